"""`train-heads --unfreeze-blocks K`: how fast the token loader feeds it, and what a step costs on this machine.

    python bench/train_blocks.py                      # 300 videos, B=128 for the loader, B=8 for the steps
    python bench/train_blocks.py --device cuda --step-batch 128

Measures:
  - the token loader (workflows/token_data.py's TokenTrainData: memmap reads of the cached block inputs, B=128
    captions of distinct videos, 12 frames, 32 words, in `--threads` threads ahead of the step) on token caches it
    writes itself in the extract format (ViT-B/32 widths: 50 x 768 frame tokens, 512-d text tokens, fp16; 10-20 s
    videos at 1 FPS, all frames cached; 2 captions a video of 9.3 words on average, 3 keywords each), read cold
    (page cache dropped, where the OS allows) and warm; batches/s and MB/s, and the step time it keeps busy;
  - one optimizer step of the full head with CLIP's last K = 1 and K = 2 blocks of both towers (ViT-B-32 with
    random weights: speed does not depend on them) against the head alone (K = 0, the same features precomputed),
    at --step-batch captions (a CPU cannot do B=128 through a ViT block in minutes).
Prints the machine; writes bench/results/train_blocks.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, resolve, sync, write_result  # noqa: E402

N_TOKENS, DV, DT, D = 50, 768, 512, 512  # ViT-B/32: 7 x 7 patches + CLS, widths, joint embedding
MEAN_WORDS = 9.3  # MSR-VTT's words per caption; SOT..EOT adds 2 tokens


def write_cache(folder: Path, n_videos: int, caps: int, shard_videos: int, blocks: int, seed: int = 0) -> dict:
    """Token-cached shards (schema 1.1) plus a ViT-B-32 tail file; rows are copies of a random pool (values do not
    matter for speed), so a few hundred MB take seconds."""
    import numpy as np
    import open_clip
    import torch

    from pipeline import schema as S
    from pipeline.clip_init import save_tail
    from pipeline.write import ShardData, TokenCache, write_shard

    rng = np.random.default_rng(seed)
    frame_pool = (rng.standard_normal((512, N_TOKENS, DV), np.float32) * 0.5).astype(np.float16)
    token_pool = (rng.standard_normal((4096, DT), np.float32) * 0.5).astype(np.float16)
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    image_proj = model.visual.proj.detach().numpy()
    text_proj = model.text_projection.detach().numpy()
    n_keywords, caption_id, frames_total, t0 = 120, 0, 0, time.perf_counter()
    for index, start in enumerate(range(0, n_videos, shard_videos)):
        vids = range(start, min(n_videos, start + shard_videos))
        counts = rng.integers(10, 21, len(vids))
        data = ShardData(index)
        cache = TokenCache(blocks, S.DEFAULT_CACHE_FRAMES, 12, 12, (N_TOKENS, DV))
        n_frames = n_tokens = 0
        for j, v in enumerate(vids):
            vid = f"video{v}.mp4"
            n = int(counts[j])
            data.videos.append({"video_id": vid, "path": f"/synthetic/{vid}", "duration": float(n),
                                "num_frames": n, "frame_start": n_frames, "status": S.STATUS_OK, "error": "",
                                "shard": index})
            data.frames.append(rng.standard_normal((n, DV), np.float32).astype(np.float16))
            data.frame_times.append(np.arange(n, dtype=np.float32) + 0.5)
            cache.frame_tokens.append(frame_pool[rng.integers(0, len(frame_pool), n)])
            cache.frame_rows.append(np.arange(n_frames, n_frames + n))
            n_frames += n
            for _ in range(caps):
                length = int(min(77, 2 + 4 + rng.poisson(MEAN_WORDS - 4)))
                data.captions.append({"caption_id": caption_id, "video_id": vid, "split": "train",
                                      "caption": "synthetic", "keywords": ["a", "b", "c"], "token_start": n_tokens,
                                      "num_tokens": length, "shard": index})
                tokens = token_pool[rng.integers(0, len(token_pool), length)]
                data.tokens.append(tokens)
                cache.text_tokens.append(tokens)
                n_tokens += length
                caption_id += 1
        data.keyword_features = token_pool[rng.integers(0, len(token_pool), n_keywords)]
        cache.keyword_tokens = [token_pool[rng.integers(0, len(token_pool), 3)] for _ in range(n_keywords)]
        data.keyword_index = rng.integers(0, n_keywords, (len(data.captions), 3)).astype(np.int32)
        data.cache = cache
        write_shard(folder, data, image_proj, text_proj, {"model": "ViT-B-32", "pretrained": "synthetic"})
        frames_total += n_frames
    save_tail(model, blocks, folder, {"model": "ViT-B-32", "pretrained": "synthetic"})
    disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"videos": n_videos, "captions": caption_id, "cached_frames": frames_total, "disk_bytes": disk,
            "write_s": round(time.perf_counter() - t0, 1)}


def evict(folder: Path) -> bool:
    """Drop the folder's files from the page cache where the OS allows (posix_fadvise); False if it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def loader_rate(data, epochs: int) -> tuple[float, int, float]:
    """(batches/s, batches, MB/s of frame and text tokens) over `epochs` epochs of data's own batches."""
    n, nbytes, t0 = 0, 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in data(epoch):
            n += 1
            nbytes += sum(v.numel() * v.element_size() for v in batch.values())
    seconds = time.perf_counter() - t0
    return n / seconds, n, nbytes / seconds / 1e6


def step_time(model, batch: dict, device: str, steps: int) -> float:
    """Seconds of one AdamW step (forward, backward, clipping, update), after one warm-up step."""
    import torch

    from heads.trainer import param_groups

    model.to(device).train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    opt = torch.optim.AdamW(param_groups(model, 0.2, clip_lr=1e-6), lr=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        loss, _ = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=300)
    ap.add_argument("--captions-per-video", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="captions per loader batch")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=3, help="loader epochs timed (warm)")
    ap.add_argument("--threads", default="1,3", help="loader thread counts to time")
    ap.add_argument("--step-batch", type=int, default=8, help="captions per timed optimizer step")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per K (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", type=Path, default=None, help="write the caches here and keep them")
    args = ap.parse_args()
    import torch

    from heads.config import HeadConfig
    from heads.model import RetrievalHead
    from pipeline.read import FeatureStore
    from pipeline.tokens import TokenStore
    from workflows.token_data import TokenIndex, TokenTrainData, build_tuned

    device = resolve(args.device)
    info = machine(device)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="train-blocks-"))
    result: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        if not (folder / "shards").exists():
            print(f"writing token caches of {args.videos} videos to {folder} ...", flush=True)
            result["cache"] = write_cache(folder, args.videos, args.captions_per_video, 50, blocks=2)
        store, tokens = FeatureStore(folder), TokenStore(folder)
        index = TokenIndex(store, tokens)
        captions = store.split_captions("train")
        rows = []
        loader = {}
        for threads in [int(t) for t in args.threads.split(",")]:
            data = TokenTrainData(index, captions, args.batch_size, args.frames, 32, seed=0, threads=threads,
                                  depth=threads + 1, pin_memory=device.startswith("cuda"))
            tokens.close()  # drop the memmaps, so the cold read really reads
            cold = evict(folder)
            rate_cold, n_cold, mb_cold = loader_rate(data, 1)
            rate, n, mb = loader_rate(data, args.epochs)
            loader[threads] = {"cold_batches_per_s": rate_cold, "cold_batches": n_cold, "cold_MB_per_s": mb_cold,
                               "page_cache_dropped": cold, "warm_batches_per_s": rate, "warm_batches": n,
                               "warm_MB_per_s": mb, "step_kept_busy_ms": 1000 / rate}
            rows += [(f"loader, {threads} thread(s), cold", rate_cold,
                      f"batches/s ({mb_cold:.0f} MB/s, {n_cold} batches)"),
                     (f"loader, {threads} thread(s), warm", rate, f"batches/s ({mb:.0f} MB/s, {n} batches): keeps a "
                      f"{1000 / rate:.0f} ms step busy")]
        # the same reads into buffers already touched, as torch's caching allocator hands out pinned ones on CUDA
        # after the first batches (here: one buffer per thread, overwritten by its next batch: only the time counts)
        buffers: dict = {}

        def reuse(shape, pin):
            import threading
            key = threading.get_ident()
            if key not in buffers or buffers[key].shape[0] < shape[0]:
                buffers[key] = torch.zeros((shape[0] + 64, *shape[1:]), dtype=torch.float16)
            return buffers[key][:shape[0]]

        index.allocate = reuse
        threads = max(int(t) for t in args.threads.split(","))
        data = TokenTrainData(index, captions, args.batch_size, args.frames, 32, seed=0, threads=threads,
                              depth=threads + 1)
        loader_rate(data, 1)
        rate, n, mb = loader_rate(data, args.epochs)
        del index.allocate
        loader["reused_buffers"] = {"threads": threads, "warm_batches_per_s": rate, "warm_MB_per_s": mb,
                                    "step_kept_busy_ms": 1000 / rate}
        rows.append((f"loader, {threads} thread(s), warm, reused buffers", rate,
                     f"batches/s ({mb:.0f} MB/s): keeps a {1000 / rate:.0f} ms step busy"))
        result["loader"] = loader

        small = TokenTrainData(index, captions, args.step_batch, args.frames, 32, seed=0)
        batch = small.load(small.plan(0)[0])
        steps = {}
        for k in (0, 1, 2):
            torch.manual_seed(0)
            head = RetrievalHead(HeadConfig(max_frames=args.frames), torch.from_numpy(store.image_proj),
                                 torch.from_numpy(store.text_proj))
            tuned = build_tuned(head, tokens, max(k, 1))
            if k == 0:  # the head alone on the features the untouched tail gives
                with torch.no_grad():
                    feats = tuned.features(batch)
                seconds = step_time(head, feats, device, args.steps)
            else:
                seconds = step_time(tuned, batch, device, args.steps)
            steps[k] = {"seconds": seconds, "batch": args.step_batch,
                        "trainable_parameters": sum(p.numel() for p in (head if k == 0 else tuned).parameters()
                                                    if p.requires_grad)}
            rows.append((f"step K={k}, B={args.step_batch}", seconds, "s (forward + backward + AdamW)"))
            print(f"  K={k}: {seconds:.2f} s a step", flush=True)
        result["steps"] = steps
        tokens.close()
        print_table("train-heads --unfreeze-blocks: token loader and step time", info, rows)
        write_result("train_blocks", result)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
