"""Distributor: decides where independent tasks run (in-process, a local Dask cluster, a running
Dask scheduler, or Slurm through dask-jobqueue). The only module that imports Dask; `extract`
sends it shards, `ablate` training runs."""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
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
    """The worker's index on its host: local workers are named 0..n-1, `dask worker --nworkers N`
    and dask-jobqueue workers NAME-0..NAME-(N-1). Otherwise a stable hash of the name (Python's
    own str hash differs from process to process, so two workers could pick the same GPU)."""
    if isinstance(name, int):
        return name
    m = re.search(r"-(\d+)$", str(name))
    return int(m.group(1)) if m else zlib.crc32(str(name).encode())


def _on_worker(fn: Callable, task, args: tuple, spec: ClusterSpec):
    """Runs inside a Dask worker: pick this worker's GPU and CPU threads, then fn(task, *args, device=)."""
    import torch
    from distributed import get_worker

    device = None  # None: the device in the task's own config
    if spec.device == "cuda" and torch.cuda.device_count() > 1:  # "cuda:N" keeps the GPU asked for
        # One worker per GPU, by the worker's index on its host (see _local_rank).
        device = f"cuda:{_local_rank(get_worker().name) % torch.cuda.device_count()}"
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


def _client(spec: ClusterSpec):
    from distributed import Client, LocalCluster

    if spec.scheduler:
        try:
            return Client(spec.scheduler, timeout="30s"), None
        except (OSError, TimeoutError, ValueError) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {spec.scheduler}: {e}") from None
    if spec.cluster == "slurm":
        try:
            cluster = _slurm_cluster(spec)
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise ClusterError(f"cannot start the Slurm cluster from {spec.cluster_config}: {e}") from None
        return Client(cluster), cluster
    gpu = spec.device.startswith("cuda")
    cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                           resources={"GPU": 1} if gpu else None, dashboard_address=None)
    return Client(cluster), cluster


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

    client, cluster = _client(spec)
    try:
        resources = {"GPU": 1} if spec.device.startswith("cuda") and not spec.scheduler else None
        futures = {client.submit(_on_worker, fn, task, args, spec, key=f"{key(task)}-{os.getpid()}",
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
