"""End-to-end `extract` frames/s against the bare image tower on the same model, batch size and machine.

    python bench/extract.py                      # 24 MSR-VTT-like videos x 20 captions, ViT-B-32, random weights
    python bench/extract.py --videos 48 --batch-size 256 --cluster local

Measures, in one run (the machine is shared, so only ratios taken together mean much):
  - model loading: the CLIP towers and the keyword model (KeyBERT), loaded once before timing, timed apart;
  - bare image tower: ClipEncoder.encode_frames on random uint8 224x224 crops, frames/s (measured
    before and after the extract run, averaged, to damp drift from other load on the machine);
  - extract: pipeline.extract.extract as `python cli.py extract VIDEOS --captions captions.jsonl` runs it
    (captions encoded by the text tower, 3 keywords per caption by KeyBERT, each distinct keyword encoded)
    on N generated videos with moving, textured, noisy content (320x240, 30 fps, H.264, 10-30 s: ffmpeg's
    mandelbrot zoom, Conway's life and a cellular automaton, each under temporal noise) and 20 generated
    MSR-VTT-style captions per video; frames/s and the ratio extract / bare (target >= 0.9 on CPU), and the
    shares of the run spent in the text tower and in the keyword stage;
  - decoding: OUT/summary.json's decode_wait_share and per-shard timings, the CPU seconds ffmpeg
    used during the run, and decode-only frames/s of pipeline.decode.decode_frames (one decoder, and
    --decode-threads decoders in parallel), with the CPU cost per decoded frame.
On CUDA (--device auto picks it) the bare figure is the ViT-B/32 GPU throughput (target >= 3000 frames/s).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, resolve, sync, write_result  # noqa: E402

import numpy as np  # noqa: E402

CPU_TARGET_RATIO = 0.9
GPU_TARGET_FPS = 3000


def cpu_times() -> tuple[float, float]:
    """(CPU seconds of this process, CPU seconds of its reaped children, i.e. ffmpeg)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


# Moving, textured sources that do not compress to nothing (unlike testsrc2), under temporal noise: a
# zooming Mandelbrot set, Conway's life (grown from a quarter-size grid), a scrolling cellular automaton.
SOURCES = ["mandelbrot=size=320x240:rate=30:maxiter=128",
           "life=size=160x120:rate=30:ratio=0.3:mold=20:life_color=#d0a070:death_color=#204060:mold_color=#306020",
           "cellauto=size=320x240:rate=30:rule=30:random_fill_ratio=0.4"]
FILTERS = {0: "noise=alls=12:allf=t+u", 1: "scale=320:240:flags=bilinear,noise=alls=6:allf=t+u",
           2: "noise=alls=12:allf=t+u"}
CAPTIONS_PER_VIDEO = 20  # MSR-VTT's


def make_videos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """N H.264 clips shaped like MSR-VTT's (320x240, 30 fps, 10-30 s) with natural-looking content
    (SOURCES, in turn); cached by name."""
    from pipeline.atomic import atomic_path
    from pipeline.decode import ffmpeg_exe
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        seconds = round(float(rng.uniform(10, 30)), 1)
        path = folder / f"v{i:04d}_{seconds:.1f}s.mp4"
        if not path.exists():
            print(f"  video {i + 1}/{n} ({seconds} s) ...", flush=True)
            with atomic_path(path) as tmp:
                subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", SOURCES[i % 3],
                                "-t", str(seconds), "-vf", FILTERS[i % 3] + ",format=yuv420p",
                                "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4", str(tmp)], check=True)
        paths.append(path)
    return paths


def write_captions(path: Path, videos: list[Path], per_video: int) -> int:
    """A captions file as `extract --captions` reads it: per_video MSR-VTT-style captions per video."""
    from captions import make_captions
    texts = make_captions(len(videos) * per_video, seed=1)
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"video": videos[i // per_video].name, "caption": text, "split": "train"}) + "\n")
    return len(texts)


class _Timed:
    """Wraps a callable and adds its wall time to self.seconds (the keyword stage, the text tower)."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name):  # everything else (the keyword extractor's spec) from the wrapped object
        return getattr(self.inner, name)


def bare_tower(enc, batch_size: int, device: str, min_frames: int, min_seconds: float) -> dict:
    """encode_frames on random crops: warm-up batch, then whole batches until both minimums are met."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size, enc.image_size, enc.image_size, 3), dtype=np.uint8)
    enc.encode_frames(x)
    sync(device)
    frames, t0, c0 = 0, time.perf_counter(), cpu_times()[0]
    while frames < min_frames or time.perf_counter() - t0 < min_seconds:
        enc.encode_frames(x)
        frames += batch_size
    sync(device)
    wall = time.perf_counter() - t0
    return {"frames": frames, "seconds": round(wall, 3), "frames_per_s": frames / wall,
            "cpu_s_per_frame": (cpu_times()[0] - c0) / frames}


def decode_only(paths: list[Path], size: int, squash: bool, threads: int) -> dict:
    """frames/s of decode_frames (+ center crop, as the runner does) with `threads` decoders, no model."""
    from pipeline.decode import decode_frames
    from pipeline.encode import center_crop

    def one(path: Path) -> int:
        return sum(1 for f in decode_frames(path, size, squash=squash) if center_crop(f, size) is not None)

    c0, k0 = cpu_times()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        frames = sum(pool.map(one, paths))
    wall = time.perf_counter() - t0
    c1, k1 = cpu_times()
    return {"threads": threads, "frames": frames, "seconds": round(wall, 3), "frames_per_s": frames / wall,
            "ffmpeg_cpu_s_per_frame": (k1 - k0) / frames, "python_cpu_s_per_frame": (c1 - c0) / frames}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none", help="open_clip tag, checkpoint path, or none (random)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="frames per model call, for extract and the bare tower (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--videos", type=int, default=24, help="number of generated videos")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--cluster", default="none", choices=["none", "local"],
                   help="none: in-process, model loaded before timing; local: a Dask worker "
                        "(its start-up and model load count in the run time)")
    p.add_argument("--decode-threads", type=int, default=3, help="ffmpeg decoders feeding the model (extract's default 3)")
    p.add_argument("--shard-size", type=int, default=64, help="videos per shard (extract's default 64)")
    p.add_argument("--captions-per-video", type=int, default=CAPTIONS_PER_VIDEO)
    p.add_argument("--keywords", type=int, default=3, help="keywords per caption (extract's default 3; 0: none)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lseca-bench" / "videos-natural-320x240",
                   help="folder for the generated videos (kept for reruns)")
    p.add_argument("--keep-out", action="store_true", help="keep the extract output folder")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from pipeline.config import ExtractConfig
    from pipeline.encode import ModelSpec
    from pipeline.extract import extract
    from pipeline.keywords import KeywordSpec
    from pipeline.runner import get_stages

    device = resolve(args.device)
    batch = args.batch_size or (256 if device.startswith("cuda") else 64)
    info = machine(device)
    print(f"generating/reusing {args.videos} videos in {args.cache} ...", flush=True)
    paths = make_videos(args.cache, args.videos)
    total_seconds = sum(float(p.stem.split("_")[1][:-1]) for p in paths)
    mean_kbps = sum(p.stat().st_size for p in paths) * 8 / 1000 / total_seconds
    captions_file = args.cache.parent / f"{args.cache.name}-captions-{args.videos}x{args.captions_per_video}.jsonl"
    n_captions = write_captions(captions_file, paths, args.captions_per_video)

    spec = ModelSpec(model=args.model, pretrained=args.pretrained, device=device)
    kw = KeywordSpec(top_k=args.keywords)
    # The runner's own model cache: in-process (--cluster none) extract reuses these models, so their
    # load is timed here, apart; the CLIP encoder is also the one of the bare figure.
    print("loading the models ...", flush=True)
    t0 = time.perf_counter()
    stages = get_stages(spec, replace(kw, device="cpu" if device == "cpu" else device), need_keywords=False)
    clip_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stages = get_stages(spec, replace(kw, device="cpu" if device == "cpu" else device), need_keywords=True)
    keyword_load_s = time.perf_counter() - t0
    enc = stages.clip
    # time the text tower and the keyword stage inside the run (instance attributes: the runner calls these)
    text_tower = enc.encode_texts = _Timed(enc.encode_texts)
    text_tower_cached = enc.encode_texts_cached = _Timed(enc.encode_texts_cached)
    if stages.keywords is not None:
        stages.keywords = _Timed(stages.keywords)
    gpu = device.startswith("cuda")
    min_frames, min_seconds = (batch * 20, 10.0) if gpu else (batch * 2, 20.0)

    print("bare image tower (before) ...", flush=True)
    bare_before = bare_tower(enc, batch, device, min_frames, min_seconds)

    print("decode only ...", flush=True)
    dec1 = decode_only(paths, enc.image_size, enc.squash, 1)
    decn = decode_only(paths, enc.image_size, enc.squash, args.decode_threads)

    out = Path(tempfile.mkdtemp(prefix="lseca-bench-extract-"))
    cfg = ExtractConfig(videos=str(args.cache.resolve()), out=str(out), captions=str(captions_file.resolve()),
                        clip=spec, keywords=kw,
                        batch_size=batch, shard_size=args.shard_size, decode_threads=args.decode_threads,
                        workers=1, cluster=args.cluster)
    print(f"extract ({args.cluster}) -> {out} ...", flush=True)
    c0, k0 = cpu_times()
    t0 = time.perf_counter()
    summary = extract(cfg, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    c1, k1 = cpu_times()
    saved = json.loads((out / "summary.json").read_text())
    if not args.keep_out:
        shutil.rmtree(out, ignore_errors=True)

    print("bare image tower (after) ...", flush=True)
    bare_after = bare_tower(enc, batch, device, min_frames, min_seconds)
    bare_fps = (bare_before["frames_per_s"] + bare_after["frames_per_s"]) / 2
    extract_fps = saved["frames_per_s"] or 0.0
    ratio = extract_fps / bare_fps
    shards = saved["shard_timings"]
    model_s = sum(s["image_model_s"] for s in shards)
    shard_s = sum(s["seconds"] for s in shards)
    in_process = args.cluster == "none"
    ffmpeg_cpu = (k1 - k0) if in_process else None       # a Dask worker's children are not ours
    model_cpu_per_frame = (bare_before["cpu_s_per_frame"] + bare_after["cpu_s_per_frame"]) / 2
    decode_cpu_per_frame = dec1["ffmpeg_cpu_s_per_frame"] + dec1["python_cpu_s_per_frame"]
    frames_done = max(1, summary["frames"])
    # CPU seconds per frame are far less sensitive than wall time to other load on a shared machine
    extract_cpu_per_frame = ((c1 - c0) + (k1 - k0)) / frames_done if in_process else None
    fps = (bare_before["frames_per_s"], bare_after["frames_per_s"])
    ratio_range = (extract_fps / max(fps), extract_fps / min(fps))
    text_s = text_tower.seconds + text_tower_cached.seconds if in_process else None
    keyword_s = stages.keywords.seconds if in_process and isinstance(stages.keywords, _Timed) else None
    shard_text_s = sum(s["text_s"] for s in shards)

    result = {
        "machine": info, "model": args.model, "pretrained": args.pretrained, "batch_size": batch,
        "cluster": args.cluster, "decode_threads": args.decode_threads, "shard_size": args.shard_size,
        "videos": {"count": len(paths), "seconds": round(total_seconds, 1), "size": "320x240", "fps": 30,
                   "codec": "h264", "mean_kbps": round(mean_kbps), "content": SOURCES, "filters": FILTERS},
        "captions": n_captions, "keywords_per_caption": args.keywords,
        "model_load_s": {"clip": round(clip_load_s, 2), "keywords": round(keyword_load_s, 2)},
        "text_tower_s": round(text_s, 2) if text_s is not None else None,
        "text_tower_share": round(text_s / wall, 3) if text_s is not None else None,
        "keyword_stage_s": round(keyword_s, 2) if keyword_s is not None else None,
        "keyword_stage_share": round(keyword_s / wall, 3) if keyword_s is not None else None,
        "captions_share_of_shards": round(shard_text_s / max(shard_s, 1e-9), 3),
        "bare_frames_per_s": round(bare_fps, 3), "bare_before": bare_before, "bare_after": bare_after,
        "extract_frames_per_s": extract_fps, "extract_frames": summary["frames"],
        "extract_wall_s": round(wall, 2), "ratio": round(ratio, 3),
        "ratio_range": [round(r, 3) for r in ratio_range],
        "extract_cpu_s_per_frame": round(extract_cpu_per_frame, 5) if in_process else None,
        "cpu_ratio": round(model_cpu_per_frame / extract_cpu_per_frame, 3) if in_process else None,
        "target": ({"gpu_frames_per_s": GPU_TARGET_FPS} if gpu else {"ratio": CPU_TARGET_RATIO}),
        "decode_wait_share": saved["decode_wait_share"],
        "image_model_share_of_shards": round(model_s / max(shard_s, 1e-9), 3),
        "shard_timings": [{k: s[k] for k in ("shard", "videos", "frames", "seconds", "decode_wait_s",
                                             "image_model_s", "text_s")} for s in shards],
        "ffmpeg_cpu_share_during_extract": round(ffmpeg_cpu / ((c1 - c0) + ffmpeg_cpu), 3) if in_process else None,
        "decode_only_1_thread": dec1, f"decode_only_{args.decode_threads}_threads": decn,
        "cpu_s_per_frame": {"model": round(model_cpu_per_frame, 5), "decode": round(decode_cpu_per_frame, 5)},
        # If decoding and the model shared the cores perfectly, the best ratio CPU-bound work allows:
        "ratio_bound_from_cpu_cost": round(model_cpu_per_frame / (model_cpu_per_frame + decode_cpu_per_frame), 3),
        "note": ("cluster none: models loaded before timing (model_load_s); frames_per_s from summary.json "
                 "covers planning, decode, image model, captions, keywords, shard write and consolidation"
                 if in_process else
                 "cluster local: frames_per_s includes Dask start-up and the model load in the worker"),
    }
    rows = [
        ("videos", f"{len(paths)} x 320x240@30", f"{total_seconds:.0f} s of video, H.264 ~{mean_kbps:.0f} kb/s"),
        ("captions", n_captions, f"{args.captions_per_video} per video, {args.keywords} keywords each"),
        ("batch size", batch, f"device {device}, torch threads {info['torch_threads']}"),
        ("model loading", clip_load_s + keyword_load_s, f"s, apart from the run (CLIP {clip_load_s:.1f} s, "
                                                        f"keyword model {keyword_load_s:.1f} s)"),
        ("bare image tower", bare_fps, f"frames/s (before {bare_before['frames_per_s']:.3g}, "
                                       f"after {bare_after['frames_per_s']:.3g})"),
        ("extract end-to-end", extract_fps, f"frames/s ({summary['frames']} frames, {args.cluster})"),
        ("ratio", ratio, (f"target >= {CPU_TARGET_RATIO}" if not gpu else "extract / bare")
         + ("  MISS" if not gpu and ratio < CPU_TARGET_RATIO else "")),
        ("ratio range", f"{ratio_range[0]:.3g}-{ratio_range[1]:.3g}", "against the after / before bare figures"),
    ]
    if in_process:
        rows.append(("text tower share", result["text_tower_share"],
                     f"of the run ({text_s:.1f} s encoding captions and keywords)"))
        if keyword_s is not None:
            rows.append(("keyword stage share", result["keyword_stage_share"],
                         f"of the run ({keyword_s:.1f} s in KeyBERT + lemmas)"))
    rows.append(("captions share", result["captions_share_of_shards"],
                 f"of shard seconds spent on captions (text tower + keywords, {shard_text_s:.1f} s)"))
    if in_process:
        rows.append(("CPU ratio", result["cpu_ratio"], "bare CPU s/frame / extract CPU s/frame (incl. ffmpeg); "
                                                       "robust to other load"))
    rows += [
        ("decode_wait_share", saved["decode_wait_share"], "summary.json: model thread waiting for frames"),
        ("image model share", result["image_model_share_of_shards"], "of shard seconds spent in encode_frames"),
    ]
    if in_process:
        rows.append(("ffmpeg CPU share", result["ffmpeg_cpu_share_during_extract"], "of all CPU seconds during extract"))
    rows += [
        ("decode-only, 1 thread", dec1["frames_per_s"], "frames/s (decode_frames + center_crop, no model)"),
        (f"decode-only, {args.decode_threads} threads", decn["frames_per_s"], "frames/s"),
        ("CPU ms/frame model", 1000 * model_cpu_per_frame, "CPU time of encode_frames per frame"),
        ("CPU ms/frame decode", 1000 * decode_cpu_per_frame, "ffmpeg + Python per decoded frame"),
        ("ratio bound (CPU cost)", result["ratio_bound_from_cpu_cost"], "model / (model + decode) CPU per frame"),
    ]
    if gpu:
        rows.append((f"{args.model} GPU frames/s", bare_fps,
                     f"target >= {GPU_TARGET_FPS}" + ("  MISS" if bare_fps < GPU_TARGET_FPS else "")))
    else:
        rows.append(("GPU (not present)", "-", f"on CUDA this prints {args.model} frames/s on one GPU, "
                                                 f"target >= {GPU_TARGET_FPS}"))
    print_table("extract vs bare image tower", info, rows)
    print("per shard: " + "; ".join(f"#{s['shard']}: {s['frames']} fr {s['seconds']} s, wait {s['decode_wait_s']} s, "
                                    f"model {s['image_model_s']} s, captions {s['text_s']} s" for s in shards))
    write_result("extract", result)


if __name__ == "__main__":
    main()
