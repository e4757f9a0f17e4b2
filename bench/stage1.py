"""Stage 1 at collection scale: which stage-1 index keeps the full head's exhaustive top 10, at what cost.

    python bench/stage1.py                      # bench/search.py's 100,000-video collection (cached), 50 queries
    python bench/stage1.py --videos 10000       # quicker

The same collection, head (by default its trained run) and queries as bench/search.py (its functions, same
seeds). The index's codes
are built once (exact stage 1) and kept under the collection's cache; the exhaustive scores of the full head
are cached beside them. Then, on the stage-1 vectors (videos x moments rows), for each index: build seconds,
milliseconds a query, and the share of queries whose exhaustive top-k videos are all among the --candidates
distinct videos that stage 1 returns (what decides bench/search.py's "same top-k set"). Rows: exact (numpy
matmul), FAISS HNSW (M 32, efConstruction 80) at several efSearch, and FAISS IVF-Flat at several list
counts and probes. For each query a lost video's stage-1 rank and score is printed, and for IVF the rank of
its list among the lists the query probes first: whether more probes could ever find it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_result  # noqa: E402

import numpy as np  # noqa: E402

import search as B  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--candidates", type=int, nargs="+", default=[200, 300])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lseca-bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hnsw", action="store_true", help="skip HNSW (its build takes minutes at 100k)")
    p.add_argument("--train-steps", type=int, default=300, help="as bench/search.py: the trained head it uses "
                   "(its cached run); 0: the untrained, perturbed head")
    a = p.parse_args()
    args = argparse.Namespace(videos=a.videos, queries=a.queries, candidates=max(a.candidates), top=a.top,
                              topics=1000, frames=12, words=16, dim=512, perturb=1.0, shard_videos=5000,
                              exact_below=None, moments=None, run=None, cache=a.cache, seed=a.seed, check_videos=0,
                              train_steps=a.train_steps, train_videos=3000, train_batch=128)
    import faiss
    import torch
    from heads.model import TEXT_KEYS
    from pipeline.read import FeatureStore
    from retrieval.codes import text_stage1
    from retrieval.index import build_index, distinct_videos, open_index
    from retrieval.scorer import Scorer, score

    features = args.cache / f"search-{args.videos}-{args.frames}f-d{args.dim}-seed{args.seed}"
    coll = B.write_collection(features, args)
    if args.train_steps > 0:
        args.run = B.train_run(coll, args)
    head, desc = B.make_head(coll, args)
    store = FeatureStore(features)
    scorer = Scorer(head, args.frames, args.words + 1, desc, {"bench": desc})
    folder = features / "index" / f"stage1-{'run' if args.run else 'perturbed'}"
    t0 = time.perf_counter()
    try:
        index = open_index(folder, store, scorer, "")
    except Exception:
        index, _ = build_index(folder, store, scorer, "cpu", 10 ** 12, progress=True)
    print(f"codes ready in {time.perf_counter() - t0:.0f} s", flush=True)
    targets, queries = B.make_queries(coll, args, np.random.default_rng(args.seed + 1))
    with torch.inference_mode():
        texts = [head.encode_text(*(q[k] for k in TEXT_KEYS)) for q in queries]
        text = type(texts[0])(**{f: torch.cat([getattr(t, f) for t in texts]) for f in
                                 ("t", "w", "w_e", "alpha", "mask")})
        qs = np.ascontiguousarray(text_stage1(head, text).numpy(), np.float32)  # (Q, Dc)
        cache = folder / f"exhaustive-{args.queries}q.npy"
        if cache.exists():
            full = np.load(cache)
        else:
            full = np.empty((len(queries), args.videos), np.float32)
            for s in range(0, args.videos, 1024):
                idx = np.arange(s, min(s + 1024, args.videos))
                full[:, idx] = score(head, text, index.codes(idx))[0].numpy()
            np.save(cache, full)
    best = np.argsort(-full, 1)[:, :args.top]
    M = index.moments
    rows = np.ascontiguousarray(index.videos.vectors, np.float32)  # (V * M, Dc)
    per_video = (qs @ rows.T).reshape(len(qs), args.videos, M).max(-1)  # exact stage 1, a video by its best moment
    order = np.argsort(-per_video, 1)
    rank = np.empty_like(order)
    rank[np.arange(len(qs))[:, None], order] = np.arange(args.videos)[None]
    worst = np.array([rank[q, best[q]].max() + 1 for q in range(len(qs))])
    print(f"exact stage-1 rank of the lowest of the exhaustive top {args.top}: p50 {np.median(worst):.0f}, "
          f"p90 {np.percentile(worst, 90):.0f}, max {worst.max()}", flush=True)

    results = []

    def measure(name: str, build_s: float, search, ivf=None) -> None:
        cent = ivf.quantizer.reconstruct_n(0, ivf.nlist) if ivf is not None else None  # the lists' centroids
        for C in a.candidates:
            lost, times = [], []
            for q in range(len(qs)):
                t = time.perf_counter()
                got = distinct_videos(search(qs[q:q + 1], C * M), M, C)
                times.append(time.perf_counter() - t)
                for v in sorted(set(best[q].tolist()) - set(got.tolist())):
                    row = int(np.argmax(rows[v * M:(v + 1) * M] @ qs[q])) + v * M
                    where = ""
                    if ivf is not None:
                        own = int(np.argmax(cent @ rows[row]))
                        where = f", its list {int((cent @ qs[q] > cent[own] @ qs[q]).sum()) + 1}th of {ivf.nlist}"
                    lost.append(f"q{q}: rank {rank[q, v] + 1}, score {per_video[q, v]:.3f}{where}")
            share = 1 - len({s.split(':')[0] for s in lost}) / len(qs)
            results.append({"index": name, "candidates": C, "build_s": round(build_s, 1),
                            "query_ms_p50": round(1000 * float(np.median(times)), 2), "kept": share, "lost": lost})
            print(f"{name:34s} C={C:4d}: kept {100 * share:5.1f}%, {1000 * np.median(times):6.1f} ms a query; "
                  f"lost: {'; '.join(lost) or '-'}", flush=True)

    def exact(q, k):
        s = rows @ q[0]
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top])]
    measure("exact (numpy matmul)", 0.0, exact)
    for nlist, spherical in ((1024, False), (1024, True), (4096, True)):
        # k-means lists; spherical: centroids kept unit length, so a row joins the list of its closest direction
        # (with plain means, inner-product assignment favours the longest centroids: a row can land in a list
        # far from it, which no query near the row probes first)
        t = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(rows.shape[1]), rows.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.spherical = spherical
        n = min(len(rows), 50 * nlist)
        ivf.train(rows[np.sort(np.random.default_rng(0).choice(len(rows), n, replace=False))])
        ivf.add(rows)
        built = time.perf_counter() - t
        for nprobe in (16, 32, 128):
            measure(f"IVF-Flat {nlist} {'spherical ' if spherical else ''}lists, {nprobe} probed", built,
                    lambda q, k, nprobe=nprobe: ivf.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1][0],
                    ivf)
    if not a.no_hnsw:  # its build takes minutes at 100k
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(rows.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        hnsw.add(rows)
        built = time.perf_counter() - t
        for ef in (256, 1600, 4000):
            measure(f"HNSW M 32, efSearch max({ef}, 2k)", built,
                    lambda q, k, ef=ef: hnsw.search(q, k, params=faiss.SearchParametersHNSW(efSearch=max(ef, 2 * k)))[1][0])
    info = machine()
    table = [(f"{r['index']}, C={r['candidates']}", round(100 * r["kept"], 1),
              f"build {r['build_s']} s, {r['query_ms_p50']} ms a query") for r in results]
    print_table(f"bench/stage1.py: {args.videos} videos x {M} moments, {len(qs)} queries: share whose exhaustive "
                f"top {args.top} stage 1 keeps (%)", info, table)
    write_result(f"stage1_{args.videos}", {"machine": info, "args": {k: str(v) for k, v in vars(a).items()},
                                           "head": desc, "moments": M, "worst_rank": worst.tolist(),
                                           "results": results})
    store.close()


if __name__ == "__main__":
    main()
