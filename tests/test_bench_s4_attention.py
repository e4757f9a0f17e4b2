"""bench/s4_attention.py: which event plays at each stored frame's timestamp, checked against the clip's own
frame-by-frame plan (the order render_frames draws events and distractor spans in)."""
from __future__ import annotations

import numpy as np

from corpora.synthetic import SyntheticSettings, describe, plan_clips
from tests.conftest import load_bench


def planned_labels(clip) -> list[int]:
    """Per rendered frame: the event's index, -1 for a distractor frame; a replay of render_frames' order."""
    before = {d.gap: d for d in clip.distractors}
    labels = []
    for i, event in enumerate(clip.events):
        if i in before:
            labels += [-1] * before[i].frames
        labels += [i] * event.frames
    if len(clip.events) in before:
        labels += [-1] * before[len(clip.events)].frames
    return labels


def test_event_of_seconds_follows_the_clips_plan_with_distractors():
    mod = load_bench("s4_attention.py")
    cfg = SyntheticSettings(distractor_s=3)
    meta, clips = describe(40, 3, cfg), plan_clips(40, 3, cfg)
    checked = distractor_frames = 0
    for video, clip in zip(meta["videos"], clips):
        labels = planned_labels(clip)
        times = np.arange(0.5, len(labels) / cfg.fps, 1.0)  # 1 FPS, the middle of each second, as extract stores
        got = mod.event_of_seconds(video, cfg.fps, times)
        assert got.tolist() == [labels[int(t * cfg.fps)] for t in times], video["video"]
        checked += len(times)
        distractor_frames += int((got == -1).sum())
    assert checked > 100 and distractor_frames > 10  # distractor seconds were there to get wrong
    plain = describe(10, 3)["videos"][0]
    assert (mod.event_of_seconds(plain, 8, np.array([0.5, 100.0])) >= 0).tolist() == [True, False]
