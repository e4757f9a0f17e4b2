"""Extraction checked against what the files really hold: a damaged stream must be reported as a
partial decode, and each stored 1 FPS frame must sit at the centre of a second that has video
(variable frame rate with a gap, 29.97 fps), with timestamps read back from the shard and compared
with the packet timestamps of the file itself (ffprobe, or ffmpeg's framecrc muxer without it).
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import schema as S
from pipeline.decode import DecodeResult, decode_frames, ffmpeg_exe
from pipeline.read import FeatureStore
from tests.conftest import make_video, run_cli, tiny_extract_args, write_jsonl
from workflows.data import EvalData, TrainData

FAST = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
NTSC = Fraction(30000, 1001)


def packet_times(path) -> list[float]:
    """Presentation times (s) of every video packet, read from the container, sorted."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe:
        out = subprocess.run([ffprobe, "-v", "error", "-select_streams", "v:0", "-show_entries",
                              "packet=pts_time", "-of", "csv=p=0", str(path)],
                             capture_output=True, text=True, check=True).stdout
        times = [float(x) for x in out.split() if x.strip() not in ("", "N/A")]
    else:  # the wheel's ffmpeg has no ffprobe: the framecrc muxer lists each packet's pts and time base
        out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                              "-f", "framecrc", "-"], capture_output=True, text=True, check=True).stdout
        num, den = map(int, re.search(r"^#tb 0: (\d+)/(\d+)", out, re.M).groups())
        pts = [int(line.split(",")[2]) for line in out.splitlines() if line and not line.startswith("#")]
        times = [p * num / den for p in pts]
    start = min(times)
    return sorted(t - start for t in times)  # the decoder counts from the first frame (PTS-STARTPTS)


def expected_centres(times: list[float]) -> list[float]:
    """The independent expectation: for each second s that has video at or after its centre, the first
    frame at or after s + 0.5 and still inside s. A second without video (a gap) gets nothing."""
    out = []
    for s in sorted({math.floor(t) for t in times}):
        inside = [t for t in times if s + 0.5 - 1e-6 <= t < s + 1]
        if inside:
            out.append(min(inside))
    return out


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Videos made here: intact, damaged in the middle, truncated, a 3 s gap, 29.97 fps.

    The truncated file is an MP4 with its index at the front (faststart), cut in half: the index promises
    6 s that the file no longer holds. (A transport stream cut in half has no index and no stated duration:
    it is a shorter valid stream, and nothing in it says otherwise.)"""
    root = tmp_path_factory.mktemp("teeth_videos")
    tmp = tmp_path_factory.mktemp("teeth_src")
    good = make_video(root / "good.ts", seconds=6.0, size="64x48", extra=[*FAST, "-f", "mpegts"])
    data = good.read_bytes()
    middle = len(data) // 2
    (root / "zeroed.ts").write_bytes(data[:middle] + bytes(4000) + data[middle + 4000:])
    full = make_video(tmp / "faststart.mp4", seconds=6.0, size="64x48", extra=[*FAST, "-movflags", "+faststart"])
    (root / "truncated.mp4").write_bytes(full.read_bytes()[:full.stat().st_size // 2])
    src = make_video(tmp / "cfr.mp4", seconds=7.0, size="64x48", extra=FAST)
    # Keep [0, 2) and [5, 7) with their timestamps: no video at all for 3 seconds.
    _ffmpeg("-i", str(src), "-vf", "select='lt(t,2)+gte(t,5)'", "-fps_mode", "vfr", *FAST, str(root / "gap.mp4"))
    make_video(root / "ntsc.mp4", seconds=6.0, size="64x48", rate="30000/1001", extra=FAST)
    return root


@pytest.fixture(scope="module")
def features(media, tmp_path_factory):
    write_jsonl(media / "captions.jsonl", [
        {"video": name, "caption": f"a test pattern number {i}", "split": "train"}
        for i, name in enumerate(["good.ts", "gap.mp4", "ntsc.mp4", "zeroed.ts", "gap.mp4"])
    ])
    out = tmp_path_factory.mktemp("teeth_features") / "features"
    res = run_cli(*tiny_extract_args(media, out, "--cluster", "none", "--keywords", "0"))
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = {r["video_id"]: r for r in pq.read_table(out / S.MANIFEST_FILE).to_pylist()}
    return out, manifest


# --- 1. broken packets -------------------------------------------------------------------------------
def test_damaged_files_really_are_damaged(media):
    """The control: a plain ffmpeg run says that both damaged files are corrupt (a corrupt packet is only a
    warning for it), says nothing about the intact one, and exits 0 for all three."""
    def complaints(path):
        res = subprocess.run([ffmpeg_exe(), "-v", "warning", "-i", str(path), "-f", "null", "-"],
                             capture_output=True, text=True)
        assert res.returncode == 0
        return res.stderr.strip()
    assert complaints(media / "good.ts") == ""
    assert "corrupt" in complaints(media / "zeroed.ts").lower()
    assert "partial file" in complaints(media / "truncated.mp4")


def test_intact_stream_has_no_warning(features):
    _, manifest = features
    row = manifest["good.ts"]
    assert (row["status"], row["error"], row["num_frames"]) == (S.STATUS_OK, "", 6)


@pytest.mark.parametrize("name", ["zeroed.ts", "truncated.mp4"])
def test_partial_decode_is_reported_in_the_manifest(features, media, name):
    """Frames decoded past (or up to) damaged data are kept, and the row says it was a partial decode,
    naming the file: before the fix ffmpeg's exit code 0 hid the damage and `error` was empty."""
    out, manifest = features
    row = manifest[name]
    assert row["status"] == S.STATUS_OK and row["num_frames"] >= 1
    assert row["error"].startswith("partial decode: "), row
    assert str(media / name) in row["error"] and "error" in row["error"]
    if name == "truncated.mp4":  # the frames stop where the data does
        assert row["duration"] == pytest.approx(6.0, abs=0.1) and row["num_frames"] < 6
    # the per-shard table says the same as the folder manifest
    shard = pq.read_table(out / S.SHARDS_DIR / S.shard_name(row["shard"]) / S.VIDEOS_FILE).to_pylist()
    assert next(r for r in shard if r["video_id"] == name)["error"] == row["error"]
    # still usable: FeatureStore keeps the video, with finite features
    store = FeatureStore(out)
    frames, mask = store.frames([store.video_index[name]], 12)
    assert mask.sum() == row["num_frames"] and np.isfinite(frames).all()


def test_partial_decode_warning_from_the_decoder(media):
    result = DecodeResult()
    frames = list(decode_frames(media / "zeroed.ts", 32, result=result))
    assert len(frames) >= 1 and result.warning.startswith("partial decode: ")
    clean = DecodeResult()
    assert len(list(decode_frames(media / "good.ts", 32, result=clean))) == 6 and clean.warning == ""


# --- 2. which second each frame belongs to ----------------------------------------------------------
def test_the_gap_file_has_a_gap(media):
    times = packet_times(media / "gap.mp4")
    gaps = np.diff(times)
    assert gaps.max() > 2.9  # a jump of ~3 s in the timestamps, not a slow frame rate
    assert {math.floor(t) for t in times} == {0, 1, 5, 6}
    assert not any(2.0 <= t < 5.0 for t in times)
    assert np.median(gaps) == pytest.approx(1 / 30, abs=1e-3)


def test_ntsc_file_is_29_97(media):
    gaps = np.diff(packet_times(media / "ntsc.mp4"))
    assert np.median(gaps) == pytest.approx(float(1 / NTSC), abs=1e-4)


@pytest.mark.parametrize("name,seconds", [("gap.mp4", [0, 1, 5, 6]), ("ntsc.mp4", [0, 1, 2, 3, 4, 5]),
                                          ("good.ts", [0, 1, 2, 3, 4, 5])])
def test_stored_frame_times_are_centres_of_seconds_with_video(features, media, name, seconds):
    """Each stored frame is the first frame at or after the centre of its own second, one per second that
    has video, in time order; the seconds of the gap get no frame and no invented timestamp. Before the
    fix the gap file stored [0.5, 1.5, 5.03, 5.5, 6.5]: the first frame after the gap (5.03 s, second 5)
    was filed for the empty second 4 and second 5 was taken twice."""
    out, manifest = features
    store = FeatureStore(out)
    got = store.frame_times(store.video_index[name])
    assert got.dtype == np.float32 and len(got) == manifest[name]["num_frames"]
    assert [math.floor(t) for t in got] == seconds                         # which second each frame is in
    np.testing.assert_allclose(got, np.array(seconds) + 0.5, atol=1 / 29)  # ... at its centre
    np.testing.assert_allclose(got, expected_centres(packet_times(media / name)), atol=1e-4)  # real frames
    assert np.all(np.diff(got) > 0)


def test_ntsc_drift_follows_the_real_timestamps(features):
    """At 30000/1001 fps the frame at or after k + 0.5 is frame ceil((k + 0.5) * 29.97): its time drifts
    from the centre by a growing ~1 ms per second, and the stored time is that frame's, not k + 0.5."""
    out, _ = features
    store = FeatureStore(out)
    got = store.frame_times(store.video_index["ntsc.mp4"])
    frame = [math.ceil((k + Fraction(1, 2)) * NTSC) for k in range(6)]
    np.testing.assert_allclose(got, [float(n / NTSC) for n in frame], atol=1e-5)


# --- 2b. what the heads get for a video with missing seconds -----------------------------------------
def test_heads_get_stored_frames_uniform_by_index_in_time_order(features):
    """What we chose: the data layer (FeatureStore.frames, used by TrainData and EvalData) samples
    `max_frames` of the stored 1 FPS frames uniformly *by index* (uniform_indices), not by time, and hands
    them to the model in stored order, which is increasing frame_times. A gap of missing seconds is not
    padded or marked: the gap video's frames at 0.5, 1.5, 5.5, 6.5 s are four consecutive positions, so
    with 3 frames the model sees rows 0, 2, 3 (0.5, 5.5, 6.5 s) and with 12 all four, zero-padded after."""
    out, _ = features
    store = FeatureStore(out)
    v = store.video_index["gap.mp4"]
    row = store.videos[v]
    import h5py
    with h5py.File(store.shard_dirs[row["shard_pos"]] / S.FEATURES_FILE, "r") as h5:
        raw = h5[S.H5_FRAMES][row["frame_start"]:row["frame_start"] + row["num_frames"]].astype(np.float32)
    times = store.frame_times(v)
    for max_frames, rows in ((3, [0, 2, 3]), (2, [0, 3]), (4, [0, 1, 2, 3]), (12, [0, 1, 2, 3])):
        frames, mask = store.frames([v], max_frames)
        n = int(mask[0].sum())
        assert n == len(rows) and mask[0, :n].all() and not mask[0, n:].any()
        np.testing.assert_array_equal(frames[0, :n], raw[rows])
        assert not frames[0, n:].any()
        assert np.all(np.diff(times[rows]) > 0)  # given to the model in increasing time

    # the same through the trainer's and the evaluator's loaders
    train = TrainData(store, store.split_captions("train"), batch_size=8, max_frames=3, max_words=8, seed=0)
    items = [i for i, c in enumerate(train.captions) if store.captions[c]["video_id"] == "gap.mp4"]
    batch = train.load(items[:1])
    np.testing.assert_array_equal(batch["frames"][0, :3].numpy(), raw[[0, 2, 3]])
    assert batch["frame_mask"][0].tolist() == [True, True, True]
    evald = EvalData(store, store.split_captions("train"), max_frames=3, max_words=8)
    for start, chunk in evald.video_chunks()():
        for j, video in enumerate(evald.videos[start:start + len(chunk["frames"])]):
            if video == v:
                assert torch.equal(chunk["frames"][j, :3], torch.from_numpy(raw[[0, 2, 3]]))
