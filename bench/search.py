"""Search at collection scale: index build, query latency per stage, and two-stage recall against exhaustive scoring.

    python bench/search.py                                   # the issue's setting: 100,000 videos, D=512, 12 frames
    python bench/search.py --videos 5000 --queries 20         # a quick look

Collection (synthetic shards in the extract format, written with pipeline.write.write_shard and cached
under $TMPDIR/lseca-bench/): every video is a sequence of 2 or 3 events; an event is a topic (one of
--topics clusters) plus its own offset, and each of its frames adds noise. Frames live in a joint
space and are mapped back to tower outputs (768-d) through the pseudo-inverse of the projection, as the
shards store them. A query describes ONE event of one video (16 word tokens near that event, 40% of them
filler in random directions, then its global feature as the EOT token, and 3 keywords): the mean of a video's frames is then
not the query's latent, and the text-conditioned pooling and the max-based fine match decide.

Head: by default a full LSECA head trained by `cli.py train-heads` (its defaults, a random temporal init)
for about --train-steps steps on --train-videos new videos of the same process, each with 2 captions made
as the queries are (train_run; the run is cached beside the collection); --run takes another run's head;
--train-steps 0 takes the full head untrained (HeadConfig defaults, D=512, 4 temporal layers, random
temporal init) with the modules that start as identity (S4's q/k/v/out/linear, S3's output projection)
perturbed by Gaussian noise of std --perturb / sqrt(D), so attention depends on the text.

Index: retrieval.index.build_index (the `index` command's code), timed, its disk size measured.
Queries: retrieval.searcher.Searcher.text_encoded (the `search`/`serve` code) after stage 1 picks
--candidates; per stage times. CLIP's text tower (ViT-B-32, random weights: speed does not depend on
them) and the keyword extractor are timed on real query strings and added to each query's total.
Exhaustive: the same full head on every video's stored codes (all queries in one pass). Recall: share
of queries whose two-stage top-k set equals the exhaustive top-k set. The stored codes are float16;
their effect is measured apart: the head's own fp32 scores (encode_video + score) on --check-videos
videos against the scores from the index.
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
from _common import machine, print_table, write_result  # noqa: E402

import numpy as np  # noqa: E402

DV, DT = 768, 512
TARGET_P50, TARGET_P95, TARGET_RECALL = 0.200, 0.400, 0.95


def orthonormal(rng, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0].astype(np.float32)  # (rows, cols)


def make_events(topics: np.ndarray, n: int, rng) -> np.ndarray:
    """(n, D) events of one video: each a random topic plus its own offset."""
    return (topics[rng.integers(0, len(topics), n)]
            + 0.8 * rng.standard_normal((n, topics.shape[1]), dtype=np.float32))


def clip_latents(events: np.ndarray, frames: int, rng) -> np.ndarray:
    """(frames, D) latents of a clip: its events in order over uneven spans, each frame with its own noise."""
    segment = np.sort(rng.integers(0, len(events), frames))
    return events[segment] + 0.6 * rng.standard_normal((frames, events.shape[1]), dtype=np.float32)


def add_video(data, vid: str, row: int, frames: np.ndarray) -> None:
    """One video of a shard in the extract format: 1 FPS frames (F, Dv) float16 from frame row `row` on."""
    from pipeline import schema as S
    n = len(frames)
    data.videos.append({"video_id": vid, "path": f"/synthetic/{vid}", "duration": float(n), "num_frames": n,
                        "frame_start": row, "status": S.STATUS_OK, "error": "", "shard": data.index})
    data.frames.append(frames)
    data.frame_times.append(np.arange(n, dtype=np.float32) + 0.5)


def write_collection(out: Path, args) -> dict:
    """Shards of --videos videos; returns the events of each video (for the queries) and the projections."""
    from pipeline.write import ShardData, write_shard

    rng = np.random.default_rng(args.seed)
    d = args.dim
    image_proj, text_proj = orthonormal(rng, DV, d), orthonormal(rng, DT, d)  # (Dv, D), (Dt, D)
    topics = rng.standard_normal((args.topics, d)).astype(np.float32)
    back = np.linalg.pinv(image_proj).astype(np.float32)  # (D, Dv)
    marker = out / "complete"
    n_events = rng.integers(2, 4, args.videos)
    events = [make_events(topics, n_events[v], rng) for v in range(args.videos)]
    coll = {"events": events, "image_proj": image_proj, "text_proj": text_proj, "topics": topics}
    if marker.exists():
        return coll
    shutil.rmtree(out, ignore_errors=True)
    for index, start in enumerate(range(0, args.videos, args.shard_videos)):
        data = ShardData(index)
        vids = range(start, min(args.videos, start + args.shard_videos))
        z = np.empty((len(vids), args.frames, d), np.float32)
        for b, v in enumerate(vids):
            z[b] = clip_latents(events[v], args.frames, rng)
        frames = (z.reshape(-1, d) @ back).reshape(len(vids), args.frames, DV).astype(np.float16)
        for b, v in enumerate(vids):
            add_video(data, f"video{v:06d}.mp4", b * args.frames, frames[b])
        data.meta = {"shard": index, "synthetic": True}
        write_shard(out, data, image_proj, text_proj, {"model": "ViT-B-32", "pretrained": "synthetic"})
    marker.write_text("ok\n")
    return coll


def describe(event: np.ndarray, words: int, rng, back: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A caption of one event, in the text tower's width as extract stores it: tokens (words + 1, Dt), whose
    last row (the EOT) is the global feature, and 3 keyword rows (3, Dt). 40% of the words are filler in
    random directions."""
    d = len(event)
    w = event + 0.7 * rng.standard_normal((words, d), dtype=np.float32)
    filler = rng.random(words) < 0.4  # words that say nothing about the video
    w[filler] = rng.standard_normal((int(filler.sum()), d), dtype=np.float32)
    keywords = event + 0.7 * rng.standard_normal((3, d), dtype=np.float32)
    t = event + 0.5 * rng.standard_normal(d, dtype=np.float32)
    return np.concatenate([w, t[None]]) @ back, keywords @ back


def make_queries(coll: dict, args, rng) -> tuple[list[int], list[dict]]:
    """Each query: one event of one random video, as TEXT_KEYS tensors of one row."""
    import torch
    back = np.linalg.pinv(coll["text_proj"]).astype(np.float32)  # (D, Dt)
    targets, out = rng.choice(args.videos, args.queries, replace=False), []
    for v in targets:
        tokens, keywords = describe(coll["events"][v][rng.integers(0, len(coll["events"][v]))], args.words, rng, back)
        out.append({"text_global": torch.from_numpy(tokens[-1:]), "tokens": torch.from_numpy(tokens[None]),
                    "token_mask": torch.ones(1, len(tokens), dtype=torch.bool),
                    "keywords": torch.from_numpy(keywords[None]), "keyword_mask": torch.ones(1, 3, dtype=torch.bool)})
    return targets.tolist(), out


def write_training_set(out: Path, coll: dict, args) -> Path:
    """--train-videos new videos of the collection's process (its topics and projections), each with 2
    captions of one of its events made as the queries are, in the extract format (one shard of each
    split: 90% train, 10% val). The collection and its queries are not in it."""
    from pipeline.write import ShardData, write_shard

    marker = out / "complete"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(args.seed + 7)
    back_v = np.linalg.pinv(coll["image_proj"]).astype(np.float32)
    back_t = np.linalg.pinv(coll["text_proj"]).astype(np.float32)
    n_val = max(args.train_videos // 10, 1)
    caption_id = 0
    for index, (split, videos) in enumerate((("train", args.train_videos - n_val), ("val", n_val))):
        data, keywords = ShardData(index), []
        n_tokens = 0
        for b in range(videos):
            k = rng.integers(2, 4)
            events = make_events(coll["topics"], k, rng)
            vid = f"{split}{b:06d}.mp4"
            add_video(data, vid, b * args.frames, (clip_latents(events, args.frames, rng) @ back_v).astype(np.float16))
            for _ in range(2):
                tok, kw = describe(events[rng.integers(0, k)], args.words, rng, back_t)
                data.captions.append({"caption_id": caption_id, "video_id": vid, "split": split, "caption": "synthetic",
                                      "keywords": ["a", "b", "c"], "token_start": n_tokens, "num_tokens": len(tok),
                                      "shard": index})
                data.tokens.append(tok.astype(np.float16))
                keywords.append(kw)
                n_tokens += len(tok)
                caption_id += 1
        data.keyword_features = np.concatenate(keywords).astype(np.float16)
        data.keyword_index = np.arange(3 * len(keywords), dtype=np.int32).reshape(-1, 3)
        data.meta = {"shard": index, "synthetic": True}
        write_shard(out, data, coll["image_proj"], coll["text_proj"], {"model": "ViT-B-32", "pretrained": "synthetic"})
    marker.write_text("ok\n")
    return out


def train_run(coll: dict, args) -> Path:
    """A full head trained by `cli.py train-heads` (its defaults but a random temporal init: these shards have
    no CLIP blocks) on write_training_set's shards; reused when it exists."""
    import subprocess
    name = f"train-{args.train_videos}v-{args.frames}f-d{args.dim}-seed{args.seed}"
    train = write_training_set(args.cache / name, coll, args)
    run = args.cache / f"{name}-run-{args.train_steps}steps"
    if (run / "best.pt").exists():
        return run
    captions = 2 * (args.train_videos - max(args.train_videos // 10, 1))
    epochs = max(1, -(-args.train_steps * args.train_batch // captions))  # ceil: about --train-steps steps
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "train-heads", "--features",
           str(train), "--out", str(run), "--epochs", str(epochs), "--batch-size", str(args.train_batch),
           "--temporal-init", "random", "--seed", str(args.seed), "--device", "cpu"]
    print("training:", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def make_head(coll: dict, args):
    import torch
    from heads.config import HeadConfig
    from heads.model import RetrievalHead
    from heads.trainer import load_head
    if args.run:
        ckpt = next(p for p in (args.run / "best.pt", args.run / "last.pt") if p.exists())
        return load_head(ckpt).eval(), f"trained run {ckpt}"
    torch.manual_seed(args.seed)
    head = RetrievalHead(HeadConfig(temporal_init="random", max_frames=args.frames),
                         torch.from_numpy(coll["image_proj"]), torch.from_numpy(coll["text_proj"])).eval()
    std = args.perturb / np.sqrt(args.dim)
    with torch.no_grad():
        for layer in (head.pool.q, head.pool.k, head.pool.v, head.pool.out, head.pool.linear,
                      head.keyword_attn.attn.out_proj):
            layer.weight.add_(torch.randn_like(layer.weight) * std)
    return head, (f"full head, seeded random weights (seed {args.seed}), S4 q/k/v/out/linear and S3 out_proj "
                  f"perturbed by N(0, ({args.perturb}/sqrt(D))^2)")


def text_tower_times(n: int, seed: int) -> tuple[list[float], list[float]]:
    """Seconds per query of CLIP's ViT-B-32 text tower and of the keyword extractor, on real strings."""
    from pipeline.encode import ClipEncoder, ModelSpec
    from pipeline.keywords import KeywordExtractor, KeywordSpec
    import logging
    logging.getLogger("pipeline.encode").setLevel(logging.ERROR)
    enc = ClipEncoder(ModelSpec("ViT-B-32", "none", "cpu"))
    kw = KeywordExtractor(KeywordSpec())
    rng = np.random.default_rng(seed)
    nouns = "dog man woman car ball kitchen beach road child bird cat horse guitar river city".split()
    verbs = "runs cooks plays drives jumps sings swims walks throws catches rides".split()
    clip_t, kw_t = [], []
    enc.encode_texts(["warm up"]), kw(["warm up the model"])
    for _ in range(n):
        q = f"a {rng.choice(nouns)} {rng.choice(verbs)} with a {rng.choice(nouns)} near the {rng.choice(nouns)}"
        t0 = time.perf_counter()
        enc.encode_texts([q])
        t1 = time.perf_counter()
        kw([q])
        clip_t.append(t1 - t0)
        kw_t.append(time.perf_counter() - t1)
    return clip_t, kw_t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--candidates", type=int, default=None, help="stage-1 candidates per query (default: search's)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--topics", type=int, default=1000, help="clusters of events")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=16)
    p.add_argument("--dim", type=int, default=512, help="joint embedding width D (ViT-B/32: 512)")
    p.add_argument("--perturb", type=float, default=1.0, help="noise on the identity-initialised modules")
    p.add_argument("--shard-videos", type=int, default=5000)
    p.add_argument("--exact-below", type=int, default=None, help="the index's threshold (default: the index's own)")
    p.add_argument("--moments", type=int, default=None, help="stage-1 vectors per video (default: the index's own)")
    p.add_argument("--check-videos", type=int, default=2000, help="videos scored in fp32 by the head itself")
    p.add_argument("--run", type=Path, help="a trained run's head (its widths must be D=512, 768/512)")
    p.add_argument("--train-steps", type=int, default=300, help="without --run: train a full head for about this "
                   "many steps on new videos of the collection's process (train_run); 0: an untrained head, "
                   "perturbed off identity (--perturb)")
    p.add_argument("--train-videos", type=int, default=3000)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lseca-bench")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.candidates is None:
        from retrieval import CANDIDATES
        args.candidates = CANDIDATES

    import logging
    logging.basicConfig(level=logging.WARNING)
    import torch
    from heads.model import TEXT_KEYS
    from pipeline.read import FeatureStore
    from retrieval.index import EXACT_BELOW, build_index
    from retrieval.scorer import Scorer, score
    from retrieval.searcher import Searcher

    features = args.cache / f"search-{args.videos}-{args.frames}f-d{args.dim}-seed{args.seed}"
    t0 = time.perf_counter()
    coll = write_collection(features, args)
    print(f"collection: {args.videos} videos x {args.frames} frames in {features} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.run is None and args.train_steps > 0:
        args.run = train_run(coll, args)
    head, head_desc = make_head(coll, args)
    store = FeatureStore(features)
    scorer = Scorer(head, args.frames, args.words + 1, head_desc, {"bench": head_desc})
    folder = features / "index" / f"bench-{'run' if args.run else f'perturb{args.perturb}'}"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    index, report = build_index(folder, store, scorer, "cpu", args.exact_below or EXACT_BELOW, progress=True,
                                moments=args.moments)
    build_s = time.perf_counter() - t0
    disk = report["bytes"]  # the index's files, as `index` reports them
    print(f"index built in {build_s:.0f} s, {disk / 2 ** 30:.2f} GiB; stage 1: {index.describe_videos()}", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    targets, queries = make_queries(coll, args, rng)
    searcher = Searcher(store, scorer, index)
    searcher.text_encoded(queries[0], "warm-up", args.top, args.candidates)
    results = [searcher.text_encoded(q, f"query {i}", args.top, args.candidates) for i, q in enumerate(queries)]
    clip_t, kw_t = text_tower_times(args.queries, args.seed)
    head_t = np.array([sum(r.timings.values()) for r in results])
    total = head_t + np.array(clip_t) + np.array(kw_t)
    stages = {k: float(np.median([r.timings.get(k, 0.0) for r in results])) for k in results[0].timings}

    # exhaustive: the same head on every video's codes, all queries at once
    t0 = time.perf_counter()
    with torch.inference_mode():
        texts = [head.encode_text(*(q[k] for k in TEXT_KEYS)) for q in queries]
        text = type(texts[0])(**{f: torch.cat([getattr(t, f) for t in texts]) for f in
                                 ("t", "w", "w_e", "alpha", "mask")})
        full = torch.empty(len(queries), args.videos)
        for s in range(0, args.videos, 1024):
            idx = np.arange(s, min(s + 1024, args.videos))
            full[:, idx] = score(head, text, index.codes(idx))[0]
    exhaustive_s = time.perf_counter() - t0
    best = full.topk(args.top, dim=1).indices.tolist()
    same_set = [set(h.video for h in r.hits) == set(b) for r, b in zip(results, best)]
    same_order = [[h.video for h in r.hits] == b for r, b in zip(results, best)]
    target_rank = (full > full[torch.arange(len(targets)), targets][:, None]).sum(1) + 1  # the described video
    # each query whose two sets differ: lost in stage 1 (an exhaustive top-k video not among the candidates),
    # or a stage-2 disagreement (all there, yet ranked otherwise: a tie at the k-th place, within rounding)
    from retrieval.codes import text_stage1
    lost_stage1, near_ties = [], []
    with torch.inference_mode():
        q1 = text_stage1(head, text).numpy()
    for q, (r, b) in enumerate(zip(results, best)):
        if set(h.video for h in r.hits) == set(b):
            continue
        cand = set(index.search_videos(q1[q], args.candidates).tolist())
        missing = sorted(set(b) - cand)
        if missing:
            lost_stage1.append(q)
        else:
            kth = full[q].topk(args.top + 1).values
            near_ties.append(float(kth[-2] - kth[-1]))
    print(f"differing queries: {len(lost_stage1)} lost in stage 1, {len(near_ties)} with every exhaustive top-{args.top} "
          f"video among the candidates (k-th minus (k+1)-th exhaustive score: "
          f"{', '.join(f'{g:.1e}' for g in near_ties) or '-'})", flush=True)

    # float16 codes against the head's own float32 encodings, on the first --check-videos videos
    n = min(args.check_videos, args.videos)
    with torch.inference_mode():
        frames, mask = store.frames(range(n), args.frames)
        ref = torch.cat([head.score(text, head.encode_video(torch.from_numpy(frames[s:s + 256]),
                                                             torch.from_numpy(mask[s:s + 256])))
                         for s in range(0, n, 256)], 1)
    diff = float((ref - full[:, :n]).abs().max())
    same_top_fp32 = float(np.mean([set(a) == set(b) for a, b in zip(ref.topk(args.top, 1).indices.tolist(),
                                                                     full[:, :n].topk(args.top, 1).indices.tolist())]))

    p50, p95 = float(np.percentile(total, 50)), float(np.percentile(total, 95))
    recall = float(np.mean(same_set))
    info = machine()
    rows = [
        ("videos", args.videos, f"{args.frames} frames, D={args.dim} (image {DV}, text {DT}), {args.topics} topics"),
        ("head", "", head_desc),
        ("index build (s)", round(build_s, 1), f"encode {report['encode_seconds']:.0f} s; stage 1: {index.describe_videos()}"),
        ("index on disk (GiB)", round(disk / 2 ** 30, 3), "codes float16, stage-1 vectors float32"),
        ("query p50 (ms)", round(1000 * p50, 1), f"target <= {1000 * TARGET_P50:.0f}: {'met' if p50 <= TARGET_P50 else 'MISSED'}"),
        ("query p95 (ms)", round(1000 * p95, 1), f"target <= {1000 * TARGET_P95:.0f}: {'met' if p95 <= TARGET_P95 else 'MISSED'}"),
        ("  CLIP text tower p50 (ms)", round(1000 * float(np.median(clip_t)), 1), "ViT-B-32, random weights"),
        ("  keywords p50 (ms)", round(1000 * float(np.median(kw_t)), 1), "KeyBERT, the default model"),
        *[(f"  {k} p50 (ms)", round(1000 * v, 1), "") for k, v in stages.items()],
        ("candidates", args.candidates, "stage-1 candidates reaching the full head"),
        (f"same top-{args.top} set", round(100 * recall, 1),
         f"% of {args.queries} queries; target >= {100 * TARGET_RECALL:.0f}: {'met' if recall >= TARGET_RECALL else 'MISSED'}"),
        (f"same top-{args.top} order", round(100 * float(np.mean(same_order)), 1), "%"),
        ("  lost in stage 1", len(lost_stage1), "queries with an exhaustive top-k video not among the candidates"),
        ("  stage-2 near ties", len(near_ties), "queries with all of them among the candidates, ranked otherwise"),
        ("exhaustive (s, all queries)", round(exhaustive_s, 1), "full head on every video's codes"),
        ("described video rank p50", float(target_rank.float().median()), "exhaustive rank of the video the query describes"),
        ("fp16 codes: max |score diff|", round(diff, 5), f"vs the head's fp32 on {n} videos"),
        ("fp16 codes: same top-k", round(100 * same_top_fp32, 1), f"% of queries, on those {n} videos"),
    ]
    print_table("bench/search.py: index, query latency, two-stage recall", info, rows)
    write_result(f"search_{args.videos}", {
        "machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "head": head_desc,
        "build_seconds": build_s, "index_report": report, "disk_bytes": disk,
        "latency_ms": {"p50": 1000 * p50, "p95": 1000 * p95, "head_path_p50": 1000 * float(np.median(head_t)),
                       "clip_text_p50": 1000 * float(np.median(clip_t)), "keywords_p50": 1000 * float(np.median(kw_t)),
                       "stages_p50": {k: 1000 * v for k, v in stages.items()}},
        "same_top_set": recall, "same_top_order": float(np.mean(same_order)), "exhaustive_seconds": exhaustive_s,
        "lost_in_stage1": len(lost_stage1), "stage2_near_ties": near_ties,
        "described_video_rank_median": float(target_rank.float().median()),
        "fp16_max_abs_diff": diff, "fp16_same_top_share": same_top_fp32,
        "targets": {"p50_ms": 1000 * TARGET_P50, "p95_ms": 1000 * TARGET_P95, "same_top_set": TARGET_RECALL}})
    store.close()
    if os.environ.get("BENCH_KEEP_INDEX") != "1":
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
