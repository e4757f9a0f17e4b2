"""`train-heads --unfreeze-blocks K`: CLIP's last blocks train on cached tokens with the head.

The token loader and TunedHead give the stored features while the blocks are untouched (frames only among the
cached ones), the blocks train while everything else of CLIP stays frozen, checkpoints hold the trained blocks
and resume exactly, `eval --run` recomputes the features through them once, and folders without (enough) caches
are refused with the extract option that makes them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from heads.config import HeadConfig
from heads.trainer import TrainConfig, fit, param_groups
from pipeline import schema as S
from pipeline.read import FeatureStore, uniform_indices
from pipeline.tokens import TokensError, TokenStore
from tests.conftest import run_cli, tiny_extract_args
from workflows.data import TrainData
from workflows.token_data import TokenIndex, TokenTrainData, build_tuned
from workflows.train import RunConfig, build_head, train

ATOL, RTOL = 4e-3, 4e-3  # fp16 storage of tokens and features (tests/test_cache_blocks.py)
MAX_FRAMES, MAX_WORDS = 12, 4  # 4 words: captions are cut, so the EOT must come from the whole caption


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spinning against other work on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cached(clip_collection, tmp_path_factory):
    """K = 2 token caches, at most 2 cached frames per video (b has 3 frames, d has 4)."""
    out = tmp_path_factory.mktemp("unfreeze") / "k2"
    res = run_cli(*tiny_extract_args(clip_collection, out, "--cluster", "none", "--shard-size", "2",
                                     "--cache-blocks", "2", "--cache-frames", "2"))
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def uncached(cached, tmp_path_factory):
    """The same shards with their token caches taken out: what `extract` without --cache-blocks writes."""
    out = tmp_path_factory.mktemp("unfreeze") / "plain"
    shutil.copytree(cached, out)
    (out / S.CLIP_TAIL_FILE).unlink()
    for shard in sorted((out / S.SHARDS_DIR).iterdir()):
        with h5py.File(shard / S.FEATURES_FILE, "a") as h5:
            for name in S.H5_CACHE_DTYPES:
                del h5[name]
            for name in S.H5_CACHE_ATTRS:
                del h5.attrs[name]
    return out


def _cfg(features, **train) -> RunConfig:
    return RunConfig(features=str(features), head=HeadConfig(max_frames=MAX_FRAMES), batch_size=8,
                     max_words=MAX_WORDS, unfreeze_blocks=1,
                     train=TrainConfig(epochs=2, clip_lr=1e-3, checkpoint_every=0, log_every=1000, **train))


@pytest.fixture(scope="module")
def tuned_run(cached, tmp_path_factory):
    """train-heads --unfreeze-blocks 1 through the CLI (2 epochs of one step: a, c; d validates)."""
    run = tmp_path_factory.mktemp("unfreeze") / "run"
    res = run_cli("train-heads", "--features", str(cached), "--out", str(run), "--epochs", "2", "--batch-size", "8",
                  "--device", "cpu", "--unfreeze-blocks", "1", "--clip-lr", "1e-3", "--max-words", str(MAX_WORDS),
                  "--checkpoint-every", "0")
    assert res.returncode == 0, res.stderr
    return run


@pytest.mark.parametrize("blocks", [1, 2])
def test_untrained_blocks_give_the_stored_features_through_the_trainers_path(cached, blocks):
    store, tokens = FeatureStore(cached), TokenStore(cached)
    everything = list(range(len(store.captions)))  # every split: videos b and d have uncached frames
    data = TokenTrainData(TokenIndex(store, tokens), everything, 8, MAX_FRAMES, MAX_WORDS, seed=3)
    plain = TrainData(store, everything, 8, MAX_FRAMES, MAX_WORDS, seed=3)
    assert [data.plan(e) for e in range(3)] == [plain.plan(e) for e in range(3)]  # same batches, same order
    model = build_tuned(build_head(HeadConfig(), store), tokens, blocks)
    seen_partial = False
    for items in data.plan(0):
        got, want = data.load(items), plain.load(items)
        with torch.no_grad():
            feats = model.features(got)
        assert torch.equal(feats["token_mask"], want["token_mask"])
        assert torch.equal(feats["keyword_mask"], want["keyword_mask"]) and want["keyword_mask"].any()
        for key in ("text_global", "tokens", "keywords"):
            np.testing.assert_allclose(feats[key].numpy(), want[key].numpy(), atol=ATOL, rtol=RTOL, err_msg=key)
        for row, v in enumerate(data.videos[items]):
            video = store.videos[v]
            _, cached_idx = tokens.frame_tokens(video["shard_pos"], video["frame_start"], video["num_frames"])
            picks = cached_idx[uniform_indices(len(cached_idx), MAX_FRAMES)]  # uniform over the cached frames
            stored, _ = store.frames([v], 1000)
            n = int(feats["frame_mask"][row].sum())
            assert n == len(picks) and not feats["frame_mask"][row, n:].any()
            np.testing.assert_allclose(feats["frames"][row, :n].numpy(), stored[0, picks], atol=ATOL, rtol=RTOL)
            seen_partial |= len(picks) < video["num_frames"]
    assert seen_partial  # some video had frames without cached tokens, and none of those was sampled
    tokens.close()


def test_the_last_blocks_train_and_the_rest_of_clip_stays_frozen(cached, tmp_path):
    store, tokens = FeatureStore(cached), TokenStore(cached)
    torch.manual_seed(0)
    model = build_tuned(build_head(HeadConfig(), store), tokens, 1)
    names = {n for n, _ in model.named_parameters()}
    assert not any(k in n for n in names for k in ("conv1", "token_embedding", "positional_embedding",
                                                   "class_embedding"))  # what precedes the cache is not here
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("tail.")}
    assert trainable and all(n.startswith(("tail.image.resblocks.1.", "tail.text.resblocks.1.",
                                           "tail.image.ln_post.", "tail.text.ln_final.")) for n in trainable)
    # own learning rate; no decay on norms and biases
    groups = param_groups(model, 0.2, clip_lr=1e-5)
    by_name = {id(p): n for n, p in model.named_parameters()}
    clip = [g for g in groups if g.get("lr") == 1e-5]
    assert {by_name[id(p)] for g in clip for p in g["params"]} == trainable
    decayed = {by_name[id(p)] for g in clip if g["weight_decay"] > 0 for p in g["params"]}
    assert "tail.image.resblocks.1.attn.in_proj_weight" in decayed
    assert not any(n.endswith(("bias", "ln_post.weight", "ln_1.weight")) for n in decayed)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    index = TokenIndex(store, tokens)
    data = TokenTrainData(index, store.split_captions("train"), 8, MAX_FRAMES, MAX_WORDS, seed=0)
    fit(model, data, data.steps_per_epoch(), TrainConfig(epochs=1, clip_lr=1e-3), tmp_path)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    for tower in ("image", "text"):
        assert any(n.startswith(f"tail.{tower}.resblocks.1.") for n in changed), tower
        assert not any(n.startswith(f"tail.{tower}.resblocks.0.") for n in changed), tower  # before L - K
    assert not changed & {"tail.image.proj", "tail.text.text_projection", "head.proj.image", "head.proj.text"}
    assert any(n.startswith("head.") for n in changed)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["tuned_blocks"] == 1 and ckpt["tail_info"]["cache_blocks"] == 2
    assert torch.equal(ckpt["model"]["tail.image.resblocks.1.mlp.c_fc.weight"],
                       model.tail.image.resblocks[1].mlp.c_fc.weight)

    # activation checkpointing recomputes the same gradients
    batch = next(iter(data(0)))
    grads = []
    for checkpoint in (False, True):
        model.tail.image.checkpoint = model.tail.text.checkpoint = checkpoint
        model.zero_grad()
        model.eval()  # no dropout: the two passes must see the same function
        model(batch)[0].backward()
        grads.append(model.tail.image.resblocks[1].attn.in_proj_weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    tokens.close()


def test_cli_run_evaluates_through_its_trained_blocks_once(cached, tuned_run, capsys):
    from workflows.evaluate import evaluate
    from workflows.tuned_features import TUNED_DIR, features_for_run

    config = json.loads((tuned_run / "config.json").read_text())
    assert config["run"]["unfreeze_blocks"] == 1 and config["run"]["train"]["clip_lr"] == 1e-3
    res = run_cli("eval", "--features", str(cached), "--run", str(tuned_run), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "recomputing the features" in res.stderr and "t2v" in res.stdout
    report = json.loads((tuned_run / "eval_test.json").read_text())

    tuned = tuned_run / TUNED_DIR
    assert features_for_run(tuned_run, cached) == tuned
    store, tuned_store, tokens = FeatureStore(cached), FeatureStore(tuned), TokenStore(cached)
    assert [v["num_frames"] for v in tuned_store.videos] == [min(2, v["num_frames"]) for v in store.videos]
    # the tuned frames are the trained blocks' output, not the stored features
    model = build_tuned(build_head(HeadConfig(), store), tokens, 1)
    model.load_state_dict(torch.load(tuned_run / "best.pt", weights_only=True)["model"])
    v = store.videos[0]
    block_in, idx = tokens.frame_tokens(v["shard_pos"], v["frame_start"], v["num_frames"])
    with torch.no_grad():
        trained = model.tail.image(torch.from_numpy(block_in)).numpy()
    got, _ = tuned_store.frames([0], 1000)
    stored, _ = store.frames([0], 1000)
    np.testing.assert_allclose(got[0, :len(idx)], trained, atol=ATOL, rtol=RTOL)
    assert np.abs(stored[0, idx] - trained).max() > 20 * ATOL
    tokens.close()

    # a second eval reuses the folder (same fingerprint) and gives the same numbers
    again = evaluate(cached, tuned_run, split="test", device="cpu")
    assert "recomputing" not in capsys.readouterr().err and again["t2v"] == report["t2v"]


def test_resume_after_an_interruption_ends_with_the_unbroken_weights(cached, tmp_path, monkeypatch):
    import workflows.train as wt

    train(_cfg(cached), tmp_path / "unbroken")

    class Interrupted(Exception):
        pass

    write = wt._write_metrics

    def crash_after_one_epoch(history, path):  # last.pt is written before this is called
        write(history, path)
        if len(history) == 1:
            raise Interrupted

    monkeypatch.setattr(wt, "_write_metrics", crash_after_one_epoch)
    with pytest.raises(Interrupted):
        train(_cfg(cached), tmp_path / "broken")
    monkeypatch.setattr(wt, "_write_metrics", write)
    torch.manual_seed(123)
    history = train(_cfg(cached), tmp_path / "broken", resume=True)
    assert [h["epoch"] for h in history] == [0, 1]
    a = torch.load(tmp_path / "unbroken" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "broken" / "last.pt", weights_only=True)["model"]
    assert any(k.startswith("tail.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_folders_without_enough_caches_are_refused(cached, uncached, tuned_run, tmp_path):
    from workflows.evaluate import evaluate

    res = run_cli("train-heads", "--features", str(cached), "--out", str(tmp_path / "r3"), "--epochs", "1",
                  "--device", "cpu", "--unfreeze-blocks", "3")
    assert res.returncode == 2
    assert "last 2 block(s)" in res.stderr and "--cache-blocks 3" in res.stderr
    with pytest.raises(TokensError, match="extracted without --cache-blocks.*--cache-blocks"):
        train(_cfg(uncached), tmp_path / "r1")
    with pytest.raises(TokensError, match=r"--unfreeze-blocks 1.*--cache-blocks"):
        evaluate(uncached, tuned_run, split="test", device="cpu")


def test_search_scores_a_tuned_run_on_its_recomputed_features(cached, uncached, tuned_run):
    from retrieval.index import default_folder
    from workflows.tuned_features import TUNED_DIR

    res = run_cli("search", "a red circle", "--features", str(cached), "--run", str(tuned_run), "--device", "cpu",
                  "--top", "3")
    assert res.returncode == 0, res.stderr
    meta = json.loads((default_folder(cached, tuned_run) / "index.json").read_text())
    assert Path(meta["features"]) == (tuned_run / TUNED_DIR).resolve()  # the index holds the trained blocks' codes
    res = run_cli("search", "a red circle", "--features", str(uncached), "--run", str(tuned_run), "--device", "cpu")
    assert res.returncode == 2 and "--cache-blocks" in res.stderr and "Traceback" not in res.stderr
