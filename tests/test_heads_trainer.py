"""fit(): learns a tiny synthetic set, checkpoints, resumes bit-exactly, and rebuilds heads from checkpoints."""
import json
import math

import pytest
import torch

from heads.evaluate import rank_all
from heads.model import TEXT_KEYS
from heads.trainer import TrainConfig, fit, load_head, param_groups, warmup_cosine
from tests.test_heads_model import encode, make_batch, make_model, scores, single_thread  # noqa: F401


class Interrupted(Exception):
    pass


def pairs(n=16, seed=0):
    return make_batch(b=n, frames=4, words=5, seed=seed)


def shuffled_batches(data, batch_size):
    """Batches in an order derived from the epoch alone, as fit() requires of its caller."""
    def batches(epoch):
        order = torch.randperm(len(data["frames"]), generator=torch.Generator().manual_seed(epoch))
        for s in range(0, len(order), batch_size):
            yield {k: v[order[s:s + batch_size]] for k, v in data.items()}
    return batches


def validator(data):
    texts = {k: data[k] for k in TEXT_KEYS}
    n = len(data["frames"])
    chunks = lambda: [(0, {"frames": data["frames"], "frame_mask": data["frame_mask"]})]  # noqa: E731
    return lambda model: rank_all(model, texts, torch.arange(n), chunks, n).as_dict()


def test_full_model_overfits_a_tiny_set(tmp_path):
    data = pairs()
    model = make_model()
    cfg = TrainConfig(epochs=30, lr=3e-3, weight_decay=0.0, log_every=1000)
    history = fit(model, shuffled_batches(data, 16), 1, cfg, tmp_path, validate=validator(data))
    assert len(history) == 30 and history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["t2v_R1"] == 100.0 and history[-1]["v2t_R1"] == 100.0
    assert {"epoch", "loss", "lr", "seconds", "data_wait_share"} <= set(history[-1])
    assert 0 <= history[-1]["data_wait_share"] <= 1
    # best.pt holds the first epoch that reached the best t2v R@1 and rebuilds a working head
    best = load_head(tmp_path / "best.pt")
    assert validator(data)(best)["t2v_R1"] == 100.0
    last = load_head(tmp_path / "last.pt")
    torch.testing.assert_close(scores(last, data), scores(model, data))


def test_resume_ends_with_the_weights_of_an_unbroken_run(tmp_path):
    data = pairs(n=12, seed=1)
    cfg = TrainConfig(epochs=3, lr=1e-3, seed=7, log_every=1000, checkpoint_every=0)  # dropout: RNG state matters

    unbroken = make_model(seed=5)
    fit(unbroken, shuffled_batches(data, 4), 3, cfg, tmp_path / "a")

    def crash_after_epoch_1(record):
        if record["epoch"] == 1:
            raise Interrupted

    broken = make_model(seed=5)
    with pytest.raises(Interrupted):
        fit(broken, shuffled_batches(data, 4), 3, cfg, tmp_path / "b", on_epoch_end=crash_after_epoch_1)
    torch.manual_seed(123)  # whatever happens to the RNG between the crash and the restart must not matter
    resumed = make_model(seed=9)  # a fresh process builds a fresh model; resume overwrites it
    history = fit(resumed, shuffled_batches(data, 4), 3, cfg, tmp_path / "b", resume=True)

    assert [h["epoch"] for h in history] == [0, 1, 2]
    a, b = unbroken.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_weight_decay_on_biases_norms_positions_and_temperature():
    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.2)
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "temporal.position_embedding", "pool.ln1.weight", "pool.q.bias"} <= kept
    assert {"pool.q.weight", "local.lstm.weight_ih_l0"} <= decayed
    assert not any(n.startswith("proj.") for n in decayed | kept)  # frozen projections are not optimised


def test_warmup_then_cosine():
    f = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    from heads.trainer import NonFiniteLoss
    data = pairs()
    model = make_model()
    cfg = TrainConfig(epochs=4, lr=1e-3, log_every=1000, checkpoint_every=0)

    def poisoned(epoch):
        for batch in shuffled_batches(data, 16)(epoch):
            if epoch == 2:
                batch = {**batch, "frames": batch["frames"] * float("nan")}
            yield batch

    with pytest.raises(NonFiniteLoss, match="epoch 3, step 3.*last.pt holds the weights after epoch 2 "):
        fit(model, poisoned, 1, cfg, tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epochs_done"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_nan_validation_metric_never_becomes_best(tmp_path):
    data = pairs()
    metrics = iter([{"t2v_R1": 10.0}, {"t2v_R1": float("nan")}, {"t2v_R1": 5.0}])
    fit(make_model(), shuffled_batches(data, 16), 1, TrainConfig(epochs=3, log_every=1000), tmp_path,
        validate=lambda model: next(metrics))
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epochs_done"] == 1


def test_checkpoints_are_throttled_but_the_final_epoch_is_always_saved(tmp_path):
    data = pairs()
    saves = []
    import heads.trainer as trainer
    real = trainer._save
    trainer._save = lambda obj, path: saves.append((path.name, obj["epochs_done"])) or real(obj, path)
    try:
        fit(make_model(), shuffled_batches(data, 16), 1, TrainConfig(epochs=5, log_every=1000, checkpoint_every=3600),
            tmp_path)
    finally:
        trainer._save = real
    assert saves == [("last.pt", 5)]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epochs_done"] == 5


def test_clip_terms_clips_each_term_on_its_own():
    from heads.trainer import _clipped_term_grads
    a, b = torch.ones(4, requires_grad=True), torch.ones(3, requires_grad=True)
    terms = lambda: [50 * (a ** 2).sum(), 0.3 * b.sum()]  # noqa: E731  # the first above the clip, the second below
    norms = _clipped_term_grads(terms(), [a, b], 1.0)
    assert norms.tolist() == pytest.approx([200.0, 0.3 * 3 ** 0.5], rel=1e-5)  # each term's own gradient
    # term_clip "own": each term's own gradient clipped to 1, then weighted 1/2 as the loss (the terms' mean) does
    assert torch.linalg.vector_norm(a.grad).item() == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(b.grad, torch.full((3,), 0.15))  # d(term / 2) / db, not shrunk by the first term
    # "weighted" (the behaviour before): the weight first, then the clip, an effective clip of 2 on each term
    a.grad = b.grad = None
    norms = _clipped_term_grads(terms(), [a, b], 1.0, own=False)
    assert norms.tolist() == pytest.approx([100.0, 0.15 * 3 ** 0.5], rel=1e-5)
    assert torch.linalg.vector_norm(a.grad).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(b.grad, torch.full((3,), 0.15))
    # under fp16's loss scaling the clipping sees true gradients, and .grad is left scaled for the scaler
    for own in (True, False):
        a.grad = b.grad = None
        _clipped_term_grads(terms(), [a, b], 1.0, own=own)
        plain = [a.grad.clone(), b.grad.clone()]
        a.grad = b.grad = None
        _clipped_term_grads(terms(), [a, b], 1.0, loss_scale=1024.0, own=own)
        torch.testing.assert_close(a.grad, 1024 * plain[0])
        torch.testing.assert_close(b.grad, 1024 * plain[1])
    # one global clip of the same loss would have shrunk the small term's gradient ~100-fold
    a.grad = b.grad = None
    (sum(terms()) / 2).backward()
    torch.nn.utils.clip_grad_norm_([a, b], 1.0)
    assert b.grad.abs().max() < 0.01


def test_clip_terms_without_clipping_is_the_plain_gradient(tmp_path):
    """With a clip no gradient reaches, clipping per term is the gradient of the mean loss: same weights."""
    data = pairs(n=12, seed=2)
    weights = []
    for clip_terms in (False, True):
        model = make_model(seed=3, loss_terms="parts", temporal_grad="separate")
        cfg = TrainConfig(epochs=2, lr=1e-3, seed=1, grad_clip=1e9, clip_terms=clip_terms, log_every=1000)
        fit(model, shuffled_batches(data, 6), 2, cfg, tmp_path / str(clip_terms))
        weights.append(model.state_dict())
    a, b = weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_history_keeps_each_terms_loss_and_the_curves_draw_them(tmp_path):
    """A full head's parts: each term's own InfoNCE per epoch (which one lags), and "loss" is their mean."""
    from workflows.train import draw_curves

    data = pairs(n=12, seed=2)
    cfg = TrainConfig(epochs=2, lr=1e-3, seed=1, log_every=1000)
    history = fit(make_model(seed=3, loss_terms="parts"), shuffled_batches(data, 6), 2, cfg, tmp_path / "parts")
    for record in history:
        assert record["loss_coarse"] > 0 and record["loss_fine"] > 0
        assert record["loss"] == pytest.approx((record["loss_coarse"] + record["loss_fine"]) / 2, rel=1e-5)
    each = fit(make_model(seed=3, loss_terms="each"), shuffled_batches(data, 6), 1, cfg, tmp_path / "each")
    assert {"loss_fused", "loss_coarse", "loss_fine"} <= set(each[0])
    one = fit(make_model(seed=3, coarse=False), shuffled_batches(data, 6), 1, cfg, tmp_path / "one")
    assert not [k for k in one[0] if k.startswith("loss_")]  # one term: "loss" is all there is
    draw_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def without_key_bias(name, a, b):
    """(a, b) without the attention keys' biases: a key bias shifts every logit of a query alike, so it has no
    effect and its gradient is rounding noise, which Adam scales up to full steps (runs that are the same in
    exact arithmetic differ there)."""
    if name.endswith("in_proj_bias"):  # nn.MultiheadAttention's (query, key, value) biases
        third = len(a) // 3
        return torch.cat([a[:third], a[2 * third:]]), torch.cat([b[:third], b[2 * third:]])
    if name.endswith("pool.k.bias"):  # S4's key projection
        return a[:0], b[:0]
    return a, b


def test_history_records_the_norm_the_clip_sees_and_how_often_it_clips(tmp_path):
    """grad_norm(_<term>): the pre-clip norm, checked against a plain backward on the untrained head (one step,
    no dropout); clipped: the share of steps above grad_clip."""
    data = pairs(n=8, seed=4)
    batches = shuffled_batches(data, 8)

    def by_hand(overrides, split):
        model = make_model(seed=3, dropout=0.0, **overrides)
        loss, logs = model(next(iter(batches(0))))
        params = [p for p in model.parameters() if p.requires_grad]
        parts = logs["terms"] if split else [loss]  # term_clip "own": each term's own gradient
        return [torch.linalg.vector_norm(torch.cat([g.flatten() for g in torch.autograd.grad(
            t, params, retain_graph=True, allow_unused=True) if g is not None])).item() for t in parts]

    for overrides, split, keys in (({"loss_terms": "parts"}, True, ["grad_norm_coarse", "grad_norm_fine"]),
                                   ({"coarse": False}, False, ["grad_norm"])):
        expected = by_hand(overrides, split)
        for clip, share in ((1e9, 0.0), (1e-9, 1.0)):
            cfg = TrainConfig(epochs=1, lr=1e-3, seed=1, grad_clip=clip, log_every=1000)
            record = fit(make_model(seed=3, dropout=0.0, **overrides), batches, 1, cfg,
                         tmp_path / f"{split}-{clip}")[0]
            assert [record[k] for k in keys] == pytest.approx(expected, rel=1e-4)
            assert [record[k.replace("grad_norm", "clipped")] for k in keys] == [share] * len(keys)


@pytest.mark.parametrize("term_clip, joint_clip", [("own", 100.0), ("weighted", 50.0)])
def test_with_a_temperature_per_term_the_full_heads_coarse_term_trains_as_a_coarse_only_head(tmp_path, term_clip,
                                                                                             joint_clip):
    """With temporal_grad "separate", temperature "per-term" and each term clipped on its own, nothing couples the
    terms: started from the same weights, without dropout, the full head's coarse parameters follow a coarse-only
    head's step for step. With term_clip "own" the coarse-only head has the same grad_clip; with "weighted" (the
    behaviour before) the full head needs half of it: the term enters the loss at 1/2 and is clipped after that
    weight. (The gradients
    then differ by the constant 1/2, which AdamW does not see.) So what differs between the two on real runs is
    the random draws (S4's initial weights, the dropout masks) and, before term_clip "own", the clip."""
    data = pairs(n=12, seed=5)
    joint = make_model(seed=3, dropout=0.0, loss_terms="parts", temperature="per-term")
    alone = make_model(seed=4, dropout=0.0, fine=False)
    rename = {"temporal_coarse.": "temporal.", "pool.": "pool.", "proj.": "proj.", "logit_scale_coarse": "logit_scale"}
    source = {new + k[len(old):]: k for k in joint.state_dict() for old, new in rename.items() if k.startswith(old)}
    alone.load_state_dict({k: joint.state_dict()[v] for k, v in source.items()})  # strict: all of it, from joint
    start = {k: v.clone() for k, v in alone.state_dict().items()}
    # the coarse term's own gradient norm is ~90-110 on these steps: the clip bites on some of them
    for model, cfg in ((joint, TrainConfig(epochs=3, lr=1e-3, seed=1, grad_clip=joint_clip, term_clip=term_clip,
                                           log_every=1000)),
                       (alone, TrainConfig(epochs=3, lr=1e-3, seed=1, grad_clip=100.0, log_every=1000))):
        history = fit(model, shuffled_batches(data, 4), 3, cfg, tmp_path / str(model is joint))
        assert 0 < history[0]["clipped_coarse" if model is joint else "clipped"] < 1
    trained = joint.state_dict()
    for k, v in alone.state_dict().items():
        torch.testing.assert_close(*without_key_bias(k, v, trained[source[k]]), rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(v, start[k]) for k, v in alone.state_dict().items())  # they trained
    # and so the coarse term scores as the coarse-only head does
    joint.eval(), alone.eval()
    with torch.no_grad():
        text, video = encode(joint, data)
        coarse = joint._terms(text, video, aligned=False)[0]
        torch.testing.assert_close(coarse, alone._terms(*encode(alone, data), aligned=False)[0], rtol=1e-4, atol=1e-5)


def test_term_clip_own_at_twice_the_norm_is_the_weighted_clip_of_before(tmp_path):
    """A full head's run under the behaviour before (term_clip "weighted", grad_clip c) is the same run as term_clip
    "own" with 2c: the figures measured before term_clip existed stand for the second."""
    data = pairs(n=12, seed=6)
    weights = []
    for term_clip, clip in (("weighted", 30.0), ("own", 60.0)):
        model = make_model(seed=3, loss_terms="parts")
        cfg = TrainConfig(epochs=2, lr=1e-3, seed=1, grad_clip=clip, term_clip=term_clip, log_every=1000)
        history = fit(model, shuffled_batches(data, 4), 3, cfg, tmp_path / term_clip)
        assert 0 < history[0]["clipped_fine"] < 1 or 0 < history[0]["clipped_coarse"] < 1
        weights.append(model.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(*without_key_bias(k, weights[0][k], weights[1][k]), rtol=1e-4, atol=1e-6, msg=k)


def test_history_records_the_largest_step_and_where_it_came_from(tmp_path):
    """grad_norm_max(_<term>): the largest pre-clip norm of an epoch's steps, at least their mean; and that step's
    norm split by module, whose parts add up (in squares) to it and name the modules each term reaches."""
    data = pairs(n=32, seed=4)
    batches = shuffled_batches(data, 8)
    for overrides, keys in (({"loss_terms": "parts"}, ["_coarse", "_fine"]), ({"coarse": False}, [""])):
        cfg = TrainConfig(epochs=2, lr=1e-3, seed=1, log_every=1000)
        history = fit(make_model(seed=3, **overrides), batches, 4, cfg, tmp_path / str(len(keys)))
        for record in history:
            for key in keys:
                largest, by_module = record[f"grad_norm_max{key}"], record[f"grad_norm_max_by_module{key}"]
                assert largest >= record[f"grad_norm{key}"] - 1e-6
                assert math.sqrt(sum(v ** 2 for v in by_module.values())) == pytest.approx(largest, rel=1e-4)
                reached = {m for m, v in by_module.items() if v > 0}
                if key == "_coarse":  # S4 and its temporal encoder, never the fine term's modules
                    assert {"pool", "temporal_coarse"} <= reached and not reached & {"local", "keyword_attn"}
                if key == "_fine":
                    assert {"temporal", "local", "keyword_attn"} <= reached and "pool" not in reached
        json.dumps(history)  # metrics.jsonl takes it as it is
