"""`extract --cache-blocks K`: the cached tokens and tail weights recompute the stored features (both towers,
keywords, K = 1 and 2), --cache-frames, resume and the fingerprint, old shards, refused configs, and a tail
whose last blocks train while the rest stays frozen."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from heads.clip_tail import ClipTail, ImageTail, TowerSpec, pad_sequences
from pipeline import schema as S
from pipeline.read import FeatureStore
from pipeline.tokens import TokensError, TokenStore, cache_bytes, load_tail, schema_version
from tests.conftest import TINY_MODEL, run_cli, tiny_extract_args

# fp16 storage of both the tokens and the features: ~1e-3 at the features' magnitude (~2.5) on this model
ATOL, RTOL = 4e-3, 4e-3


def _extract(videos, out, overwrite: bool = False, **settings) -> dict:
    """In process (the models stay loaded between runs), as the CLI would fill the config."""
    from pipeline.config import ExtractConfig
    from pipeline.encode import ModelSpec
    from pipeline.extract import extract

    cfg = ExtractConfig(videos=str(videos), out=str(out), captions=str(videos / "captions.jsonl"),
                        clip=ModelSpec(TINY_MODEL, "none"), batch_size=16, shard_size=2, cluster="none", **settings)
    return extract(cfg, overwrite=overwrite, progress=False)


@pytest.fixture(scope="module")
def k1(clip_collection, tmp_path_factory):
    """Through the CLI: K = 1, at most 2 cached frames per video."""
    out = tmp_path_factory.mktemp("cache") / "k1"
    res = run_cli(*tiny_extract_args(clip_collection, out, "--cluster", "none", "--shard-size", "2",
                                     "--cache-blocks", "1", "--cache-frames", "2"))
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def k2(k1, clip_collection, tmp_path_factory):
    """The K = 1 folder rerun with K = 2 (default --cache-frames): every shard is redone."""
    out = tmp_path_factory.mktemp("cache") / "k2"
    shutil.copytree(k1, out)
    summary = _extract(clip_collection, out, cache_blocks=2)
    assert summary["shards_done_now"] == 2 and summary["videos_skipped_complete"] == 0
    return out


def _h5(store: FeatureStore, shard_pos: int) -> h5py.File:
    return h5py.File(store.shard_dirs[shard_pos] / S.FEATURES_FILE, "r")


def _close(got: torch.Tensor | np.ndarray, want: np.ndarray, what: str) -> None:
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=what)


@pytest.mark.parametrize("folder,k", [("k1", 1), ("k2", 2)])
def test_cached_tokens_reproduce_the_stored_features(folder, k, request):
    out = request.getfixturevalue(folder)
    store, tokens = FeatureStore(out), TokenStore(out)
    tensors, info = tokens.tail()
    assert tokens.blocks == info["cache_blocks"] == k
    assert info["visual"]["first_block"] == info["visual"]["layers"] - k == 2 - k
    tail = ClipTail.from_state(tensors, info).eval()
    assert tail.blocks == k
    ip, tp = torch.from_numpy(store.image_proj), torch.from_numpy(store.text_proj)
    with torch.no_grad():
        for v in store.videos:
            toks, idx = tokens.frame_tokens(v["shard_pos"], v["frame_start"], v["num_frames"])
            assert toks.dtype == np.float16 and toks.shape[1:] == (17, 128)  # (64 / 16)^2 patches + CLS
            with _h5(store, v["shard_pos"]) as h5:
                want = h5[S.H5_FRAMES][v["frame_start"]:v["frame_start"] + v["num_frames"]][idx].astype(np.float32)
            got = tail.image(torch.from_numpy(toks))
            _close(got, want, f"frames of {v['video_id']}")
            _close(tail.image.encode(torch.from_numpy(toks)), want @ ip.numpy(), f"image embedding {v['video_id']}")
        for c in store.captions:
            block_in = tokens.caption_tokens(c["shard_pos"], c["token_start"], c["num_tokens"])
            with _h5(store, c["shard_pos"]) as h5:
                want = h5[S.H5_TOKENS][c["token_start"]:c["token_start"] + c["num_tokens"]].astype(np.float32)
                rows = h5[S.H5_KEYWORD_INDEX][c["row_in_shard"]]
                kw_want = h5[S.H5_KEYWORDS][()].astype(np.float32)
            x, pooled = tail.text(torch.from_numpy(block_in)[None], torch.tensor([len(block_in)]))
            _close(x[0], want, f"tokens of '{c['caption']}'")
            _close(pooled[0], want[-1], "EOT feature")
            _close(tail.text.encode(torch.from_numpy(block_in)[None], torch.tensor([len(block_in)]))[0],
                   want[-1] @ tp.numpy(), "text embedding")
            # keywords: the same text tail, several of them in one zero-padded batch
            rows = [int(r) for r in rows if r >= 0]
            assert rows, c["caption"]
            batch, lengths = pad_sequences([torch.from_numpy(tokens.keyword_tokens(c["shard_pos"], r)) for r in rows])
            _close(tail.text(batch, lengths)[1], kw_want[rows], f"keywords of '{c['caption']}'")
    tokens.close()


def test_a_tail_of_the_wrong_depth_does_not_reproduce_them(k1, k2):
    """The equivalence above has teeth: K = 2 weights on K = 1 tokens miss by far more than fp16."""
    store, wrong = FeatureStore(k1), ClipTail.from_state(*TokenStore(k2).tail()).eval()
    v = store.videos[0]
    toks, idx = TokenStore(k1).frame_tokens(v["shard_pos"], v["frame_start"], v["num_frames"])
    with _h5(store, v["shard_pos"]) as h5:
        want = h5[S.H5_FRAMES][v["frame_start"]:v["frame_start"] + v["num_frames"]][idx].astype(np.float32)
    with torch.no_grad():
        assert np.abs(wrong.image(torch.from_numpy(toks)).numpy() - want).max() > 50 * ATOL


def test_cache_frames_bounds_the_cached_frames_not_the_features(k1, k2):
    expected_frames = {"a.mp4": 2, "b.mp4": 3, "c.mp4": 1, "sub/d.mp4": 4}
    for out, limit in ((k1, 2), (k2, S.DEFAULT_CACHE_FRAMES)):
        store, tokens = FeatureStore(out), TokenStore(out)
        assert {v["video_id"]: v["num_frames"] for v in store.videos} == expected_frames
        for v in store.videos:
            toks, idx = tokens.frame_tokens(v["shard_pos"], v["frame_start"], v["num_frames"])
            assert idx.tolist() == S.cached_frame_indices(v["num_frames"], limit) and len(toks) == len(idx)
        with _h5(store, 0) as h5:
            assert int(h5.attrs["cache_frames"]) == limit
    # 4 frames, at most 2: the first and the last; 3 -> 0 and 2
    assert S.cached_frame_indices(4, 2) == [0, 3] and S.cached_frame_indices(3, 2) == [0, 2]
    assert S.cached_frame_indices(100, 32)[:3] == [0, 3, 6] and len(set(S.cached_frame_indices(100, 32))) == 32


def test_schema_of_a_cached_shard_and_its_bytes(k2):
    with h5py.File(k2 / S.SHARDS_DIR / S.shard_name(0) / S.FEATURES_FILE, "r") as h5:
        assert schema_version(h5) == (S.SCHEMA_VERSION, S.SCHEMA_MINOR)
        assert set(h5.keys()) == set(S.H5_DTYPES) | set(S.H5_CACHE_DTYPES)
        assert set(h5.attrs) == set(S.H5_ATTRS) | set(S.H5_CACHE_ATTRS)
        for name, dtype in S.H5_CACHE_DTYPES.items():
            assert h5[name].dtype == np.dtype(dtype), name
        assert h5[S.H5_TEXT_BLOCK_TOKENS].shape == h5[S.H5_TOKENS].shape
        lengths, starts = h5[S.H5_KEYWORD_BLOCK_LENGTH][()], h5[S.H5_KEYWORD_BLOCK_START][()]
        assert len(lengths) == len(h5[S.H5_KEYWORDS]) and starts[-1] + lengths[-1] == len(h5[S.H5_KEYWORD_BLOCK_TOKENS])
        # the bytes on disk are what the architecture says (README's size figures are this formula)
        per = cache_bytes(image_tokens=17, image_width=128, text_width=64)
        n_frames, n_tokens = len(h5[S.H5_FRAME_BLOCK_ROWS]), len(h5[S.H5_TEXT_BLOCK_TOKENS])
        stored = sum(h5[n].id.get_storage_size() for n in (S.H5_FRAME_BLOCK_TOKENS, S.H5_FRAME_BLOCK_ROWS))
        assert stored == n_frames * per["frame"]
        assert h5[S.H5_TEXT_BLOCK_TOKENS].id.get_storage_size() == n_tokens * per["text_token"]
    meta = json.loads((k2 / S.SHARDS_DIR / S.shard_name(0) / S.META_FILE).read_text())
    assert meta["cache_blocks"] == 2 and meta["schema_minor"] == S.SCHEMA_MINOR
    # FeatureStore reads a 1.1 shard as it reads a 1.0 one
    assert len(FeatureStore(k2).videos) == 4


def test_same_k_skips_other_frames_limit_or_overwrite_redoes(k1, clip_collection, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(k1, out)
    tail_before = (out / S.CLIP_TAIL_FILE).stat().st_mtime_ns
    assert _extract(clip_collection, out, cache_blocks=1, cache_frames=2)["shards_done_now"] == 0
    assert (out / S.CLIP_TAIL_FILE).stat().st_mtime_ns == tail_before  # same K: not rewritten
    assert _extract(clip_collection, out, cache_blocks=1, cache_frames=3)["shards_done_now"] == 2
    summary = _extract(clip_collection, out, overwrite=True, cache_blocks=1, cache_frames=3)
    assert summary["shards_done_now"] == 2 and summary["videos_skipped_complete"] == 0
    assert load_tail(out)[1]["cache_blocks"] == 1


def test_k0_after_k2_writes_plain_shards_and_drops_the_tail(k2, clip_collection, tmp_path):
    from pipeline import extract as E
    from pipeline.config import ExtractConfig

    out = tmp_path / "plain"
    shutil.copytree(k2, out)
    assert _extract(clip_collection, out)["shards_done_now"] == 2
    assert not (out / S.CLIP_TAIL_FILE).exists()
    for d in sorted((out / S.SHARDS_DIR).iterdir()):
        with h5py.File(d / S.FEATURES_FILE, "r") as h5:  # exactly the 1.0 layout
            assert set(h5.keys()) == set(S.H5_DTYPES) and set(h5.attrs) == set(S.H5_ATTRS)
            assert schema_version(h5) == (1, 0)
        assert "cache_blocks" not in json.loads((d / S.META_FILE).read_text())
    with pytest.raises(TokensError, match="--cache-blocks"):
        TokenStore(out)
    # K = 0 leaves the fingerprint's inputs as they were before caches existed: old folders are not redone
    cfg = ExtractConfig(videos=str(clip_collection), out=str(out))
    assert E.encoder_sources(cfg) == {"settings": cfg.feature_settings()}
    assert E.encoder_sources(ExtractConfig(videos="v", out="o", cache_blocks=1))["cache"] == {"blocks": 1, "frames": 32}


def test_an_old_shard_still_reads_and_the_token_reader_names_the_remedy(tmp_path):
    from tests.test_teeth_shards import ATTRS, make_shard
    from pipeline.write import write_shard

    data, ip, tp = make_shard()
    path = write_shard(tmp_path / "old", data, ip, tp, ATTRS)  # no cache: the writer's 1.0 path
    with h5py.File(path / S.FEATURES_FILE, "r") as h5:
        assert schema_version(h5) == (1, 0) and "schema_minor" not in h5.attrs
    store = FeatureStore(tmp_path / "old")
    assert [v["video_id"] for v in store.videos] == ["a.mp4", "sub/c.mp4"]
    with pytest.raises(TokensError, match=r"shard-00000.*schema 1\.0.*--cache-blocks K"):
        TokenStore(tmp_path / "old")
    with pytest.raises(TokensError, match="clip_tail.safetensors does not exist.*--cache-blocks"):
        load_tail(tmp_path / "old")


def test_a_folder_mixing_two_ks_is_refused(k1, k2, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(k1, out)
    shutil.rmtree(out / S.SHARDS_DIR / S.shard_name(1))
    shutil.copytree(k2 / S.SHARDS_DIR / S.shard_name(1), out / S.SHARDS_DIR / S.shard_name(1))
    with pytest.raises(TokensError, match=r"different block counts \[1, 2\].*--cache-blocks 2"):
        TokenStore(out)


def test_unsupported_requests_are_refused_before_any_work(clip_collection, tmp_path):
    from pipeline.clip_init import tail_state
    from pipeline.encode import CacheBlocksError, ModelSpec, load_clip

    model = load_clip(ModelSpec(TINY_MODEL, "none"))
    with pytest.raises(CacheBlocksError, match=r"image tower has 2 blocks \(choose 1..2\)"):
        tail_state(model, 3)
    model.text_pool_type = "eos"
    with pytest.raises(CacheBlocksError, match="text pool_type 'eos'"):
        tail_state(model, 1)
    model.text_pool_type = "argmax"
    model.attn_mask = None
    with pytest.raises(CacheBlocksError, match="not causal"):
        tail_state(model, 1)
    model.visual.attn_pool = torch.nn.Identity()
    with pytest.raises(CacheBlocksError, match="attn_pool"):
        tail_state(model, 1)
    from pipeline.extract import ExtractError

    with pytest.raises(ExtractError, match=r"ViT-Tiny-16: --cache-blocks 3: the image tower has 2 blocks"):
        _extract(clip_collection, tmp_path / "out", cache_blocks=3)
    assert not (tmp_path / "out" / S.SHARDS_DIR).exists() and not (tmp_path / "out" / S.CONFIG_FILE).exists()


@pytest.mark.parametrize("pool,after", [("tok", False), ("avg", False), ("avg", True)])
def test_image_tail_pools_as_open_clip_does(pool, after):
    """Pooling variants, layer scale and QuickGELU, against open_clip's own forward (fp32, exact)."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    from pipeline.clip_init import image_tail_state
    from pipeline.encode import image_features

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=16, width=32, layers=3, heads=2, mlp_ratio=2.0,
                               ls_init_value=0.5, output_dim=16, pool_type=pool, final_ln_after_pool=after,
                               act_layer=QuickGELU).eval()
    for k in (1, 3):
        tensors, info = image_tail_state(visual, k)
        assert info["layer_scale"] and info["activation"] == "quick_gelu" and info["pool_type"] == pool
        tail = ImageTail(TowerSpec.from_info(info), tensors, pool, after, info["ln_post_eps"]).eval()
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            _, block_in = image_features(visual, pixels, k)
            assert (tail.encode(block_in) - visual(pixels)).abs().max().item() < 1e-5


def test_last_blocks_train_while_the_rest_stays_frozen(k2):
    store, tokens = FeatureStore(k2), TokenStore(k2)
    tail = ClipTail.from_state(*tokens.tail())
    trainable = tail.set_trainable(1)
    names = {n for n, p in tail.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("image.resblocks.1.", "text.resblocks.1.", "image.ln_post.", "text.ln_final."))
                         for n in names)
    assert any(n.startswith("image.resblocks.1.") for n in names) and any(n.startswith("text.resblocks.1.") for n in names)
    before = {n: p.detach().clone() for n, p in tail.named_parameters()}
    v, c = store.videos[0], store.captions[0]
    frames, _ = tokens.frame_tokens(v["shard_pos"], v["frame_start"], v["num_frames"])
    text = tokens.caption_tokens(c["shard_pos"], c["token_start"], c["num_tokens"])
    image = tail.image.encode(torch.from_numpy(frames)).mean(0)
    caption = tail.text.encode(torch.from_numpy(text)[None], torch.tensor([len(text)]))[0]
    loss = -torch.cosine_similarity(image, caption, dim=0)
    loss.backward()
    torch.optim.SGD(trainable, lr=1.0).step()
    for n, p in tail.named_parameters():
        if n in names:
            assert p.grad is not None
        else:
            assert p.grad is None and torch.equal(p, before[n]), n
    changed = {n for n in names if not torch.equal(tail.get_parameter(n), before[n])}
    assert any(n.startswith("image.resblocks.1.") for n in changed) and any(n.startswith("text.resblocks.1.")
                                                                         for n in changed)
    assert tail.set_trainable(0) == [] and len(tail.set_trainable(2, projections=True)) == sum(
        1 for _ in tail.parameters())
    with pytest.raises(ValueError, match="3 trainable blocks asked for, 2 cached"):
        tail.set_trainable(3)
