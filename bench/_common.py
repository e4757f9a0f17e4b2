"""Shared bits of the benchmarks: the machine description, a table printer, the JSON result file, cold reads
and cached synthetic shards in the extract format."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DV, DT, D = 768, 512, 512  # ViT-B/32: image width before projection, text width, joint embedding


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: str = "cpu") -> dict:
    import torch
    info = {"cpu": cpu_model(), "cores": cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "python": platform.python_version(),
            # other jobs on a shared machine: the 1-minute load average when the figures were taken
            "load_average_1m": round(os.getloadavg()[0], 2)}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def resolve(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_table(title: str, info: dict, rows: list[tuple[str, object, str]]) -> None:
    """rows: (name, value, note)."""
    print(f"\n== {title} ==")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    width = max(len(r[0]) for r in rows) if rows else 10
    for name, value, note in rows:
        v = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {v:>12}  {note}")


def evict(folder: Path) -> None:
    """Drop the files of folder from the page cache (where the OS allows), so the next read is cold."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


MSRVTT_MEAN_WORDS = 9.3  # words per MSR-VTT caption (its paper); SOT..EOT adds 2 tokens
POOL_ROWS = 1 << 15  # random feature rows drawn per array; shards pick rows from them (values do not matter here)


@dataclass
class ShardSet:
    """A cached set of synthetic shards in the extract format."""
    folder: str
    videos: int
    captions: int
    shards: int
    frames: int
    tokens: int
    disk_bytes: int
    write_s: float
    reused: bool = False


def msrvtt_shards(cache: Path, n_videos: int, caps_per_video: int, shard_videos: int = 64, split: str = "train",
                  seed: int = 0) -> ShardSet:
    """MSR-VTT-sized shards (ViT-B/32 widths), written once with write_shard and kept in cache.

    Videos last 10-30 s (10 + an exponential of mean 5 s, capped: mean ~15 s, as MSR-VTT's 41 hours over
    10k clips), one frame per second; captions have 4 + Poisson(5.3) words (mean 9.3, MSR-VTT's) and
    words + 2 tokens (SOT..EOT); each caption names 3 of its shard's 400 keyword rows, in any order, some
    repeated. Feature rows are copies of rows of a random pool, so writing 2 GB takes seconds; the loader
    reads them like any other rows."""
    import numpy as np
    from pipeline import schema as S
    from pipeline.write import ShardData, write_shard

    name = f"msrvtt-{split}-v{n_videos}-c{caps_per_video}-s{shard_videos}-seed{seed}-schema{S.SCHEMA_VERSION}"
    final = cache / name
    done = final / "bench-shards.json"
    if done.exists():
        return ShardSet(**{**json.loads(done.read_text()), "folder": str(final), "reused": True})
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    frame_pool = rng.standard_normal((POOL_ROWS, DV), np.float32).astype(np.float16)
    token_pool = rng.standard_normal((POOL_ROWS, DT), np.float32).astype(np.float16)
    image_proj = (rng.standard_normal((DV, D)) / np.sqrt(DV)).astype(np.float32)
    text_proj = (rng.standard_normal((DT, D)) / np.sqrt(DT)).astype(np.float32)
    n_keywords, caption_id, total_frames, total_tokens = 400, 0, 0, 0
    shards = list(range(0, n_videos, shard_videos))
    for index, start in enumerate(shards):
        vids = range(start, min(n_videos, start + shard_videos))
        seconds = np.minimum(10 + rng.exponential(5.0, len(vids)), 30.0)
        counts = np.maximum(1, np.round(seconds)).astype(np.int64)
        data = ShardData(index)
        n_frames = n_tokens = 0
        lengths = np.minimum(77, 2 + 4 + rng.poisson(MSRVTT_MEAN_WORDS - 4, len(vids) * caps_per_video))
        for j, v in enumerate(vids):
            vid = f"video{v}.mp4"
            data.videos.append({"video_id": vid, "path": f"/synthetic/{vid}", "duration": float(seconds[j]),
                                "num_frames": int(counts[j]), "frame_start": n_frames, "status": S.STATUS_OK,
                                "error": "", "shard": index})
            data.frame_times.append(np.arange(counts[j], dtype=np.float32) + 0.5)
            n_frames += int(counts[j])
            for c in range(caps_per_video):
                length = int(lengths[j * caps_per_video + c])
                data.captions.append({"caption_id": caption_id, "video_id": vid, "split": split,
                                      "caption": "synthetic", "keywords": ["a", "b", "c"],
                                      "token_start": n_tokens, "num_tokens": length, "shard": index})
                n_tokens += length
                caption_id += 1
        # write_shard concatenates the per-video (per-caption) blocks: one block each holds the same rows
        data.frames = [frame_pool[rng.integers(0, POOL_ROWS, n_frames)]]
        data.tokens = [token_pool[rng.integers(0, POOL_ROWS, n_tokens)]]
        data.keyword_features = token_pool[rng.integers(0, POOL_ROWS, n_keywords)]
        data.keyword_index = rng.integers(0, n_keywords, (len(data.captions), 3)).astype(np.int32)
        data.meta = {"shard": index, "synthetic": True}
        write_shard(tmp, data, image_proj, text_proj, {"model": "ViT-B-32", "pretrained": "synthetic"})
        total_frames, total_tokens = total_frames + n_frames, total_tokens + n_tokens
        if index % 20 == 0 or index == len(shards) - 1:
            print(f"  shard {index + 1}/{len(shards)} written", flush=True)
    disk = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    info = ShardSet(str(final), n_videos, caption_id, len(shards), total_frames, total_tokens, disk,
                    round(time.perf_counter() - t0, 1))
    (tmp / "bench-shards.json").write_text(json.dumps(asdict(info), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return info


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"figures written to {path.relative_to(ROOT)}")
    return path
