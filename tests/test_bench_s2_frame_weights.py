"""bench/s2_frame_weights.py: which stored seconds are distractor seconds, checked against the clip's own
frame-by-frame plan (the order render_frames draws events and distractor spans in)."""
from __future__ import annotations

import numpy as np

from corpora.synthetic import SyntheticSettings, describe, plan_clips
from tests.conftest import load_bench
from tests.test_bench_s4_attention import planned_labels


class _Store:
    """What distractor_items reads from a FeatureStore: the video index and each video's frame times."""

    def __init__(self, videos, times):
        self.video_index = {v["video"]: i for i, v in enumerate(videos)}
        self._times = times

    def frame_times(self, i):
        return self._times[i]


def test_distractor_items_mark_the_planned_distractor_seconds():
    mod = load_bench("s2_frame_weights.py")
    cfg = SyntheticSettings(distractor_s=3)
    meta, clips = describe(40, 3, cfg), plan_clips(40, 3, cfg)
    times, labels = [], []
    for clip in clips:
        plan = planned_labels(clip)
        t = np.arange(0.5, len(plan) / cfg.fps, 1.0)  # 1 FPS, the middle of each second, as extract stores
        times.append(t)
        labels.append(np.array([plan[int(x * cfg.fps)] for x in t]))
    store = _Store(meta["videos"], times)
    for split in ("train", "test"):
        items = mod.distractor_items(store, meta, split)
        wanted = [v["video"] for v in meta["videos"] if v["split"] == split and v["distractors"]]
        assert len(items) == len(wanted) > 0
        for vi, on in items:
            assert on.tolist() == (labels[vi] == -1).tolist(), meta["videos"][vi]["video"]
    assert sum(int(on.sum()) for _, on in mod.distractor_items(store, meta, "train")) > 10
