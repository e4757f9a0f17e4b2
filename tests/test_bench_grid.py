"""bench/grid.py --skip-done: a stopped or reordered grid goes on without rerunning its finished runs."""
from __future__ import annotations

import json

from tests.conftest import load_bench


def test_pending_runs_skips_finished_rows_only(tmp_path, capsys):
    grid = load_bench("grid.py")
    runs = [{"set": "a", "row": "full", "seed": s, "steps": 200, "head": {}} for s in range(3)]
    runs.append({"set": "a", "row": "full", "seed": 0, "steps": 1000, "head": {}})  # same seed, other budget
    out = tmp_path / "out.jsonl"
    assert grid.pending_runs(runs, out) == runs  # no results file yet: everything is pending
    out.write_text(json.dumps({**runs[0], "t2v": {"R1": 1.0}}) + "\n\n"
                   + json.dumps({**runs[1], "error": "RuntimeError: stopped"}) + "\n")  # a failed run is rerun
    left = grid.pending_runs(runs, out)
    assert [(r["seed"], r["steps"]) for r in left] == [(1, 200), (2, 200), (0, 1000)]
    assert "skipping 1 run(s)" in capsys.readouterr().out


def test_clip_summary_names_the_largest_step_and_its_modules():
    grid = load_bench("grid.py")
    history = [{"epoch": e, "grad_norm_fine": n, "clipped_fine": 1.0, "grad_norm_max_fine": m,
                "grad_norm_max_by_module_fine": {"temporal": m / 2, "local": m}}
               for e, (n, m) in enumerate([(4.0, 6.0), (30.0, 300.0), (2.0, 3.0)])]
    out = grid.clip_summary(history)
    assert out["grad_norm_fine"] == {"first": 4.0, "mean": 12.0, "max": 30.0, "last": 2.0}
    assert out["grad_norm_max_fine"]["max"] == 300.0
    assert out["grad_norm_max_by_module_fine"] == {"epoch": 1, "temporal": 150.0, "local": 300.0}
