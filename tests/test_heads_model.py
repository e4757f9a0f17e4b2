"""RetrievalHead: gradients, masking, ablation switches, baselines, score_pairs."""
import math

import pytest
import torch
import torch.nn.functional as F

from heads.config import HeadConfig
from heads.model import TEXT_KEYS, VIDEO_KEYS, RetrievalHead

DV, DT, D = 48, 32, 24
SMALL = dict(temporal_layers=1, temporal_heads=2, cross_heads=2, max_frames=6, max_positions=10)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: one thread avoids OpenMP spinning against other work on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_projections(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(DV, D, generator=g) / DV ** 0.5, torch.randn(DT, D, generator=g) / DT ** 0.5


def lengths_mask(lengths, width):
    return torch.arange(width)[None, :] < lengths[:, None]


def make_batch(b=6, frames=6, words=7, keywords=3, seed=0, full=False):
    """Random features with random lengths; caption 0 has no keywords. full=True: no padding frames."""
    g = torch.Generator().manual_seed(seed)
    n_frames = torch.full((b,), frames) if full else torch.randint(1, frames + 1, (b,), generator=g)
    n_keywords = torch.randint(0, keywords + 1, (b,), generator=g)
    n_keywords[0] = 0
    return {
        "frames": torch.randn(b, frames, DV, generator=g),
        "frame_mask": lengths_mask(n_frames, frames),
        "text_global": torch.randn(b, DT, generator=g),
        "tokens": torch.randn(b, words, DT, generator=g),
        "token_mask": lengths_mask(torch.randint(1, words + 1, (b,), generator=g), words),
        "keywords": torch.randn(b, keywords, DT, generator=g),
        "keyword_mask": lengths_mask(n_keywords, keywords),
    }


def make_model(seed=0, untrained=False, **overrides):
    """A small head; unless untrained, S3's zero-initialised output projection gets small random weights, as
    after some training, so that the keyword branch acts (an untrained S3 is the identity by design)."""
    torch.manual_seed(seed)
    model = RetrievalHead(HeadConfig(**{**SMALL, **overrides}), *make_projections())
    if not untrained and model.keyword_attn is not None:
        with torch.no_grad():
            model.keyword_attn.attn.out_proj.weight.normal_(0, 0.1)
            model.keyword_attn.attn.out_proj.bias.normal_(0, 0.1)
    return model


def encode(model, batch):
    return (model.encode_text(*(batch[k] for k in TEXT_KEYS)), model.encode_video(*(batch[k] for k in VIDEO_KEYS)))


def scores(model, batch):
    model.eval()
    with torch.no_grad():
        return model.score(*encode(model, batch))


def pad(batch, key, mask_key, extra):
    """Append `extra` padding positions (mask False, random content) along dim 1."""
    out = dict(batch)
    x, m = batch[key], batch[mask_key]
    out[key] = torch.cat([x, torch.randn(x.shape[0], extra, *x.shape[2:]) * 5], 1)
    out[mask_key] = torch.cat([m, torch.zeros(m.shape[0], extra, dtype=torch.bool)], 1)
    return out


def test_forward_is_a_finite_loss_and_gradients_reach_every_trainable_module():
    model = make_model()
    loss, logs = model(make_batch(frames=10, full=True))  # every position-table row needs a real frame
    loss.backward()
    assert torch.isfinite(loss) and set(logs) >= {"loss", "logit_scale"}
    for name, p in model.named_parameters():
        if name.startswith("proj."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_projections_train_only_when_unfrozen():
    model = make_model(unfreeze_proj=True)
    model(make_batch())[0].backward()
    assert model.proj.image.grad.abs().sum() > 0 and model.proj.text.grad.abs().sum() > 0


@pytest.mark.parametrize("key,mask_key", [("frames", "frame_mask"), ("tokens", "token_mask"),
                                          ("keywords", "keyword_mask")])
def test_extra_padding_leaves_scores_unchanged(key, mask_key):
    model, batch = make_model(), make_batch()
    torch.testing.assert_close(scores(model, pad(batch, key, mask_key, 3)), scores(model, batch),
                               rtol=1e-5, atol=1e-5)


def test_caption_without_keywords_keeps_its_words_and_nothing_is_nan():
    model, batch = make_model(), make_batch()
    batch["keyword_mask"][:] = False
    batch["keyword_mask"][1, 0] = True
    model.eval()
    text, _ = encode(model, batch)
    assert torch.isfinite(text.w_e).all()
    no_kw = ~batch["keyword_mask"].any(1)
    assert torch.equal(text.w_e[no_kw], text.w[no_kw])
    assert not torch.allclose(text.w_e[1], text.w[1])


def test_score_pairs_is_the_diagonal_of_score():
    model, batch = make_model(), make_batch(b=5)
    model.eval()
    with torch.no_grad():
        text, video = encode(model, batch)
        torch.testing.assert_close(model.score_pairs(text, video), model.score(text, video).diagonal(),
                                   rtol=1e-5, atol=1e-6)


def test_explain_is_per_frame_and_zero_on_padding():
    model, batch = make_model(), make_batch()
    model.eval()
    with torch.no_grad():
        rel = model.explain(*encode(model, batch))
    assert rel.shape == (6, 6, 6)
    assert (rel[:, ~batch["frame_mask"]] == 0).all() and torch.isfinite(rel).all()


# each switch, the parameter-name prefixes it must remove from the default head (whose coarse term has a temporal
# encoder of its own: a head with one term, or none, keeps at most one)
ABLATIONS = {
    "temporal": ["temporal.", "temporal_coarse."],
    "video_enhance": ["local.", "frame_weights."],
    "text_enhance": ["keyword_attn."],
    "interaction": ["pool."],
    "fine": ["local.", "frame_weights.", "keyword_attn.", "word_weights.", "temporal_coarse."],
    "coarse": ["pool.", "temporal_coarse."],
}


@pytest.mark.parametrize("flag", list(ABLATIONS))
def test_each_switch_removes_its_module_and_changes_the_score(flag):
    full, ablated = make_model(), make_model(**{flag: False})
    full_names, ablated_names = set(full.state_dict()), set(ablated.state_dict())
    removed = full_names - ablated_names
    assert ablated_names < full_names
    assert {n.split(".")[0] + "." for n in removed} == set(ABLATIONS[flag])
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k in ablated_names})
    batch = make_batch()
    assert not torch.allclose(scores(full, batch), scores(ablated, batch), atol=1e-4)


def test_config_rejects_unknown_variant_and_no_score_term():
    with pytest.raises(ValueError, match="bogus"):
        HeadConfig(variant="bogus")
    with pytest.raises(ValueError):
        HeadConfig(fine=False, coarse=False)
    cfg = HeadConfig(variant="seqtransf", dropout=0.2)
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg and not cfg.fine


def test_untrained_keyword_attention_is_the_identity():
    model, batch = make_model(untrained=True), make_batch()
    model.eval()
    text, _ = encode(model, batch)
    assert batch["keyword_mask"].any()
    torch.testing.assert_close(text.w_e, text.w, rtol=0, atol=0)


def test_meanp_is_clip4clip_loose_similarity():
    """CLIP4Clip's _loose_similarity: normalise each projected frame, mean over real frames, normalise."""
    model, batch = make_model(variant="meanp"), make_batch()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["logit_scale"]
    image_proj, text_proj = make_projections()
    m = batch["frame_mask"].float()
    frames = F.normalize(batch["frames"] @ image_proj, dim=-1)
    video = (frames * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    text = batch["text_global"] @ text_proj
    expected = F.normalize(text, dim=-1) @ F.normalize(video, dim=-1).T
    torch.testing.assert_close(scores(model, batch), expected, rtol=1e-5, atol=1e-6)


def test_seqtransf_is_clip4clip_loose_similarity_of_temporal_frames():
    model, batch = make_model(variant="seqtransf"), make_batch()
    model.eval()
    with torch.no_grad():
        text, video = encode(model, batch)
        m = batch["frame_mask"].float()
        v = (F.normalize(video.f, dim=-1) * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        expected = F.normalize(text.t, dim=-1) @ F.normalize(v, dim=-1).T
        torch.testing.assert_close(model.score(text, video), expected, rtol=1e-5, atol=1e-6)


def test_full_with_every_module_off_is_meanp():
    off = make_model(temporal=False, video_enhance=False, text_enhance=False, interaction=False, fine=False)
    meanp, batch = make_model(variant="meanp"), make_batch()
    assert set(off.state_dict()) == set(meanp.state_dict())
    torch.testing.assert_close(scores(off, batch), scores(meanp, batch))


def test_logit_scale_starts_at_and_is_clamped_to_log_100():
    model = make_model()
    assert model(make_batch())[1]["logit_scale"].item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_saturated_frame_weights_stay_finite_and_normalised():
    """A seed-1 run drove every pre-sigmoid frame weight of some videos to about -88: sigmoid underflowed to 0
    and a / sum(a) was 0/0. The weights are now a softmax of logsigmoid: finite whatever the logits."""
    from heads.layers import normalised_frame_weights
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    for value in (-88.0, -1e4, 1e4, 0.0):
        beta = normalised_frame_weights(torch.full((2, 4), value), mask)
        assert torch.isfinite(beta).all()
        torch.testing.assert_close(beta.sum(1), torch.ones(2))
        assert (beta[~mask] == 0).all()
    logits = torch.tensor([[-100.0, -90.0, -200.0, 5.0]])
    beta = normalised_frame_weights(logits, mask[:1])
    expected = torch.sigmoid(logits.double())[:, :3] / torch.sigmoid(logits.double())[:, :3].sum()
    torch.testing.assert_close(beta[:, :3].double(), expected)  # the same as a / sum(a) where that is finite
    model, batch = make_model(), make_batch()
    with torch.no_grad():  # drive the frame-weight layer into saturation, as the failed run did
        model.frame_weights.fc2.bias.fill_(-1e4)
    loss, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_residual_frame_weights_tell_frames_apart_where_the_patents_cannot():
    """An untrained self-attention is close to uniform; where it is exactly uniform, the patent's
    sigmoid(FC2(SelfAttn(FC1(h)))) gives every frame of a video the same weight and no gradient to tell them
    apart, while the residual form FC2(x + SelfAttn(x)) keeps each frame's own feature."""
    from heads.layers import FrameWeights
    torch.manual_seed(0)
    h = torch.randn(3, 5, D)
    mask = lengths_mask(torch.tensor([5, 3, 1]), 5)
    for residual in (False, True):
        torch.manual_seed(1)
        layer = FrameWeights(D, 2, residual=residual)
        with torch.no_grad():  # zero queries and keys: every attention row is uniform over the real frames
            layer.attn.in_proj_weight[:2 * D].zero_()
            layer.attn.in_proj_bias[:2 * D].zero_()
        x = layer(h, mask)
        fc1 = layer.fc1(h)
        v = F.linear(fc1, layer.attn.in_proj_weight[2 * D:], layer.attn.in_proj_bias[2 * D:])
        mean_v = torch.stack([v[i, mask[i]].mean(0) for i in range(3)])  # (3, D)
        y = layer.attn.out_proj(mean_v).unsqueeze(1).expand(-1, 5, -1)  # the same for every frame
        naive = layer.fc2(fc1 + y if residual else y).squeeze(-1)  # a second implementation of the layer
        torch.testing.assert_close(x[mask], naive[mask], atol=1e-5, rtol=1e-5)
        spread = x[0].std()  # the 5-frame video
        if residual:
            assert spread > 1e-3
        else:
            assert spread < 1e-5
            beta_grad = torch.autograd.grad(
                (torch.arange(5.0) * torch.softmax(F.logsigmoid(x[0]), 0)).sum(), layer.fc2.weight)[0]
            assert beta_grad.abs().max() < 1e-6  # no gradient can move the weights apart
    assert HeadConfig.from_dict({}).frame_weights == "patent"  # a config saved before the option ran so
    with pytest.raises(ValueError, match="frame_weights"):
        HeadConfig(frame_weights="attn")


@pytest.mark.parametrize("residual", [False, True])
def test_frame_norm_input_keeps_the_frame_weights_off_saturation_whatever_the_feature_norms(residual):
    """frame_norm "input": a LayerNorm on h before FC1, so the frame weights' logits do not change when h is scaled
    (the temporal features' norm grows in training), where without it the logits grow with h and the weights
    saturate (a trained run reached logits of -515..2330); the LayerNorm trains; the model builds it only when
    asked, and a config saved before the option existed loads without it."""
    from heads.layers import FrameWeights

    torch.manual_seed(0)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    h = torch.randn(2, 6, 16)
    normed, plain = FrameWeights(16, 2, residual, norm=True), FrameWeights(16, 2, residual)
    with torch.no_grad():
        for p in normed.norm.parameters():  # moved off LayerNorm's identity start, so its parameters take part
            p.add_(torch.randn_like(p) * 0.3)
    torch.testing.assert_close(normed(h * 50, mask), normed(h, mask), rtol=1e-4, atol=1e-4)
    naive = normed.fc1(F.layer_norm(h, (16,), normed.norm.weight, normed.norm.bias))  # a second implementation
    y = normed.attn(naive, naive, naive, key_padding_mask=~mask, need_weights=False)[0]
    torch.testing.assert_close(normed(h, mask), normed.fc2(naive + y if residual else y).squeeze(-1))
    with torch.no_grad():
        spread = [float((plain(h * s, mask) - plain(h * s, mask).mean()).abs().max()) for s in (1.0, 50.0)]
    assert spread[1] > 5 * spread[0]  # without it the logits follow the feature norm
    normed(h, mask).square().sum().backward()
    assert normed.norm.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="frame_norm"):
        HeadConfig(frame_norm="output")
    assert HeadConfig.from_dict({}).frame_norm == "none"
    assert make_model().frame_weights.norm is None
    model, batch = make_model(frame_norm="input"), make_batch()
    assert isinstance(model.frame_weights.norm, torch.nn.LayerNorm)
    loss, _ = model(batch)
    loss.backward()
    assert model.frame_weights.norm.weight.grad is not None


@pytest.mark.parametrize("fusion", ["sum", "mean", "weighted"])
def test_fusion_joins_fine_and_coarse(fusion):
    model, batch = make_model(fusion=fusion, loss_terms="fused"), make_batch()
    model.eval()
    with torch.no_grad():
        text, video = encode(model, batch)
        coarse, fine = model._coarse(text, video, False), model._fine(text, video, False)
        expected = coarse + fine if fusion == "sum" else (coarse + fine) / 2
        torch.testing.assert_close(model.score(text, video), expected)
    assert (model.fusion_logits is not None) == (fusion == "weighted")


def test_temporal_encoder_reproduces_clip_blocks_it_was_copied_from():
    """CLIP4Clip's initialisation: each copied layer computes what open_clip's text block computes."""
    import open_clip
    from heads.layers import TemporalEncoder
    from pipeline.clip_init import text_blocks_state
    from pipeline.encode import ModelSpec, _text_tower, load_clip

    clip = load_clip(ModelSpec("ViT-Tiny-16", "none", "cpu"))
    blocks, info = text_blocks_state(clip)
    assert info["blocks"] == 2 and info["width"] == 64 and info["heads"] == 2 and info["activation"] == "gelu"
    enc = TemporalEncoder(64, 3, info["heads"], 64, dropout=0.0, activation=info["activation"]).eval()
    assert enc.load_clip_blocks(blocks) == 2  # the tiny tower has two blocks; the third layer stays random
    tower = _text_tower(clip)
    torch.testing.assert_close(enc.position_embedding[:64], tower.positional_embedding[:64])
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        for i in range(2):
            ours = enc.encoder.layers[i](x)
            theirs = tower.transformer.resblocks[i](x)  # open_clip blocks are batch-first here
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # OpenAI's weights use QuickGELU: an open_clip model built with it reports it, and our layer matches
    quick = open_clip.create_model("ViT-Tiny-16", pretrained=None, force_quick_gelu=True).eval()
    blocks, info = text_blocks_state(quick)
    assert info["activation"] == "quick_gelu"
    enc = TemporalEncoder(64, 2, 2, 64, dropout=0.0, activation="quick_gelu").eval()
    enc.load_clip_blocks(blocks)
    with torch.no_grad():
        torch.testing.assert_close(enc.encoder.layers[1](x), _text_tower(quick).transformer.resblocks[1](x),
                                   rtol=1e-5, atol=1e-5)


def test_clip_blocks_of_another_width_are_refused():
    from heads.layers import TemporalEncoder
    enc = TemporalEncoder(32, 1, 2, 16, dropout=0.0)
    with pytest.raises(ValueError, match="wide"):
        enc.load_clip_blocks({"positional_embedding": torch.zeros(77, 64)})


def test_loss_terms_each_is_the_mean_of_the_fused_and_each_terms_infonce():
    from heads.loss import symmetric_infonce
    model, batch = make_model(loss_terms="each", dropout=0.0), make_batch()
    model.eval()
    loss, _ = model(batch)
    with torch.no_grad():
        text, video = encode(model, batch)
        coarse, fine = model._coarse(text, video, False), model._fine(text, video, False)
        scale = model.logit_scale.exp()
        expected = (symmetric_infonce((coarse + fine) * scale) + symmetric_infonce(coarse * scale)
                    + symmetric_infonce(fine * scale)) / 3
    torch.testing.assert_close(loss.detach(), expected)
    fused_only, _ = make_model(dropout=0.0).eval()(batch)
    assert not torch.allclose(fused_only, loss.detach())


def test_masks_must_be_non_empty_prefixes():
    model, batch = make_model(), make_batch()
    holes = batch["frame_mask"].clone()
    holes[2] = torch.tensor([True, False, True, False, False, False])
    with pytest.raises(ValueError, match="frame_mask row 2 is not a prefix"):
        model.encode_video(batch["frames"], holes)
    empty = batch["token_mask"].clone()
    empty[1] = False
    with pytest.raises(ValueError, match="token_mask row 1 is empty"):
        model.encode_text(batch["text_global"], batch["tokens"], empty, batch["keywords"], batch["keyword_mask"])


@pytest.mark.parametrize("interaction", [True, False])
def test_temporal_grad_fine_stops_only_the_coarse_gradient_into_the_temporal_encoder(interaction):
    batch = make_batch(frames=10, full=True)
    both = make_model(dropout=0.0, interaction=interaction, temporal_grad="both")
    fine = make_model(dropout=0.0, interaction=interaction, temporal_grad="fine")
    both.eval(), fine.eval()
    torch.testing.assert_close(scores(both, batch), scores(fine, batch))  # same forward, same inference
    for model in (both, fine):
        text, video = encode(model, batch)
        model.zero_grad()
        coarse = model._coarse(text, video, False)
        if coarse.requires_grad:  # without S4 and with the stop-gradient nothing trainable is left in it
            coarse.sum().backward(retain_graph=True)
        coarse_grad = sum(float(p.grad.abs().sum()) for p in model.temporal.parameters() if p.grad is not None)
        assert (coarse_grad > 0) == (model is both)
        if model.pool is not None:  # S4 itself still learns from the coarse term
            assert model.pool.q.weight.grad.abs().sum() > 0
        model.zero_grad()
        model._fine(text, video, False).sum().backward()
        assert sum(float(p.grad.abs().sum()) for p in model.temporal.parameters() if p.grad is not None) > 0
    with pytest.raises(ValueError, match="temporal_grad"):
        HeadConfig(temporal_grad="coarse")


def test_loss_terms_parts_is_the_mean_of_each_terms_infonce_without_the_fused_one():
    from heads.loss import symmetric_infonce
    model, batch = make_model(loss_terms="parts", dropout=0.0), make_batch()
    model.eval()
    loss, _ = model(batch)
    with torch.no_grad():
        text, video = encode(model, batch)
        coarse, fine = model._coarse(text, video, False), model._fine(text, video, False)
        scale = model.logit_scale.exp()
        expected = (symmetric_infonce(coarse * scale) + symmetric_infonce(fine * scale)) / 2
    torch.testing.assert_close(loss.detach(), expected)
    one_term = make_model(loss_terms="parts", dropout=0.0, coarse=False).eval()  # one term: its own loss
    with torch.no_grad():
        fine = one_term._fine(*encode(one_term, batch), False)
        torch.testing.assert_close(one_term(batch)[0], symmetric_infonce(fine * one_term.logit_scale.exp()))


def test_weighted_fusion_needs_a_loss_on_the_joined_score():
    """Its weights learn only from the fused InfoNCE; 'parts' (the default) never computes it: refused, not ignored."""
    with pytest.raises(ValueError, match="nothing would train them"):
        HeadConfig(fusion="weighted")
    assert HeadConfig().loss_terms == "parts"
    HeadConfig(fusion="weighted", loss_terms="fused"), HeadConfig(fusion="weighted", loss_terms="each")
    HeadConfig(fusion="weighted", coarse=False)  # one term: no fusion to learn, nothing to refuse


def test_ranking_layout_gives_the_same_scores_without_the_per_pair_linear():
    """for_ranking factorises S4 (TextConditionedPool.factorise): every score, all pairs and aligned, equals the
    plain path's, with every parameter of S4 moved off its initial value (LayerNorm biases included, which
    make LN1's scale matter) and padded frames in the batch."""
    model, batch = make_model(), make_batch(b=7)
    with torch.no_grad():
        for p in model.pool.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    with torch.no_grad():
        text, video = encode(model, batch)
        ranked = model.for_ranking(video)
        assert ranked.pool_values is None and ranked.pool_basis is not None
        torch.testing.assert_close(model.score(text, ranked), model.score(text, video), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.score_pairs(text, ranked), model.score_pairs(text, video),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.score_explained(text, ranked)[0], model.score(text, video),
                                   rtol=1e-5, atol=1e-5)
        sub = torch.tensor([4, 1])
        torch.testing.assert_close(model.score(text, ranked.index(sub)), model.score(text, video)[:, sub],
                                   rtol=1e-5, atol=1e-5)
    model.train()
    assert model.for_ranking(video) is video  # training keeps the plain path (dropout)


def test_temporal_grad_separate_gives_the_coarse_term_a_temporal_encoder_of_its_own():
    """Nothing shared: the coarse loss trains only the coarse encoder (and S4), the fine loss only the fine one;
    both start from the same initialisation (CLIP's blocks when given), and a head with one term keeps one."""
    batch = make_batch(frames=10, full=True)
    model = make_model(dropout=0.0, temporal_grad="separate")
    assert model.temporal_coarse is not None
    assert HeadConfig().temporal_grad == "separate"  # the default
    assert make_model(temporal_grad="both").temporal_coarse is None
    # a config saved before the option existed ran with one shared encoder, and loads as one
    old = {k: v for k, v in HeadConfig().to_dict().items() if k != "temporal_grad"}
    assert HeadConfig.from_dict(old).temporal_grad == "both"
    assert make_model(temporal_grad="separate", fine=False).temporal_coarse is None
    text, video = encode(model, batch)

    def grad(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    model.zero_grad()
    model._coarse(text, video, False).sum().backward(retain_graph=True)
    assert grad(model.temporal_coarse) > 0 and grad(model.temporal) == 0 and grad(model.pool) > 0
    model.zero_grad()
    model._fine(text, video, False).sum().backward()
    assert grad(model.temporal) > 0 and grad(model.temporal_coarse) == 0
    from heads.trainer import param_groups
    groups = param_groups(model, 0.1, temporal_lr=1e-4)
    temporal = {id(p) for g in groups if g.get("lr") == 1e-4 for p in g["params"]}
    assert {id(p) for p in model.temporal_coarse.parameters()} <= temporal  # --temporal-lr reaches both
    with torch.no_grad():  # copied from the same initial weights, the coarse term is what a shared encoder gives
        model.temporal_coarse.load_state_dict(model.temporal.state_dict())
    shared = make_model(dropout=0.0, temporal_grad="both")
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("temporal_coarse.")})
    shared.eval(), model.eval()
    torch.testing.assert_close(scores(model, batch), scores(shared, batch))


def test_pool_init_uniform_starts_s4_as_mean_pooling_and_then_learns_the_query():
    """pool_init "uniform": a zero query, so S4's attention is uniform over each video's real frames and its pooled
    vector is LN2(z + Linear(z)) of the frames' mean; the query still gets a gradient. "identity" (X-Pool's) does
    not start uniform on these random features."""
    from heads.layers import TextConditionedPool

    torch.manual_seed(0)
    batch = make_batch(seed=4)
    mask = batch["frame_mask"]
    t, f = torch.randn(5, 16), torch.randn(len(mask), mask.shape[1], 16)
    uniform = TextConditionedPool(16, 2, 0.0, "uniform")
    attn = uniform.attention(t, uniform.video_side(f)[0], mask)  # (Nt, Nv, H, F)
    expected = (mask / mask.sum(1, keepdim=True))[None, :, None, :].expand_as(attn)
    torch.testing.assert_close(attn, expected)
    mean = (f * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (Nv, D)
    z = uniform.ln1(mean)
    torch.testing.assert_close(uniform(t, f, mask), uniform.ln2(z + uniform.linear(z)).expand(5, -1, -1))
    uniform(t, f, mask).square().sum().backward()
    assert uniform.q.weight.grad.abs().sum() > 0
    identity = TextConditionedPool(16, 2, 0.0)
    assert not torch.allclose(identity.attention(t, identity.video_side(f)[0], mask), expected)
    with pytest.raises(ValueError, match="pool_init"):
        HeadConfig(pool_init="zeros")
    head = make_model(pool_init="uniform")
    assert head.pool.q.weight.abs().sum() == 0
    assert HeadConfig.from_dict({k: v for k, v in HeadConfig().to_dict().items() if k != "pool_init"}).pool_init == "identity"


def test_pool_norm_input_keeps_s4s_attention_off_saturation_whatever_the_feature_norms():
    """pool_norm "input" (X-Pool's layer_norm1, shared by the text feature and the frames): S4's attention and pooled
    vector do not change when the features that come in are scaled (a temporal encoder's output norm grows in
    training), where without it the attention saturates onto one frame; the factorised ranking path gives the same
    scores with it; a config saved before the option existed loads without it."""
    from heads.layers import TextConditionedPool

    torch.manual_seed(0)
    batch = make_batch(seed=4)
    mask = batch["frame_mask"]
    t, f = torch.randn(5, 16), torch.randn(len(mask), mask.shape[1], 16)
    normed = TextConditionedPool(16, 2, 0.0, norm="input")
    plain = TextConditionedPool(16, 2, 0.0)
    with torch.no_grad():
        for p in normed.ln0.parameters():  # moved off LayerNorm's identity start, so its parameters take part
            p.add_(torch.randn_like(p) * 0.3)

    def attn(pool, scale):
        return pool.attention(t * scale, pool.video_side(f * scale)[0], mask)  # (Nt, Nv, H, F)

    torch.testing.assert_close(attn(normed, 8.0), attn(normed, 1.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(normed(t * 8, f * 8, mask), normed(t, f, mask), rtol=1e-4, atol=1e-4)
    peak = [float(attn(plain, s).detach().amax(-1).mean()) for s in (1.0, 8.0)]
    assert peak[1] > 0.9 > peak[0]  # without it: one frame takes (nearly) all of the weight
    normed(t, f, mask).square().sum().backward()
    assert normed.ln0.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pool_norm"):
        HeadConfig(pool_norm="output")
    assert HeadConfig.from_dict({k: v for k, v in HeadConfig().to_dict().items() if k != "pool_norm"}).pool_norm == "none"
    assert make_model(pool_norm="none").pool.ln0 is None and make_model().pool.ln0 is not None  # input: the default

    model, batch = make_model(pool_norm="input"), make_batch(b=7)
    with torch.no_grad():
        for p in model.pool.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    with torch.no_grad():
        text, video = encode(model, batch)
        torch.testing.assert_close(model.score(text, model.for_ranking(video)), model.score(text, video),
                                   rtol=1e-5, atol=1e-5)


def test_per_term_temperature_gives_each_term_its_own_tau():
    """temperature "per-term": the coarse InfoNCE uses logit_scale_coarse, the fine one logit_scale, and each tau
    gets gradient from its own term only; "shared" (the default) has one tau. Scores at inference do not use tau."""
    model, batch = make_model(loss_terms="parts", temperature="per-term", dropout=0.0), make_batch()
    assert make_model(loss_terms="parts").logit_scale_coarse is None
    with torch.no_grad():
        model.logit_scale_coarse.fill_(math.log(20.0))
    loss, logs = model(batch)
    coarse, fine = logs["terms"]
    torch.testing.assert_close(logs["logit_scale_coarse"], torch.tensor(20.0))
    coarse.backward(retain_graph=True)
    assert model.logit_scale_coarse.grad.abs() > 0 and model.logit_scale.grad is None
    model.zero_grad(set_to_none=True)
    fine.backward()
    assert model.logit_scale.grad.abs() > 0 and model.logit_scale_coarse.grad is None
    with torch.no_grad():  # the clamp keeps both taus <= the maximum
        model.logit_scale_coarse.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.logit_scale_coarse.item() == pytest.approx(model.cfg.logit_scale_max)
    with pytest.raises(ValueError, match="per-term"):
        HeadConfig(temperature="per-term", loss_terms="fused")
    HeadConfig(temperature="per-term", loss_terms="fused", coarse=False)  # one term: nothing to separate
