"""Search latency and recall on a large synthetic collection: two-stage search against exhaustive scoring.

    python bench/search.py --videos 100000 --queries 10          # the issue's setting
    python bench/search.py --videos 2000 --queries 5              # a quick look

Synthetic collection: videos fall into topics (clusters); a video's frames are its topic, its own
offset and per-frame noise, in CLIP's joint space, mapped back to pre-projection features through
the (pseudo-inverse of the) projections, as the shards store them. A query describes one video
(its latent plus noise). The head is a RetrievalHead (full LSECA variant; random weights, or a
trained run's with --run). The coarse index uses only the CLIP projections, as workflows.search does.

Exhaustive: the full head scores every video for each query; the videos' text-independent
encodings (encode_video) are made once and not counted per query, which favours exhaustive.
Two-stage: workflows.search.top_candidates on the coarse embeddings, then encode_video on the
candidates (counted) and the full head. Recall: share of queries whose top-k set is the same.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.config import HeadConfig  # noqa: E402
from heads.model import RetrievalHead  # noqa: E402
from heads.trainer import load_head  # noqa: E402
from workflows.search import top_candidates  # noqa: E402


def make_head(args) -> RetrievalHead:
    if args.run:
        ckpt = next(p for p in (Path(args.run) / "best.pt", Path(args.run) / "last.pt") if p.exists())
        return load_head(ckpt).eval()
    torch.manual_seed(args.seed)
    # orthonormal projections: CLIP's are close to that, and it keeps the synthetic geometry readable
    image_proj = torch.linalg.qr(torch.randn(args.image_dim, args.dim))[0]  # (Dv, D)
    text_proj = torch.linalg.qr(torch.randn(args.text_dim, args.dim))[0]  # (Dt, D)
    cfg = HeadConfig(temporal_layers=args.temporal_layers, max_frames=args.frames)
    return RetrievalHead(cfg, image_proj, text_proj).eval()


def make_collection(head: RetrievalHead, args, rng: np.random.Generator):
    """Pre-projection frames (N, F, Dv) float16 and the latent (N, D) of each video."""
    d = head.proj.image.shape[1]
    back_image = torch.linalg.pinv(head.proj.image).numpy()  # (D, Dv): joint space -> tower output
    topics = rng.standard_normal((args.topics, d)).astype(np.float32)
    latent = topics[rng.integers(0, args.topics, args.videos)] + 0.7 * rng.standard_normal((args.videos, d),
                                                                                           dtype=np.float32)
    frames = np.empty((args.videos, args.frames, back_image.shape[1]), np.float16)
    for s in range(0, args.videos, args.chunk):
        n = len(latent[s:s + args.chunk])
        z = latent[s:s + args.chunk, None] + 0.5 * rng.standard_normal((n, args.frames, d), dtype=np.float32)
        frames[s:s + n] = (z.reshape(-1, d) @ back_image).reshape(n, args.frames, -1)  # 2-D: one BLAS call
    return frames, latent


def make_queries(head: RetrievalHead, latent: np.ndarray, args, rng: np.random.Generator) -> dict:
    """TEXT_KEYS tensors for args.queries texts, each describing one random video."""
    back_text = torch.linalg.pinv(head.proj.text).numpy()  # (D, Dt)
    target = latent[rng.choice(len(latent), args.queries, replace=False)]  # (Q, D)
    noise = lambda *shape: 0.5 * rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    q, w, k = args.queries, args.words, 3
    tokens = (target[:, None] + noise(q, w, target.shape[1])) @ back_text  # (Q, W, Dt)
    return {"text_global": torch.from_numpy((target + noise(*target.shape)) @ back_text),
            "tokens": torch.from_numpy(tokens), "token_mask": torch.ones(q, w, dtype=torch.bool),
            "keywords": torch.from_numpy((target[:, None] + noise(q, k, target.shape[1])) @ back_text),
            "keyword_mask": torch.ones(q, k, dtype=torch.bool)}


def coarse_embeddings(head: RetrievalHead, frames: np.ndarray, chunk: int) -> np.ndarray:
    proj = head.proj.image.detach().numpy()
    out = np.concatenate([frames[s:s + chunk].astype(np.float32).mean(1) @ proj
                          for s in range(0, len(frames), chunk)])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--topics", type=int, default=1000, help="clusters of videos")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=16)
    p.add_argument("--dim", type=int, default=512, help="joint embedding width D (ViT-B/32: 512)")
    p.add_argument("--image-dim", type=int, default=768, help="image tower width (ViT-B/32: 768)")
    p.add_argument("--text-dim", type=int, default=512, help="text tower width (ViT-B/32: 512)")
    p.add_argument("--temporal-layers", type=int, default=4)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--run", type=Path, help="use a trained run's head (and its widths) instead of random weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    head = make_head(args)
    if args.run:
        args.dim, args.image_dim, args.text_dim = (head.proj.image.shape[1], head.proj.image.shape[0],
                                                   head.proj.text.shape[0])
    t0 = time.perf_counter()
    frames, latent = make_collection(head, args, rng)
    texts = make_queries(head, latent, args, rng)
    emb = coarse_embeddings(head, frames, args.chunk)
    print(f"{args.videos} videos x {args.frames} frames, D={args.dim} (image {args.image_dim}, text "
          f"{args.text_dim}), {args.queries} queries, {torch.get_num_threads()} threads; "
          f"data + coarse index {time.perf_counter() - t0:.1f} s")
    text = head.encode_text(*texts.values())  # (Q, ...) in TEXT_KEYS order
    mask = torch.ones(args.chunk, args.frames, dtype=torch.bool)

    # exhaustive: every video through the full head, one query at a time
    scores, t_encode, t_score = torch.empty(args.queries, args.videos), 0.0, 0.0
    for s in range(0, args.videos, args.chunk):
        t0 = time.perf_counter()
        block = torch.from_numpy(frames[s:s + args.chunk].astype(np.float32))
        video = head.encode_video(block, mask[:len(block)])
        t1 = time.perf_counter()
        for i in range(args.queries):
            scores[i, s:s + len(block)] = head.score(text.index(slice(i, i + 1)), video)[0]
        t_encode, t_score = t_encode + t1 - t0, t_score + time.perf_counter() - t1
    exhaustive_top = scores.topk(args.top, dim=1).indices

    # two-stage, as workflows.search does it
    t_coarse, t_full, same_set, same_order = 0.0, 0.0, 0, 0
    proj_text = head.proj.text.detach().numpy()
    for i in range(args.queries):
        t0 = time.perf_counter()
        q = texts["text_global"][i].numpy() @ proj_text
        cand, index_kind = top_candidates(emb, q / np.linalg.norm(q), args.candidates)
        t1 = time.perf_counter()
        block = torch.from_numpy(frames[np.sort(cand)].astype(np.float32))
        video = head.encode_video(block, torch.ones(len(block), args.frames, dtype=torch.bool))
        s = head.score(text.index(slice(i, i + 1)), video)[0]
        top = torch.from_numpy(np.sort(cand))[s.topk(min(args.top, len(s))).indices]
        t_coarse, t_full = t_coarse + t1 - t0, t_full + time.perf_counter() - t1
        same_set += set(top.tolist()) == set(exhaustive_top[i].tolist())
        same_order += top.tolist() == exhaustive_top[i].tolist()

    q = args.queries
    exhaustive = t_score / q
    two_stage = (t_coarse + t_full) / q
    print(f"exhaustive full head:  {1000 * exhaustive:9.1f} ms/query  (+ {t_encode:.1f} s once to encode all videos)")
    print(f"two-stage:             {1000 * two_stage:9.1f} ms/query  (stage 1 {index_kind}: "
          f"{1000 * t_coarse / q:.1f} ms, stage 2 full head on {args.candidates}: {1000 * t_full / q:.1f} ms)")
    print(f"speed-up {exhaustive / two_stage:.1f}x; same top-{args.top} set: {100 * same_set / q:.1f}% of queries, "
          f"same order: {100 * same_order / q:.1f}%")


if __name__ == "__main__":
    main()
