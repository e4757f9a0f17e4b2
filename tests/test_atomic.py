"""pipeline/atomic.py: the target is always one writer's whole file, temporaries never outlive a write,
concurrent writers never share one; and the writers that use it (the search index cache, checkpoints)."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pipeline import schema as S
from pipeline.atomic import TMP_MARK, atomic_path, atomic_write_bytes, atomic_write_text, temporary_name
from tests.conftest import ROOT

SIZE = 1 << 18  # big enough that a torn or mixed write would show


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _whole(data: bytes, writers: int) -> bool:
    """One writer's complete content: SIZE copies of its byte."""
    return len(data) == SIZE and data[:1] in {bytes([65 + i]) for i in range(writers)} and data == data[:1] * SIZE


def test_write_leaves_only_the_target(tmp_path):
    target = atomic_write_text(tmp_path / "a.json", '{"x": 1}\r\n')
    assert target.read_bytes() == b'{"x": 1}\r\n'  # as given: no newline translation
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and _names(tmp_path) == ["a.json"]


def test_temporary_names_are_unique_hidden_and_keep_the_suffix(tmp_path):
    names = {temporary_name(tmp_path / "curves.png") for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.parent == tmp_path and name.name.startswith(".curves" + TMP_MARK) and name.suffix == ".png"


def test_an_error_keeps_the_old_target_and_removes_the_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "t.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full (injected)")
    assert target.read_text() == "old" and _names(tmp_path) == ["t.txt"]
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "new.txt", "not bytes")
    assert _names(tmp_path) == ["t.txt"]  # no target made, no temporary left
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "never.txt"):
        pass  # a writer that wrote nothing is an error, not an empty file
    assert _names(tmp_path) == ["t.txt"]


def _hammer_and_read(target, writers: list, seconds_limit: float = 60) -> int:
    """Read `target` while the writers run; every read must be one writer's whole content."""
    reads, deadline = 0, time.monotonic() + seconds_limit
    while any(w.is_alive() if hasattr(w, "is_alive") else w.poll() is None for w in writers):
        assert time.monotonic() < deadline, "writers did not finish"
        if target.exists():
            assert _whole(target.read_bytes(), len(writers))
            reads += 1
    return reads


def test_concurrent_threads_write_one_target(tmp_path):
    target, errors = tmp_path / "shared.bin", []
    start = threading.Barrier(5)  # four writers and the reader

    def write(i: int) -> None:
        try:
            start.wait()
            for _ in range(15):
                atomic_write_bytes(target, bytes([65 + i]) * SIZE)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    start.wait()
    reads = _hammer_and_read(target, threads)
    for t in threads:
        t.join()
    assert errors == [] and reads > 0
    assert _whole(target.read_bytes(), 4) and _names(tmp_path) == ["shared.bin"]


WRITER = """
import sys
from pipeline.atomic import atomic_write_bytes
target, byte, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import os, time
while not os.path.exists(go):
    time.sleep(0.001)
for _ in range(30):
    atomic_write_bytes(target, bytes([byte]) * {size})
"""


def test_concurrent_processes_write_one_target(tmp_path):
    target, go = tmp_path / "out" / "shared.bin", tmp_path / "go"
    target.parent.mkdir()
    code = WRITER.format(size=SIZE)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), str(65 + i), str(go)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    go.touch()  # both start writing together
    _hammer_and_read(target, procs)
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    assert _whole(target.read_bytes(), 2) and _names(target.parent) == ["shared.bin"]


# --- the search index cache --------------------------------------------------------------------------------

def _features(root):
    """A features folder of two small shards, written as extract writes them."""
    from pipeline import write as W

    for index in range(2):
        data = W.ShardData(index)
        for j in range(3):
            n = 2 + j
            data.videos.append({"video_id": f"v{index}{j}.mp4", "path": f"/v{index}{j}.mp4", "duration": float(n),
                                "num_frames": n, "frame_start": sum(2 + k for k in range(j)),
                                "status": S.STATUS_OK, "error": "", "shard": index})
            data.frames.append(np.random.default_rng(10 * index + j).normal(size=(n, 8)).astype("float16"))
            data.frame_times.append(np.arange(n, dtype="float32") + 0.5)
        W.write_shard(root, data, np.eye(8, 4, dtype="float32"), np.eye(6, 4, dtype="float32"),
                      {"model": "m", "pretrained": "p"})
    return root


def _plain_index(root, folder):
    from pipeline.read import FeatureStore
    from retrieval.index import build_index
    from workflows.search import load_scorer

    store = FeatureStore(root)
    index, _ = build_index(folder, store, load_scorer(store, None), progress=False)
    return store, index


def test_concurrent_index_builds_of_one_features_folder(tmp_path, monkeypatch):
    """Several `index`/`search` calls build the saved index of one folder at once: none fails, none deletes
    another's work in progress, and the index left behind is whole, current and equal to a lone build."""
    from pipeline.read import FeatureStore
    from retrieval import index as I
    from retrieval.index import open_index
    from workflows.search import load_scorer

    root = _features(tmp_path / "features")
    _, alone = _plain_index(root, tmp_path / "alone")
    expected = np.asarray(alone.video_vectors)
    real_encode = I._encode_shard

    def slow_encode(*args, **kwargs):  # hold every builder inside its temporary
        real_encode(*args, **kwargs)
        time.sleep(0.05)

    monkeypatch.setattr(I, "_encode_shard", slow_encode)
    folder = tmp_path / "shared"
    for _ in range(3):
        shutil.rmtree(folder, ignore_errors=True)  # gone: every builder encodes every shard
        start, results, errors = threading.Barrier(4), [], []

        def build() -> None:
            try:
                start.wait()
                results.append(_plain_index(root, folder)[1])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=build) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(results) == 4
        for index in results:
            np.testing.assert_array_equal(np.asarray(index.video_vectors), expected)
        assert not [p for p in (folder / "codes").iterdir() if I.TMP_MARK in p.name]  # no temporary left
        assert not [p for p in folder.iterdir() if I.TMP_MARK in p.name]
    store = FeatureStore(root)
    again = open_index(folder, store, load_scorer(store, None), "python cli.py index")  # whole and current
    np.testing.assert_array_equal(np.asarray(again.video_vectors), expected)


def test_a_torn_or_stale_index_is_refused_then_rebuilt(tmp_path):
    """A torn index.json, or an index of other features, is never used and never a crash: search refuses it
    with the command that fixes it, and `index` builds it again."""
    from pipeline.read import FeatureStore
    from retrieval.index import INDEX_FILE, StaleIndexError, open_index
    from workflows.search import load_scorer

    root = _features(tmp_path / "features")
    folder = tmp_path / "index"
    _, first = _plain_index(root, folder)
    expected = np.asarray(first.video_vectors)
    meta = folder / INDEX_FILE
    meta.write_bytes(meta.read_bytes()[:100])  # torn
    store = FeatureStore(root)
    with pytest.raises(StaleIndexError, match="no index.*python cli.py index"):
        open_index(folder, store, load_scorer(store, None), "python cli.py index")
    _, rebuilt = _plain_index(root, folder)
    np.testing.assert_array_equal(np.asarray(rebuilt.video_vectors), expected)
    # features changed under the same name: a shard rewritten
    shard = sorted((root / S.SHARDS_DIR).iterdir())[0] / S.FEATURES_FILE
    time.sleep(0.01)
    shard.write_bytes(shard.read_bytes())
    store = FeatureStore(root)
    with pytest.raises(StaleIndexError, match="changed since it was built"):
        open_index(folder, store, load_scorer(store, None), "python cli.py index")


# --- heads/trainer.py's own copy (heads/ does not import pipeline/) --------------------------------------

def test_checkpoint_saves_concurrently_leave_one_whole_checkpoint(tmp_path):
    import torch

    from heads.trainer import _save

    target, errors = tmp_path / "last.pt", []

    def save(i: int) -> None:
        try:
            for _ in range(5):
                _save({"who": i, "w": torch.full((SIZE // 4,), float(i))}, target)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and _names(tmp_path) == ["last.pt"]
    ckpt = torch.load(target, weights_only=True)
    assert torch.equal(ckpt["w"], torch.full((SIZE // 4,), float(ckpt["who"])))


def test_index_size_ignores_other_builders_temporaries(tmp_path, monkeypatch):
    """The report's disk size is taken while other builders' temporaries come and go: they are not counted nor
    walked into, and a folder or file that vanishes between being listed and being read is not an error (both
    made a concurrent build fail under load: Path.rglob raises when a listed folder is gone)."""
    import os

    from retrieval import index as I
    (tmp_path / "codes" / "s0-abc").mkdir(parents=True)
    (tmp_path / "codes" / "s0-abc" / "frames.npy").write_bytes(b"x" * 100)
    (tmp_path / "index.json").write_bytes(b"y" * 10)
    busy = tmp_path / "codes" / f"s1-def{I.TMP_MARK}123"
    busy.mkdir()
    (busy / "frames.npy").write_bytes(b"z" * 1000)
    (tmp_path / f".index{I.TMP_MARK}9.json").write_bytes(b"w" * 10000)
    assert I._disk_bytes(tmp_path) == 110
    gone = tmp_path / "codes" / "s2-ghi"  # listed, then removed (with its file) before it is walked or read
    gone.mkdir()
    (gone / "values.npy").write_bytes(b"v" * 7)
    real_scandir, real_stat = os.scandir, os.stat
    entered = []

    def scandir(path="."):
        entered.append(str(path))
        if I.TMP_MARK in str(path) or str(path) == str(gone):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        if str(gone) in str(path):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    assert I._disk_bytes(tmp_path) == 110
    assert not [p for p in entered if I.TMP_MARK in p] and str(gone) in entered
    monkeypatch.setattr(os, "scandir", real_scandir)  # listed, its file gone before stat
    assert I._disk_bytes(tmp_path) == 110
