"""Runner: turns one shard's videos and captions into a written shard.

The stages are built once per process from the (picklable) config by `get_stages`, so no
model is ever pickled with a task. Decoding runs in threads (each drives its own ffmpeg
process) and fills a bounded queue; the model takes frames from several videos per batch,
so short clips do not leave batches empty and decoding overlaps the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import schema as S
from .captions import Caption, Failure
from .config import ExtractConfig
from .decode import DecodeError, DecodeResult, decode_frames
from .encode import ClipEncoder, ModelSpec, center_crop
from .keywords import KeywordExtractor, KeywordSpec
from .write import ShardData, TokenCache, write_shard


@dataclass(frozen=True)
class ShardTask:
    index: int
    videos: tuple[str, ...]             # relative paths, in shard order
    captions: tuple[Caption, ...] = ()
    fingerprint: str = ""               # shard_fingerprint of its inputs, made by the planner; the worker
    # writes it to meta.json as is (it may see other paths and caches, so it never makes its own)


def shard_fingerprint(videos: tuple[str, ...], captions: tuple[Caption, ...], stamps: list, sources: dict) -> str:
    """Changes when what the shard is made from changes: its videos (names, and per file `stamps`, e.g.
    size and modification time), its captions, or what encodes them (`sources`: feature settings,
    checkpoint file, resolved keyword model)."""
    payload = json.dumps([videos, [c.__dict__ for c in captions], stamps, sources], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Stages:
    clip: ClipEncoder
    keywords: KeywordExtractor | None
    keyword_cache: dict[str, np.ndarray] = field(default_factory=dict)             # keyword -> (Dt,) EOT feature
    keyword_block_cache: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # (K, keyword) -> (L, Dt)


_STAGES: dict[tuple, Stages] = {}
_STAGES_LOCK = threading.Lock()


def get_stages(clip: ModelSpec, kw: KeywordSpec, need_keywords: bool) -> Stages:
    """The models of this process, loaded on first use and kept for every later shard."""
    key = (clip, kw)
    with _STAGES_LOCK:
        stages = _STAGES.get(key)
        if stages is None:
            stages = _STAGES[key] = Stages(ClipEncoder(clip), None)
        if need_keywords and stages.keywords is None and kw.top_k > 0:
            stages.keywords = KeywordExtractor(kw)
        return stages


_END = object()


class ModelError(RuntimeError):
    """The image tower raised (CUDA out of memory, a bad checkpoint): the whole shard fails and is
    not written, so that a rerun redoes it rather than keeping its videos as failed."""


def _put(q: queue.Queue, item, cancel: threading.Event) -> bool:
    """Put, unless cancelled first (then False). Every put must be: once the consumer is gone the
    queue stays full, and a plain put blocks forever, and the thread pool's shutdown with it."""
    while not cancel.is_set():
        try:
            q.put(item, timeout=0.5)
            return True
        except queue.Full:
            pass
    return False


def _decode_into(q: queue.Queue, slot: int, path: Path, clip: ClipEncoder, timeout: float,
                 cancel: threading.Event) -> None:
    """Decode one video into the queue: (slot, crop) per frame, then (slot, _END, result|error)."""
    result = DecodeResult()
    if cancel.is_set():
        return
    try:
        # closing(): a cancelled decoder kills and reaps its ffmpeg now, not whenever the generator is collected.
        with closing(decode_frames(path, clip.image_size, squash=clip.squash, stall_timeout=timeout,
                                   result=result)) as frames:
            for frame in frames:
                if not _put(q, (slot, center_crop(frame, clip.image_size)), cancel):
                    return
        end = result
    except DecodeError as e:
        end = e
    except Exception as e:  # anything else is still one video's failure, not the run's
        end = DecodeError(f"{path}: {type(e).__name__}: {e}")
    _put(q, (slot, _END, end), cancel)


@dataclass
class _Timing:
    wait: float = 0.0      # main thread waiting for decoded frames
    model: float = 0.0     # image tower
    text: float = 0.0      # text tower and keywords


class _FrameBatcher:
    """Collects decoded frames of several videos into model batches and files the features.

    With cache_blocks = K it also files each frame's tokens entering the image tower's last K blocks; once
    a video has ended and all its frames are encoded, only the tokens of its cached frames are kept (a
    video's length is known only at its end, so the tokens of the videos being decoded wait until then)."""

    def __init__(self, clip: ClipEncoder, n_videos: int, batch_size: int, timing: _Timing,
                 cache_blocks: int = 0, cache_frames: int = S.DEFAULT_CACHE_FRAMES):
        self.clip, self.batch_size, self.timing = clip, batch_size, timing
        self.cache_blocks, self.cache_frames = cache_blocks, cache_frames
        self.feats: list[list[np.ndarray]] = [[] for _ in range(n_videos)]
        self.tokens: list[list[np.ndarray]] = [[] for _ in range(n_videos)]  # (N, Dv) per frame, then per kept frame
        self.kept: list[list[int] | None] = [None] * n_videos               # frame indices with tokens, once known
        self.ended: dict[int, int] = {}                                     # slot -> frames, videos not yet pruned
        self.slots: list[int] = []
        self.frames: list[np.ndarray] = []

    def add(self, slot: int, frame: np.ndarray) -> None:
        self.slots.append(slot)
        self.frames.append(frame)
        if len(self.frames) >= self.batch_size:
            self.flush()

    def count(self, slot: int) -> int:
        return len(self.feats[slot]) + self.slots.count(slot)

    def end(self, slot: int) -> None:
        """The video in `slot` has no more frames."""
        if self.cache_blocks:
            self.ended[slot] = self.count(slot)
            self._prune()

    def _prune(self) -> None:
        for slot, n in list(self.ended.items()):
            if len(self.feats[slot]) == n:  # every frame encoded: keep only the cached frames' tokens
                keep = S.cached_frame_indices(n, self.cache_frames)
                self.tokens[slot] = [self.tokens[slot][i] for i in keep]
                self.kept[slot] = keep
                del self.ended[slot]

    def flush(self) -> None:
        if not self.frames:
            return
        t0 = time.perf_counter()
        batch = np.stack(self.frames)
        try:
            if self.cache_blocks:
                out, tokens = self.clip.encode_frames_cached(batch, self.cache_blocks)  # (B, Dv), (B, N, Dv)
            else:
                out, tokens = self.clip.encode_frames(batch), None  # (B, Dv)
        except Exception as e:  # say which stage failed: the videos themselves may be fine
            raise ModelError(f"image model failed on a batch of {len(self.frames)} frames: "
                             f"{type(e).__name__}: {e}") from e
        self.timing.model += time.perf_counter() - t0
        for i, (slot, row) in enumerate(zip(self.slots, out)):
            self.feats[slot].append(row)
            if tokens is not None:
                self.tokens[slot].append(tokens[i])
        self.slots.clear()
        self.frames.clear()
        if self.ended:
            self._prune()


def encode_videos(paths: list[Path], clip: ClipEncoder, cfg: ExtractConfig, timing: _Timing,
                  on_video: Callable[[int], None] | None = None):
    """Per video: (features (n, Dv) float16, times (n,), DecodeResult, cached) or a DecodeError; cached is
    None, or with cfg.cache_blocks (tokens (n_c, N, Dv) float16, frame indices (n_c,) int64)."""
    q: queue.Queue = queue.Queue(maxsize=2 * cfg.batch_size)
    batcher = _FrameBatcher(clip, len(paths), cfg.batch_size, timing, cfg.cache_blocks, cfg.cache_frames)
    outcome: list = [None] * len(paths)
    cancel = threading.Event()
    threads = cfg.decode_threads
    if clip.device.type == "cuda":  # one ffmpeg gives ~130 frames/s on a CPU core; a GPU wants thousands
        threads = max(threads, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for slot, path in enumerate(paths):
            pool.submit(_decode_into, q, slot, path, clip, cfg.decode_timeout, cancel)
        try:
            remaining = len(paths)
            while remaining:
                t0 = time.perf_counter()
                item = q.get()
                timing.wait += time.perf_counter() - t0
                if item[1] is not _END:
                    batcher.add(*item)
                    continue
                outcome[item[0]] = item[2]
                batcher.end(item[0])
                remaining -= 1
                if on_video:
                    on_video(batcher.count(item[0]))
                if q.empty():
                    batcher.flush()  # nothing else is ready: do not let the model idle
        except BaseException:
            # Decoders stop at their next put (within 0.5 s, or at their next frame) and kill their
            # ffmpeg; the pool's shutdown waits for that, so no ffmpeg outlives the failed shard.
            cancel.set()
            raise
    batcher.flush()
    results = []
    for slot, res in enumerate(outcome):
        if isinstance(res, Exception):
            results.append(res)
            continue
        cached = None
        if cfg.cache_blocks:
            cached = (np.stack(batcher.tokens[slot]), np.asarray(batcher.kept[slot], np.int64))
        results.append((np.stack(batcher.feats[slot]), np.asarray(res.times, "float32"), res, cached))
    return results


@dataclass
class CaptionFeatures:
    tokens: list[np.ndarray]                  # per caption (L_i, Dt) float16, SOT..EOT after ln_final
    keywords: list[list[str]]                 # per caption, lemmatised, in score order
    table: np.ndarray                         # (V, Dt) float16, EOT feature of each distinct keyword
    index: np.ndarray                         # (C, K) int32 rows into table, -1 = none
    block_tokens: list[np.ndarray] | None = None          # cache_blocks: per caption (L_i, Dt) block input
    keyword_block_tokens: list[np.ndarray] | None = None  # cache_blocks: per table row (L_v, Dt) block input


def encode_caption_features(captions: list[Caption], stages: Stages, batch_size: int,
                            cache_blocks: int = 0) -> CaptionFeatures:
    """Token features per caption, keywords per caption, the keyword table and its index; with
    cache_blocks = K also the tokens entering the text tower's last K blocks, for captions and keywords."""
    clip = stages.clip

    def encode(texts: list[str]):
        if cache_blocks:
            return clip.encode_texts_cached(texts, cache_blocks)
        pooled, toks = clip.encode_texts(texts)
        return pooled, toks, None

    order = sorted(range(len(captions)), key=lambda i: len(captions[i].text))  # similar lengths batch well
    tokens: list[np.ndarray | None] = [None] * len(captions)
    block_tokens: list[np.ndarray | None] = [None] * len(captions)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        _, toks, blocks = encode([captions[i].text for i in batch])
        for j, (i, t) in enumerate(zip(batch, toks)):
            tokens[i] = t
            if blocks is not None:
                block_tokens[i] = blocks[j]
    keywords = stages.keywords([c.text for c in captions]) if stages.keywords else [[] for _ in captions]
    vocab = list(dict.fromkeys(k for kws in keywords for k in kws))
    # each distinct keyword is encoded once per worker (and once more per K when its block input is wanted)
    new = [k for k in vocab if k not in stages.keyword_cache
           or (cache_blocks and (cache_blocks, k) not in stages.keyword_block_cache)]
    for start in range(0, len(new), batch_size):
        chunk = new[start:start + batch_size]
        pooled, _, blocks = encode(chunk)
        stages.keyword_cache.update(zip(chunk, pooled))
        if blocks is not None:
            stages.keyword_block_cache.update(((cache_blocks, k), b) for k, b in zip(chunk, blocks))
    k = stages.keywords.spec.top_k if stages.keywords else 0
    row_of = {kw: i for i, kw in enumerate(vocab)}
    index = np.full((len(captions), k), -1, dtype=np.int32)
    for i, kws in enumerate(keywords):
        index[i, :len(kws)] = [row_of[w] for w in kws]
    table = (np.stack([stages.keyword_cache[w] for w in vocab]) if vocab
             else np.zeros((0, clip.text_dim), np.float16))
    features = CaptionFeatures(tokens, keywords, table, index)
    if cache_blocks:
        features.block_tokens = block_tokens
        features.keyword_block_tokens = [stages.keyword_block_cache[(cache_blocks, w)] for w in vocab]
    return features


def encode_captions(captions: list[Caption], stages: Stages, batch_size: int):
    """(tokens, keywords, table, index) of encode_caption_features, without token caches."""
    f = encode_caption_features(captions, stages, batch_size)
    return f.tokens, f.keywords, f.table, f.index


def run_shard(task: ShardTask, cfg: ExtractConfig, on_video: Callable[[int], None] | None = None,
              device: str | None = None) -> dict:
    """Extract, encode and write one shard; returns its summary (counts, timings, failures)."""
    start = time.perf_counter()
    clip_spec = replace(cfg.clip, device=device) if device else cfg.clip
    kw_spec = replace(cfg.keywords, device="cpu" if clip_spec.device == "cpu" else clip_spec.device)
    stages = get_stages(clip_spec, kw_spec, need_keywords=bool(task.captions))
    clip = stages.clip
    timing = _Timing()
    root = Path(cfg.videos)
    data = ShardData(task.index)
    if cfg.cache_blocks:
        data.cache = TokenCache(cfg.cache_blocks, cfg.cache_frames, clip.image_layers, clip.text_layers,
                                (clip.image_tokens, clip.image_dim))
    failures: list[Failure] = []
    n_frames = 0
    results = encode_videos([root / v for v in task.videos], clip, cfg, timing, on_video)
    for video_id, res in zip(task.videos, results):
        row = {"video_id": video_id, "path": str(root / video_id), "shard": task.index,
               "frame_start": n_frames, "num_frames": 0, "duration": float("nan")}
        if isinstance(res, Exception):
            failures.append(Failure(str(root / video_id), "decode", str(res)))
            data.videos.append({**row, "status": S.STATUS_FAILED, "error": str(res)})
            continue
        feats, times, info, cached = res
        data.frames.append(feats)
        data.frame_times.append(times)
        if cached is not None:
            data.cache.frame_tokens.append(cached[0])
            data.cache.frame_rows.append(n_frames + cached[1])
        data.videos.append({**row, "status": S.STATUS_OK, "error": info.warning,
                            "num_frames": len(feats), "duration": info.duration})
        n_frames += len(feats)

    t0 = time.perf_counter()
    captions = list(task.captions)
    encoded = encode_caption_features(captions, stages, cfg.batch_size, cfg.cache_blocks)
    tokens, keywords, table, index = encoded.tokens, encoded.keywords, encoded.table, encoded.index
    if data.cache is not None:
        data.cache.text_tokens, data.cache.keyword_tokens = encoded.block_tokens, encoded.keyword_block_tokens
    timing.text = time.perf_counter() - t0
    n_tokens = 0
    for c, toks, kws in zip(captions, tokens, keywords):
        data.captions.append({"caption_id": c.caption_id, "video_id": c.video_id, "split": c.split,
                              "caption": c.text, "keywords": kws, "token_start": n_tokens,
                              "num_tokens": len(toks), "shard": task.index})
        data.tokens.append(toks)
        n_tokens += len(toks)
        if stages.keywords and not kws:
            failures.append(Failure(f"caption {c.caption_id}", "keywords",
                                    f"no keywords found in '{c.text[:80]}' (kept, with no keyword features)"))
    data.keyword_features, data.keyword_index = table, index
    seconds = time.perf_counter() - start
    summary = {
        "shard": task.index, "videos": len(task.videos),
        "ok": sum(v["status"] == S.STATUS_OK for v in data.videos),
        "failed": sum(v["status"] == S.STATUS_FAILED for v in data.videos),
        "frames": n_frames, "captions": len(captions), "keywords": len(table),
        "seconds": round(seconds, 3), "decode_wait_s": round(timing.wait, 3),
        "image_model_s": round(timing.model, 3), "text_s": round(timing.text, 3),
        "device": clip_spec.device, "fingerprint": task.fingerprint,
    }
    data.meta = {**summary, "schema_version": S.SCHEMA_VERSION,
                 "failures": [f.__dict__ for f in failures]}
    if data.cache is not None:
        data.meta.update(schema_minor=S.SCHEMA_MINOR, cache_blocks=cfg.cache_blocks, cache_frames=cfg.cache_frames,
                         cached_frames=sum(len(t) for t in data.cache.frame_tokens))
    write_shard(Path(cfg.out), data, clip.image_proj.numpy(), clip.text_proj.numpy(),
                {"model": clip_spec.model, "pretrained": clip_spec.pretrained})
    summary["failures"] = data.meta["failures"]
    return summary
