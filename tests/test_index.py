"""retrieval.codes / scorer / index: the full head on stored codes equals the head itself; the saved index is
refused when stale, updated per shard, and searched the same with or without FAISS."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from heads.config import HeadConfig
from heads.model import RetrievalHead
from pipeline.read import FeatureStore
from retrieval.codes import moments_of, text_stage1, video_codes, video_moments, video_stage1
from retrieval.index import StaleIndexError, build_index, open_index
from retrieval.scorer import rank, score
from tests.conftest import run_cli
from tests.search_fixtures import features, run  # noqa: F401 (fixtures)
from workflows import search as W

QUERY = "a dog runs in the park"


def _head(**cfg) -> RetrievalHead:
    torch.manual_seed(0)
    head = RetrievalHead(HeadConfig(temporal_layers=1, temporal_heads=2, temporal_init="random", **cfg),
                         torch.randn(24, 16) / 5, torch.randn(20, 16) / 5).eval()
    with torch.no_grad():  # move the identity-initialised modules away from identity: attention must matter
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return head


def _inputs(n_text=3, n_video=5, frames=6, words=7):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 3, 1, 5, 2])[:n_video]
    return ({"text_global": torch.randn(n_text, 20, generator=g), "tokens": torch.randn(n_text, words, 20, generator=g),
             "token_mask": torch.arange(words)[None] < torch.tensor([7, 2, 4])[:n_text, None],
             "keywords": torch.randn(n_text, 2, 20, generator=g), "keyword_mask": torch.tensor([[1, 1], [1, 0], [0, 0]],
                                                                                             dtype=torch.bool)[:n_text]},
            torch.randn(n_video, frames, 24, generator=g), torch.arange(frames)[None] < lengths[:, None])


@pytest.mark.parametrize("cfg", [{}, {"fusion": "weighted", "loss_terms": "fused"}, {"interaction": False}, {"fine": False},
                                 {"coarse": False}, {"variant": "seqtransf"}, {"variant": "meanp"}])
def test_scorer_on_codes_equals_the_head(cfg):
    head = _head(**cfg)
    texts, frames, mask = _inputs()
    with torch.inference_mode():
        text = head.encode_text(*texts.values())
        video = head.encode_video(frames, mask)
        expected, why = head.score(text, video), head.explain(text, video)
        got, relevance = score(head, text, video_codes(head, frames, mask))
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    real = mask[None].expand_as(why)
    assert torch.allclose(relevance[real], why[real], atol=1e-5)
    assert torch.isinf(relevance[~real]).all()
    if cfg.get("variant") in ("meanp", "seqtransf"):  # stage 1 is then the head's score itself
        with torch.inference_mode():
            s1 = text_stage1(head, text) @ video_stage1(head, video_codes(head, frames, mask)).T
        assert torch.allclose(s1, expected, atol=1e-5)


def test_rank_is_one_loop_with_best_frames():
    scores = torch.tensor([0.1, float("nan"), 0.7, 0.3])
    rel = torch.tensor([[0, 1.0], [1, 0], [2, 5], [-1, -torch.inf]])

    def block(idx):
        return scores[idx], rel[idx]
    assert rank(block, np.array([0, 1, 2, 3]), 3, chunk=2) == [(pytest.approx(0.7), 2, 1), (pytest.approx(0.3), 3, 0),
                                                                (pytest.approx(0.1), 0, 1)]


def test_stale_index_refused_then_updated_per_shard(features, run, tmp_path):
    """Index with one shard; a second shard appears (as extract adds new videos): search refuses, index
    encodes only the new shard; a retrained run makes it stale again."""
    feats = tmp_path / "features"
    shutil.copytree(features, feats, ignore=shutil.ignore_patterns("index"))
    aside = tmp_path / "shard-00001"
    shutil.move(feats / "shards" / "shard-00001", aside)
    res = run_cli("index", "--features", str(feats), "--run", str(run), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "encoded 2 videos of 1 new or changed shard(s), reused 0" in res.stdout
    assert "videos parameters: kind=exact" in res.stdout  # parameters printed (and saved in index.json)
    folder = W.default_folder(feats, run)
    assert json.loads((folder / "index.json").read_text())["ann"]["videos"]["kind"] == "exact"

    shutil.move(aside, feats / "shards" / "shard-00001")
    with pytest.raises(StaleIndexError, match=r"stale: 1 shard\(s\) new since it was built: shard-00001.*"
                                              r"python cli.py index --features"):
        W.search_text(feats, QUERY, run=run)
    _, report = build_index(folder, FeatureStore(feats), W.load_scorer(FeatureStore(feats), run), progress=False)
    assert report["encoded_shards"] == ["shard-00001"] and report["reused_shards"] == 1
    assert report["videos"] == 4 and len(list((folder / "codes").iterdir())) == 2
    updated = W.search_text(feats, QUERY, run=run, top=4, candidates=4)
    fresh = W.search_text(features, QUERY, run=run, top=4, candidates=4)  # built from scratch on the same shards
    assert [h.video_id for h in updated.hits] == [h.video_id for h in fresh.hits]
    assert [h.score for h in updated.hits] == pytest.approx([h.score for h in fresh.hits], abs=1e-6)

    ckpt = run / "best.pt"  # a retrained run: the codes no longer describe its head
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    try:
        store = FeatureStore(feats)
        with pytest.raises(StaleIndexError, match="it was built for full head"):
            open_index(folder, store, W.load_scorer(store, run), "index")
    finally:
        os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_same_results_without_faiss_and_with_ivf(features, run, tmp_path, monkeypatch):
    store = FeatureStore(features)
    scorer = W.load_scorer(store, run)
    flat, _ = build_index(tmp_path / "flat", store, scorer, progress=False)
    ivf, report = build_index(tmp_path / "ivf", store, scorer, exact_below=2, progress=False)
    assert report["stage1"]["videos"]["kind"] == "ivf" and (tmp_path / "ivf" / "videos.faiss").exists()
    assert ivf.videos.describe().startswith("faiss IVF-Flat") and flat.videos.describe() == "faiss IndexFlatIP (exact)"
    q = np.random.default_rng(0).standard_normal(flat.video_vectors.shape[1]).astype(np.float32)
    assert flat.moments == ivf.moments == 4 and flat.videos.vectors.shape[0] == 4 * len(flat.video_vectors)
    best = (flat.videos.vectors.reshape(len(flat.video_vectors), 4, -1) @ q).max(1)  # a video: its best moment
    expected = np.argsort(-best)
    assert flat.search_videos(q, 3).tolist() == expected[:3].tolist()
    assert ivf.search_videos(q, 4).tolist() == expected.tolist()  # 16 rows, one list: all probed
    monkeypatch.setitem(sys.modules, "faiss", None)
    bare = open_index(tmp_path / "ivf", store, scorer, "index")  # built with FAISS, opened without it
    assert bare.videos.describe() == "exact (numpy matmul)"
    assert bare.search_videos(q, 3).tolist() == expected[:3].tolist()


def test_ivf_lists_grow_in_place_then_retrain(tmp_path):
    """The inverted file keeps its lists when rows are only added, is trained again when the rows want more lists
    or earlier rows changed, and with every list probed it ranks exactly like a matmul."""
    from retrieval import index as I

    faiss = pytest.importorskip("faiss", reason="faiss-cpu is in the `search` and `test` extras")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6000, 16)).astype(np.float32)
    path = tmp_path / "videos.faiss"
    assert [I._nlist(n) for n in (1, 38, 39, 4000, 6000, 100_000, 400_000)] == [1, 1, 1, 64, 128, 512, 1024]
    first = I._build_ann(vectors[:4000], I._ann_params(4000, 2), path, None)
    assert first["kind"] == "ivf" and first["nlist"] == 64 and first["added"] == 4000
    assert first["trained_rows"] == 64 * I.IVF["train_per_list"]
    grown = I._build_ann(vectors[:4500], I._ann_params(4500, 2), path, (first, 4000))
    assert grown["nlist"] == 64 and grown["added"] == 500 and grown["trained_rows"] == first["trained_rows"]
    index = faiss.read_index(str(path))
    assert index.ntotal == 4500
    # plain k-means means, not FAISS's default unit-length centroids for inner product (README: recall)
    centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 64)
    assert first["spherical"] is False and not np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-3)
    q = rng.standard_normal(16).astype(np.float32)
    every = I.VectorIndex(vectors[:4500], {**grown, "nprobe": grown["nlist"]}, index)
    exact = I.VectorIndex(vectors[:4500], {"kind": "exact", "search": "exact (numpy matmul)"}, None)
    exact.ann = None
    assert every.search(q, 20).tolist() == exact.search(q, 20).tolist()
    few = I.VectorIndex(vectors[:4500], {**grown, "nprobe": 1}, index)  # one list holds ~70 rows: more are probed
    assert len(few.search(q, 1000)) == 1000 and len(set(few.search(q, 1000).tolist())) == 1000
    changed = I._build_ann(vectors[:4500], I._ann_params(4500, 2), path, (grown, 3000))  # rows 3000+ redone
    assert changed["added"] == 4500
    more = I._build_ann(vectors, I._ann_params(6000, 2), path, (changed, 4500))  # wants 128 lists: retrained
    assert more["nlist"] == 128 and more["added"] == 6000 and faiss.read_index(str(path)).ntotal == 6000
    assert I._build_ann(vectors[:10], I._ann_params(10, 50), path, None)["kind"] == "exact" and not path.exists()


def test_stage1_uses_the_runs_space(features, run):
    store = FeatureStore(features)
    searcher = W.open_searcher(features, run)
    model = searcher.model
    assert searcher.index.video_vectors.shape[1] == 2 * store.info.embed_dim  # coarse + fine parts
    frames, mask = store.frames(range(len(store.videos)), searcher.scorer.max_frames)
    with torch.inference_mode():
        expected = video_stage1(model, video_codes(model, torch.from_numpy(frames), torch.from_numpy(mask)))
    # the saved vectors are the run's (temporal encoder, S4, frame weights), not CLIP's frame means
    assert np.allclose(searcher.index.video_vectors, expected.numpy(), atol=2e-3)
    clip = (frames * mask[..., None]).sum(1) @ store.image_proj
    assert not np.allclose(searcher.index.video_vectors[:, :clip.shape[1]], clip / np.linalg.norm(clip, axis=1,
                                                                                                  keepdims=True),
                           atol=1e-2)


def _naive_stage1(head, codes, frames):
    """The whole-video stage-1 vector of the sub-video made of `frames` (beta renormalised over them)."""
    sub = {k: v[:, frames] for k, v in codes.items() if k in ("frames", "beta", "keys", "values")}
    sub["beta"] = sub["beta"] / sub["beta"].sum(1, keepdim=True)
    sub["nframes"] = torch.full((len(sub["frames"]),), len(frames), dtype=torch.int16)
    if "pooled" in codes:
        sub["pooled"] = codes["pooled"]
    return video_stage1(head, sub)[0]


@pytest.mark.parametrize("cfg", [{}, {"fusion": "weighted", "loss_terms": "fused"}, {"interaction": False},
                                 {"coarse": False}])
def test_moments_are_whole_video_vectors_of_contiguous_frame_groups(cfg):
    head = _head(**cfg)
    _, frames, mask = _inputs()  # real frames 6, 3, 1, 5, 2 of 6
    with torch.inference_mode():
        codes = video_codes(head, frames, mask)
        one = video_moments(head, codes, 1)[:, 0]
        three = video_moments(head, codes, 3)
    # one moment: the whole video, the same vector the old single-vector stage 1 gave
    expected = []
    for v in range(len(frames)):
        n = int(mask[v].sum())
        expected.append(_naive_stage1(head, {k: c[v:v + 1] for k, c in codes.items()}, list(range(n))))
    assert torch.allclose(one, torch.stack(expected), atol=1e-5)
    # three moments: frames [0,1], [2,3], [4,5] of a 6-frame video; [0], [1], [2] of 3; 5 frames: [0,1], [2,3], [4]
    groups = {0: [[0, 1], [2, 3], [4, 5]], 1: [[0], [1], [2]], 2: [[0], [0], [0]], 3: [[0, 1], [2, 3], [4]],
              4: [[0], [1], [0, 1]]}  # a 1-frame video: every moment is that frame; 2 frames: the last is the whole
    for v, gs in groups.items():
        c = {k: x[v:v + 1] for k, x in codes.items()}
        for m, g in enumerate(gs):
            assert torch.allclose(three[v, m], _naive_stage1(head, c, g), atol=1e-5), (cfg, v, m)


def test_heads_with_exact_stage1_keep_one_moment():
    assert moments_of(_head(variant="seqtransf"), 4) == 1 and moments_of(_head(variant="meanp"), 4) == 1
    assert moments_of(_head(), 4) == 4 and moments_of(_head(interaction=False), 4) == 4
