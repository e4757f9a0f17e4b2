"""Scoring speed and peak memory of `eval` (heads.evaluate.rank_all, full head) on features read from shards.

    python bench/eval.py                                  # 1k x 1k timing, RSS at two galleries x chunks
    python bench/eval.py --galleries 10000,100000 --chunks 256   # the 100k gallery (long on a CPU)

The features are shards on disk in the extract format (bench/_common.msrvtt_shards: written once with
pipeline.write.write_shard, cached in $TMPDIR/lseca-bench/; ViT-B/32 widths, 10-30 s videos at 1 FPS, one
9.3-word caption per video, 3 keywords), read as `cli.py eval` reads them (FeatureStore and
workflows.data.EvalData: all texts at once, the videos chunk by chunk on every pass), the page cache
dropped first. Every configuration runs in a fresh subprocess, so ru_maxrss (peak RSS) belongs to that
configuration alone.
Measures:
  - seconds to rank 1,000 texts x 1,000 videos (t2v and v2t ranks, no DSL), ViT-B/32 shapes (frames 12 x
    768, tokens up to 32 x 512, 3 keywords x 512, embed 512), reading included; the reading alone apart;
  - peak RSS per (gallery, chunk): it should grow with the chunk (text_chunk = video chunk, as in
    `cli.py eval --chunk`), not with the gallery size; target < 4 GiB at 1,000 texts x 100,000 videos;
  - the time of the largest gallery run, extrapolated to 100,000 videos when that is not run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import D, DT, DV, evict, machine, msrvtt_shards, print_table, resolve, write_result  # noqa: E402

FRAMES, WORDS, KEYWORDS = 12, 32, 3
TARGET_RSS_GIB = 4.0
TARGET_SECONDS = 10.0  # 1k x 1k, full head, CPU
TARGET_GALLERY = 100_000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(texts: int, videos: int, chunk: int, device: str, folder: str) -> dict:
    """One configuration, in this (fresh) process: the first `texts` captions against the first `videos`
    videos of the shards in folder (one caption per video)."""
    import torch
    import heads.evaluate as E
    from heads.config import HeadConfig
    from heads.model import RetrievalHead
    from pipeline.read import FeatureStore
    from workflows.data import EvalData

    if videos > texts:
        # rank_all refuses a gallery with captionless videos (their v2t rank is undefined), and 1,000 texts
        # cannot caption 10k-100k videos; the check is skipped here only: the work and memory are the same
        E.check_text_to_video = lambda *a, **k: None

    evict(Path(folder))
    before = peak_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    store = FeatureStore(folder)
    captions = store.split_captions("test")[:videos]
    data = EvalData(store, captions, FRAMES, WORDS, chunk)  # the gallery: the videos of these captions
    if len(data.videos) != videos:
        raise SystemExit(f"{folder}: {len(data.videos)} videos with a caption, expected {videos}")
    # the queries: the first `texts` captions only (one per video, so caption i is of video i); reading every
    # caption of a 100k gallery and keeping a slice would hold 100k captions' tokens (7 GB) for 1k queries
    queries = EvalData(store, captions[:texts], FRAMES, WORDS, chunk)
    if queries.videos != data.videos[:texts] or not torch.equal(queries.text_to_video, data.text_to_video[:texts]):
        raise SystemExit(f"{folder}: the first {texts} captions are not of the first {texts} videos")
    text, text_to_video = queries.texts(), queries.text_to_video
    open_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = RetrievalHead(HeadConfig(max_frames=FRAMES), torch.from_numpy(store.image_proj),
                          torch.from_numpy(store.text_proj)).to(device)
    t1 = time.perf_counter()
    result = E.rank_all(model, text, text_to_video, data.video_chunks(), videos, text_chunk=chunk, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rank_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in data.video_chunks()():  # one more pass of the reading alone (warm now), for its share
        pass
    read_pass_s = time.perf_counter() - t2
    out = {"texts": texts, "videos": videos, "chunk": chunk, "seconds": round(open_s + rank_s, 2),
           "cpu_s": round(time.process_time() - c0, 2), "load_average_1m": round(os.getloadavg()[0], 2),
           "open_and_texts_s": round(open_s, 2), "rank_all_s": round(rank_s, 2),
           "video_read_pass_s": round(read_pass_s, 2),
           "rss_before_mib": round(before), "peak_rss_mib": round(peak_rss_mib()),
           "t2v_MdR": float(result.t2v["MdR"])}
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    return out


def run_config(texts: int, videos: int, chunk: int, device: str, timeout: float, folder: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(texts), str(videos), str(chunk), "--device", device,
           "--folder", folder]
    print(f"  {texts} texts x {videos} videos, chunk {chunk} ...", flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"texts": texts, "videos": videos, "chunk": chunk, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"texts": texts, "videos": videos, "chunk": chunk, "error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--timing-videos", type=int, default=1000, help="gallery of the timing figure")
    p.add_argument("--galleries", default="1000,5000",
                   help="gallery sizes for the RSS comparison at --chunk (add 100000 to run the target size)")
    p.add_argument("--chunk", type=int, default=256, help="texts and videos per scoring block (cli eval's default)")
    p.add_argument("--chunks", default="128,512", help="other chunk sizes, at the smallest gallery")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lseca-bench",
                   help="folder for the shards (kept for reruns)")
    p.add_argument("--worker", nargs=3, type=int, metavar=("TEXTS", "VIDEOS", "CHUNK"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = resolve(args.device)

    if args.worker:
        print(json.dumps(worker(*args.worker, device, args.folder)))
        return

    info = machine(device)
    galleries = [int(x) for x in args.galleries.split(",") if x]
    chunks = [int(x) for x in args.chunks.split(",") if x]
    configs = [(args.texts, args.timing_videos, args.chunk)]
    configs += [(args.texts, g, args.chunk) for g in galleries if (args.texts, g, args.chunk) not in configs]
    configs += [(args.texts, min(galleries), c) for c in chunks if c != args.chunk]
    gallery = max(c[1] for c in configs)
    print(f"shards: {gallery} test videos, one caption each, in {args.cache} ...", flush=True)
    shards = msrvtt_shards(args.cache, gallery, 1, split="test")
    runs = [run_config(*c, device, args.timeout, shards.folder) for c in configs]
    ok = [r for r in runs if "error" not in r]

    timing = next((r for r in ok if r["videos"] == args.timing_videos and r["chunk"] == args.chunk), None)
    largest = max((r for r in ok if r["chunk"] == args.chunk), key=lambda r: r["videos"], default=None)
    at_target = next((r for r in ok if r["videos"] >= TARGET_GALLERY), None)
    # scoring is linear in texts x videos; extrapolate from the largest gallery actually run
    extrapolated = (largest["seconds"] * TARGET_GALLERY / largest["videos"]) if largest else None
    peak = max((r["peak_rss_mib"] for r in ok), default=None)
    result = {
        "machine": info, "head": "full", "shapes": {"frames": FRAMES, "words": WORDS, "keywords": KEYWORDS,
                                                    "image_dim": DV, "text_dim": DT, "embed_dim": D},
        "features": {**asdict(shards), "source": "shards on disk (pipeline.write.write_shard), read cold"},
        "target_seconds_1k_x_1k": TARGET_SECONDS,
        "runs": runs,
        "seconds_1k_x_1k": timing["seconds"] if timing else None,
        "pairs_per_s": round(timing["texts"] * timing["videos"] / timing["seconds"]) if timing else None,
        "seconds_1k_x_100k": at_target["seconds"] if at_target else None,
        "seconds_1k_x_100k_extrapolated": round(extrapolated, 1) if extrapolated and not at_target else None,
        "peak_rss_mib_max": peak, "target_rss_gib": TARGET_RSS_GIB,
        "ran_100k": at_target is not None,
    }
    rows = []
    if timing:
        miss = "" if timing["seconds"] < TARGET_SECONDS or device.startswith("cuda") else "  MISS"
        rows.append((f"{timing['texts']} texts x {timing['videos']} videos", timing["seconds"],
                     f"s (chunk {args.chunk}, reading included), {result['pairs_per_s']} pairs/s, "
                     f"{timing['cpu_s']} CPU s, load {timing['load_average_1m']}; target < "
                     f"{TARGET_SECONDS:.0f} s for 1k x 1k on CPU{miss}"))
        rows.append(("  of which reading", timing["open_and_texts_s"],
                     f"s: open the store and read the texts (cold); a pass over the videos takes "
                     f"{timing['video_read_pass_s']} s warm"))
    for r in runs:
        name = f"{r['texts']} x {r['videos']}, chunk {r['chunk']}"
        if "error" in r:
            rows.append((name, "error", r["error"][:200]))
        else:
            rows.append((name, f"{r['peak_rss_mib']} MiB", f"peak RSS ({r['rss_before_mib']} MiB before rank_all), "
                                                          f"{r['seconds']} s"))
    if at_target:
        rows.append(("1k x 100k", at_target["seconds"], "s (measured)"))
    elif extrapolated:
        rows.append(("1k x 100k (extrapolated)", extrapolated,
                     f"s from {largest['videos']} videos; not run (pass --galleries ...,100000)"))
    if peak is not None:
        rows.append(("largest peak RSS", f"{peak / 1024:.2f} GiB", f"target < {TARGET_RSS_GIB} GiB"
                     + ("" if at_target else " (at 100k: not measured; see the gallery comparison)")
                     + ("  MISS" if peak / 1024 >= TARGET_RSS_GIB else "")))
    print_table("rank_all: speed and peak memory", info, rows)
    write_result("eval", result)


if __name__ == "__main__":
    main()
