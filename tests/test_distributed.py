"""Which GPU each Dask worker uses and which local cluster starts (pipeline/distributed.py), without
a GPU: torch.cuda.device_count is monkeypatched, dask-cuda is a fake module in sys.modules, and the
end-to-end runs use an in-process LocalCluster (threads, so the monkeypatches reach the workers)."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

import distributed
from pipeline import distributed as D
from pipeline.distributed import ClusterSpec, cluster_kind, gpu_for_worker

UNNAMED = "tcp://127.0.0.1:40123"  # `dask worker ADDRESS` without --name is named by its address


def physical_gpu(device: str, visible: list[int]) -> int:
    """The physical GPU a torch device string lands on, for a process with these visible GPUs."""
    return visible[int(device.split(":")[1]) if ":" in device else 0]


def rotated(i: int, gpus: list[int]) -> list[int]:
    """The CUDA_VISIBLE_DEVICES dask-cuda gives its worker i (dask_cuda.utils.cuda_visible_devices)."""
    return gpus[i:] + gpus[:i]


# ---------------------------------------------------------------------------------------------
# gpu_for_worker: one GPU, several GPUs with and without dask-cuda, every kind of worker name

@pytest.mark.parametrize("name", [0, 3, "0", "SLURMCluster-2-1", UNNAMED, "anything"])
@pytest.mark.parametrize("n_gpus", [0, 1])
def test_one_visible_gpu_is_cuda_whatever_the_name(name, n_gpus):
    # one GPU, or CUDA_VISIBLE_DEVICES naming one GPU per worker: never parse the name
    assert gpu_for_worker(name, n_gpus) == "cuda"
    assert gpu_for_worker(name, n_gpus, dask_cuda_worker=True) == "cuda"


@pytest.mark.parametrize("n_gpus", [2, 3, 4, 8])
def test_local_workers_0_to_n_minus_1_get_distinct_gpus(n_gpus):
    devices = [gpu_for_worker(i, n_gpus) for i in range(n_gpus)]  # LocalCluster's names are ints
    assert devices == [f"cuda:{i}" for i in range(n_gpus)]
    assert [gpu_for_worker(str(i), n_gpus) for i in range(n_gpus)] == devices


@pytest.mark.parametrize("name, rank", [
    ("worker-0", 0), ("worker-1", 1), ("gpu-node-3", 3),          # dask worker --nworkers N --name NAME
    ("SLURMCluster-12-0", 0), ("SLURMCluster-12-1", 1),           # dask-jobqueue, processes > 1
])
def test_name_i_workers_use_their_index(name, rank):
    assert D._local_rank(name) == rank
    assert gpu_for_worker(name, 4) == f"cuda:{rank}"


def test_more_workers_than_gpus_share_them_round_robin():
    assert [gpu_for_worker(i, 2) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


@pytest.mark.parametrize("name", [UNNAMED, "tcp://node-1:8786", "worker", "worker-", "gpu-a", True])
def test_a_name_without_index_fails_loudly_instead_of_hashing(name):
    with pytest.raises(ValueError) as err:
        gpu_for_worker(name, 4)
    message = str(err.value)
    assert repr(name) in message and "--name NAME" in message and "dask cuda worker" in message


@pytest.mark.parametrize("name", [0, 1, 3, "GPU-5ab1c2d3-0000-0000-0000-000000000000", UNNAMED])
def test_dask_cuda_worker_uses_cuda_its_own_gpu(name):
    # dask-cuda names local workers by their GPU (an index or a UUID); the name is never parsed
    assert gpu_for_worker(name, 4, dask_cuda_worker=True) == "cuda"


@pytest.mark.parametrize("gpus", [[0, 1, 2, 3], [2, 3], [3, 1, 0]])
def test_dask_cuda_visible_devices_give_each_worker_its_own_physical_gpu(gpus):
    # LocalCUDACluster: worker i sees the GPUs rotated, its own first ("1,2,3,0"); `cuda` is its own
    own = [physical_gpu(gpu_for_worker(g, len(gpus), dask_cuda_worker=True), rotated(i, gpus))
           for i, g in enumerate(gpus)]
    assert own == gpus
    # ...whereas indexing the rotated list by the name could put two workers on one GPU
    if gpus == [0, 1, 2, 3]:
        naive = [physical_gpu(gpu_for_worker(g, len(gpus)), rotated(i, gpus)) for i, g in enumerate(gpus)]
        assert len(set(naive)) < len(gpus)


@pytest.mark.parametrize("inherited", [[0, 1, 2, 3], [1, 0], [3, 1, 2]])
def test_local_cluster_workers_sharing_visible_devices_get_distinct_physical_gpus(inherited):
    # without dask-cuda every worker inherits this process's CUDA_VISIBLE_DEVICES (or all GPUs)
    n = len(inherited)
    assert sorted(physical_gpu(gpu_for_worker(i, n), inherited) for i in range(n)) == sorted(inherited)


# ---------------------------------------------------------------------------------------------
# cluster_kind

@pytest.mark.parametrize("device, n_gpus, dask_cuda, workers, kind", [
    ("cuda", 4, True, 4, "dask-cuda"),
    ("cuda", 4, True, 2, "dask-cuda"),    # fewer workers: the first GPUs
    ("cuda", 2, True, 1, "dask-cuda"),
    ("cuda", 4, True, 5, "local"),        # LocalCUDACluster cannot start more workers than GPUs
    ("cuda", 4, False, 4, "local"),       # dask-cuda absent: workers 0..n-1 pick cuda:i
    ("cuda", 1, True, 1, "local"),        # one GPU: nothing to pin
    ("cuda", 0, True, 1, "local"),
    ("cuda:1", 4, True, 4, "local"),      # cuda:N keeps every worker on GPU N
    ("cpu", 4, True, 2, "local"),
    ("mps", 0, True, 1, "local"),
])
def test_cluster_kind(device, n_gpus, dask_cuda, workers, kind):
    assert cluster_kind(device, n_gpus, dask_cuda, workers) == kind


# ---------------------------------------------------------------------------------------------
# inside a worker: _started_by_dask_cuda and _on_worker

class _FakeDaskCudaPlugin:  # a plugin class as dask-cuda defines them (dask_cuda.plugins)
    pass


_FakeDaskCudaPlugin.__module__ = "dask_cuda.plugins"


class _OtherPlugin:
    pass


def fake_worker(name, preloads=(), plugins=()):
    return SimpleNamespace(name=name, preloads=[SimpleNamespace(name=p) for p in preloads],
                           plugins={f"p{i}": p for i, p in enumerate(plugins)})


def test_started_by_dask_cuda():
    assert D._started_by_dask_cuda(fake_worker(0, preloads=["dask_cuda.initialize"]))
    assert D._started_by_dask_cuda(fake_worker(0, plugins=[_FakeDaskCudaPlugin()]))
    assert not D._started_by_dask_cuda(fake_worker(0, preloads=["mymodule"], plugins=[_OtherPlugin()]))
    assert not D._started_by_dask_cuda(fake_worker(0, preloads=["dask_cudax"]))
    assert not D._started_by_dask_cuda(SimpleNamespace(name=0))  # a worker without those attributes


def device_of(task, *args, device=None):
    """A task for _on_worker and run_tasks: the device it was given and the worker it ran on."""
    try:
        worker = distributed.get_worker().name
    except ValueError:
        worker = None
    return device, worker


@pytest.fixture
def gpus(monkeypatch):
    """Set how many GPUs torch sees; torch.set_num_threads is recorded, not applied."""
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)

    def set_count(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return threads
    return set_count


@pytest.mark.parametrize("worker, n, pinned, device, expected", [
    (fake_worker(2), 4, False, "cuda", "cuda:2"),                                     # LocalCluster worker 2
    (fake_worker("node-1"), 4, False, "cuda", "cuda:1"),                              # --scheduler, NAME-i
    (fake_worker(2, preloads=["dask_cuda.initialize"]), 4, False, "cuda", "cuda"),    # LocalCUDACluster
    (fake_worker(UNNAMED, plugins=[_FakeDaskCudaPlugin()]), 4, False, "cuda", "cuda"),  # `dask cuda worker`
    (fake_worker(2), 4, True, "cuda", "cuda"),                                        # run_tasks started it
    (fake_worker(UNNAMED), 1, False, "cuda", None),                                   # one GPU: config's device
    (fake_worker(UNNAMED), 4, False, "cuda:1", None),                                 # cuda:N kept
    (fake_worker(UNNAMED), 4, False, "cpu", None),
])
def test_on_worker_device(monkeypatch, gpus, worker, n, pinned, device, expected):
    threads = gpus(n)
    monkeypatch.setattr(distributed, "get_worker", lambda: worker)
    spec = ClusterSpec(workers=4, device=device)
    assert D._on_worker(device_of, "task", (), spec, pinned)[0] == expected
    assert len(threads) == 1 and threads[0] >= 1


def test_on_worker_with_an_unnamed_worker_on_several_gpus_fails_the_task(monkeypatch, gpus):
    gpus(2)
    monkeypatch.setattr(distributed, "get_worker", lambda: fake_worker(UNNAMED))
    with pytest.raises(ValueError, match="no index on its host"):
        D._on_worker(device_of, "task", (), ClusterSpec(workers=2, device="cuda"))


# ---------------------------------------------------------------------------------------------
# the local-cluster factory, with a fake dask_cuda

class Recorder:
    """Stands in for a cluster class: records each call's keyword arguments."""

    def __init__(self, label):
        self.label, self.calls = label, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.label


@pytest.fixture
def fake_dask_cuda(monkeypatch):
    module = types.ModuleType("dask_cuda")
    module.LocalCUDACluster = Recorder("LocalCUDACluster")
    monkeypatch.setitem(sys.modules, "dask_cuda", module)
    return module.LocalCUDACluster


@pytest.fixture
def local_cluster(monkeypatch):
    recorder = Recorder("LocalCluster")
    monkeypatch.setattr(distributed, "LocalCluster", recorder)
    return recorder


@pytest.mark.parametrize("workers", [4, 2])
def test_factory_takes_local_cuda_cluster_on_several_gpus(gpus, fake_dask_cuda, local_cluster, workers):
    gpus(4)
    cluster, pinned = D._local_cluster(ClusterSpec(workers=workers, device="cuda"))
    assert (cluster, pinned) == ("LocalCUDACluster", True)
    assert fake_dask_cuda.calls == [{"n_workers": workers, "threads_per_worker": 1, "resources": {"GPU": 1},
                                     "dashboard_address": None}]
    assert local_cluster.calls == []


@pytest.mark.parametrize("device, n, workers, resources", [
    ("cuda", 4, 6, {"GPU": 1}),    # more workers than GPUs
    ("cuda", 1, 1, {"GPU": 1}),    # one GPU
    ("cuda:1", 4, 4, {"GPU": 1}),  # one GPU asked for
    ("cpu", 4, 2, None),
])
def test_factory_keeps_local_cluster_otherwise(gpus, fake_dask_cuda, local_cluster, device, n, workers, resources):
    gpus(n)
    assert D._local_cluster(ClusterSpec(workers=workers, device=device)) == ("LocalCluster", False)
    assert fake_dask_cuda.calls == []
    assert local_cluster.calls == [{"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                    "resources": resources, "dashboard_address": None}]


def test_factory_without_dask_cuda_keeps_local_cluster(monkeypatch, gpus, local_cluster, caplog):
    gpus(4)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # `import dask_cuda` raises ImportError
    assert D._import_dask_cuda() is None
    with caplog.at_level("INFO", logger="pipeline.distributed"):
        assert D._local_cluster(ClusterSpec(workers=4, device="cuda")) == ("LocalCluster", False)
    assert local_cluster.calls[0]["n_workers"] == 4
    assert "pip install -e '.[gpu]'" in caplog.text


# ---------------------------------------------------------------------------------------------
# end to end through run_tasks, on an in-process cluster (worker threads see the monkeypatches)

_LocalCluster = distributed.LocalCluster  # the real one, whatever a test monkeypatches


def in_process_cluster(**kwargs):
    return _LocalCluster(n_workers=kwargs["n_workers"], threads_per_worker=1, processes=False,
                                    resources=kwargs["resources"], dashboard_address=None)


def test_run_tasks_with_fake_local_cuda_cluster_gives_cuda(monkeypatch, gpus, fake_dask_cuda):
    gpus(2)
    calls = []
    sys.modules["dask_cuda"].LocalCUDACluster = lambda **kw: calls.append(kw) or in_process_cluster(**kw)
    results = dict(D.run_tasks(device_of, list(range(4)), ClusterSpec(workers=2, device="cuda")))
    assert calls[0]["n_workers"] == 2
    assert {device for device, _ in results.values()} == {"cuda"}  # pinned: each worker's own GPU


def test_run_tasks_without_dask_cuda_gives_cuda_i_by_worker_index(monkeypatch, gpus):
    gpus(2)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    monkeypatch.setattr(distributed, "LocalCluster", lambda processes, **kw: in_process_cluster(**kw))
    results = dict(D.run_tasks(device_of, list(range(6)), ClusterSpec(workers=2, device="cuda")))
    assert len(results) == 6 and not any(isinstance(r, Exception) for r in results.values())
    for device, worker in results.values():
        assert worker in (0, 1) and device == f"cuda:{worker}"  # LocalCluster names its workers 0..n-1
