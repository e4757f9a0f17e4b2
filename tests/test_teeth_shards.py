"""The shard writer and reader on a shard built by hand: every dataset's dtype and shape as
pipeline/schema.py defines them, values read back with h5py and pyarrow alone and with FeatureStore,
and FeatureStore.texts putting keywords back in each caption's own order (HDF5 wants sorted indices)."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.read import FeatureStore
from pipeline.write import ShardData, write_shard

DV, DT, D, K = 6, 5, 4, 3
ATTRS = {"model": "hand-made", "pretrained": "none"}


def _video(vid, start, n, status=S.STATUS_OK, error="", duration=2.0, shard=0):
    return {"video_id": vid, "path": f"/videos/{vid}", "duration": duration, "num_frames": n, "frame_start": start,
            "status": status, "error": error, "shard": shard}


def _caption(cid, vid, text, keywords, token_start, num_tokens, split="train", shard=0):
    return {"caption_id": cid, "video_id": vid, "split": split, "caption": text, "keywords": keywords,
            "token_start": token_start, "num_tokens": num_tokens, "shard": shard}


# Keyword rows of each caption, in the caption's own (score) order: shuffled, decreasing, repeated, none,
# and one increasing row as the case that needs no reordering.
KEYWORD_ROWS = [[4, 1, 3], [5, 4, 0], [2, 2, -1], [-1, -1, -1], [0, 1, 2]]


def make_shard(seed: int = 0, index: int = 0) -> tuple[ShardData, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = ShardData(index)
    # video a: 3 frames, b: failed (no frames), c: 2 frames; float32 in, as the encoder may hand them
    data.frames = [rng.normal(size=(3, DV)).astype(np.float32), rng.normal(size=(2, DV)).astype(np.float32)]
    data.frame_times = [np.array([0.5, 1.5, 2.5]), np.array([0.5005, 5.5])]
    data.videos = [_video("a.mp4", 0, 3, shard=index),
                   _video("b.mp4", 3, 0, S.STATUS_FAILED, "b.mp4: broken", float("nan"), shard=index),
                   _video("sub/c.mp4", 3, 2, error="partial decode: c.mp4: damaged", duration=5.9, shard=index)]
    lengths = [4, 7, 3, 5, 2]
    videos = ["a.mp4", "a.mp4", "sub/c.mp4", "sub/c.mp4", "sub/c.mp4"]
    start = 0
    for i, (n, vid, rows) in enumerate(zip(lengths, videos, KEYWORD_ROWS)):
        words = [f"w{r}" for r in rows if r >= 0]
        data.captions.append(_caption(10 + i, vid, f"caption {i} \u00e9 & <b>", words, start, n, shard=index))
        data.tokens.append(rng.normal(size=(n, DT)).astype(np.float32))
        start += n
    # each keyword row is recognisable: row r holds r + 0.125 * column
    data.keyword_features = (np.arange(6)[:, None] + 0.125 * np.arange(DT)[None]).astype(np.float16)
    data.keyword_index = np.array(KEYWORD_ROWS, np.int32)
    data.meta = {"shard": index, "note": "hand-made", "failures": [{"path": "b.mp4", "stage": "decode",
                                                                     "error": "broken"}]}
    image_proj = rng.normal(size=(DV, D)).astype(np.float32)
    text_proj = rng.normal(size=(DT, D)).astype(np.float32)
    return data, image_proj, text_proj


@pytest.fixture
def shard(tmp_path):
    data, ip, tp = make_shard()
    path = write_shard(tmp_path / "features", data, ip, tp, ATTRS)
    return tmp_path / "features", path, data, ip, tp


# --- write_shard ----------------------------------------------------------------------------------------
def test_h5_datasets_dtypes_shapes_and_values(shard):
    out, path, data, ip, tp = shard
    assert path == out / S.SHARDS_DIR / S.shard_name(0)
    assert sorted(p.name for p in path.iterdir()) == sorted([S.FEATURES_FILE, S.VIDEOS_FILE, S.CAPTIONS_FILE,
                                                              S.META_FILE])
    assert not list((out / S.SHARDS_DIR).glob(f"{S.TMP_PREFIX}*"))  # nothing half-written left
    T, W, C, V = 5, sum(len(t) for t in data.tokens), len(data.captions), len(data.keyword_features)
    expected = {
        S.H5_FRAMES: ((T, DV), np.concatenate(data.frames).astype(np.float16)),
        S.H5_FRAME_TIMES: ((T,), np.array([0.5, 1.5, 2.5, 0.5005, 5.5], np.float32)),
        S.H5_TOKENS: ((W, DT), np.concatenate(data.tokens).astype(np.float16)),
        S.H5_KEYWORDS: ((V, DT), data.keyword_features),
        S.H5_KEYWORD_INDEX: ((C, K), np.array(KEYWORD_ROWS, np.int32)),
        S.H5_IMAGE_PROJ: ((DV, D), ip),
        S.H5_TEXT_PROJ: ((DT, D), tp),
    }
    with h5py.File(path / S.FEATURES_FILE, "r") as h5:
        assert set(h5.keys()) == set(S.H5_DTYPES) == set(expected)
        for name, (shape, values) in expected.items():
            ds = h5[name]
            assert ds.dtype == np.dtype(S.H5_DTYPES[name]) and ds.shape == shape, name
            np.testing.assert_array_equal(ds[()], values, err_msg=name)
        assert set(h5.attrs) == set(S.H5_ATTRS)
        assert int(h5.attrs["schema_version"]) == S.SCHEMA_VERSION
        assert (str(h5.attrs["model"]), str(h5.attrs["pretrained"])) == ("hand-made", "none")
        assert (int(h5.attrs["image_dim"]), int(h5.attrs["text_dim"]), int(h5.attrs["embed_dim"])) == (DV, DT, D)


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], float) and math.isnan(w[k]):
                assert math.isnan(g[k]), k
            else:
                assert g[k] == w[k], (k, g[k], w[k])


def test_parquet_tables_and_meta(shard):
    out, path, data, *_ = shard
    videos, captions = pq.read_table(path / S.VIDEOS_FILE), pq.read_table(path / S.CAPTIONS_FILE)
    assert videos.schema.remove_metadata().equals(S.VIDEO_SCHEMA)
    assert captions.schema.remove_metadata().equals(S.CAPTION_SCHEMA)
    _same_rows(videos.to_pylist(), data.videos)
    _same_rows(captions.to_pylist(), data.captions)
    assert json.loads((path / S.META_FILE).read_text()) == data.meta


def test_feature_store_reads_what_was_written(shard):
    out, path, data, ip, tp = shard
    store = FeatureStore(out)
    assert [v["video_id"] for v in store.videos] == ["a.mp4", "sub/c.mp4"]  # the failed video is left out
    assert (store.info.image_dim, store.info.text_dim, store.info.embed_dim) == (DV, DT, D)
    np.testing.assert_array_equal(store.image_proj, ip)
    np.testing.assert_array_equal(store.text_proj, tp)
    frames, mask = store.frames([0, 1], 12)
    assert frames.dtype == np.float32 and frames.shape == (2, 3, DV)
    np.testing.assert_array_equal(frames[0], data.frames[0].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(frames[1, :2], data.frames[1].astype(np.float16).astype(np.float32))
    assert mask.tolist() == [[True, True, True], [True, True, False]] and not frames[1, 2].any()
    np.testing.assert_array_equal(store.frame_times(1), np.array([0.5005, 5.5], np.float32))
    assert store.splits() == {"train": 5}
    texts = store.texts(range(5), max_words=4)
    for b, toks in enumerate(data.tokens):
        toks = toks.astype(np.float16).astype(np.float32)
        keep = min(len(toks), 4)
        np.testing.assert_array_equal(texts["text_global"][b], toks[-1])  # the EOT
        want = np.concatenate([toks[:keep - 1], toks[-1:]]) if keep < len(toks) else toks
        np.testing.assert_array_equal(texts["tokens"][b, :keep], want)
        assert texts["token_mask"][b].tolist() == [i < keep for i in range(4)]


def test_empty_shard_round_trips(tmp_path):
    data = ShardData(3, videos=[_video("x.mp4", 0, 0, S.STATUS_FAILED, "x.mp4: empty file", float("nan"), 3)])
    path = write_shard(tmp_path, data, np.zeros((DV, D), np.float32), np.zeros((DT, D), np.float32), ATTRS)
    with h5py.File(path / S.FEATURES_FILE, "r") as h5:
        shapes = {name: h5[name].shape for name in S.H5_DTYPES}
        assert all(h5[name].dtype == np.dtype(S.H5_DTYPES[name]) for name in S.H5_DTYPES)
    assert shapes == {S.H5_FRAMES: (0, DV), S.H5_FRAME_TIMES: (0,), S.H5_TOKENS: (0, DT), S.H5_KEYWORDS: (0, DT),
                      S.H5_KEYWORD_INDEX: (0, 0), S.H5_IMAGE_PROJ: (DV, D), S.H5_TEXT_PROJ: (DT, D)}
    assert pq.read_table(path / S.CAPTIONS_FILE).num_rows == 0
    assert FeatureStore(tmp_path).videos == []


def test_rewriting_a_shard_replaces_it_whole(shard):
    out, path, *_ = shard
    data, ip, tp = make_shard(seed=1)
    data.videos[0]["video_id"] = "renamed.mp4"
    write_shard(out, data, ip, tp, ATTRS)
    assert sorted(p.name for p in (out / S.SHARDS_DIR).iterdir()) == [S.shard_name(0)]
    assert pq.read_table(path / S.VIDEOS_FILE).column("video_id").to_pylist()[0] == "renamed.mp4"
    with h5py.File(path / S.FEATURES_FILE, "r") as h5:
        np.testing.assert_array_equal(h5[S.H5_FRAMES][:3], data.frames[0].astype(np.float16))


# --- FeatureStore.texts: keyword order ------------------------------------------------------------------
@pytest.mark.parametrize("in_memory", [False, True], ids=["hdf5", "preloaded"])
def test_keywords_come_back_in_the_captions_order(shard, in_memory):
    """h5py reads fancy indices only when increasing, so texts() reads the rows sorted and puts them back:
    compared here with a naive read of one row at a time in the caption's order, from HDF5 and from memory."""
    out, path, data, *_ = shard
    store = FeatureStore(out)
    if in_memory:
        assert store.preload(1 << 30)
    texts = store.texts(range(5), max_words=8)
    assert texts["keywords"].shape == (5, K, DT)
    with h5py.File(path / S.FEATURES_FILE, "r") as h5:
        for b, rows in enumerate(KEYWORD_ROWS):
            rows = [r for r in rows if r >= 0]
            naive = np.stack([h5[S.H5_KEYWORDS][r] for r in rows]).astype(np.float32) if rows else np.zeros((0, DT))
            np.testing.assert_array_equal(texts["keywords"][b, :len(rows)], naive, err_msg=str(rows))
            assert texts["keyword_mask"][b].tolist() == [i < len(rows) for i in range(K)]
            assert not texts["keywords"][b, len(rows):].any()
            # and by value: row r holds r + 0.125 * column
            np.testing.assert_array_equal(texts["keywords"][b, :len(rows), 0], np.array(rows, np.float32))


def test_keyword_order_over_random_index_rows(tmp_path):
    """60 captions with random keyword rows (any order, often repeated, -1 padding after), from HDF5 and
    from memory, against the rows' own values."""
    rng = np.random.default_rng(7)
    data, ip, tp = make_shard()
    n_caps, v, k = 60, 8, 6
    data.keyword_features = (np.arange(v)[:, None] + 0.125 * np.arange(DT)[None]).astype(np.float16)
    data.keyword_index = np.full((n_caps, k), -1, np.int32)
    data.captions, data.tokens = [], []
    for b in range(n_caps):
        n = int(rng.integers(0, k + 1))
        data.keyword_index[b, :n] = rng.integers(0, v, size=n)  # with replacement: repeats are common
        data.captions.append(_caption(b, "a.mp4", f"c{b}", [f"w{r}" for r in data.keyword_index[b, :n]], 2 * b, 2))
        data.tokens.append(rng.normal(size=(2, DT)).astype(np.float32))
    repeats = sum(len(set(r[r >= 0])) < (r >= 0).sum() for r in data.keyword_index)
    unsorted = sum(bool(np.any(np.diff(r[r >= 0]) < 0)) for r in data.keyword_index)
    assert repeats >= 10 and unsorted >= 20  # the cases that need the reordering are really there
    write_shard(tmp_path, data, ip, tp, ATTRS)
    for preload in (False, True):
        store = FeatureStore(tmp_path)
        assert store.preload(1 << 30) if preload else store._memory is None
        texts = store.texts(range(n_caps), max_words=8)
        for b in range(n_caps):
            rows = data.keyword_index[b][data.keyword_index[b] >= 0]
            want = data.keyword_features[rows].astype(np.float32)
            np.testing.assert_array_equal(texts["keywords"][b, :len(rows)], want)
            assert texts["keyword_mask"][b].sum() == len(rows) and not texts["keywords"][b, len(rows):].any()
