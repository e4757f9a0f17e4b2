"""Synthetic set: real decodable clips, deterministic for a seed, time-reversed twins in test."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.synthetic import (
    THREE_EVENT_TEMPLATES,
    TWO_EVENT_TEMPLATES,
    SyntheticSettings,
    ffmpeg_exe,
    make_synthetic,
)

SETTINGS = SyntheticSettings()
N_VIDEOS = 12


def decode(path: Path, width: int = SETTINGS.width, height: int = SETTINGS.height) -> np.ndarray:
    args = [ffmpeg_exe(), "-v", "error", "-i", str(path)]
    args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(args, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)  # (T, H, W, 3)


def captions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, make_synthetic(out, N_VIDEOS, seed=7)


def test_files_exist_and_decode(synth) -> None:
    out, meta = synth
    assert json.loads((out / "synthetic.json").read_text()) == meta
    assert meta["seed"] == 7 and meta["settings"]["fps"] == SETTINGS.fps
    assert len(meta["videos"]) == N_VIDEOS
    for video in meta["videos"]:
        frames = decode(out / video["video"])
        assert len(frames) == video["frames"]
        assert 4.0 <= len(frames) / SETTINGS.fps <= 7.0
        assert all(e["frames"] >= 2 * SETTINGS.fps for e in video["events"])


def test_frames_show_coloured_objects(synth) -> None:
    out, meta = synth
    frames = decode(out / meta["videos"][0]["video"]).astype(int)
    # Something other than the grey background is drawn in most frames.
    coloured = (np.abs(frames - frames[:, :1, :1]).sum(-1) > 60).mean(axis=(1, 2))
    assert (coloured > 0.005).mean() > 0.7


def test_splits_disjoint_and_caption_counts(synth) -> None:
    out, meta = synth
    rows = captions(out)
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["video"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert meta["splits"] == {"train": 8, "val": 1, "test": 3}
    per_video = {v: sum(r["video"] == v for r in rows) for v in split_of}
    for video in meta["videos"]:
        expected = SETTINGS.train_captions if video["split"] == "train" else 1
        assert per_video[video["video"]] == expected


def test_twins_differ_only_in_event_order(synth) -> None:
    _, meta = synth
    by_name = {v["video"]: v for v in meta["videos"]}
    assert meta["twins"]
    for a, b in meta["twins"]:
        first, second = by_name[a], by_name[b]
        assert first["split"] == second["split"] == "test"
        assert first["events"] == second["events"][::-1]
        assert first["captions"] != second["captions"]
        n_events = len(first["events"])
        template, phrases = _parse(first["captions"][0], n_events)
        assert _parse(second["captions"][0], n_events) == (template, phrases[::-1])


def _parse(caption: str, n_events: int) -> tuple[str, list[str]]:
    """The template a caption was written from, and its event phrases in order."""
    text = caption[0].lower() + caption[1:].rstrip(".")
    templates = TWO_EVENT_TEMPLATES if n_events == 2 else THREE_EVENT_TEMPLATES
    for template in templates:
        pattern = re.escape(template)
        for i in range(n_events):
            pattern = pattern.replace(re.escape("{%d}" % i), "(a .+?)")
        match = re.fullmatch(pattern, text)
        if match:
            return template, list(match.groups())
    raise AssertionError(f"no template fits {caption!r}")


def test_same_seed_same_output_other_seed_differs(synth, tmp_path: Path) -> None:
    out, meta = synth
    again = tmp_path / "again"
    make_synthetic(again, N_VIDEOS, seed=7, workers=1)
    assert captions(again) == captions(out)
    assert (again / "synthetic.json").read_text() == (out / "synthetic.json").read_text()
    for video in meta["videos"][:3]:
        assert np.array_equal(decode(again / video["video"]), decode(out / video["video"]))
    other = tmp_path / "other"
    make_synthetic(other, N_VIDEOS, seed=8)
    assert captions(other) != captions(out)
    name = meta["videos"][0]["video"]
    a, b = decode(other / name), decode(out / name)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_rejects_odd_frame_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        make_synthetic(tmp_path, 2, 0, settings=SyntheticSettings(width=127))
