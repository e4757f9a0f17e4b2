"""Robustness of `extract` and `train-heads`: real Dask clusters, killed workers, killed runs,
concurrent runs, resumed training, hostile inputs, and the safety rules (argument lists only,
no pickled code). Every run is a real subprocess, as a user (or a cluster) would start it."""
from __future__ import annotations

import ast
import contextlib
import csv
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.decode import DecodeResult, decode_frames, ffmpeg_exe
from tests.conftest import ROOT, make_video, run_cli, tiny_extract_args, write_jsonl

FAST = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
SHARD_FILES = {S.FEATURES_FILE, S.VIDEOS_FILE, S.CAPTIONS_FILE, S.META_FILE}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "DASK_LOGGING__DISTRIBUTED": "error"}


# ---------------------------------------------------------------------------------------------
# helpers

def read_shards(out: Path) -> dict:
    """Every shard's arrays and tables, with nothing but h5py and pyarrow."""
    shards = {}
    for d in sorted((out / S.SHARDS_DIR).iterdir()):
        with h5py.File(d / S.FEATURES_FILE, "r") as h5:
            arrays = {k: h5[k][()] for k in h5.keys()}
        shards[d.name] = (arrays, pq.read_table(d / S.VIDEOS_FILE).to_pylist(),
                          pq.read_table(d / S.CAPTIONS_FILE).to_pylist())
    return shards


def assert_same_shards(a: Path, b: Path, exact: bool = False) -> None:
    sa, sb = read_shards(a), read_shards(b)
    assert list(sa) == list(sb)
    for name in sa:
        (arr_a, vids_a, caps_a), (arr_b, vids_b, caps_b) = sa[name], sb[name]
        assert vids_a == vids_b and caps_a == caps_b, name
        assert set(arr_a) == set(arr_b)
        for key in arr_a:
            if exact:
                np.testing.assert_array_equal(arr_a[key], arr_b[key], err_msg=f"{name}/{key}")
            else:
                np.testing.assert_allclose(arr_a[key].astype("float32"), arr_b[key].astype("float32"),
                                           atol=2e-3, err_msg=f"{name}/{key}")


def complete_shards(out: Path) -> list[str]:
    """Names of the shard directories that are visible (and must therefore be whole)."""
    shards = out / S.SHARDS_DIR
    if not shards.is_dir():
        return []
    names = sorted(d.name for d in shards.iterdir() if d.name.startswith(S.SHARD_PREFIX))
    for name in names:
        assert {f.name for f in (shards / name).iterdir()} == SHARD_FILES, f"half-written {name}"
    return names


def assert_no_temporaries(out: Path) -> None:
    assert not list((out / S.SHARDS_DIR).glob(f"{S.TMP_PREFIX}*"))


def popen_cli(*args: str, log: Path) -> subprocess.Popen:
    """`python cli.py ...` in the background, in its own process group (so that a kill of it
    and of its ffmpeg children never reaches the test)."""
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=ENV,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 120, what: str = "") -> None:
    """Poll `condition` every 20 ms; fail if `proc` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def summary(out: Path) -> dict:
    return json.loads((out / S.SUMMARY_FILE).read_text())


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / S.MANIFEST_FILE).to_pylist()


def failures(out: Path) -> list[dict]:
    with open(out / S.FAILURES_FILE, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# 1-2: a real Dask cluster (scheduler and workers as separate processes on loopback)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_cluster(tmp: Path, n_workers: int = 2):
    """`dask scheduler` and `dask worker` processes; yields (address, worker processes)."""
    dask = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              cwd=ROOT, env=ENV, stdout=open(tmp / "scheduler.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        workers = [subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                     "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                                    cwd=ROOT, env=ENV, stdout=open(tmp / f"worker{i}.log", "w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
                   for i in range(n_workers)]
        procs += workers
        from distributed import Client
        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=90)
        yield address, workers
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_group(proc)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for name, seconds in (("a", 2.0), ("b", 3.0), ("c", 1.4), ("sub/d", 4.0)):
        make_video(root / f"{name}.mp4", seconds, size="64x48", extra=FAST)
    write_jsonl(root / "captions.jsonl", [
        {"video": "a", "caption": "a dog runs across the park", "split": "train"},
        {"video": "b", "caption": "a man cooks pasta in a kitchen", "split": "test"},
        {"video": "c", "caption": "children play football on the beach", "split": "train"},
        {"video": "sub/d", "caption": "two cars race on a wet road", "split": "val"},
    ])
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two workers, shared by the two tests below (the second kills a worker)."""
    with dask_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def test_running_dask_scheduler_equals_local_run(small_set, cluster, tmp_path):
    address, _ = cluster
    args = ("--shard-size", "2", "--keywords", "0")
    local = run_cli(*tiny_extract_args(small_set, tmp_path / "local", "--cluster", "none", *args))
    assert local.returncode == 0, local.stderr
    res = run_cli(*tiny_extract_args(small_set, tmp_path / "remote", "--scheduler", address, *args))
    assert res.returncode == 0, res.stderr
    assert "done: 4 videos ok, 0 failed" in res.stdout
    assert complete_shards(tmp_path / "remote") == ["shard-00000", "shard-00001"]
    assert_same_shards(tmp_path / "local", tmp_path / "remote")
    assert manifest(tmp_path / "local") == manifest(tmp_path / "remote")


@pytest.fixture(scope="module")
def long_set(tmp_path_factory) -> Path:
    """Six single-video shards long enough (1 FPS frames: 60..85) that a run can be killed in
    the middle, with one caption per video."""
    root = tmp_path_factory.mktemp("long")
    rows = []
    for i in range(6):
        make_video(root / f"v{i}.mp4", seconds=60 + 5 * i, size="32x24", rate=2, extra=FAST)
        rows.append({"video": f"v{i}", "caption": f"clip number {i} with a moving test pattern", "split": "train"})
    write_jsonl(root / "captions.jsonl", rows)
    return root


def test_killed_dask_worker_loses_nothing(long_set, cluster, tmp_path):
    out = tmp_path / "out"
    address, workers = cluster
    proc = popen_cli(*tiny_extract_args(long_set, out, "--scheduler", address, "--shard-size", "1",
                                        "--keywords", "0", "--batch-size", "8"), log=tmp_path / "extract.log")
    try:
        wait_for(lambda: len(complete_shards(out)) >= 1, proc, what="the first shard")
        os.killpg(workers[0].pid, signal.SIGKILL)  # the worker (and its nanny) die mid-run
        workers[0].wait(timeout=30)
        assert proc.poll() is None and len(complete_shards(out)) < 6, "run ended before the kill"
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "extract.log").read_text()
    assert rc == 0, log
    ids = [r["video_id"] for r in manifest(out)]
    assert sorted(ids) == [f"v{i}.mp4" for i in range(6)]  # every video exactly once
    assert all(r["status"] == "ok" for r in manifest(out))
    assert complete_shards(out) == [S.shard_name(i) for i in range(6)]
    assert_no_temporaries(out)
    assert summary(out)["missing_shards"] == [] and summary(out)["shard_errors"] == []
    read_shards(out)  # every shard opens


def test_slurm_options_land_in_the_job_script(tmp_path):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is in the `test` and `slurm` extras")
    from dask_jobqueue import SLURMCluster

    from pipeline.config import ExtractConfig
    from pipeline.distributed import slurm_options

    config = tmp_path / "slurm.yaml"
    config.write_text("queue: gpu\naccount: vision\ncores: 8\nmemory: 32GB\nwalltime: '02:00:00'\n"
                      "gpus_per_job: 2\njobs: 4\nlifetime: 110m\nlifetime_stagger: 5m\n"
                      "job_extra_directives: ['--constraint=a100']\n")
    cfg = ExtractConfig(videos=str(tmp_path), out=str(tmp_path / "out"), cluster="slurm", cluster_config=str(config))
    options, jobs = slurm_options(cfg)
    assert jobs == 4 and options["processes"] == 2  # one worker per GPU
    with SLURMCluster(**options, scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()
    for needle in ("#SBATCH -p gpu", "#SBATCH -A vision", "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:2",
                   "#SBATCH --constraint=a100", "--resources GPU=1", "--lifetime 110m",
                   "--lifetime-stagger 5m", "--nthreads 4"):
        assert needle in script, (needle, script)
    (tmp_path / "slurm.json").write_text(json.dumps({"queue": "cpu", "cores": 4, "memory": "8GB",
                                                     "walltime": "00:30:00"}))
    options, jobs = slurm_options(ExtractConfig(videos=str(tmp_path), out=str(tmp_path), workers=3,
                                                cluster_config=str(tmp_path / "slurm.json")))
    assert jobs == 3 and options == {"queue": "cpu", "cores": 4, "memory": "8GB", "walltime": "00:30:00"}


# ---------------------------------------------------------------------------------------------
# 3-4: killed and concurrent `extract` runs

LONG_ARGS = ("--cluster", "none", "--shard-size", "1", "--keywords", "0", "--batch-size", "8")


@pytest.fixture(scope="module")
def reference(long_set, tmp_path_factory):
    """An uninterrupted run; while it holds the lock (paused with SIGSTOP, so the timing cannot
    matter), a second run on the same folder is started. Returns (out, second run's result)."""
    out = tmp_path_factory.mktemp("reference")
    first = popen_cli(*tiny_extract_args(long_set, out, *LONG_ARGS), log=out.parent / "reference.log")
    try:
        lock = out / S.LOCK_FILE
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), first,
                 what="the first run to take the lock")
        os.kill(first.pid, signal.SIGSTOP)
        try:
            # The first run may be paused before or after it wrote its plan: compare whatever is there.
            def state():
                plan = out / S.PLAN_FILE
                return sorted(p.name for p in out.rglob("*")), plan.read_text() if plan.exists() else None
            before = state()
            second = run_cli(*tiny_extract_args(long_set, out, *LONG_ARGS))
            assert state() == before
        finally:
            os.kill(first.pid, signal.SIGCONT)
        rc = first.wait(timeout=240)
    finally:
        if first.poll() is None:
            kill_group(first)
    assert rc == 0, (out.parent / "reference.log").read_text()
    return out, second


def test_second_concurrent_run_stops_on_the_lock(reference):
    out, second = reference
    assert second.returncode == 2
    assert "another extract is already writing to" in second.stderr and str(out) in second.stderr
    assert summary(out)["ok"] == 6 and complete_shards(out) == [S.shard_name(i) for i in range(6)]


def test_killed_extract_resumes_to_identical_output(long_set, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    shards_dir = out / S.SHARDS_DIR
    args = tiny_extract_args(long_set, out, *LONG_ARGS)
    # Kill points: after the first shard, then after one more; each run picks up where the last died.
    for n in range(2):
        before = complete_shards(out)
        proc = popen_cli(*args, log=tmp_path / f"run{n}.log")
        try:
            wait_for(lambda: len(complete_shards(out)) > len(before), proc, what=f"kill point {n}")
        finally:
            kill_group(proc)
        assert proc.returncode == -signal.SIGKILL
        assert len(complete_shards(out)) < 6, "the run ended before it could be killed"
    done = complete_shards(out)
    assert len(done) >= 2
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    s = summary(out)
    redone = sorted(S.shard_name(t["shard"]) for t in s["shard_timings"])
    assert redone == sorted(set(S.shard_name(i) for i in range(6)) - set(done))  # only the unfinished ones
    assert s["shards_done_now"] == 6 - len(done) and s["videos_skipped_complete"] == len(done)
    assert f"{len(done)} skipped (already complete)" in res.stdout
    assert_no_temporaries(out)
    assert manifest(out) == manifest(ref)
    assert pq.read_table(out / S.ALL_CAPTIONS_FILE).to_pylist() == pq.read_table(ref / S.ALL_CAPTIONS_FILE).to_pylist()
    assert_same_shards(ref, out, exact=True)


# ---------------------------------------------------------------------------------------------
# 5: `train-heads --resume` after a kill

def test_train_heads_resume_after_kill_gives_identical_weights(tmp_path):
    import torch

    res = run_cli("make-synthetic", str(tmp_path / "syn"), "--videos", "24", "--seed", "0")
    assert res.returncode == 0, res.stderr
    features = tmp_path / "features"
    res = run_cli(*tiny_extract_args(tmp_path / "syn", features, "--cluster", "none"))
    assert res.returncode == 0, res.stderr
    train = ["train-heads", "--features", str(features), "--device", "cpu", "--epochs", "4", "--batch-size", "8",
             "--seed", "0", "--temporal-layers", "1", "--max-frames", "4", "--checkpoint-every", "0"]
    res = run_cli(*train, "--out", str(tmp_path / "whole"))
    assert res.returncode == 0, res.stderr

    run = tmp_path / "killed"
    last = run / "last.pt"

    def epochs_done() -> int:
        try:
            return torch.load(last, map_location="cpu", weights_only=True)["epochs_done"]
        except (FileNotFoundError, RuntimeError, EOFError):
            return 0

    proc = popen_cli(*train, "--out", str(run), log=tmp_path / "train.log")
    try:
        wait_for(lambda: epochs_done() >= 1, proc, what="the first checkpoint")
    finally:
        kill_group(proc)
    killed_at = epochs_done()
    assert 1 <= killed_at < 4, "training ended before it could be killed"
    res = run_cli(*train, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr
    assert f"epoch {killed_at + 1}/4" in res.stdout and f"epoch {killed_at}/4" not in res.stdout
    a = torch.load(tmp_path / "whole" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert b["epochs_done"] == 4 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


# ---------------------------------------------------------------------------------------------
# 6: hostile inputs at the CLI level (what tests/test_decode.py checks on the function)

ODD_NAMES = ("it's a \"quoted\" name.mp4", "-i.mp4", "--help.mp4", "ünïcødé 日本語 ✓.mp4", "$(touch pwned); `x`.mp4")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One extract run over a folder of hostile inputs (plus a plain video to compare with), with
    a fake `ffmpeg` first on PATH that hangs on hang.mp4 and runs the real one otherwise."""
    tmp = tmp_path_factory.mktemp("hostile")
    v = tmp / "videos"
    ff = ffmpeg_exe()

    def ffmpeg(*args):
        subprocess.run([ff, "-v", "error", "-y", *args], check=True)

    plain = make_video(v / "plain.mp4", 3.0, size="64x48", extra=FAST)
    for name in ODD_NAMES:
        shutil.copy(plain, v / name)
    good = make_video(tmp / "good.mp4", 2.0, size="64x48", extra=FAST)
    (v / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(v / "audio_only.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "1", "-f", "image2", "-c:v", "png",
           str(v / "image.mp4"))
    make_video(v / "short.mp4", 0.2, size="64x48", extra=FAST)
    make_video(v / "4k.mp4", 2.0, size="3840x2160", rate=4, extra=FAST)
    make_video(v / "odd_321x241_yuv444.mp4", 2.0, size="321x241", extra=["-c:v", "libx264", "-preset", "ultrafast",
                                                                          "-pix_fmt", "yuv444p"])
    make_video(v / "ten_bit.mp4", 2.0, size="64x48", extra=["-c:v", "libx264", "-preset", "ultrafast",
                                                            "-pix_fmt", "yuv420p10le"])
    ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", str(v / "rotated.mp4"))
    src = make_video(tmp / "cfr.mp4", 4.0, size="64x48", extra=FAST)
    ffmpeg("-i", str(src), "-vf", "select='not(mod(n,3))+between(t,1,2)',setpts=PTS", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", str(v / "vfr.mkv"))
    ts = make_video(tmp / "good.ts", 6.0, size="64x48", extra=[*FAST, "-f", "mpegts"])
    data = bytearray(ts.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4000] = bytes(4000)
    (v / "broken_packet.ts").write_bytes(bytes(data))
    os.symlink(v / "loop.mp4", v / "loop.mp4")
    (v / "folder.mp4").mkdir()
    shutil.copy(plain, v / "hang.mp4")
    (v / "zero.mp4").write_bytes(b"")
    (v / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))

    fake_bin = tmp / "bin"
    fake_bin.mkdir()
    (fake_bin / "ffmpeg").write_text(f'#!/bin/sh\ncase "$*" in *hang.mp4*) exec sleep 600;; esac\nexec "{ff}" "$@"\n')
    (fake_bin / "ffmpeg").chmod(0o755)

    long_caption = " ".join(["word"] * 2000)  # 9,999 characters
    captions = write_jsonl(tmp / "captions.jsonl", [
        {"video": "plain", "caption": "a plain test pattern", "split": "train"},
        {"video": "plain", "caption": long_caption + "!", "split": "train"},
        {"video": "-i", "caption": "a file named like an ffmpeg option", "split": "test"},
        {"video": "ünïcødé 日本語 ✓.mp4", "caption": "unicode in the name", "split": "test"},
        {"video": "/etc/passwd", "caption": "an absolute path"},
        {"video": "sub/../../good.mp4", "caption": "up and out of the folder, to a real file"},
        "[1, 2, 3]",
        '{"video": "plain", "caption": 5}',
    ])
    out = tmp / "out"
    env = {**ENV, "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"),
                          *tiny_extract_args(v, out, "--captions", str(captions), "--cluster", "none",
                                             "--keywords", "0", "--decode-timeout", "8")],
                         capture_output=True, text=True, timeout=300, cwd=tmp, env=env)
    return {"res": res, "out": out, "videos": v, "tmp": tmp, "seconds": time.monotonic() - started,
            "manifest": {r["video_id"]: r for r in manifest(out)}, "shards": read_shards(out),
            "failures": failures(out)}


def _frames(h, video_id):
    row = h["manifest"][video_id]
    arrays = h["shards"][S.shard_name(row["shard"])][0]
    sl = slice(row["frame_start"], row["frame_start"] + row["num_frames"])
    return arrays[S.H5_FRAMES][sl], arrays[S.H5_FRAME_TIMES][sl]


FAILS = {
    "truncated.mp4": "not a complete MP4",
    "audio_only.mp4": "no video stream",
    "image.mp4": "an image",
    "loop.mp4": "symlink loop",
    "folder.mp4": "is a directory",
    "hang.mp4": "decoder hung, killed after 8 s",
    "zero.mp4": "empty file",
    "random.mp4": "not a complete MP4",
}


@pytest.mark.parametrize("name,reason", sorted(FAILS.items()))
def test_hostile_file_becomes_a_failed_row_naming_it(hostile, name, reason):
    row = hostile["manifest"][name]
    assert row["status"] == S.STATUS_FAILED and row["num_frames"] == 0
    assert reason in row["error"] and str(hostile["videos"] / name) in row["error"]
    assert {"path": str(hostile["videos"] / name), "stage": "decode", "error": row["error"]} in hostile["failures"]


OK = {  # name: (frames, times at the centre of each second or None)
    "short.mp4": (1, None),
    "4k.mp4": (2, [0.5, 1.5]),
    "odd_321x241_yuv444.mp4": (2, [0.5, 1.5]),
    "ten_bit.mp4": (2, [0.5, 1.5]),
    "rotated.mp4": (3, [0.5, 1.5, 2.5]),
    "vfr.mkv": (4, [0.5, 1.5, 2.5, 3.5]),
}


@pytest.mark.parametrize("name", sorted(OK))
def test_odd_but_valid_video_gives_correct_features(hostile, name):
    n, times = OK[name]
    row = hostile["manifest"][name]
    assert row["status"] == S.STATUS_OK and row["error"] == "" and row["num_frames"] == n
    frames, got = _frames(hostile, name)
    assert frames.shape[0] == n and np.isfinite(frames).all() and np.abs(frames).sum() > 0
    if times:
        np.testing.assert_allclose(got, times, atol=0.15)
    if name == "rotated.mp4":  # displayed upright: not the same pixels as the unrotated file
        assert not np.array_equal(frames, _frames(hostile, "plain.mp4")[0])


def test_broken_packet_keeps_the_good_frames(hostile):
    row = hostile["manifest"]["broken_packet.ts"]
    assert row["status"] == S.STATUS_OK and row["num_frames"] >= 4


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_file_names_give_the_same_features_as_a_plain_name(hostile, name):
    row = hostile["manifest"][name]
    assert row["status"] == S.STATUS_OK and row["num_frames"] == 3
    np.testing.assert_array_equal(_frames(hostile, name)[0], _frames(hostile, "plain.mp4")[0])
    assert not (hostile["tmp"] / "pwned").exists() and not (ROOT / "pwned").exists()  # no shell ran


def test_hostile_run_summary_and_captions(hostile):
    res, out = hostile["res"], hostile["out"]
    assert res.returncode == 0, res.stderr
    assert f"{len(FAILS)} failed" in res.stdout and "problem(s) listed in" in res.stdout
    assert hostile["seconds"] < 120  # the hung decoder cost its timeout, not the run
    caps = {c["caption_id"]: c for c in pq.read_table(out / S.ALL_CAPTIONS_FILE).to_pylist()}
    assert sorted(caps) == [1, 2, 3, 4]
    assert caps[2]["num_tokens"] == 77 and len(caps[2]["caption"]) == 2000  # long caption: kept, cut
    assert caps[3]["video_id"] == "-i.mp4" and caps[4]["video_id"] == "ünïcødé 日本語 ✓.mp4"
    errors = {r["path"]: r["error"] for r in hostile["failures"] if r["stage"] == "captions"}
    cap_file = hostile["tmp"] / "captions.jsonl"
    assert "escapes the videos folder" in errors[f"{cap_file}:5"]
    assert "escapes the videos folder" in errors[f"{cap_file}:6"]
    assert "not a JSON object" in errors[f"{cap_file}:7"]
    assert "missing or non-text" in errors[f"{cap_file}:8"]
    strict = run_cli(*tiny_extract_args(hostile["videos"], out, "--captions", str(cap_file), "--cluster", "none",
                                        "--keywords", "0", "--decode-timeout", "8", "--strict"))
    assert strict.returncode == 1 and "21 skipped (already complete)" in strict.stdout  # failures on record


def test_two_hour_video_streams_in_bounded_memory(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    # 2 frames a second so that a frame sits at the centre of every second (k + 0.5 s).
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=blue:s=32x24:r=2:d=7200",
                    *FAST, str(videos / "two_hours.mp4")], check=True)
    # A fresh Python in between, so that the peak RSS of its children is this run's alone.
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", probe, sys.executable, str(ROOT / "cli.py"),
                          *tiny_extract_args(videos, tmp_path / "out", "--cluster", "none", "--batch-size", "128")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    code, peak_kib = map(int, res.stdout.split()[-2:])
    assert code == 0, res.stderr
    row, = manifest(tmp_path / "out")
    assert row["status"] == "ok" and row["num_frames"] == 7200 and row["duration"] == pytest.approx(7200)
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


def _as_nobody(tmp: Path):
    """subprocess keyword arguments that run a command as user 'nobody', or a reason why not."""
    if os.geteuid() != 0:
        return {}, ""
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return None, "running as root and there is no user 'nobody' to drop to"
    kw = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    try:
        probe = subprocess.run([sys.executable, "-c", "import pipeline.decode, torch, open_clip"], cwd=ROOT,
                               env={**ENV, "HOME": str(tmp)}, capture_output=True, text=True, timeout=120, **kw)
    except OSError as e:  # e.g. the interpreter lives under /root, which 'nobody' may not enter
        return None, (f"running as root (which bypasses permission bits) and user 'nobody' cannot start "
                      f"{sys.executable}: {e}")
    if probe.returncode != 0:
        return None, f"running as root; user 'nobody' cannot run the project here: {probe.stderr[-300:]}"
    return kw, ""


def test_unreadable_file_is_reported():
    # As root, permission bits are not checked: the run goes through the user 'nobody' instead.
    tmp = Path(tempfile.mkdtemp(prefix="unreadable-"))
    try:
        tmp.chmod(0o777)
        kw, why_not = _as_nobody(tmp)
        if kw is None:
            pytest.skip(why_not)
        videos = tmp / "videos"
        make_video(videos / "good.mp4", 1.0, size="64x48", extra=FAST)
        shutil.copy(videos / "good.mp4", videos / "secret.mp4")
        (videos / "secret.mp4").chmod(0)
        videos.chmod(0o755)
        (videos / "good.mp4").chmod(0o644)
        res = subprocess.run([sys.executable, str(ROOT / "cli.py"),
                              *tiny_extract_args(videos, tmp / "out", "--cluster", "none")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={**ENV, "HOME": str(tmp)}, **kw)
        assert res.returncode == 0, res.stderr
        rows = {r["video_id"]: r for r in manifest(tmp / "out")}
        assert rows["good.mp4"]["status"] == "ok"
        assert rows["secret.mp4"]["status"] == "failed"
        assert rows["secret.mp4"]["error"] == f"{videos / 'secret.mp4'}: permission denied"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_slow_consumer_is_not_a_hung_decoder(tmp_path):
    # The stall timeout counts time spent waiting for ffmpeg, not time the model (or a full
    # queue) keeps the decoder's frames waiting.
    path = make_video(tmp_path / "v.mp4", 3.0, size="64x48", extra=FAST)
    frames = []
    for frame in decode_frames(path, 32, stall_timeout=0.3, result=DecodeResult()):
        frames.append(frame)
        time.sleep(0.8)
    assert len(frames) == 3


# ---------------------------------------------------------------------------------------------
# safety: argument lists, no pickled code

def _source_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for d in ("pipeline", "heads", "workflows", "scripts", "bench"):
        files += sorted((ROOT / d).rglob("*.py")) if (ROOT / d).is_dir() else []
    return files


def test_no_shell_strings_and_no_pickle_loading():
    problems = []
    for path in _source_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
            if "shell" in kwargs and not (isinstance(kwargs["shell"], ast.Constant) and kwargs["shell"].value is False):
                problems.append(f"{where}: shell=")
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                        "pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                problems.append(where)
            if name.endswith("torch.load"):
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: without weights_only=True")
            if name.endswith(("np.load", "numpy.load")):
                ap = kwargs.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}: allow_pickle")
            if name.endswith(("subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                              "subprocess.check_output")) and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
                problems.append(f"{where}: a string command")
    assert not problems, problems


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path, small_set):
    import torch

    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, evil)
    res = run_cli("extract", str(small_set), "--out", str(tmp_path / "out"), "--model", "ViT-Tiny-16",
                  "--pretrained", str(evil), "--cluster", "none", "--quiet")
    assert res.returncode == 2 and "could not load weights" in res.stderr
    assert not marker.exists()
    # Refused by our own call (weights_only=True spelled out), not by a default: with torch told to load
    # pickles whenever a caller does not say otherwise, the checkpoint is still refused.
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        res = run_cli("extract", str(small_set), "--out", str(tmp_path / "out2"), "--model", "ViT-Tiny-16",
                      "--pretrained", str(evil), "--cluster", "none", "--quiet")
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    assert res.returncode == 2 and "could not load weights" in res.stderr
    assert not marker.exists()
    from heads.trainer import load_head

    torch.save({"model": _Payload(marker), "head_config": {}}, tmp_path / "last.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_head(tmp_path / "last.pt")
    assert not marker.exists()
