"""workflows/data.py unique_video_batches and TrainData.plan, property-tested over random inputs with many
duplicates (seeded numpy draws; the project does not depend on hypothesis)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from workflows.data import TrainData, unique_video_batches


def reference_batches(videos: np.ndarray, batch_size: int, seed: int) -> list[list[int]]:
    """The documented rule, written plainly: shuffle the items (torch.randperm with the seeded generator);
    each batch takes, in shuffled order, every remaining item whose video it does not hold yet, until it
    is full; whatever it skipped keeps its place for the next batch."""
    remaining = torch.randperm(len(videos), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    while remaining:
        batch, seen = [], set()
        for item in remaining:
            if len(batch) < batch_size and int(videos[item]) not in seen:
                batch.append(item)
                seen.add(int(videos[item]))
        taken = set(batch)
        remaining = [i for i in remaining if i not in taken]
        out.append(batch)
    return out


def _cases(count: int = 60):
    rng = np.random.default_rng(1234)
    for case in range(count):
        n = int(rng.integers(0, 400))
        kind = case % 4
        if kind == 0:    # few videos, many captions each
            videos = rng.integers(0, max(1, n // 20), size=n)
        elif kind == 1:  # one video holds most items (a long tail of singletons)
            videos = np.where(rng.random(n) < 0.7, 7, rng.integers(100, 100 + max(1, n // 3), size=n))
        elif kind == 2:  # MSR-VTT-like: every video the same number of captions
            videos = np.repeat(np.arange(max(1, n // 10)), 10)[:n]
        else:            # sparse ids, some repeats
            videos = rng.choice(np.arange(10**9, 10**9 + 5 * max(1, n)), size=n)
        yield case, videos.astype(np.int64), int(rng.integers(1, 70)), int(rng.integers(0, 10**6))


@pytest.mark.parametrize("case,videos,batch_size,seed", list(_cases()))
def test_unique_video_batches_properties(case, videos, batch_size, seed):
    batches = unique_video_batches(videos, batch_size, torch.Generator().manual_seed(seed))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(videos)))  # every item exactly once in the epoch
    for k, b in enumerate(batches):
        assert 1 <= len(b) <= batch_size
        assert len({int(videos[i]) for i in b}) == len(b)  # no video twice in a batch
        if len(b) < batch_size:  # cut short only when nothing left could join it
            later = {int(videos[i]) for later_batch in batches[k + 1:] for i in later_batch}
            assert later <= {int(videos[i]) for i in b}
    # the number of batches can not be below the largest number of items of one video, nor n / batch_size
    if len(videos):
        assert len(batches) >= max(Counter(videos.tolist()).values())
        assert len(batches) >= -(-len(videos) // batch_size)
    assert batches == reference_batches(videos, batch_size, seed)
    # deterministic for a seed
    assert batches == unique_video_batches(videos, batch_size, torch.Generator().manual_seed(seed))


def test_different_seeds_give_different_orders():
    videos = np.repeat(np.arange(50), 4)
    runs = {tuple(map(tuple, unique_video_batches(videos, 16, torch.Generator().manual_seed(s)))) for s in range(5)}
    assert len(runs) == 5


@pytest.mark.parametrize("videos,batch_size,expected_sizes", [
    (np.zeros(5, np.int64), 4, [1, 1, 1, 1, 1]),         # one video: one item per batch
    (np.arange(10), 4, [4, 4, 2]),                        # all distinct: plain chunks
    (np.array([3, 3, 3, 1, 2], np.int64), 8, [3, 1, 1]),  # a video's extra items wait for later batches
    (np.zeros(0, np.int64), 4, []),
])
def test_small_cases(videos, batch_size, expected_sizes):
    batches = unique_video_batches(videos, batch_size, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == expected_sizes


class _Store:
    """The two things TrainData asks of a FeatureStore before loading."""

    def __init__(self, videos):
        self._videos = np.asarray(videos, np.int64)

    def caption_video(self, captions):
        return self._videos[captions]

    def preload(self, max_bytes):
        return True


def test_train_plan_is_these_batches_without_singletons():
    """What an epoch trains on: the unique-video batches of seed * 100003 + epoch, less the batches of one
    item (InfoNCE needs a negative), so a caption that ends up alone in the tail is skipped that epoch."""
    rng = np.random.default_rng(5)
    videos = np.concatenate([np.full(30, 0), rng.integers(1, 40, size=170)])  # video 0: a long tail
    data = TrainData(_Store(videos), list(range(len(videos))), batch_size=32, max_frames=4, max_words=8, seed=3)
    for epoch in range(3):
        full = unique_video_batches(data.videos, 32, torch.Generator().manual_seed(3 * 100_003 + epoch))
        plan = data.plan(epoch)
        assert plan == [b for b in full if len(b) > 1]
        skipped = [b[0] for b in full if len(b) == 1]
        assert sorted([i for b in plan for i in b] + skipped) == list(range(len(videos)))
        assert all(videos[i] == 0 for i in skipped)  # only the over-represented video loses items
        assert plan == TrainData(_Store(videos), list(range(len(videos))), 32, 4, 8, seed=3).plan(epoch)
    assert data.plan(0) != data.plan(1) and data.steps_per_epoch() == len(data.plan(0))
