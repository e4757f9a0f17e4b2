"""FeatureStore: batches read from memory after preload() equal those read from HDF5, and both equal a plain
reading of the shards one video and one caption at a time (the reader gathers whole batches at once)."""
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.read import FeatureStore, FeaturesError, uniform_indices
from pipeline.write import ShardData, write_shard
from workflows.data import TrainData

DV, DT, D, K = 6, 5, 4, 3


def test_preloaded_batches_equal_hdf5_batches(synthetic_features):
    disk, memory = FeatureStore(synthetic_features), FeatureStore(synthetic_features)
    caps = disk.split_captions("train")
    from_disk = TrainData(disk, caps, 8, 4, 7, seed=0, preload_bytes=0)
    from_memory = TrainData(memory, caps, 8, 4, 7, seed=0)
    assert not from_disk.in_memory and from_memory.in_memory
    for items in from_disk.plan(0):
        a, b = from_disk.load(items), from_memory.load(items)
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert from_memory.load(from_disk.plan(0)[0])["keyword_mask"].any()  # keywords are read too


def write_shards(root, n_shards=3, seed=0):
    """Shards with 1-20 frames per video, a failed video in each (its rows are left out, so store indices
    and rows in a shard differ), captions of 2-12 tokens, 0-3 keyword rows per caption in any order."""
    rng = np.random.default_rng(seed)
    ip, tp = rng.normal(size=(DV, D)).astype(np.float32), rng.normal(size=(DT, D)).astype(np.float32)
    cid = 0
    for index in range(n_shards):
        data = ShardData(index)
        n_frames = n_tokens = 0
        n_kw = int(rng.integers(3, 8))
        data.keyword_features = rng.normal(size=(n_kw, DT)).astype(np.float16)
        k_index = []
        for v in range(int(rng.integers(3, 7))):
            vid, failed = f"s{index}v{v}.mp4", v == 1
            n = 0 if failed else int(rng.integers(1, 21))
            data.videos.append({"video_id": vid, "path": vid, "duration": float(n), "num_frames": n,
                                "frame_start": n_frames, "status": S.STATUS_FAILED if failed else S.STATUS_OK,
                                "error": "", "shard": index})
            if n:
                data.frames.append(rng.normal(size=(n, DV)).astype(np.float16))
                data.frame_times.append(np.arange(n, dtype=np.float32) + 0.5)
            n_frames += n
            for _ in range(int(rng.integers(1, 4))):
                length, k = int(rng.integers(2, 13)), int(rng.integers(0, K + 1))
                rows = list(rng.integers(0, n_kw, k)) + [-1] * (K - k)
                data.captions.append({"caption_id": cid, "video_id": vid, "split": "train", "caption": "c",
                                      "keywords": [f"w{r}" for r in rows if r >= 0], "token_start": n_tokens,
                                      "num_tokens": length, "shard": index})
                data.tokens.append(rng.normal(size=(length, DT)).astype(np.float16))
                k_index.append(rows)
                n_tokens, cid = n_tokens + length, cid + 1
        data.keyword_index = np.array(k_index, np.int32)
        write_shard(root, data, ip, tp, {"model": "hand-made", "pretrained": "none"})
    return root


def plain_frames(root, video_id, max_frames):
    for shard in sorted((root / S.SHARDS_DIR).iterdir()):
        for row in pq.read_table(shard / S.VIDEOS_FILE).to_pylist():
            if row["video_id"] == video_id:
                with h5py.File(shard / S.FEATURES_FILE) as h5:
                    block = h5[S.H5_FRAMES][row["frame_start"]:row["frame_start"] + row["num_frames"]]
                return block[uniform_indices(row["num_frames"], max_frames)].astype(np.float32)


def plain_text(root, caption_id, max_words):
    """(EOT feature, tokens kept: the first max_words - 1 and the EOT, keyword rows in the caption's order)"""
    for shard in sorted((root / S.SHARDS_DIR).iterdir()):
        for i, row in enumerate(pq.read_table(shard / S.CAPTIONS_FILE).to_pylist()):
            if row["caption_id"] == caption_id:
                with h5py.File(shard / S.FEATURES_FILE) as h5:
                    toks = h5[S.H5_TOKENS][row["token_start"]:row["token_start"] + row["num_tokens"]]
                    toks = toks.astype(np.float32)
                    kept = toks if len(toks) <= max_words else np.concatenate([toks[:max_words - 1], toks[-1:]])
                    kws = [h5[S.H5_KEYWORDS][r].astype(np.float32) for r in h5[S.H5_KEYWORD_INDEX][i] if r >= 0]
                return toks[-1], kept, kws


@pytest.mark.parametrize("in_memory", [False, True], ids=["hdf5", "preloaded"])
def test_batches_equal_a_plain_reading_one_item_at_a_time(tmp_path, in_memory):
    root = write_shards(tmp_path / "features")
    store = FeatureStore(root)
    if in_memory:
        assert store.preload(1 << 30)
    rng = np.random.default_rng(1)
    for max_frames, max_words in ((4, 5), (12, 32), (1, 2)):
        videos = rng.permutation(len(store.videos))[:7]  # any order, across shards
        frames, mask = store.frames(videos, max_frames)
        assert frames.dtype == np.float32 and frames.shape[:2] == mask.shape
        for b, v in enumerate(videos):
            want = plain_frames(root, store.videos[v]["video_id"], max_frames)
            assert mask[b].tolist() == [i < len(want) for i in range(mask.shape[1])]
            np.testing.assert_array_equal(frames[b, :len(want)], want)
            assert not frames[b, len(want):].any()
        captions = rng.permutation(len(store.captions))[:9]
        texts = store.texts(captions, max_words)
        assert texts["keywords"].shape[1] == max(1, max(len(store.captions[c]["keywords"]) for c in captions))
        for b, c in enumerate(captions):
            eot, kept, kws = plain_text(root, store.captions[c]["caption_id"], max_words)
            np.testing.assert_array_equal(texts["text_global"][b], eot)
            np.testing.assert_array_equal(texts["tokens"][b, :len(kept)], kept)
            assert texts["token_mask"][b].tolist() == [i < len(kept) for i in range(texts["tokens"].shape[1])]
            assert not texts["tokens"][b, len(kept):].any()
            for j, kw in enumerate(kws):
                np.testing.assert_array_equal(texts["keywords"][b, j], kw)
            assert texts["keyword_mask"][b].tolist() == [j < len(kws) for j in range(texts["keywords"].shape[1])]
            assert not texts["keywords"][b, len(kws):].any()


@pytest.mark.parametrize("in_memory", [False, True], ids=["hdf5", "preloaded"])
@pytest.mark.parametrize("array", [S.H5_FRAMES, S.H5_TOKENS, S.H5_KEYWORDS])
def test_a_non_finite_feature_is_reported_with_its_file(tmp_path, in_memory, array):
    root = write_shards(tmp_path / "features")
    shard = sorted((root / S.SHARDS_DIR).iterdir())[1]
    with h5py.File(shard / S.FEATURES_FILE, "r+") as h5:
        named = h5[S.H5_KEYWORD_INDEX][()]
        row = int(named[named >= 0][0]) if array == S.H5_KEYWORDS else 0  # a keyword row some caption names
        h5[array][row, 2] = np.inf if array == S.H5_TOKENS else np.nan
    store = FeatureStore(root)
    if in_memory:
        assert store.preload(1 << 30)
    what = {S.H5_FRAMES: "frames of video s1v0.mp4", S.H5_TOKENS: "tokens of caption",
            S.H5_KEYWORDS: "keywords of caption"}[array]
    with pytest.raises(FeaturesError, match=f"{shard / S.FEATURES_FILE}: non-finite values in the {what}"):
        store.frames(range(len(store.videos)), 30)
        store.texts(range(len(store.captions)), 30)


def test_reads_stay_right_with_few_open_files(tmp_path):
    """ShardFiles keeps at most max_open HDF5 handles a thread (each holds HDF5's metadata); reads that
    cross more shards than that close and reopen files, and their dataset objects with them."""
    root = write_shards(tmp_path / "features", n_shards=5)
    store = FeatureStore(root)
    store._h5.max_open = 2
    rng = np.random.default_rng(2)
    for _ in range(3):
        videos = rng.permutation(len(store.videos))[:9]  # across shards, in any order
        frames, _ = store.frames(videos, 12)
        for b, v in enumerate(videos):
            want = plain_frames(root, store.videos[v]["video_id"], 12)
            np.testing.assert_array_equal(frames[b, :len(want)], want)
        captions = rng.permutation(len(store.captions))[:9]
        texts = store.texts(captions, 32)
        for b, c in enumerate(captions):
            np.testing.assert_array_equal(texts["text_global"][b], plain_text(root, store.captions[c]["caption_id"], 32)[0])
        assert len(store._h5._local.files) <= 2
