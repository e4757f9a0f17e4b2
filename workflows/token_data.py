"""Batches of cached tokens (`extract --cache-blocks K`) for a TunedHead (heads/tuned.py): training batches in
the same order as workflows/data.py's TrainData (each video at most once per batch), and whole splits for
validation.

The F frames of a video are sampled uniformly among its cached frames only (`--cache-frames` may have cached
fewer than it has); a caption's whole SOT..EOT sequence is read, because its EOT must see every word, and the
head's W word positions are picked from it after the tail (heads/tuned.py's token_index). Dense arrays are
read through memmaps (pipeline/tokens.py), by a few threads ahead of the training step.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline import schema as S
from pipeline.read import FeatureStore, uniform_indices
from pipeline.tokens import TokenStore

from .data import unique_video_batches


def ahead(load: Callable, items: Iterable, threads: int, depth: int) -> Iterator:
    """load(item) for each item, in order, computed by `threads` threads up to `depth` items ahead."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokens") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(load, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an abandoned epoch (islice) must not leave loads running
            for f in pending:
                f.cancel()


class TokenIndex:
    """Where each video's cached frames and each caption's and keyword's tokens are, for the FeatureStore's own
    video and caption indices."""

    def __init__(self, store: FeatureStore, tokens: TokenStore):
        self.store, self.tokens = store, tokens
        if [d.name for d in store.shard_dirs] != [d.name for d in tokens.shard_dirs]:
            raise ValueError(f"{store.root}: the features and the token caches list different shards")
        rows = [tokens.frame_rows(s) for s in range(len(tokens.shard_dirs))]
        v = store.videos
        self.v_shard = np.array([r["shard_pos"] for r in v], np.int64)
        start = np.array([r["frame_start"] for r in v], np.int64)
        count = np.array([r["num_frames"] for r in v], np.int64)
        self.v_first = np.empty(len(v), np.int64)  # first cached row of each video, in frame_block_tokens
        self.v_cached = np.empty(len(v), np.int64)  # how many of its frames are cached
        for s, r in enumerate(rows):
            sel = np.flatnonzero(self.v_shard == s)
            lo = np.searchsorted(r, start[sel])
            hi = np.searchsorted(r, start[sel] + count[sel])
            self.v_first[sel], self.v_cached[sel] = lo, hi - lo
        empty = np.flatnonzero(self.v_cached == 0)
        if len(empty):
            bad = v[int(empty[0])]
            raise ValueError(f"{store.shard_dirs[bad['shard_pos']] / S.FEATURES_FILE}: video {bad['video_id']} has "
                             "no cached frame; rerun extract with --cache-frames >= 1")
        c = store.captions
        self.c_shard = np.array([r["shard_pos"] for r in c], np.int64)
        self.c_start = np.array([r["token_start"] for r in c], np.int64)
        self.c_count = np.array([r["num_tokens"] for r in c], np.int64)
        self.c_keywords = np.array([len(r["keywords"] or ()) for r in c], np.int64)  # keyword strings, as read.py
        # each caption's keyword rows in its shard's keyword table, valid ones first in their own order (as
        # FeatureStore.texts orders them), -1 = none
        tables = [tokens.keyword_table(s) for s in range(len(tokens.shard_dirs))]
        k = max((t.shape[1] for t in tables), default=0)
        self.c_keyword_rows = np.full((len(c), k), -1, np.int64)
        for i, r in enumerate(c):
            row = tables[r["shard_pos"]][r["row_in_shard"]]
            valid = row[row >= 0]
            self.c_keyword_rows[i, :len(valid)] = valid
        self.spans = [tokens.keyword_spans(s) for s in range(len(tokens.shard_dirs))]
        self.frame_shape = tuple(tokens.array(0, S.H5_FRAME_BLOCK_TOKENS).shape[1:])  # (N, Dv)
        self.text_width = int(tokens.array(0, S.H5_TEXT_BLOCK_TOKENS).shape[1])

    @staticmethod
    def allocate(shape: tuple, pin: bool) -> torch.Tensor:
        """A batch's float16 frame-token buffer (~120 MB at B=128, 12 frames, ViT-B/32). Pinned buffers come from
        torch's caching host allocator, which reuses them; plain ones are fresh memory each time, and touching
        fresh pages costs more than the copy into them (bench/train_blocks.py measures both)."""
        return torch.empty(shape, dtype=torch.float16, pin_memory=pin)

    # ---- reads -------------------------------------------------------------------------------------------
    def frames(self, video_indices, max_frames: int, pin: bool = False) -> dict:
        """frame_tokens (n, N, Dv) float16 of the real frames and frame_mask (B, F): at most max_frames per video,
        uniform over its cached frames."""
        idx = np.asarray(video_indices, np.int64)
        picks = [uniform_indices(int(n), max_frames) for n in self.v_cached[idx]]
        width = max(1, max(len(p) for p in picks))
        mask = np.zeros((len(idx), width), bool)
        shard = np.concatenate([np.full(len(p), self.v_shard[i]) for p, i in zip(picks, idx)])
        rows = np.concatenate([self.v_first[i] + p for p, i in zip(picks, idx)])
        for b, p in enumerate(picks):
            mask[b, :len(p)] = True
        out = self.allocate((len(rows), *self.frame_shape), pin)
        values = out.numpy()
        arrays = {int(s): self.tokens.array(int(s), S.H5_FRAME_BLOCK_TOKENS) for s in np.unique(shard)}
        if all(isinstance(a, np.memmap) for a in arrays.values()):
            # one copy per frame straight into the batch (a fancy read would copy every byte twice)
            arrays = {s: a.view(np.ndarray) for s, a in arrays.items()}
            for i, (s, r) in enumerate(zip(shard.tolist(), rows.tolist())):
                values[i] = arrays[s][r]
        else:  # h5py datasets: one (sorted) read per shard
            for s, a in arrays.items():
                sel = np.flatnonzero(shard == s)
                order = np.argsort(rows[sel])
                values[sel[order]] = a[rows[sel][order]]
        return {"frame_tokens": out, "frame_mask": torch.from_numpy(mask)}

    def captions(self, caption_indices, max_words: int, pin: bool = False) -> dict:
        """text_tokens (B, L, Dt) float16 (whole captions), text_lengths, token_index and token_mask (the head's
        word positions: the first max_words - 1 and the EOT, as FeatureStore.texts), and the keywords."""
        idx = np.asarray(caption_indices, np.int64)
        count = self.c_count[idx]
        text = torch.zeros((len(idx), max(1, int(count.max(initial=1))), self.text_width), dtype=torch.float16,
                           pin_memory=pin)
        values = text.numpy()
        for b, i in enumerate(idx):
            a = self.tokens.array(int(self.c_shard[i]), S.H5_TEXT_BLOCK_TOKENS)
            values[b, :count[b]] = a[self.c_start[i]:self.c_start[i] + count[b]]
        keep = np.minimum(count, max_words)
        at = np.arange(max(1, int(keep.max(initial=1))))[None, :]  # (1, W)
        token_index = np.where(at == keep[:, None] - 1, (count - 1)[:, None], at)
        token_mask = at < keep[:, None]
        return {"text_tokens": text, "text_lengths": torch.from_numpy(count),
                "token_index": torch.from_numpy(np.where(token_mask, token_index, 0)),
                "token_mask": torch.from_numpy(token_mask), **self.keywords(idx, pin)}

    def keywords(self, idx: np.ndarray, pin: bool = False) -> dict:
        """Each distinct keyword of the captions once, and each caption's keywords as rows of that table."""
        k = max(1, int(self.c_keywords[idx].max(initial=1)))
        rows = self.c_keyword_rows[idx]
        rows = np.pad(rows, ((0, 0), (0, max(0, k - rows.shape[1]))), constant_values=-1)[:, :k]  # (B, K)
        keys = np.stack([np.broadcast_to(self.c_shard[idx, None], rows.shape), rows], -1)[rows >= 0]  # (n, 2)
        index = np.full(rows.shape, -1, np.int64)
        distinct = np.zeros((0, 2), np.int64)
        if len(keys):
            distinct, inverse = np.unique(keys, axis=0, return_inverse=True)
            index[rows >= 0] = inverse.reshape(-1)
        lengths = np.array([self.spans[s][1][r] for s, r in distinct], np.int64)
        out = torch.zeros((len(distinct), max(1, int(lengths.max(initial=1))), self.text_width),
                          dtype=torch.float16, pin_memory=pin)
        values = out.numpy()
        for u, (s, r) in enumerate(distinct):
            start = self.spans[s][0][r]
            values[u, :lengths[u]] = self.tokens.array(int(s), S.H5_KEYWORD_BLOCK_TOKENS)[start:start + lengths[u]]
        return {"keyword_tokens": out, "keyword_lengths": torch.from_numpy(lengths),
                "keyword_index": torch.from_numpy(index)}


@dataclass
class TokenTrainData:
    """The train split as deterministic per-epoch batches of cached tokens; the same batches as TrainData."""
    index: TokenIndex
    captions: list[int]
    batch_size: int
    max_frames: int
    max_words: int
    seed: int
    pin_memory: bool = False
    threads: int = 3  # loader threads (memmap reads run in parallel)
    depth: int = 4  # batches prepared ahead of the step (B=128, 12 frames, ViT-B/32: ~120 MB each)

    def __post_init__(self):
        if not self.captions:
            raise ValueError("no training captions")
        self.videos = self.index.store.caption_video(self.captions)
        self._caption_rows = np.asarray(self.captions, np.int64)

    def plan(self, epoch: int) -> list[list[int]]:
        """TrainData.plan's batches: the same (seed, epoch) generator and the same unique-video cut."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return [b for b in unique_video_batches(self.videos, self.batch_size, g) if len(b) > 1]

    def steps_per_epoch(self) -> int:
        return len(self.plan(0))

    def load(self, items: list[int]) -> dict:
        items = np.asarray(items, np.int64)
        return {**self.index.frames(self.videos[items], self.max_frames, self.pin_memory),
                **self.index.captions(self._caption_rows[items], self.max_words, self.pin_memory)}

    def __call__(self, epoch: int) -> Iterator[dict]:
        return ahead(self.load, self.plan(epoch), self.threads, self.depth)


@torch.no_grad()
def tuned_inputs(model, index: TokenIndex, captions: list[int], max_frames: int, max_words: int,
                 chunk: int = 256, device="cpu") -> tuple[dict, list[int], list[dict]]:
    """A split's head inputs computed through a TunedHead's tail, on the CPU: texts (the TEXT_KEYS tensors of
    every caption), the gallery (every video with a caption here, sorted) and its {frames, frame_mask} chunks."""
    was_training = model.training
    model.eval()
    try:
        texts = [_cpu(model.text_inputs(_to(index.captions(captions[s:s + chunk], max_words), device)))
                 for s in range(0, len(captions), chunk)]
        videos = sorted(set(index.store.caption_video(captions).tolist()))
        frames = [_cpu(model.video_inputs(_to(index.frames(videos[s:s + chunk], max_frames), device)))
                  for s in range(0, len(videos), chunk)]
    finally:
        model.train(was_training)
    return _cat(texts), videos, frames


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _cpu(batch: dict) -> dict:
    return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in batch.items()}


def _cat(parts: list[dict]) -> dict:
    """Concatenate text batches whose word and keyword widths differ (zero / False padded)."""
    out = {}
    for k in parts[0]:
        tensors = [p[k] for p in parts]
        if tensors[0].ndim > 1:
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:])], 1) for t in tensors]
        out[k] = torch.cat(tensors)
    return out


def open_tokens(features, blocks: int) -> TokenStore:
    """The features folder's token caches for training (or using) the last `blocks` blocks: a folder extracted
    without caches, or with fewer blocks, is refused with the command that makes them."""
    from pipeline.tokens import TokensError

    remedy = (f"rerun `python cli.py extract VIDEOS --out {features} --cache-blocks {blocks}` (with the same videos, "
              "captions and options) to cache them")
    try:
        tokens = TokenStore(features)
    except TokensError as e:
        raise TokensError(f"{blocks} CLIP blocks to train (--unfreeze-blocks {blocks}) need token caches: {e}") \
            from None
    if tokens.blocks < blocks:
        tokens.close()
        raise TokensError(f"{features}: its shards cache the tokens of the last {tokens.blocks} block(s) "
                          f"(extract --cache-blocks {tokens.blocks}), fewer than the {blocks} to train; {remedy}")
    return tokens


def build_tuned(head, tokens: TokenStore, blocks: int, checkpoint: bool = False):
    """A TunedHead: the saved tail (from tokens' folder) in front of `head`, its last `blocks` blocks trainable."""
    from heads.clip_tail import ClipTail
    from heads.tuned import TunedHead

    tensors, info = tokens.tail()
    return TunedHead(ClipTail.from_state(tensors, info), head, blocks, checkpoint=checkpoint, tail_info=info)
