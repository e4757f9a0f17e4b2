"""bench/summarise_grid.py: mean +- std per row, and the seed-by-seed difference against a reference row."""
from __future__ import annotations

import json

from tests.conftest import load_bench


def load():
    return load_bench("summarise_grid.py")


def row(name, seed, r1, steps=200):
    return {"set": "s", "row": name, "seed": seed, "steps": steps, "train": {"amp": "none"},
            "t2v": {"R1": r1}, "v2t": {"R1": 0.0}, "twins": 50.0}


def test_paired_differences_match_seeds_and_count_wins(tmp_path, capsys):
    lines = [row("fine only", 0, 40.0), row("fine only", 1, 30.0), row("fine only", 2, 20.0),
             row("full", 0, 45.0), row("full", 1, 30.0), row("full", 2, 17.0), row("full", 3, 99.0),  # seed 3: unpaired
             row("full", 0, 10.0, steps=1000), {**row("full", 1, 0.0), "seed": 5, "error": "stopped"}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    load().main([str(path)], against="fine only")
    out = capsys.readouterr().out
    paired = out.split("minus 'fine only'")[1]
    full_200 = next(line for line in paired.splitlines() if " 200  full" in line)
    # differences +5, 0, -3 over the 3 paired seeds: mean 0.7, std 4.0; 1 win, 1 tie, 1 loss
    assert full_200.split()[3:] == ["3", "0.7", "+-", "4.0", "1/1/1"]
    assert " 1000  full" not in paired  # no reference row at 1,000 steps


def test_val_column_appears_only_with_val_figures(tmp_path, capsys):
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [row("full", 0, 40.0), row("full", 1, 30.0)]))
    load().main([str(path)])
    assert "val t2v" not in capsys.readouterr().out
    lines = [{**row("full", 0, 40.0), "val_t2v": {"R1": 20.0}}, {**row("full", 1, 30.0), "val_t2v": {"R1": 30.0}},
             row("seqtransf", 0, 10.0)]  # a run without val figures: no value, not a zero
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    load().main([str(path)])
    out = capsys.readouterr().out
    assert "val t2v R@1" in out
    full = next(line for line in out.splitlines() if " full " in line)
    assert full.split()[-3:] == ["25.0", "+-", "7.1"]  # mean and std of 20 and 30
    seq = next(line for line in out.splitlines() if " seqtransf " in line)
    assert seq.rstrip().endswith("-")
