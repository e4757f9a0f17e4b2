"""Encode stage: truncated text tower == full encode_text; features before projection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.encode import ClipEncoder, ModelSpec, WeightsError, center_crop, load_clip, text_features
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def encoder():
    return ClipEncoder(ModelSpec(TINY_MODEL, "none"))


@pytest.fixture(scope="module")
def reference():
    return load_clip(ModelSpec(TINY_MODEL, "none"))  # the same seeded random weights, projection kept


CAPTIONS = ["a dog catches a frisbee", "a man is cooking pasta in a small kitchen while his friend watches",
            "red", "two children ride bicycles along the river at sunset in the summer"]


def test_truncated_text_tower_equals_full_encode_text(encoder, reference):
    ids = encoder.tokenize(CAPTIONS)
    pooled, tokens, lengths = text_features(encoder.model, ids)
    assert tokens.shape[1] == int(lengths.max()) < ids.shape[1]  # it really ran shorter
    full = reference.encode_text(ids)
    assert (pooled @ encoder.text_proj - full).abs().max().item() <= 1e-4
    # The per-token outputs match a full 77-token pass too (up to each EOT).
    tower = reference
    x = tower.token_embedding(ids) + tower.positional_embedding
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
    for i, n in enumerate(lengths.tolist()):
        assert (tokens[i, :n] - x[i, :n]).abs().max().item() <= 1e-4


def test_encode_texts_returns_tokens_up_to_eot(encoder):
    pooled, tokens = encoder.encode_texts(CAPTIONS)
    assert pooled.shape == (4, encoder.text_dim) and pooled.dtype == np.float16
    assert [len(t) for t in tokens] == (encoder.tokenize(CAPTIONS).argmax(-1) + 1).tolist()
    np.testing.assert_allclose(tokens[2][-1], pooled[2], atol=1e-3)  # the last token is the EOT


def test_image_features_are_before_projection(encoder, reference):
    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    feats = torch.from_numpy(encoder.encode_frames(frames)).float()
    assert feats.shape == (3, encoder.image_dim)
    pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() - encoder.mean) / encoder.std
    expected = reference.encode_image(pixels)
    assert (feats @ encoder.image_proj - expected).abs().max().item() < 2e-2  # fp16 storage


def test_center_crop_matches_clip_crop():
    frame = np.arange(40 * 64 * 3, dtype=np.uint32).reshape(40, 64, 3).astype(np.uint8)
    crop = center_crop(frame, 40)
    assert crop.shape == (40, 40, 3)
    np.testing.assert_array_equal(crop, frame[:, 12:52])


def test_unloadable_weights_name_model_and_remedy(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=f"(?s){TINY_MODEL}.*Remedy.*--pretrained PATH.*--pretrained none"):
        load_clip(ModelSpec(TINY_MODEL, str(bad)))
    with pytest.raises(WeightsError, match="does not exist"):
        load_clip(ModelSpec(TINY_MODEL, str(tmp_path / "missing" / "x.pt")))
    with pytest.raises(WeightsError, match="unknown open_clip model"):
        load_clip(ModelSpec("ViT-Nope", "none"))


@pytest.mark.parametrize("k", [1, 2])
def test_cached_text_block_input_cut_at_eot_equals_the_full_pass(encoder, reference, k):
    """The block input of a caption cut at its own EOT (the cache) is the full 77-token pass's, up to the EOT:
    the causal mask keeps later positions out; and caching changes no output."""
    from pipeline.encode import capture_block_input

    pooled, tokens, block_in = encoder.encode_texts_cached(CAPTIONS, k)
    plain_pooled, plain_tokens = encoder.encode_texts(CAPTIONS)
    np.testing.assert_array_equal(pooled, plain_pooled)
    assert [len(t) for t in block_in] == [len(t) for t in tokens] == [len(t) for t in plain_tokens]
    ids = encoder.tokenize(CAPTIONS)
    x = reference.token_embedding(ids) + reference.positional_embedding
    with torch.no_grad(), capture_block_input(reference.transformer, k) as box:
        reference.transformer(x, attn_mask=reference.attn_mask)
    full = box[0]  # (B, 77, Dt)
    assert full.shape[1] == 77
    for i, b in enumerate(block_in):
        np.testing.assert_allclose(b, full[i, :len(b)].numpy(), atol=2e-3, rtol=2e-3)
        assert np.abs(full[i, len(b):].numpy() - full[i, len(b) - 1].numpy()).max() > 1e-2  # the cut is real


def test_cached_frames_give_the_same_features_and_the_block_input(encoder):
    frames = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    feats, tokens = encoder.encode_frames_cached(frames, 1)
    np.testing.assert_array_equal(feats, encoder.encode_frames(frames))
    assert tokens.shape == (3, encoder.image_tokens, encoder.image_dim) == (3, 17, 128) and tokens.dtype == np.float16
    _, tokens2 = encoder.encode_frames_cached(frames, 2)  # the input of the whole tower: another sequence
    assert np.abs(tokens.astype(np.float32) - tokens2.astype(np.float32)).max() > 1e-2
    with pytest.raises(ValueError, match=r"--cache-blocks 3: the tower has 2 blocks"):
        encoder.encode_frames_cached(frames, 3)
