"""bench/tables.py: the README's Benchmarks table is what bench/results/ holds, verdicts computed, not typed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tables(tmp_path, monkeypatch):
    mod = load_bench("tables.py")
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    monkeypatch.setattr(mod, "RESULTS", results)
    monkeypatch.setattr(mod, "README", readme)
    return mod


def test_readme_table_matches_committed_results():
    mod = load_bench("tables.py")
    assert mod.main(["--check"]) == 0, "run: python bench/tables.py --write"


def test_verdicts_follow_the_figures(tables):
    extract = tables.RESULTS / "extract.json"
    d = json.loads(extract.read_text())
    d["ratio"] = 0.95
    extract.write_text(json.dumps(d))
    row = next(r for r in tables.rows() if r[0] == "`bench/extract.py`")
    assert "**ratio 0.95**" in row[2] and ": met;" in row[2]
    d["ratio"] = 0.5
    extract.write_text(json.dumps(d))
    row = next(r for r in tables.rows() if r[0] == "`bench/extract.py`")
    assert "**missed**" in row[2]


def test_changed_results_fail_the_check_until_written(tables, capsys):
    (tables.RESULTS / "train.json").unlink()
    assert tables.main(["--check"]) == 1
    assert "bench/tables.py --write" in capsys.readouterr().err
    assert tables.main(["--write"]) == 0
    assert tables.main(["--check"]) == 0
    text = tables.README.read_text()
    assert "| `bench/train.py` | " in text and "| not run |" in text
    assert text.count(tables.START) == 1 and "## Benchmarks" in text  # the rest of the README kept


def test_readme_without_markers_is_refused(tables):
    tables.README.write_text("# a README without the table markers\n")
    with pytest.raises(SystemExit, match="bench-table"):
        tables.main(["--write"])
