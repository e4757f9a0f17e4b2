"""Distributor: decides where shards run (in-process, a local Dask cluster, a running Dask
scheduler, or Slurm through dask-jobqueue). The only module that imports Dask."""
from __future__ import annotations

import json
import logging
import os
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


def _on_worker(task: ShardTask, cfg: ExtractConfig) -> dict:
    """Runs inside a Dask worker: pick this worker's GPU and CPU threads, then the shard."""
    import torch
    from distributed import get_worker

    worker = get_worker()
    device = None
    if cfg.clip.device.startswith("cuda") and torch.cuda.device_count() > 1 and cfg.clip.device == "cuda":
        # One worker per GPU: local workers are named 0..n-1; elsewhere hash the name.
        rank = worker.name if isinstance(worker.name, int) else abs(hash(worker.name))
        device = f"cuda:{rank % torch.cuda.device_count()}"
    # Dask's nanny sets OMP_NUM_THREADS=1; the image tower on CPU wants the cores it has.
    torch.set_num_threads(_cpu_threads(cfg.workers if cfg.scheduler is None else 1))
    return run_shard(task, cfg, device=device)


def _slurm_cluster(cfg: ExtractConfig):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise RuntimeError("--cluster slurm needs dask-jobqueue: pip install dask-jobqueue") from None
    options = {}
    if cfg.cluster_config:
        text = Path(cfg.cluster_config).read_text()
        if cfg.cluster_config.endswith((".yaml", ".yml")):
            import yaml
            options = yaml.safe_load(text) or {}
        else:
            options = json.loads(text)
    jobs = int(options.pop("jobs", cfg.workers))
    gpus = int(options.pop("gpus_per_job", 0))
    if gpus:
        options.setdefault("job_extra_directives", []).append(f"--gres=gpu:{gpus}")
        options.setdefault("worker_extra_args", []).extend(["--resources", f"GPU={gpus}"])
    cluster = SLURMCluster(**options)
    cluster.scale(jobs=jobs)
    return cluster


def _client(cfg: ExtractConfig):
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        return Client(cfg.scheduler), None
    if cfg.cluster == "slurm":
        cluster = _slurm_cluster(cfg)
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
