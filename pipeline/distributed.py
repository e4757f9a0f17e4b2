"""Distributor: decides where independent tasks run (in-process, a local Dask cluster, a running
Dask scheduler, or Slurm through dask-jobqueue) and which GPU each worker uses (dask-cuda's
LocalCUDACluster on a machine with several GPUs when the `gpu` extra is installed, see
cluster_kind and gpu_for_worker). The only module that imports Dask; `extract` sends it shards,
`ablate` training runs."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    from .config import ExtractConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ClusterSpec:
    """Where the tasks run; the CLI fills it from --cluster, --scheduler, --cluster-config, --workers."""
    cluster: str = "local"             # local | slurm | none (in-process, one task after the other, no Dask)
    workers: int = 1                   # local Dask workers; Slurm jobs unless the config file says `jobs`
    scheduler: str | None = None       # address of a running Dask scheduler (instead of local or slurm)
    cluster_config: str | None = None  # YAML/JSON options for --cluster slurm (see slurm_options)
    device: str = "cpu"                # the tasks' device; on CUDA each task holds one GPU (Dask resource GPU=1)


def _cpu_threads(workers_on_host: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers_on_host))


def _local_rank(name) -> int:
    """The worker's index on its host, from its name: LocalCluster names its workers 0..n-1,
    `dask worker --nworkers N --name NAME` and dask-jobqueue NAME-0..NAME-(N-1). Any other name
    (a worker started without --name is named by its address) gives no index: ValueError, never
    a guess (a hash of the name could put two workers on one GPU)."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    m = re.fullmatch(r"\d+", str(name)) or re.search(r"-(\d+)$", str(name))
    if m is None:
        raise ValueError(
            f"cannot choose a GPU for Dask worker {name!r}: its name gives no index on its host "
            "(expected 0, 1, ... or NAME-0, NAME-1, ...). Start workers with "
            "`dask worker ADDRESS --nworkers N --nthreads 1 --name NAME`, or with `dask cuda worker "
            "ADDRESS` (dask-cuda), or give each worker one GPU through CUDA_VISIBLE_DEVICES")
    return int(m.group(1) if m.groups() else m.group(0))


def gpu_for_worker(name, n_gpus: int, dask_cuda_worker: bool = False) -> str:
    """The device for a task asked to run on plain `cuda`, on a worker named `name` that sees
    n_gpus GPUs (torch.cuda.device_count() there).

    - One GPU visible (one GPU, or CUDA_VISIBLE_DEVICES naming one GPU per worker): `cuda`.
    - A worker started by dask-cuda (LocalCUDACluster, `dask cuda worker`): `cuda`. dask-cuda
      gives each worker its own CUDA_VISIBLE_DEVICES with that worker's GPU first (worker 2 of 4
      sees 2,3,0,1), so device 0 is its own GPU and no two workers share one.
    - Otherwise `cuda:{rank % n_gpus}`, rank from the worker's name (_local_rank; ValueError when
      the name gives none): workers 0..n_gpus-1 get distinct GPUs; more workers than GPUs share
      them round robin.
    """
    if n_gpus <= 1 or dask_cuda_worker:
        return "cuda"
    return f"cuda:{_local_rank(name) % n_gpus}"


def cluster_kind(device: str, n_gpus: int, dask_cuda_available: bool, workers: int = 1) -> str:
    """Which local cluster to start: "dask-cuda" (dask_cuda.LocalCUDACluster, one worker pinned to
    each GPU) for plain `cuda` with more than one GPU visible, dask-cuda installed and no more
    workers than GPUs (LocalCUDACluster cannot start more); "local" (distributed.LocalCluster,
    workers 0..n-1 pick their GPU by that index, see gpu_for_worker) otherwise. `cuda:N` keeps
    every worker on GPU N, so it never takes dask-cuda (which renumbers each worker's GPUs)."""
    if device == "cuda" and n_gpus > 1 and dask_cuda_available and workers <= n_gpus:
        return "dask-cuda"
    return "local"


def _started_by_dask_cuda(worker) -> bool:
    """Whether dask-cuda started this worker (LocalCUDACluster or `dask cuda worker`): both add the
    preload dask_cuda.initialize and their own worker plugins (CPU affinity, RMM, ...)."""
    names = [str(getattr(p, "name", "")) for p in getattr(worker, "preloads", None) or ()]
    names += [type(p).__module__ for p in (getattr(worker, "plugins", None) or {}).values()]
    return any(n == "dask_cuda" or n.startswith("dask_cuda.") for n in names)


def _on_worker(fn: Callable, task, args: tuple, spec: ClusterSpec, pinned: bool = False):
    """Runs inside a Dask worker: pick this worker's GPU and CPU threads, then fn(task, *args, device=).
    pinned: the worker comes from the LocalCUDACluster run_tasks started (its GPU is `cuda`)."""
    import torch
    from distributed import get_worker

    device = None  # None: the device in the task's own config
    if spec.device == "cuda" and (n_gpus := torch.cuda.device_count()) > 1:  # "cuda:N" keeps the GPU asked for
        worker = get_worker()
        device = gpu_for_worker(worker.name, n_gpus, pinned or _started_by_dask_cuda(worker))
    # Dask's nanny sets OMP_NUM_THREADS=1; torch on CPU wants the cores this worker has.
    torch.set_num_threads(_cpu_threads(spec.workers if spec.scheduler is None else 1))
    return fn(task, *args, device=device)


def slurm_options(cfg: ClusterSpec | ExtractConfig) -> tuple[dict, int]:
    """(SLURMCluster keyword arguments, number of jobs) from cfg.cluster_config (any config with
    `cluster_config` and `workers`: a ClusterSpec, or extract's ExtractConfig).

    Keys are SLURMCluster's own (queue, account, cores, memory, processes, walltime,
    job_extra_directives, worker_extra_args, ...) plus four of ours: `jobs` (how many Slurm jobs
    to keep running, default --workers), `gpus_per_job` (adds --gres=gpu:N and Dask resources
    GPU, one worker process per GPU unless `processes` says otherwise), `lifetime` and
    `lifetime_stagger` (dask worker --lifetime/--lifetime-stagger: workers retire cleanly before
    the walltime and new jobs replace them).
    """
    options: dict = {}
    if cfg.cluster_config:
        text = Path(cfg.cluster_config).read_text()
        if cfg.cluster_config.endswith((".yaml", ".yml")):
            import yaml
            options = yaml.safe_load(text) or {}
        else:
            options = json.loads(text)
    if not isinstance(options, dict):
        raise ValueError(f"{cfg.cluster_config}: expected a mapping of SLURMCluster options")
    options = dict(options)
    jobs = int(options.pop("jobs", cfg.workers))
    gpus = int(options.pop("gpus_per_job", 0))
    lifetime, stagger = options.pop("lifetime", None), options.pop("lifetime_stagger", None)
    directives = list(options.pop("job_extra_directives", None) or [])
    worker_args = [str(a) for a in options.pop("worker_extra_args", None) or []]
    if gpus:
        options.setdefault("processes", gpus)  # one worker per GPU
        directives.append(f"--gres=gpu:{gpus}")
        worker_args += ["--resources", f"GPU={max(1, gpus // int(options['processes']))}"]
    if lifetime:
        worker_args += ["--lifetime", str(lifetime)]
        if stagger:
            worker_args += ["--lifetime-stagger", str(stagger)]
    if directives:
        options["job_extra_directives"] = directives
    if worker_args:
        options["worker_extra_args"] = worker_args
    return options, jobs


def _slurm_cluster(spec: ClusterSpec):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise RuntimeError("--cluster slurm needs dask-jobqueue: pip install dask-jobqueue") from None
    options, jobs = slurm_options(spec)
    cluster = SLURMCluster(**options)
    # adapt, not scale: a job that reaches its walltime or worker lifetime is replaced.
    cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
    return cluster


class ClusterError(RuntimeError):
    """The cluster could not be reached or started; nothing was run."""


def _visible_gpus() -> int:
    import torch
    return torch.cuda.device_count()


def _import_dask_cuda():
    """The dask_cuda module (the `gpu` extra), or None when it is not installed."""
    try:
        import dask_cuda
    except ImportError:
        return None
    return dask_cuda


def _local_cluster(spec: ClusterSpec):
    """(cluster, pinned): a LocalCUDACluster (pinned=True) or a LocalCluster, see cluster_kind."""
    from distributed import LocalCluster

    resources = {"GPU": 1} if spec.device.startswith("cuda") else None
    n_gpus = _visible_gpus() if spec.device == "cuda" else 0
    dask_cuda = _import_dask_cuda() if n_gpus > 1 else None
    if cluster_kind(spec.device, n_gpus, dask_cuda is not None, spec.workers) == "dask-cuda":
        # One worker per GPU, each with its own CUDA_VISIBLE_DEVICES (its GPU first) and the CPU
        # cores near its GPU; CUDA_VISIBLE_DEVICES of this process, if set, limits the GPUs used.
        cluster = dask_cuda.LocalCUDACluster(n_workers=spec.workers, threads_per_worker=1,
                                             resources=resources, dashboard_address=None)
        return cluster, True
    if n_gpus > 1:
        if dask_cuda is None:
            log.info("dask-cuda is not installed: %d local workers pick cuda:0..cuda:%d by their index "
                     "(pip install -e '.[gpu]' pins one worker per GPU)", spec.workers, n_gpus - 1)
        if spec.workers > n_gpus:
            log.warning("%d workers on %d GPUs: workers share GPUs (worker i uses cuda:i %% %d)",
                        spec.workers, n_gpus, n_gpus)
    # LocalCluster names its workers 0..n-1, the index _local_rank reads.
    cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                           resources=resources, dashboard_address=None)
    return cluster, False


def _client(spec: ClusterSpec):
    """(client, cluster or None, pinned): pinned when each worker has its own GPU as `cuda`."""
    from distributed import Client

    if spec.scheduler:
        try:
            return Client(spec.scheduler, timeout="30s"), None, False
        except (OSError, TimeoutError, ValueError) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {spec.scheduler}: {e}") from None
    if spec.cluster == "slurm":
        try:
            cluster = _slurm_cluster(spec)
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise ClusterError(f"cannot start the Slurm cluster from {spec.cluster_config}: {e}") from None
        return Client(cluster), cluster, False
    cluster, pinned = _local_cluster(spec)
    return Client(cluster), cluster, pinned


def run_tasks(fn: Callable[..., Any], tasks: Sequence[T], spec: ClusterSpec, *args, key: Callable[[T], str] = str,
              local_kwargs: dict | None = None) -> Iterator[tuple[T, Any]]:
    """Run fn(task, *args) for every task, one task per worker at a time; yield (task, result) as
    each finishes, or (task, error) when it raised (the others go on).

    fn must be importable by name (a module-level function): Dask sends the reference, the task
    and args, never a loaded model. On a worker fn also gets device= (that worker's GPU, or None
    for the device in its config); in-process it gets local_kwargs instead (callbacks, which
    cannot travel). A killed worker's task runs again on another worker, so fn must be safe to
    run twice. key(task) names the task on the Dask dashboard.
    """
    if not tasks:
        return
    if spec.cluster == "none":
        for task in tasks:
            try:
                yield task, fn(task, *args, **(local_kwargs or {}))
            except Exception as e:
                log.exception("task %s failed", key(task))
                yield task, e
        return
    from distributed import as_completed

    client, cluster, pinned = _client(spec)
    try:
        resources = {"GPU": 1} if spec.device.startswith("cuda") and not spec.scheduler else None
        futures = {client.submit(_on_worker, fn, task, args, spec, pinned, key=f"{key(task)}-{os.getpid()}",
                                 pure=False, resources=resources): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                yield task, future.result()
            except Exception as e:
                log.error("task %s failed: %s", key(task), e)
                yield task, e
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
