"""The training data loader on MSR-VTT-sized shards, the full head's step time and the data-wait share.

    python bench/train.py                          # loader on 9,000 videos x 20 captions; steps on 600 videos
    python bench/train.py --loader-only            # the loader figure alone
    python bench/train.py --loader-videos 1000 --loader-only   # a quick look while developing

Measures:
  - step time of heads.trainer.fit on in-memory batches of 128 captions x 12 frames x 32 words at
    ViT-B/32 shapes (image 768, text 512, embed 512): the pure compute cost of one step;
  - the real data path: synthetic shards written with pipeline.write.write_shard (random fp16
    features), then workflows.train.train (RunConfig) for --epochs epochs; data_wait_share from
    the returned history (target < 5%);
  - the loader alone (workflows.data.TrainData.load, batches of --batch-size x --frames x --words) on
    MSR-VTT-sized shards (--loader-videos 9,000 x --loader-captions 20, ViT-B/32 widths: frames 768-d and
    tokens 512-d as extract stores them, before CLIP's projections; 64 videos per shard as extract writes
    them; 10-30 s videos at 1 FPS, mean ~15 s, and 9.3-word captions on average, as MSR-VTT's), written
    once with pipeline.write.write_shard and cached in $TMPDIR/lseca-bench/; batches/s reading from HDF5
    by index and from memory after FeatureStore.preload (the default when the arrays fit), the files
    evicted from the page cache first (posix_fadvise DONTNEED: a cold read), and the GPU step time each
    could keep busy (target >= 50 batches/s from memory).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (D, DT, DV, ShardSet, evict, machine, msrvtt_shards, print_table, resolve,  # noqa: E402
                     write_result)

import numpy as np  # noqa: E402

TARGET_WAIT = 0.05
TARGET_LOADER = 50.0  # batches/s


def loader_batches_per_s(features: Path, batch: int, frames: int, words: int, in_memory: bool,
                         max_batches: int = 60) -> dict:
    """batches/s over at most max_batches batches of one epoch's plan, read cold, and the seconds spent
    opening the store and in TrainData (its preload)."""
    from pipeline.read import FeatureStore
    from workflows.data import TrainData

    evict(features)
    t0 = time.perf_counter()
    store = FeatureStore(features)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = TrainData(store, store.split_captions("train"), batch, frames, words, seed=0,
                     preload_bytes=(64 << 30) if in_memory else 0)
    preload_s = time.perf_counter() - t0
    plan = data.plan(0)[:max_batches]
    t0 = time.perf_counter()
    for items in plan:
        data.load(items)
    rate = len(plan) / (time.perf_counter() - t0)
    store.close()
    return {"batches_per_s": rate, "batches": len(plan), "open_s": open_s, "preload_s": preload_s,
            "in_memory": data.in_memory}


def write_synthetic_shards(out: Path, n_videos: int, frames: int, caps_per_video: int, shard_videos: int,
                           seed: int = 0) -> int:
    """Shards in the extract format with random fp16 features; returns the number of captions."""
    from pipeline import schema as S
    from pipeline.write import ShardData, write_shard

    rng = np.random.default_rng(seed)
    image_proj = (rng.standard_normal((DV, D)) / np.sqrt(DV)).astype(np.float32)
    text_proj = (rng.standard_normal((DT, D)) / np.sqrt(DT)).astype(np.float32)
    caption_id = 0
    for index, start in enumerate(range(0, n_videos, shard_videos)):
        data = ShardData(index)
        n_frames = n_tokens = 0
        vids = range(start, min(n_videos, start + shard_videos))
        n_keywords = 200
        data.keyword_features = rng.standard_normal((n_keywords, DT)).astype(np.float16)
        k_index = []
        for v in vids:
            vid = f"video{v:06d}.mp4"
            data.videos.append({"video_id": vid, "path": f"/synthetic/{vid}", "duration": float(frames),
                                "num_frames": frames, "frame_start": n_frames, "status": S.STATUS_OK,
                                "error": "", "shard": index})
            data.frames.append(rng.standard_normal((frames, DV)).astype(np.float16))
            data.frame_times.append(np.arange(frames, dtype=np.float32) + 0.5)
            n_frames += frames
            for _ in range(caps_per_video):
                length = int(rng.integers(12, 40))  # SOT..EOT of a 10-35 word caption
                data.captions.append({"caption_id": caption_id, "video_id": vid, "split": "train",
                                      "caption": "synthetic", "keywords": ["a", "b", "c"],
                                      "token_start": n_tokens, "num_tokens": length, "shard": index})
                data.tokens.append(rng.standard_normal((length, DT)).astype(np.float16))
                k_index.append(rng.choice(n_keywords, 3, replace=False))
                n_tokens += length
                caption_id += 1
        data.keyword_index = np.asarray(k_index, np.int32)
        data.meta = {"shard": index, "synthetic": True}
        write_shard(out, data, image_proj, text_proj, {"model": "ViT-B-32", "pretrained": "synthetic"})
    return caption_id


def memory_batch(batch: int, frames: int, words: int, seed: int = 0) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, words + 1, (batch,), generator=g)
    return {"frames": torch.randn(batch, frames, DV, generator=g), "frame_mask": torch.ones(batch, frames, dtype=torch.bool),
            "text_global": torch.randn(batch, DT, generator=g), "tokens": torch.randn(batch, words, DT, generator=g),
            "token_mask": torch.arange(words)[None, :] < lengths[:, None],
            "keywords": torch.randn(batch, 3, DT, generator=g), "keyword_mask": torch.ones(batch, 3, dtype=torch.bool)}


def loader_rows(shards: ShardSet, hdf5: dict, memory: dict, args) -> list[tuple[str, object, str]]:
    miss = "" if memory["batches_per_s"] >= TARGET_LOADER else "  MISS"
    return [
        ("shards", f"{shards.videos} x {args.loader_captions}",
         f"videos x captions, {shards.shards} shards, {shards.frames} frames, {shards.tokens} tokens, "
         f"{shards.disk_bytes / 2 ** 30:.2f} GiB on disk"
         + (" (cached)" if shards.reused else f", written in {shards.write_s:.0f} s")),
        ("open the store", hdf5["open_s"], "s (tables of every shard, cold)"),
        ("loader, HDF5 by index", hdf5["batches_per_s"],
         f"batches/s (cold, {hdf5['batches']} batches of {args.batch_size}); keeps a "
         f"{1000 / hdf5['batches_per_s']:.0f} ms step busy"),
        ("loader, from memory", memory["batches_per_s"],
         f"batches/s after a {memory['preload_s']:.1f} s cold preload; keeps a "
         f"{1000 / memory['batches_per_s']:.1f} ms step busy; target >= {TARGET_LOADER:.0f}{miss}"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--frames", type=int, default=12, help="frames per video the head sees (max_frames)")
    p.add_argument("--words", type=int, default=32, help="tokens per caption (max_words)")
    p.add_argument("--loader-videos", type=int, default=9000, help="videos of the loader's shards (MSR-VTT 9k)")
    p.add_argument("--loader-captions", type=int, default=20, help="captions per video of the loader's shards")
    p.add_argument("--loader-shard-videos", type=int, default=64, help="videos per shard (extract's default 64)")
    p.add_argument("--loader-batches", type=int, default=100, help="batches timed per loader figure")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lseca-bench",
                   help="folder for the loader's shards (kept for reruns)")
    p.add_argument("--loader-only", action="store_true", help="skip the step-time and train() parts")
    p.add_argument("--videos", type=int, default=600, help="videos in the synthetic shards of the train() run")
    p.add_argument("--stored-frames", type=int, default=15, help="1 FPS frames stored per video (train() run)")
    p.add_argument("--captions-per-video", type=int, default=4, help="(train() run)")
    p.add_argument("--shard-videos", type=int, default=150, help="videos per synthetic shard (train() run)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of workflows.train.train on the shards")
    p.add_argument("--memory-steps", type=int, default=4, help="timed in-memory steps (after as many warm-up steps)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)

    device = resolve(args.device)
    info = machine(device)
    shapes = {"batch": args.batch_size, "frames": args.frames, "words": args.words,
              "image_dim": DV, "text_dim": DT, "embed_dim": D, "keywords": 3}

    # ---- the loader alone, MSR-VTT-sized shards, cold ---------------------------------------------------
    print(f"shards: {args.loader_videos} videos x {args.loader_captions} captions in {args.cache} ...", flush=True)
    shards = msrvtt_shards(args.cache, args.loader_videos, args.loader_captions, args.loader_shard_videos)
    features = Path(shards.folder)
    print("loader from HDF5 (cold) ...", flush=True)
    hdf5 = loader_batches_per_s(features, args.batch_size, args.frames, args.words, False, args.loader_batches)
    print("loader from memory (cold preload) ...", flush=True)
    memory = loader_batches_per_s(features, args.batch_size, args.frames, args.words, True, args.loader_batches)
    if not memory["in_memory"]:
        raise SystemExit("the shards did not fit in memory: no in-memory figure")
    loader = {"shards": asdict(shards), "hdf5_by_index": {k: round(v, 3) if isinstance(v, float) else v
                                                          for k, v in hdf5.items()},
              "memory": {k: round(v, 3) if isinstance(v, float) else v for k, v in memory.items()},
              "step_ms_kept_busy": {"hdf5_by_index": round(1000 / hdf5["batches_per_s"], 2),
                                    "memory": round(1000 / memory["batches_per_s"], 2)},
              "target_batches_per_s": TARGET_LOADER, "met": memory["batches_per_s"] >= TARGET_LOADER}
    rows = loader_rows(shards, hdf5, memory, args)
    result = {"machine": info, "shapes": shapes, "loader": loader}
    if args.loader_only:
        print_table("training data loader", info, rows)
        write_result("train_loader", result)
        return
    result.update(train_steps(args, device))
    rows = train_rows(result, args, device) + rows
    print_table("training step, data wait and the loader", info, rows)
    write_result("train", result)


def train_steps(args, device: str) -> dict:
    """The full head's step time on in-memory batches, then workflows.train.train on small synthetic shards."""
    import torch
    from heads.config import HeadConfig
    from heads.model import RetrievalHead
    from heads.trainer import TrainConfig, fit
    from workflows.train import RunConfig, train

    amp = "bf16" if device.startswith("cuda") else "none"
    tmp = Path(tempfile.mkdtemp(prefix="lseca-bench-train-"))
    try:
        # ---- pure step time: the same batch from memory, epoch 1 warms up, epoch 2 is timed ----------
        print("step time on in-memory batches ...", flush=True)
        batch = {k: v.to(device) for k, v in memory_batch(args.batch_size, args.frames, args.words).items()}
        g = torch.Generator().manual_seed(0)
        model = RetrievalHead(HeadConfig(max_frames=args.frames), torch.randn(DV, D, generator=g) / DV ** 0.5,
                              torch.randn(DT, D, generator=g) / DT ** 0.5)
        hist = fit(model, lambda epoch: [batch] * args.memory_steps, args.memory_steps,
                   TrainConfig(epochs=2, device=device, amp=amp, log_every=10 ** 9), tmp / "memory")
        step_s = hist[1]["seconds"] / args.memory_steps
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

        # ---- the real data path ---------------------------------------------------------------------
        print(f"train() on {args.videos} videos ...", flush=True)
        t0 = time.perf_counter()
        n_caps = write_synthetic_shards(tmp / "features", args.videos, args.stored_frames,
                                        args.captions_per_video, args.shard_videos)
        write_s = time.perf_counter() - t0
        # random temporal init: these synthetic shards have no CLIP blocks, and speed does not depend on it
        cfg = RunConfig(features=str(tmp / "features"), head=HeadConfig(max_frames=args.frames, temporal_init="random"),
                        train=TrainConfig(epochs=args.epochs, device=device, amp=amp, log_every=10 ** 9),
                        batch_size=args.batch_size, max_words=args.words, val_split="none")
        history = train(cfg, tmp / "run")
        steps = json.loads((tmp / "run" / "config.json").read_text())["steps_per_epoch"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    epochs = [{"epoch": r["epoch"], "seconds": round(r["seconds"], 2), "step_ms": round(1000 * r["seconds"] / steps, 1),
               "data_wait_share": round(r["data_wait_share"], 4), "loss": round(r["loss"], 4)} for r in history]
    wait = sum(r["data_wait_share"] * r["seconds"] for r in history) / sum(r["seconds"] for r in history)
    real_step_s = sum(r["seconds"] for r in history) / (steps * len(history))
    return {
        "head": "full", "trainable_parameters": n_params, "amp": amp,
        "memory_step_ms": round(1000 * step_s, 1), "memory_steps_per_s": round(1 / step_s, 3),
        "data": {"videos": args.videos, "stored_frames": args.stored_frames, "captions": n_caps,
                 "shards": -(-args.videos // args.shard_videos), "write_s": round(write_s, 2)},
        "train_epochs": epochs, "steps_per_epoch": steps, "train_step_ms": round(1000 * real_step_s, 1),
        "train_steps_per_s": round(1 / real_step_s, 3),
        "data_wait_share": round(wait, 4), "target_data_wait_share": TARGET_WAIT,
    }


def train_rows(r: dict, args, device: str) -> list[tuple[str, object, str]]:
    wait = r["data_wait_share"]
    return [
        ("step (in-memory)", r["memory_step_ms"], f"ms; B={args.batch_size}, F={args.frames}, N={args.words}, "
                                                  f"{r['trainable_parameters'] / 1e6:.1f} M trainable, device {device}"),
        ("step (shards, train())", r["train_step_ms"],
         f"ms; {r['steps_per_epoch']} steps/epoch x {len(r['train_epochs'])} epoch(s), "
         f"{r['data']['captions']} captions of {args.videos} videos"),
        ("data wait", f"{100 * wait:.2f}%", f"target < {100 * TARGET_WAIT:.0f}%" + ("  MISS" if wait >= TARGET_WAIT else "")),
    ]


if __name__ == "__main__":
    main()
