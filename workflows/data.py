"""Batches for the heads, read from the shards: training batches (each video at most once per
batch, prepared in a background thread) and the evaluator's text tensors and video chunks."""
from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.read import FeatureStore


def _tensors(arrays: dict, pin: bool) -> dict:
    out = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def unique_video_batches(videos: np.ndarray, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle items, then cut batches in which no video appears twice: in-batch negatives
    must really be negatives. A second caption of a video waits for the next batch."""
    order = deque(torch.randperm(len(videos), generator=generator).tolist())
    batches = []
    while order:
        batch, seen, deferred = [], set(), []
        while order and len(batch) < batch_size:
            item = order.popleft()
            if int(videos[item]) in seen:
                deferred.append(item)
            else:
                batch.append(item)
                seen.add(int(videos[item]))
        order.extendleft(reversed(deferred))
        batches.append(batch)
    return batches


class _Prefetch:
    """Runs a batch iterator in a thread, a few batches ahead of the training step."""

    def __init__(self, it: Iterator[dict], depth: int = 4):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self.thread.start()

    def _run(self, it):
        try:
            for item in it:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.q.put(None)
        except BaseException as e:  # surface the loader's error in the training loop
            self.q.put(e)

    def __iter__(self):
        try:
            while (item := self.q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()


@dataclass
class TrainData:
    """The train split of a FeatureStore as deterministic per-epoch batches."""
    store: FeatureStore
    captions: list[int]
    batch_size: int
    max_frames: int
    max_words: int
    seed: int
    pin_memory: bool = False

    preload_bytes: int = 4 << 30  # read the shards into memory when their arrays fit (FeatureStore.preload)

    def __post_init__(self):
        if not self.captions:
            raise ValueError("no training captions")
        self.videos = self.store.caption_video(self.captions)
        self._caption_rows = np.asarray(self.captions, np.int64)  # items -> store caption indices, vectorised
        self.in_memory = self.store.preload(self.preload_bytes)

    def plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # data order depends on (seed, epoch) only
        batches = unique_video_batches(self.videos, self.batch_size, g)
        return [b for b in batches if len(b) > 1]  # InfoNCE needs a negative

    def steps_per_epoch(self) -> int:
        return len(self.plan(0))

    def load(self, items: list[int]) -> dict:
        items = np.asarray(items, np.int64)
        frames, mask = self.store.frames(self.videos[items], self.max_frames)
        texts = self.store.texts(self._caption_rows[items], self.max_words)
        return _tensors({"frames": frames, "frame_mask": mask, **texts}, self.pin_memory)

    def __call__(self, epoch: int) -> Iterator[dict]:
        plan = self.plan(epoch)
        return iter(_Prefetch(self.load(b) for b in plan))


@dataclass
class EvalData:
    """One split as the evaluator wants it: all its captions, and its videos in chunks."""
    store: FeatureStore
    captions: list[int]
    max_frames: int
    max_words: int
    video_chunk: int = 256

    def __post_init__(self):
        own = self.store.caption_video(self.captions)
        self.videos = sorted(set(own.tolist()))      # the gallery: every video with a caption here
        position = {v: i for i, v in enumerate(self.videos)}
        self.text_to_video = torch.tensor([position[v] for v in own.tolist()], dtype=torch.long)

    def texts(self) -> dict:
        return _tensors(self.store.texts(self.captions, self.max_words), False)

    def video_chunks(self) -> Callable[[], Iterator[tuple[int, dict]]]:
        def chunks():
            for start in range(0, len(self.videos), self.video_chunk):
                frames, mask = self.store.frames(self.videos[start:start + self.video_chunk], self.max_frames)
                yield start, _tensors({"frames": frames, "frame_mask": mask}, False)
        return chunks
