"""The `extract` job: list the inputs, plan shards, run the missing ones, consolidate tables.

A rerun reuses the saved plan (new videos go to new shards), skips every shard whose
directory exists with the same input fingerprint, and redoes the rest. A lock file keeps
two runs off the same output folder.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema as S
from .atomic import atomic_path, atomic_write_text
from .captions import VIDEO_EXTENSIONS, Caption, Failure, VideoIndex, find_videos, read_captions
from .config import ExtractConfig
from .encode import RANDOM_WEIGHTS
from .keywords import keyword_model_name
from .runner import ShardTask, run_shard, shard_fingerprint
from .write import remove_stale_temporaries

log = logging.getLogger(__name__)


class ExtractError(RuntimeError):
    """A problem with the run as a whole (not with one video): nothing is started."""


@contextmanager
def output_lock(out: Path):
    """Hold OUT/.extract.lock for the whole run; a second run stops at once."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / S.LOCK_FILE, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip() or "unknown"
        fh.close()
        raise ExtractError(f"another extract is already writing to {out} (pid {owner}); "
                           "wait for it to finish or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _atomic_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _versions() -> dict:
    names = ("torch", "open_clip_torch", "keybert", "sentence-transformers", "simplemma", "h5py",
             "pyarrow", "dask", "distributed", "ffmpeg-python", "imageio-ffmpeg", "numpy")
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_previous(cfg: ExtractConfig, overwrite: bool) -> None:
    """Refuse to mix features of different models in one folder; --overwrite starts afresh."""
    out = cfg.out_path
    if overwrite:
        shutil.rmtree(out / S.SHARDS_DIR, ignore_errors=True)
        for name in (S.PLAN_FILE, S.MANIFEST_FILE, S.ALL_CAPTIONS_FILE, S.FAILURES_FILE, S.SUMMARY_FILE,
                     S.CLIP_BLOCKS_FILE, S.CLIP_TAIL_FILE):
            (out / name).unlink(missing_ok=True)
        return
    previous = out / S.CONFIG_FILE
    if not previous.exists() or not (out / S.SHARDS_DIR).exists():
        return
    try:
        before = ExtractConfig.from_dict(json.loads(previous.read_text())["config"]).feature_settings()
    except (ValueError, KeyError, TypeError) as e:
        raise ExtractError(f"{previous} is unreadable ({e}); use --overwrite to start afresh") from None
    if before != cfg.feature_settings():
        raise ExtractError(f"{out} holds features made with {json.dumps(before)}, not "
                           f"{json.dumps(cfg.feature_settings())}; use another --out, or --overwrite")


def _tail_attrs(cfg: ExtractConfig) -> dict:
    """What the saved tail must match besides K: the model, its weights tag and, for a local file, its stamp."""
    return {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained,
            "checkpoint": encoder_sources(cfg).get("checkpoint")}


def _write_clip_files(cfg: ExtractConfig) -> None:
    """CLIP weights saved beside the shards (pipeline/clip_init.py), loaded once on the CPU when one is due:
    the first text blocks for the heads' temporal encoder (written when missing, also over a folder made
    before they existed), and with --cache-blocks K the towers' tails (rewritten when K or the weights
    changed; removed when K is 0, as the shards will hold no tokens for them)."""
    from .clip_init import save_tail, save_text_blocks, tail_file_info
    from .encode import CacheBlocksError, ModelSpec, load_clip

    out = cfg.out_path
    tail = out / S.CLIP_TAIL_FILE
    want_blocks = not (out / S.CLIP_BLOCKS_FILE).exists()
    want_tail = False
    if cfg.cache_blocks:
        info = tail_file_info(tail) or {}
        want_tail = (info.get("cache_blocks"), {k: info.get(k) for k in _tail_attrs(cfg)}) != \
            (cfg.cache_blocks, _tail_attrs(cfg))
    else:
        tail.unlink(missing_ok=True)
    if not (want_blocks or want_tail):
        return
    model = load_clip(ModelSpec(model=cfg.clip.model, pretrained=cfg.clip.pretrained, device="cpu"))
    if want_tail:
        try:
            save_tail(model, cfg.cache_blocks, out, _tail_attrs(cfg))
        except CacheBlocksError as e:
            raise ExtractError(f"{cfg.clip.model}: {e}") from None
    if want_blocks:
        save_text_blocks(model, out, {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained})


def plan_shards(out: Path, videos: list[str], shard_size: int) -> list[list[str]]:
    """The saved plan, with videos it does not know yet appended as new shards."""
    path = out / S.PLAN_FILE
    shards: list[list[str]] = json.loads(path.read_text())["shards"] if path.exists() else []
    known = {v for shard in shards for v in shard}
    new = [v for v in videos if v not in known]
    shards += [new[i:i + shard_size] for i in range(0, len(new), shard_size)]
    _atomic_json(path, {"shard_size": shard_size, "shards": shards})
    return shards


def _done_fingerprint(shard_dir: Path) -> str | None:
    try:
        return json.loads((shard_dir / S.META_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


@dataclass
class Inputs:
    videos: list[str]
    captions: list[Caption] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def list_inputs(cfg: ExtractConfig) -> Inputs:
    root = Path(cfg.videos)
    if not root.is_dir():
        raise ExtractError(f"videos folder {root} does not exist or is not a folder")
    videos = find_videos(root)
    captions_file = Path(cfg.captions) if cfg.captions else None
    if captions_file is None:
        return Inputs(videos)
    if not captions_file.is_file():
        raise ExtractError(f"captions file {captions_file} does not exist")
    captions, failures = read_captions(captions_file, VideoIndex(root, videos))
    return Inputs(videos, captions, failures)


def file_stamp(path: Path) -> list[int] | None:
    """[size, modification time in ns] of a file: another file under the same name differs."""
    try:
        st = path.stat()
    except OSError:  # gone or unreadable: its shard records the decoder's error
        return None
    return [st.st_size, st.st_mtime_ns]


def encoder_sources(cfg: ExtractConfig) -> dict:
    """What encodes the features, beyond feature_settings' names: a local checkpoint file (path, size,
    modification time); the keyword model is resolved per shard, see _tasks."""
    sources: dict = {"settings": cfg.feature_settings()}
    if cfg.cache_settings():  # absent at K = 0: the fingerprints of folders made before caches existed hold
        sources["cache"] = cfg.cache_settings()
    pretrained = cfg.clip.pretrained
    if pretrained.lower() != RANDOM_WEIGHTS and Path(pretrained).exists():  # as load_clip tells a path from a tag
        sources["checkpoint"] = [str(Path(pretrained).resolve()), *(file_stamp(Path(pretrained)) or [])]
    return sources


def _keyword_model(cfg: ExtractConfig) -> str:
    """The keyword model's name with "auto" resolved, so that a change of what it stands for redoes the shards."""
    try:
        return keyword_model_name(cfg.keywords.model)
    except RuntimeError as e:  # no keyword model offline: say so before any work
        raise ExtractError(f"{e} (or --keywords 0 for no keywords)") from None


def _tasks(cfg: ExtractConfig, inputs: Inputs) -> tuple[list[ShardTask], list[ShardTask]]:
    """(all tasks of the plan, those still to do): a shard is done when its meta.json holds the
    fingerprint of its inputs as they are now (see shard_fingerprint)."""
    out, root = cfg.out_path, Path(cfg.videos)
    by_video: dict[str, list[Caption]] = {}
    for c in inputs.captions:
        by_video.setdefault(c.video_id, []).append(c)
    sources = encoder_sources(cfg)
    keyword_model = _keyword_model(cfg) if inputs.captions and cfg.keywords.top_k > 0 else None
    tasks = []
    for i, vs in enumerate(plan_shards(out, inputs.videos, cfg.shard_size)):
        if not vs:
            continue
        videos, captions = tuple(vs), tuple(c for v in vs for c in by_video.get(v, ()))
        used = {**sources, "keyword_model": keyword_model} if captions and keyword_model else sources
        fingerprint = shard_fingerprint(videos, captions, [file_stamp(root / v) for v in videos], used)
        tasks.append(ShardTask(i, videos, captions, fingerprint))
    todo = [t for t in tasks if _done_fingerprint(out / S.SHARDS_DIR / S.shard_name(t.index)) != t.fingerprint]
    return tasks, todo


def consolidate(out: Path, tasks: list[ShardTask], input_failures: list[Failure]) -> dict:
    """Rebuild the folder-level manifest, captions table and failures.csv from the shards."""
    videos, captions, failures = [], [], [f.__dict__ for f in input_failures]
    missing = []
    for t in tasks:
        d = out / S.SHARDS_DIR / S.shard_name(t.index)
        if not (d / S.META_FILE).exists():
            missing.append(t.index)
            continue
        videos.append(pq.read_table(d / S.VIDEOS_FILE))
        captions.append(pq.read_table(d / S.CAPTIONS_FILE))
        failures += json.loads((d / S.META_FILE).read_text()).get("failures", [])
    manifest = pa.concat_tables(videos) if videos else S.VIDEO_SCHEMA.empty_table()
    caps = pa.concat_tables(captions) if captions else S.CAPTION_SCHEMA.empty_table()
    for table, name in ((manifest, S.MANIFEST_FILE), (caps, S.ALL_CAPTIONS_FILE)):
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    for index in missing:
        failures.append({"path": str(out / S.SHARDS_DIR / S.shard_name(index)), "stage": "shard",
                         "error": "shard not written (its task failed); rerun extract to redo it"})
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=S.FAILURE_COLUMNS)
    writer.writeheader()
    writer.writerows({k: r.get(k, "") for k in S.FAILURE_COLUMNS} for r in failures)
    atomic_write_text(out / S.FAILURES_FILE, table.getvalue())
    status = manifest.column("status").to_pylist()
    return {"videos": len(status), "ok": status.count(S.STATUS_OK), "failed": status.count(S.STATUS_FAILED),
            "frames": int(pc.sum(manifest.column("num_frames")).as_py() or 0),
            "captions": caps.num_rows, "failures": len(failures), "missing_shards": missing}


def extract(cfg: ExtractConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the whole job; returns the summary that is also written to OUT/summary.json."""
    from tqdm import tqdm

    from .distributed import ClusterSpec, run_tasks

    out = cfg.out_path
    start = time.perf_counter()
    with output_lock(out):
        _check_previous(cfg, overwrite)
        inputs = list_inputs(cfg)
        if not inputs.videos:
            raise ExtractError(f"no video files found in {cfg.videos} "
                               f"(looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
        _write_clip_files(cfg)  # first: a model that cannot serve --cache-blocks stops the run here
        _atomic_json(out / S.CONFIG_FILE, {"config": cfg.to_dict(), "schema_version": S.SCHEMA_VERSION,
                                           **({"schema_minor": S.SCHEMA_MINOR} if cfg.cache_blocks else {}),
                                           "versions": _versions()})
        remove_stale_temporaries(out)
        tasks, todo = _tasks(cfg, inputs)
        skipped = sum(len(t.videos) for t in tasks) - sum(len(t.videos) for t in todo)
        bar = tqdm(total=sum(len(t.videos) for t in todo), unit="video", disable=not progress,
                   desc=f"extract {len(todo)}/{len(tasks)} shards", dynamic_ncols=True)
        frames = 0
        t_run = time.perf_counter()

        def advance(n_videos: int, n_frames: int) -> None:
            nonlocal frames
            frames += n_frames
            bar.update(n_videos)
            elapsed = max(time.perf_counter() - t_run, 1e-9)
            bar.set_postfix(videos_s=f"{bar.n / elapsed:.1f}", frames_s=f"{frames / elapsed:.1f}")

        shard_summaries, shard_errors = [], []
        per_video = cfg.cluster == "none"
        spec = ClusterSpec(cluster=cfg.cluster, workers=cfg.workers, scheduler=cfg.scheduler,
                           cluster_config=cfg.cluster_config, device=cfg.clip.device)
        on_video = {"on_video": (lambda n: advance(1, n))} if per_video else None
        for task, result in run_tasks(run_shard, todo, spec, cfg, key=lambda t: f"shard-{t.index}",
                                      local_kwargs=on_video):
            if isinstance(result, Exception):
                shard_errors.append({"shard": task.index, "error": f"{type(result).__name__}: {result}"})
                if not per_video:
                    advance(len(task.videos), 0)
                continue
            shard_summaries.append({k: v for k, v in result.items() if k != "failures"})
            if not per_video:
                advance(result["videos"], result["frames"])
        bar.close()
        # A worker killed while writing leaves a temporary shard; its task ran again elsewhere.
        remove_stale_temporaries(out)
        totals = consolidate(out, tasks, inputs.failures)
        run_seconds = time.perf_counter() - t_run
        done_frames = sum(s["frames"] for s in shard_summaries)
        summary = {
            **totals, "shards": len(tasks), "shards_done_now": len(shard_summaries),
            "shard_errors": shard_errors, "videos_skipped_complete": skipped,
            "videos_done_now": sum(s["videos"] for s in shard_summaries),
            "seconds": round(time.perf_counter() - start, 2),
            "frames_per_s": round(done_frames / run_seconds, 2) if shard_summaries else None,
            "decode_wait_share": round(sum(s["decode_wait_s"] for s in shard_summaries)
                                       / max(1e-9, sum(s["seconds"] for s in shard_summaries)), 3)
            if shard_summaries else None,
            "shard_timings": shard_summaries,
        }
        _atomic_json(out / S.SUMMARY_FILE, summary)
    return summary


def exit_code(summary: dict, strict: bool) -> int:
    """0 unless nothing succeeded, a shard is missing, or --strict and anything failed."""
    if summary["ok"] == 0 or summary["missing_shards"]:
        return 1
    if strict and summary["failures"]:
        return 1
    return 0
