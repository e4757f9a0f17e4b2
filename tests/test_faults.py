"""Faults inside `extract` itself: a model that raises mid-shard (no hang, no stray ffmpeg, the shard
fails saying why, the run goes on) and a crash at any step of replacing a shard (the old or the new
shard is always whole at its final name, and the next run's cleanup removes the rest)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline import schema as S
from pipeline import write as W
from tests.conftest import ROOT, make_video, tiny_extract_args

FAST = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
SHARD_FILES = {S.FEATURES_FILE, S.VIDEOS_FILE, S.CAPTIONS_FILE, S.META_FILE}

# ---------------------------------------------------------------------------------------------
# 1. the image tower raises while the frame queue is full

# Loaded through PYTHONPATH by every Python process of the run (the CLI and, with Dask, the worker):
# the image tower fails on its FAIL_AT-th batch, after long enough for the decoders to fill the
# queue and block on it; when a later shard starts, it lists any ffmpeg still reading a video of
# the failed shard (they must all be gone by then).
SITECUSTOMIZE = '''
import os, time
if os.environ.get("FAULT_FAIL_AT"):
    from pipeline import encode
    _calls, _real = [0], encode.ClipEncoder.encode_frames

    def _flaky(self, frames):
        _calls[0] += 1
        if _calls[0] == int(os.environ["FAULT_FAIL_AT"]):
            time.sleep(1.5)
            raise RuntimeError("CUDA out of memory (injected)")
        if _calls[0] > int(os.environ["FAULT_FAIL_AT"]):
            left = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        args = f.read().decode(errors="replace").split("\\0")
                except OSError:
                    continue
                if "ffmpeg" in os.path.basename(args[0]) and any(os.environ["FAULT_SHARD0"] in a for a in args):
                    left.append(" ".join(args))
            with open(os.environ["FAULT_REPORT"], "a") as f:
                f.write("\\n".join(left) + "\\n" if left else "")
        return _real(self, frames)

    encode.ClipEncoder.encode_frames = _flaky
'''


@pytest.fixture(scope="module")
def model_fault_set(tmp_path_factory) -> Path:
    """Shard 0: a long video (frames) and 40 files ffmpeg rejects (each only an end-of-video marker,
    so their decoder is blocked on the marker once the queue is full); shard 1: one good video."""
    root = tmp_path_factory.mktemp("fault_videos")
    make_video(root / "a_long.mp4", 30.0, size="96x72", extra=FAST)
    for i in range(40):
        (root / f"b_bad{i:02d}.mp4").write_bytes(b"this is not a video\n" * 50)
    make_video(root / "c_ok.mp4", 2.0, size="96x72", extra=FAST)
    return root


def _leftover_ffmpeg(session: int) -> list[str]:
    """Command lines of live ffmpeg processes still in the run's session (orphans of the run)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
            if name.startswith("ffmpeg") and state != "Z" and os.getsid(int(pid)) == session:
                left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return left


@pytest.mark.parametrize("cluster", ["none", "local"])
def test_model_error_fails_the_shard_without_hanging(model_fault_set, tmp_path, cluster):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    out, report = tmp_path / "out", tmp_path / "ffmpeg_left.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DASK_LOGGING__DISTRIBUTED": "error",
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "FAULT_FAIL_AT": "2",
           "FAULT_SHARD0": str(model_fault_set / "a_long.mp4"), "FAULT_REPORT": str(report)}
    args = tiny_extract_args(model_fault_set, out, "--cluster", cluster, "--batch-size", "2",
                             "--shard-size", "41", "--decode-threads", "2", "--workers", "1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"extract hung after the model error (killed after 150 s)\n{stdout}\n{stderr[-3000:]}")
    assert proc.returncode == 1, stderr  # a shard failed
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    assert summary["missing_shards"] == [0] and summary["ok"] == 1, summary
    [error] = summary["shard_errors"]
    assert error["shard"] == 0 and "RuntimeError: CUDA out of memory (injected)" in error["error"], error
    assert "image model" in error["error"]
    assert "CUDA out of memory (injected)" in stderr  # the user sees why
    shards = out / S.SHARDS_DIR
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00001"]  # no temporaries either
    assert {p.name for p in (shards / "shard-00001").iterdir()} == SHARD_FILES
    assert report.exists() and report.read_text() == "", "ffmpeg of the failed shard still running"
    assert _leftover_ffmpeg(proc.pid) == []


# ---------------------------------------------------------------------------------------------
# 2. a crash at any step of replacing a shard

class Crash(BaseException):
    """The process dies here: nothing after it runs, not even exception handlers' file operations."""


def _shard_data(version: str) -> W.ShardData:
    data = W.ShardData(3)
    n = 2 if version == "old" else 3  # the versions differ in content, not only in meta
    data.videos.append({"video_id": "v.mp4", "path": "/v.mp4", "duration": 2.0, "num_frames": n,
                        "frame_start": 0, "status": S.STATUS_OK, "error": "", "shard": 3})
    data.frames.append(np.full((n, 8), 1.0, "float16"))
    data.frame_times.append(np.arange(n, dtype="float32") + 0.5)
    data.meta = {"version": version}
    return data


def _write(out: Path, version: str) -> Path:
    return W.write_shard(out, _shard_data(version), np.eye(8, 4, dtype="float32"), np.eye(6, 4, dtype="float32"),
                         {"model": "m", "pretrained": "p"})


def _version(shard: Path) -> str | None:
    """'old' or 'new' when `shard` is a whole shard (files and contents agree), else None."""
    import h5py
    import pyarrow.parquet as pq

    if not shard.is_dir() or {p.name for p in shard.iterdir()} != SHARD_FILES:
        return None
    version = json.loads((shard / S.META_FILE).read_text())["version"]
    with h5py.File(shard / S.FEATURES_FILE, "r") as h5:
        n = len(h5[S.H5_FRAMES])
    assert pq.read_table(shard / S.VIDEOS_FILE).column("num_frames").to_pylist() == [n]
    assert n == (2 if version == "old" else 3)
    return version


@contextlib.contextmanager
def _file_operations(monkeypatch, crash_at: int | None = None, error_at: int | None = None):
    """Record os.rename, os.fsync and shutil.rmtree calls in order; the crash_at-th one kills the
    "process" (it and every later one raise Crash; an rmtree deletes one file first, as a crash
    in the middle of it would), the error_at-th one raises OSError once."""
    calls: list[tuple] = []
    real = {"rename": os.rename, "fsync": os.fsync, "rmtree": shutil.rmtree}

    def wrap(name):
        def op(*args, **kwargs):
            what = os.readlink(f"/proc/self/fd/{args[0]}") if name == "fsync" else tuple(map(str, args))
            calls.append((name, what))
            if crash_at is not None and len(calls) >= crash_at:
                if name == "rmtree" and len(calls) == crash_at:
                    files = [p for p in Path(args[0]).rglob("*") if p.is_file()]
                    if files:
                        files[0].unlink()
                raise Crash(f"crash at {name} {what}")
            if len(calls) == error_at:
                if name == "rmtree" and kwargs.get("ignore_errors"):
                    return None
                raise OSError(5, f"injected error at {name}")
            return real[name](*args, **kwargs)
        return op

    for name in real:
        monkeypatch.setattr(shutil if name == "rmtree" else os, name, wrap(name))
    try:
        yield calls
    finally:
        monkeypatch.undo()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / S.SHARDS_DIR).iterdir() if p.name != "shard-00003")


def test_shard_replacement_order(tmp_path, monkeypatch):
    """Old aside, new in, the folder fsynced, and only then the old one deleted."""
    _write(tmp_path, "old")
    with _file_operations(monkeypatch) as calls:
        _write(tmp_path, "new")
    shards, final = tmp_path / S.SHARDS_DIR, tmp_path / S.SHARDS_DIR / "shard-00003"
    renames = [c[1] for c in calls if c[0] == "rename"]
    assert len(renames) == 2
    (src1, aside), (tmp, dst2) = renames
    assert src1 == dst2 == str(final)
    for name in (Path(aside).name, Path(tmp).name):  # garbage to readers and to the cleanup
        assert name.startswith(S.TMP_PREFIX) and not name.startswith(S.SHARD_PREFIX)
    i_in = calls.index(("rename", (tmp, str(final))))
    assert ("fsync", str(shards)) in calls[i_in:], "the shards folder is not fsynced after the rename"
    assert ("rmtree", (aside,)) in [(c[0], c[1][:1]) for c in calls[calls.index(("fsync", str(shards))):]]
    assert _version(final) == "new" and _leftovers(tmp_path) == []


def _count_steps(tmp_path, monkeypatch) -> int:
    _write(tmp_path / "count", "old")
    with _file_operations(monkeypatch) as calls:
        _write(tmp_path / "count", "new")
    return len(calls)


def test_crash_at_any_step_keeps_a_whole_shard(tmp_path, monkeypatch):
    from pipeline.read import FeatureStore

    steps = _count_steps(tmp_path, monkeypatch)
    seen = set()
    for k in range(1, steps + 1):
        out = tmp_path / f"crash{k}"
        _write(out, "old")
        with _file_operations(monkeypatch, crash_at=k) as calls, pytest.raises(Crash):
            _write(out, "new")
        final = out / S.SHARDS_DIR / "shard-00003"
        before = _version(final)
        if before is None:  # only between the two renames: the old shard waits, whole, under its aside name
            assert calls[k - 1][0] == "rename" and Path(calls[k - 1][1][1]) == final, calls[k - 1]
            assert [_version(out / S.SHARDS_DIR / n) for n in _leftovers(out)].count("old") == 1
        else:
            assert FeatureStore(out).shard_dirs == [final]  # readers never see the leftovers
        W.remove_stale_temporaries(out)  # the next run starts with this
        after = _version(final)
        assert after in ("old", "new") and (before is None or after == before), (k, calls[k - 1], before, after)
        assert _leftovers(out) == [], (k, calls[k - 1])
        seen.add(after)
    assert seen == {"old", "new"}


def test_error_at_any_step_keeps_a_whole_shard(tmp_path, monkeypatch):
    """An exception (full disk, EIO) rather than a crash: the old shard is put back at once."""
    steps = _count_steps(tmp_path, monkeypatch)
    for k in range(1, steps + 1):
        out = tmp_path / f"error{k}"
        _write(out, "old")
        with _file_operations(monkeypatch, error_at=k) as calls:
            try:
                _write(out, "new")
            except OSError:
                pass
        final = out / S.SHARDS_DIR / "shard-00003"
        assert _version(final) in ("old", "new"), (k, calls[k - 1])
        W.remove_stale_temporaries(out)
        assert _version(final) in ("old", "new") and _leftovers(out) == [], (k, calls[k - 1])
