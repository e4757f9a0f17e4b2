"""bench/ensemble.py: separately trained runs joined at inference, checked against `eval` and a naive count."""
from __future__ import annotations

import json

import pytest

from tests.conftest import load_bench, run_cli


def load():
    return load_bench("ensemble.py")


@pytest.fixture(scope="module")
def two_runs(synthetic_features, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    runs = []
    for name, flag in (("fine", "--fine-only"), ("coarse", "--coarse-only")):
        res = run_cli("train-heads", "--features", str(synthetic_features), "--out", str(root / name), "--epochs",
                      "2", "--batch-size", "8", "--device", "cpu", "--val-split", "none", flag)
        assert res.returncode == 0, res.stderr
        res = run_cli("eval", "--features", str(synthetic_features), "--run", str(root / name), "--device", "cpu")
        assert res.returncode == 0, res.stderr
        runs.append(root / name)
    return runs


def naive_t2v_r1(scores, text_to_video) -> float:
    """Share of texts whose own video scores strictly above every other video, by a loop."""
    hits = 0
    for t, own in enumerate(text_to_video.tolist()):
        row = scores[t].tolist()
        hits += all(row[own] > s for j, s in enumerate(row) if j != own)
    return 100 * hits / len(text_to_video)


def test_each_run_alone_matches_eval_and_the_sum_matches_a_naive_count(synthetic_features, two_runs):
    mod = load()
    out = mod.ensemble(str(synthetic_features), [str(r) for r in two_runs])
    for run in two_runs:
        report = json.loads((run / "eval_test.json").read_text())
        assert out[run.name]["t2v_R1"] == pytest.approx(report["t2v"]["R1"], abs=1e-3)
        assert out[run.name]["v2t_R1"] == pytest.approx(report["v2t"]["R1"], abs=1e-3)

    from heads.evaluate import score_matrix
    from pipeline.read import FeatureStore
    from workflows.data import EvalData
    from workflows.evaluate import load_run
    store = FeatureStore(synthetic_features)
    data = EvalData(store, store.split_captions("test"), 12, 32)
    total = sum(score_matrix(load_run(r, store)[0], data.texts(), data.video_chunks(), len(data.videos))
                for r in two_runs)
    assert out["sum"]["t2v_R1"] == pytest.approx(naive_t2v_r1(total, data.text_to_video), abs=1e-6)
    store.close()


def test_a_run_joined_with_itself_ranks_as_it_does_alone(synthetic_features, two_runs):
    out = load().ensemble(str(synthetic_features), [str(two_runs[0])] * 2)
    assert out["sum"] == out[two_runs[0].name]
