"""Session fixtures of the search tests (test_search, test_index, test_serve*): one extraction, one run."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli, tiny_extract_args


@pytest.fixture(scope="session")
def features(clip_collection, tmp_path_factory):
    """The four clips of clip_collection, two videos a shard (two shards: the index is built per shard)."""
    out = tmp_path_factory.mktemp("search") / "features"
    res = run_cli(*tiny_extract_args(clip_collection, out, "--cluster", "none", "--shard-size", "2"))
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def run(features):
    out = features.parent / "run"
    res = run_cli("train-heads", "--features", str(features), "--out", str(out), "--epochs", "1",
                  "--batch-size", "4", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    return out
