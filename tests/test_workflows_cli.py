"""`train-heads` and `eval` end to end on shards extracted from the synthetic set."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import torch

from tests.conftest import run_cli  # synthetic_features: the session fixture of conftest.py


def train_args(features, out, *extra):
    return ["train-heads", "--features", str(features), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--device", "cpu", *extra]


def test_train_then_eval(synthetic_features, tmp_path):
    run = tmp_path / "run"
    res = run_cli(*train_args(synthetic_features, run))
    assert res.returncode == 0, res.stderr
    assert "epoch 2/2" in res.stdout
    for name in ("config.json", "metrics.jsonl", "curves.png", "last.pt", "best.pt"):
        assert (run / name).exists(), name
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1] and all("t2v_R1" in r for r in history)
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["head"]["variant"] == "full" and config["features_model"]["model"] == "ViT-Tiny-16"
    ckpt = torch.load(run / "last.pt", weights_only=True)  # loads without executing pickled code
    assert "model" in ckpt

    out_json = tmp_path / "metrics.json"
    res = run_cli("eval", "--features", str(synthetic_features), "--run", str(run), "--json", str(out_json),
                  "--device", "cpu", "--chunk", "5")
    assert res.returncode == 0, res.stderr
    assert "R@1" in res.stdout and "t2v" in res.stdout and "v2t" in res.stdout
    report = json.loads(out_json.read_text())
    n_test = report["queries"]["t2v"]
    assert n_test == report["candidates"]["v2t"] and report["queries"]["v2t"] == report["candidates"]["t2v"]
    for side in ("t2v", "v2t"):
        assert set(report[side]) == {"R1", "R5", "R10", "MdR", "MnR"}
        assert 0 <= report[side]["R1"] <= report[side]["R5"] <= report[side]["R10"] <= 100
    ranks = pq.read_table(run / "ranks_test.parquet").to_pylist()
    assert sum(r["direction"] == "t2v" for r in ranks) == n_test
    assert all(1 <= r["rank"] <= report["candidates"]["t2v"] for r in ranks if r["direction"] == "t2v")
    # Chunking is only about memory: one block gives the same numbers.
    res = run_cli("eval", "--features", str(synthetic_features), "--run", str(run), "--json", str(out_json),
                  "--device", "cpu", "--chunk", "1000")
    assert json.loads(out_json.read_text())["t2v"] == report["t2v"]


def test_baseline_variants_and_ablation_flags(synthetic_features, tmp_path):
    sizes = {}
    for name, extra in (("meanp", ["--variant", "meanp"]), ("full", []), ("no_video", ["--no-video-enhance"]),
                        ("coarse", ["--coarse-only"])):
        res = run_cli(*train_args(synthetic_features, tmp_path / name, "--epochs", "1", *extra))
        assert res.returncode == 0, res.stderr
        sizes[name] = json.loads((tmp_path / name / "config.json").read_text())["trainable_parameters"]
    assert sizes["meanp"] < sizes["coarse"] < sizes["no_video"] < sizes["full"]


def test_training_recipe_options_reach_the_saved_run(synthetic_features, tmp_path):
    run = tmp_path / "run"
    res = run_cli(*train_args(synthetic_features, run, "--epochs", "1", "--fusion", "mean", "--loss-terms", "each",
                              "--temporal-grad", "fine", "--temporal-lr", "1e-4", "--global-clip",
                              "--pool-init", "uniform", "--pool-norm", "none",
                              "--frame-weights", "residual", "--frame-norm", "input"))
    assert res.returncode == 0, res.stderr
    saved = json.loads((run / "config.json").read_text())["run"]
    assert (saved["head"]["fusion"], saved["head"]["loss_terms"], saved["head"]["temporal_grad"]) == ("mean", "each", "fine")
    assert (saved["head"]["pool_init"], saved["head"]["pool_norm"]) == ("uniform", "none")
    assert (saved["head"]["frame_weights"], saved["head"]["frame_norm"]) == ("residual", "input")
    assert saved["train"]["temporal_lr"] == 1e-4 and saved["train"]["clip_terms"] is False
    # clip_terms means nothing to a head with one loss term: not recorded, and such a config reads back
    res = run_cli(*train_args(synthetic_features, tmp_path / "fine", "--epochs", "1", "--fine-only", "--clip-terms"))
    assert res.returncode == 0, res.stderr
    saved = json.loads((tmp_path / "fine" / "config.json").read_text())["run"]
    assert "clip_terms" not in saved["train"]
    from workflows.train import RunConfig
    assert RunConfig.from_dict(saved).train.clip_terms is False
    res = run_cli(*train_args(synthetic_features, tmp_path / "bad", "--epochs", "1", "--temporal-grad", "coarse"))
    assert res.returncode != 0 and "temporal_grad" in res.stderr
    # the clip: its norm and which gradient of a term meets it; a config saved before term_clip existed clipped
    # each term after the loss's weight, and reads back so
    res = run_cli(*train_args(synthetic_features, tmp_path / "clip", "--epochs", "1", "--grad-clip", "3",
                              "--term-clip", "weighted"))
    assert res.returncode == 0, res.stderr
    saved = json.loads((tmp_path / "clip" / "config.json").read_text())["run"]
    assert (saved["train"]["grad_clip"], saved["train"]["term_clip"], saved["train"]["clip_terms"]) == (3.0, "weighted", True)
    saved["train"].pop("term_clip")
    assert RunConfig.from_dict(saved).train.term_clip == "weighted"
    history = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert {"grad_norm_coarse", "grad_norm_fine", "clipped_coarse", "clipped_fine"} <= set(history[-1])
    for bad, said in ((("--term-clip", "raw"), "term_clip"), (("--grad-clip", "0"), "grad_clip")):
        res = run_cli(*train_args(synthetic_features, tmp_path / "bad", "--epochs", "1", *bad))
        assert res.returncode != 0 and said in res.stderr, res.stderr


def test_zero_shot_eval_without_a_run(synthetic_features):
    res = run_cli("eval", "--features", str(synthetic_features), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "t2v" in res.stdout and "R@1" in res.stdout


def test_eval_dsl(synthetic_features, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args(synthetic_features, run, "--epochs", "1")).returncode == 0
    res = run_cli("eval", "--features", str(synthetic_features), "--run", str(run), "--dsl", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "dual softmax" in res.stdout and (run / "eval_test_dsl.json").exists()


def test_bad_inputs_give_clear_errors(synthetic_features, tmp_path):
    res = run_cli(*train_args(tmp_path / "nothing", tmp_path / "run"))
    assert res.returncode == 2 and "no shards found" in res.stderr
    res = run_cli("eval", "--features", str(synthetic_features), "--run", str(tmp_path / "norun"), "--device", "cpu")
    assert res.returncode == 2 and "not a trained run" in res.stderr
    res = run_cli(*train_args(synthetic_features, tmp_path / "run", "--resume"))
    assert res.returncode == 2 and "nothing to resume" in res.stderr
    res = run_cli("eval", "--features", str(synthetic_features), "--split", "nope", "--device", "cpu")
    assert res.returncode == 2 and "split 'nope'" in res.stderr


def test_run_on_other_features_is_refused(synthetic_features, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args(synthetic_features, run, "--epochs", "1")).returncode == 0
    config = json.loads((run / "config.json").read_text())
    config["features_model"].update(model="ViT-B-32", image_dim=768)
    (run / "config.json").write_text(json.dumps(config))
    res = run_cli("eval", "--features", str(synthetic_features), "--run", str(run), "--device", "cpu")
    assert res.returncode == 2 and "ViT-B-32" in res.stderr and "ViT-Tiny-16" in res.stderr


def copy_features(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".extract.lock"))
    return dst


def test_temporal_encoder_starts_from_clip_blocks_saved_by_extract(synthetic_features, tmp_path):
    assert (synthetic_features / "clip_text_blocks.safetensors").exists()
    run = tmp_path / "run"
    assert run_cli(*train_args(synthetic_features, run, "--epochs", "1")).returncode == 0
    head = json.loads((run / "config.json").read_text())["run"]["head"]
    assert head["temporal_init"] == "clip" and head["temporal_heads"] == 2  # the tiny text tower's heads

    old = copy_features(synthetic_features, tmp_path / "old")
    (old / "clip_text_blocks.safetensors").unlink()  # a folder extracted before the file existed
    res = run_cli(*train_args(old, tmp_path / "r1", "--epochs", "1"))
    assert res.returncode == 2 and "clip_text_blocks.safetensors" in res.stderr and "--temporal-init random" in res.stderr
    res = run_cli(*train_args(old, tmp_path / "r2", "--epochs", "1", "--temporal-init", "random"))
    assert res.returncode == 0, res.stderr
    (old / "clip_text_blocks.safetensors").write_bytes(b"not safetensors")
    res = run_cli(*train_args(old, tmp_path / "r3", "--epochs", "1"))
    assert res.returncode == 2 and "unreadable" in res.stderr


def test_a_nan_feature_stops_training_with_an_error_naming_its_file(synthetic_features, tmp_path):
    import h5py
    broken = copy_features(synthetic_features, tmp_path / "broken")
    shard = sorted((broken / "shards").iterdir())[0]
    with h5py.File(shard / "features.h5", "r+") as h5:
        h5["frames"][0] = float("nan")
    res = run_cli(*train_args(broken, tmp_path / "run", "--epochs", "2"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{shard / 'features.h5'}: non-finite values in the frames of video" in res.stderr


def test_eval_of_a_dead_run_reports_zero_not_a_perfect_score(synthetic_features, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args(synthetic_features, run, "--epochs", "1")).returncode == 0
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["model"]["pool.linear.weight"].fill_(float("nan"))
        torch.save(ckpt, run / name)
    out_json = tmp_path / "m.json"
    res = run_cli("eval", "--features", str(synthetic_features), "--run", str(run), "--device", "cpu",
                  "--json", str(out_json))
    assert res.returncode == 0, res.stderr
    report = json.loads(out_json.read_text())
    assert report["t2v"]["R1"] == 0.0 and report["v2t"]["R1"] == 0.0
    assert report["non_finite_own_scores"] == report["queries"]["t2v"] and "WARNING" in res.stdout
    assert report["v2t_protocol"] == "group"
