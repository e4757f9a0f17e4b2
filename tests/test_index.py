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
from retrieval.codes import text_stage1, video_codes, video_stage1
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


@pytest.mark.parametrize("cfg", [{}, {"fusion": "weighted"}, {"interaction": False}, {"fine": False},
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


def test_same_results_without_faiss_and_with_hnsw(features, run, tmp_path, monkeypatch):
    store = FeatureStore(features)
    scorer = W.load_scorer(store, run)
    flat, _ = build_index(tmp_path / "flat", store, scorer, progress=False)
    hnsw, report = build_index(tmp_path / "hnsw", store, scorer, exact_below=2, progress=False)
    assert report["stage1"]["videos"]["kind"] == "hnsw" and (tmp_path / "hnsw" / "videos.faiss").exists()
    assert hnsw.videos.describe().startswith("faiss HNSW") and flat.videos.describe() == "faiss IndexFlatIP (exact)"
    q = np.random.default_rng(0).standard_normal(flat.video_vectors.shape[1]).astype(np.float32)
    expected = np.argsort(-(flat.video_vectors @ q))
    assert flat.videos.search(q, 3).tolist() == expected[:3].tolist()
    assert hnsw.videos.search(q, 4).tolist() == expected.tolist()  # 4 rows: HNSW finds them all
    monkeypatch.setitem(sys.modules, "faiss", None)
    bare = open_index(tmp_path / "hnsw", store, scorer, "index")  # built with HNSW, opened without faiss
    assert bare.videos.describe() == "exact (numpy matmul)"
    assert bare.videos.search(q, 3).tolist() == expected[:3].tolist()


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
