"""Distributor: decides where shards run (in-process, a local Dask cluster, a running Dask
scheduler, or Slurm through dask-jobqueue). The only module that imports Dask."""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Callable, Iterator

from .config import ExtractConfig
from .runner import ShardTask, run_shard

log = logging.getLogger(__name__)


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


def _on_worker(task: ShardTask, cfg: ExtractConfig) -> dict:
    """Runs inside a Dask worker: pick this worker's GPU and CPU threads, then the shard."""
    import torch
    from distributed import get_worker

    worker = get_worker()
    device = None
    if cfg.clip.device == "cuda" and torch.cuda.device_count() > 1:  # "cuda:N" keeps the GPU asked for
        # One worker per GPU, by the worker's index on its host (see _local_rank).
        rank = _local_rank(worker.name)
        device = f"cuda:{rank % torch.cuda.device_count()}"
    # Dask's nanny sets OMP_NUM_THREADS=1; the image tower on CPU wants the cores it has.
    torch.set_num_threads(_cpu_threads(cfg.workers if cfg.scheduler is None else 1))
    return run_shard(task, cfg, device=device)


def slurm_options(cfg: ExtractConfig) -> tuple[dict, int]:
    """(SLURMCluster keyword arguments, number of jobs) from the --cluster-config file.

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


def _slurm_cluster(cfg: ExtractConfig):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise RuntimeError("--cluster slurm needs dask-jobqueue: pip install dask-jobqueue") from None
    options, jobs = slurm_options(cfg)
    cluster = SLURMCluster(**options)
    # adapt, not scale: a job that reaches its walltime or worker lifetime is replaced.
    cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
    return cluster


class ClusterError(RuntimeError):
    """The cluster could not be reached or started; nothing was run."""


def _client(cfg: ExtractConfig):
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            return Client(cfg.scheduler, timeout="30s"), None
        except (OSError, TimeoutError, ValueError) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {cfg.scheduler}: {e}") from None
    if cfg.cluster == "slurm":
        try:
            cluster = _slurm_cluster(cfg)
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise ClusterError(f"cannot start the Slurm cluster from {cfg.cluster_config}: {e}") from None
        return Client(cluster), cluster
    gpu = cfg.clip.device.startswith("cuda")
    cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                           resources={"GPU": 1} if gpu else None, dashboard_address=None)
    return Client(cluster), cluster


def run_tasks(tasks: list[ShardTask], cfg: ExtractConfig,
              on_video: Callable[[int], None] | None = None) -> Iterator[tuple[ShardTask, dict | Exception]]:
    """Run every task; yield (task, summary) as each finishes, or (task, error) when a shard
    itself failed (the run goes on; a rerun redoes that shard)."""
    if not tasks:
        return
    if cfg.cluster == "none":
        for task in tasks:
            try:
                yield task, run_shard(task, cfg, on_video=on_video)
            except Exception as e:
                log.exception("shard %d failed", task.index)
                yield task, e
        return
    from distributed import as_completed

    client, cluster = _client(cfg)
    try:
        resources = {"GPU": 1} if cfg.clip.device.startswith("cuda") and not cfg.scheduler else None
        futures = {client.submit(_on_worker, task, cfg, key=f"shard-{task.index}-{os.getpid()}",
                                 pure=False, resources=resources): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                yield task, future.result()
            except Exception as e:
                log.error("shard %d failed: %s", task.index, e)
                yield task, e
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
