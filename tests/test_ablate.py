"""`ablate`: rows x seeds trained and evaluated in-process and on a local Dask cluster, the tables,
skip and resume on rerun, failing rows, grid files, and the twin pair accuracy."""
from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import torch

from tests.conftest import run_cli
from workflows.ablate import AblateError, read_grid, select_rows, twin_accuracy

METRICS = ("R1", "R5", "R10", "MdR", "MnR")
# meanP rows: cheap to train, and two of them are enough to test the table.
GRID = {"meanp lr 1e-2": {"variant": "meanp", "lr": 1e-2},
        "bad lr": {"variant": "meanp", "lr": -1.0},              # AdamW refuses it inside the run
        "no score": {"fine": False, "coarse": False}}           # HeadConfig refuses it before any run


def ablate_args(features, out, grid, *only, extra=()):
    args = ["ablate", "--features", str(features), "--out", str(out), "--grid", str(grid), "--seeds", "2",
            "--steps", "5", "--batch-size", "32", "--device", "cpu", *extra]
    for row in only:
        args += ["--only", row]
    return args


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "grid.json"
    path.write_text(json.dumps(GRID))
    return path


@pytest.fixture(scope="module")
def in_process(synthetic_features, grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "out"
    res = run_cli(*ablate_args(synthetic_features, out, grid, "meanp", "meanp lr 1e-2", extra=("--cluster", "none")))
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_holds_the_runs_numbers(in_process):
    out, res = in_process
    for name in ("table.md", "table.csv", "runs.csv", "table.png", "ablate.json"):
        assert (out / name).exists(), name
    assert "[4/4]" in res.stdout and "| meanp lr 1e-2 | 2/2 |" in res.stdout
    config = json.loads((out / "ablate.json").read_text())
    assert list(config["rows"]) == ["meanp", "meanp lr 1e-2"] and config["seeds"] == [0, 1]
    runs = {"meanp": "meanp", "meanp lr 1e-2": "meanp_lr_1e-2"}
    table = {r["row"]: r for r in read_csv(out / "table.csv")}
    for row, folder in runs.items():
        reports = [json.loads((out / "runs" / f"{folder}-seed{s}" / "eval_test.json").read_text()) for s in (0, 1)]
        for side in ("t2v", "v2t"):
            for m in METRICS:
                values = [r[side][m] for r in reports]
                assert float(table[row][f"{side}_{m}_mean"]) == pytest.approx(statistics.fmean(values))
                assert float(table[row][f"{side}_{m}_std"]) == pytest.approx(statistics.stdev(values))
        assert table[row]["seeds_done"] == "2" and table[row]["errors"] == ""
        twins = [json.loads((out / "runs" / f"{folder}-seed{s}" / "twins_test.json").read_text()) for s in (0, 1)]
        assert all(t["pairs"] >= 1 and 0 <= t["twins"] <= 100 for t in twins)  # the synthetic set has twins
        assert float(table[row]["twins_mean"]) == pytest.approx(statistics.fmean(t["twins"] for t in twins))
    assert "twins" in (out / "table.md").read_text()
    n_videos = reports[0]["queries"]["v2t"]
    assert f"chance R@1 = {100 / n_videos:.1f}%" in (out / "table.md").read_text()


def test_every_row_gets_the_same_budget_and_its_overrides(in_process):
    out, _ = in_process
    budget = json.loads((out / "ablate.json").read_text())["budget"]
    for seed in (0, 1):
        epochs = budget[str(seed)]["epochs"]
        assert epochs == math.ceil(5 / budget[str(seed)]["steps_per_epoch"])
        for folder, lr in (("meanp", 1e-3), ("meanp_lr_1e-2", 1e-2)):
            train = json.loads((out / "runs" / f"{folder}-seed{seed}" / "config.json").read_text())["run"]["train"]
            assert (train["epochs"], train["seed"], train["lr"]) == (epochs, seed, lr)


def test_rerun_skips_finished_runs_and_resumes_unevaluated_ones(in_process, synthetic_features, grid):
    out, _ = in_process
    checkpoints = sorted((out / "runs").glob("*/last.pt"))
    before = {p: p.stat().st_mtime_ns for p in checkpoints}
    (out / "runs" / "meanp-seed1" / "eval_test.json").unlink()  # as if killed after training
    res = run_cli(*ablate_args(synthetic_features, out, grid, "meanp", "meanp lr 1e-2", extra=("--cluster", "none")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("(done before)") == 3
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == before  # nothing trained again
    status = {(r["row"], r["seed"]): r["status"] for r in read_csv(out / "runs.csv")}
    assert status[("meanp", "1")] == "resumed" and status[("meanp", "0")] == "skipped"
    assert (out / "runs" / "meanp-seed1" / "eval_test.json").exists()


def test_local_dask_cluster_with_failing_rows(synthetic_features, grid, tmp_path):
    out = tmp_path / "out"
    res = run_cli(*ablate_args(synthetic_features, out, grid, "meanp", "bad lr", "no score",
                               extra=("--cluster", "local", "--workers", "2")))
    assert res.returncode == 0, res.stdout + res.stderr  # some runs finished
    table = {r["row"]: r for r in read_csv(out / "table.csv")}
    assert table["meanp"]["seeds_done"] == "2" and table["meanp"]["t2v_R1_mean"] != ""
    assert table["bad lr"]["seeds_done"] == "0" and "learning rate" in table["bad lr"]["errors"]
    assert table["no score"]["seeds_done"] == "0" and "at least one of fine / coarse" in table["no score"]["errors"]
    md = (out / "table.md").read_text()
    assert "Failed runs:" in md and "no score, seed 1: ValueError" in md and "| bad lr | 0/2 |" in md
    reports = [json.loads((out / "runs" / f"meanp-seed{s}" / "eval_test.json").read_text()) for s in (0, 1)]
    assert float(table["meanp"]["t2v_R1_mean"]) == pytest.approx(statistics.fmean(r["t2v"]["R1"] for r in reports))
    assert "Traceback" in (out / "runs" / "bad_lr-seed0" / "train.log").read_text()


def test_every_run_failing_exits_non_zero(synthetic_features, grid, tmp_path):
    res = run_cli(*ablate_args(synthetic_features, tmp_path / "out", grid, "no score", extra=("--cluster", "none")))
    assert res.returncode == 1 and "failed: ValueError" in res.stdout


def test_bad_grid_files_give_clear_errors(synthetic_features, tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("full: {}\nsmall lr:\n  lr: 1.0e-4\n  dropot: 0.2\n")
    res = run_cli("ablate", "--features", str(synthetic_features), "--out", str(tmp_path / "out"),
                  "--grid", str(bad), "--cluster", "none", "--device", "cpu")
    assert res.returncode == 2 and str(bad) in res.stderr and "'dropot'" in res.stderr and "small lr" in res.stderr
    assert not (tmp_path / "out").exists()
    bad.write_text("full: {lr: [\n")
    with pytest.raises(AblateError, match=f"grid file {bad}: cannot read it"):
        read_grid(bad)
    bad.write_text("- lr: 1.0e-4\n")
    with pytest.raises(AblateError, match="expected a mapping"):
        read_grid(bad)
    bad.write_text("again:\n  seed: 3\n")
    with pytest.raises(AblateError, match="'seed' is the same for every row"):
        read_grid(bad)
    with pytest.raises(AblateError, match=f"grid file {tmp_path / 'none.yaml'}"):
        read_grid(tmp_path / "none.yaml")


def test_rows_presets_grid_and_only():
    assert list(select_rows("baselines")) == ["full", "seqtransf", "meanp"]
    assert len(select_rows("modules")) == 7 and len(select_rows("all")) == 9
    rows = select_rows("baselines", {"meanp": {"variant": "meanp", "lr": 1e-2}, "K=0": {"unfreeze_proj": True}})
    assert rows["meanp"] == {"variant": "meanp", "lr": 1e-2} and rows["K=0"] == {"unfreeze_proj": True}
    assert list(select_rows("all", only=["meanp", "full"])) == ["full", "meanp"]
    with pytest.raises(AblateError, match="no such row"):
        select_rows("all", only=["nope"])
    with pytest.raises(AblateError, match="share the folder"):
        select_rows("baselines", {"Full": {}})


def test_twin_accuracy_on_a_hand_made_case():
    # videos 0..3, twins (0, 1) and (2, 3); captions 0..3 of videos 0..3, caption 4 a second one of video 2
    text_to_video = torch.tensor([0, 1, 2, 3, 2])
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],   # caption of 0: own clip above its twin
        [0.2, 0.8, 0.0, 0.0],   # caption of 1: own clip above its twin -> pair (0, 1) told apart
        [0.0, 0.0, 0.7, 0.3],   # caption of 2: right
        [0.0, 0.0, 0.1, 0.6],   # caption of 3: right
        [0.0, 0.0, 0.4, 0.5],   # second caption of 2 prefers the twin -> pair (2, 3) not told apart
    ])
    assert twin_accuracy(scores, text_to_video, [(0, 1), (2, 3)]) == 50.0
    assert twin_accuracy(scores[:4], text_to_video[:4], [(0, 1), (2, 3)]) == 100.0
    tie = scores.clone()
    tie[0, 1] = tie[0, 0]  # a tie tells nothing apart
    assert twin_accuracy(tie, text_to_video, [(0, 1)]) == 0.0
    # the order within a pair does not matter; a pair without captions on both sides is not judged
    assert twin_accuracy(scores, text_to_video, [(1, 0)]) == 100.0
    assert twin_accuracy(scores[:1], text_to_video[:1], [(0, 1)]) is None
