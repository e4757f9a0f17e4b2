"""Training step time of the full head and the share of time spent waiting for data.

    python bench/train.py                          # 600 videos x 15 frames, 4 captions each, 1 epoch
    python bench/train.py --videos 2000 --epochs 2   # the fuller run (~8 s/step on 2 busy cores)

Measures:
  - step time of heads.trainer.fit on in-memory batches of 128 captions x 12 frames x 32 words at
    ViT-B/32 shapes (image 768, text 512, embed 512): the pure compute cost of one step;
  - the real data path: synthetic shards written with pipeline.write.write_shard (random fp16
    features), then workflows.train.train (RunConfig) for --epochs epochs; data_wait_share from
    the returned history (target < 5%);
  - the loader alone (workflows.data.TrainData.load, batches of --batch-size): batches/s reading the
    shards from HDF5 by index and from memory after FeatureStore.preload (the default when the arrays
    fit), the files evicted from the page cache first (posix_fadvise DONTNEED: a cold read), and the
    GPU step time each could keep busy (target >= 50 batches/s from memory).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, resolve, write_result  # noqa: E402

import numpy as np  # noqa: E402

DV, DT, D = 768, 512, 512
TARGET_WAIT = 0.05
TARGET_LOADER = 50.0  # batches/s


def evict(folder: Path) -> None:
    """Drop the files of folder from the page cache (where the OS allows), so the next read is cold."""
    import os
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def loader_batches_per_s(features: Path, batch: int, frames: int, words: int, in_memory: bool,
                         max_batches: int = 60) -> tuple[float, float]:
    """(batches/s over at most max_batches batches of one epoch's plan, seconds spent in preload), cold."""
    from pipeline.read import FeatureStore
    from workflows.data import TrainData

    evict(features)
    store = FeatureStore(features)
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
    return rate, preload_s


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--frames", type=int, default=12, help="frames per video the head sees (max_frames)")
    p.add_argument("--words", type=int, default=32, help="tokens per caption (max_words)")
    p.add_argument("--videos", type=int, default=600, help="videos in the synthetic shards")
    p.add_argument("--stored-frames", type=int, default=15, help="1 FPS frames stored per video")
    p.add_argument("--captions-per-video", type=int, default=4)
    p.add_argument("--shard-videos", type=int, default=150, help="videos per synthetic shard")
    p.add_argument("--epochs", type=int, default=1, help="epochs of workflows.train.train on the shards")
    p.add_argument("--memory-steps", type=int, default=4, help="timed in-memory steps (after as many warm-up steps)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from heads.config import HeadConfig
    from heads.model import RetrievalHead
    from heads.trainer import TrainConfig, fit
    from workflows.train import RunConfig, train

    device = resolve(args.device)
    info = machine(device)
    amp = "bf16" if device.startswith("cuda") else "none"
    tmp = Path(tempfile.mkdtemp(prefix="lseca-bench-train-"))
    try:
        # ---- pure step time: the same batch from memory, epoch 1 warms up, epoch 2 is timed ----------
        batch = {k: v.to(device) for k, v in memory_batch(args.batch_size, args.frames, args.words).items()}
        g = torch.Generator().manual_seed(0)
        model = RetrievalHead(HeadConfig(max_frames=args.frames), torch.randn(DV, D, generator=g) / DV ** 0.5,
                              torch.randn(DT, D, generator=g) / DT ** 0.5)
        hist = fit(model, lambda epoch: [batch] * args.memory_steps, args.memory_steps,
                   TrainConfig(epochs=2, device=device, amp=amp, log_every=10 ** 9), tmp / "memory")
        step_s = hist[1]["seconds"] / args.memory_steps
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

        # ---- the real data path ---------------------------------------------------------------------
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
        disk_rate, _ = loader_batches_per_s(tmp / "features", args.batch_size, args.frames, args.words, False)
        memory_rate, preload_s = loader_batches_per_s(tmp / "features", args.batch_size, args.frames, args.words, True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    epochs = [{"epoch": r["epoch"], "seconds": round(r["seconds"], 2), "step_ms": round(1000 * r["seconds"] / steps, 1),
               "data_wait_share": round(r["data_wait_share"], 4), "loss": round(r["loss"], 4)} for r in history]
    wait = sum(r["data_wait_share"] * r["seconds"] for r in history) / sum(r["seconds"] for r in history)
    real_step_s = sum(r["seconds"] for r in history) / (steps * len(history))
    result = {
        "machine": info, "shapes": {"batch": args.batch_size, "frames": args.frames, "words": args.words,
                                    "image_dim": DV, "text_dim": DT, "embed_dim": D, "keywords": 3},
        "head": "full", "trainable_parameters": n_params, "amp": amp,
        "memory_step_ms": round(1000 * step_s, 1), "memory_steps_per_s": round(1 / step_s, 3),
        "data": {"videos": args.videos, "stored_frames": args.stored_frames, "captions": n_caps,
                 "shards": -(-args.videos // args.shard_videos), "write_s": round(write_s, 2)},
        "train_epochs": epochs, "steps_per_epoch": steps, "train_step_ms": round(1000 * real_step_s, 1),
        "train_steps_per_s": round(1 / real_step_s, 3),
        "data_wait_share": round(wait, 4), "target_data_wait_share": TARGET_WAIT,
        "loader_batches_per_s": {"hdf5_by_index": round(disk_rate, 2), "memory": round(memory_rate, 2),
                                 "preload_s": round(preload_s, 2), "target": TARGET_LOADER},
    }
    rows = [
        ("step (in-memory)", 1000 * step_s, f"ms; B={args.batch_size}, F={args.frames}, N={args.words}, "
                                            f"{n_params / 1e6:.1f} M trainable, device {device}"),
        ("steps/s (in-memory)", 1 / step_s, ""),
        ("step (shards, train())", 1000 * real_step_s, f"ms; {steps} steps/epoch x {len(history)} epoch(s), "
                                                       f"{n_caps} captions of {args.videos} videos"),
        ("steps/s (shards)", 1 / real_step_s, ""),
        ("data wait", f"{100 * wait:.2f}%", f"target < {100 * TARGET_WAIT:.0f}%" + ("  MISS" if wait >= TARGET_WAIT else "")),
        ("loader, HDF5 by index (cold)", disk_rate, f"batches/s; keeps a {1000 / disk_rate:.0f} ms step busy"),
        ("loader, from memory (cold)", memory_rate, f"batches/s after a {preload_s:.1f} s preload; keeps a "
                                                    f"{1000 / memory_rate:.0f} ms step busy; target >= "
                                                    f"{TARGET_LOADER:.0f}" + ("" if memory_rate >= TARGET_LOADER
                                                                             else "  MISS")),
    ]
    print_table("training step and data wait", info, rows)
    write_result("train", result)


if __name__ == "__main__":
    main()
