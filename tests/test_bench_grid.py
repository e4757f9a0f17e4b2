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
