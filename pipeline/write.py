"""Write stage: one shard = HDF5 arrays + Parquet tables, written under a temporary name and
renamed, so a shard on disk is always whole.

A shard that is redone replaces the old one by renames only: the old one goes aside (under the
temporary prefix, which readers and the cleanup treat as garbage), the new one comes in, the
folder is fsynced, and only then is the old one deleted. A crash leaves the old or the new shard
at the final name, or, between the two renames, the old one aside, which the next run's
remove_stale_temporaries puts back."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema as S
from .atomic import fsync_dir

_ASIDE = "-old-"  # .tmp-shard-NNNNN-old-XXXXXXXX: a whole shard being replaced


@dataclass
class ShardData:
    """Everything one shard holds, in memory, ready to write."""
    index: int
    videos: list[dict] = field(default_factory=list)      # rows of S.VIDEO_SCHEMA
    frames: list[np.ndarray] = field(default_factory=list)  # per ok video (n_i, Dv) float16
    frame_times: list[np.ndarray] = field(default_factory=list)
    captions: list[dict] = field(default_factory=list)    # rows of S.CAPTION_SCHEMA
    tokens: list[np.ndarray] = field(default_factory=list)  # per caption (L_i, Dt) float16
    keyword_features: np.ndarray | None = None             # (V, Dt) float16
    keyword_index: np.ndarray | None = None                # (C, K) int32
    meta: dict = field(default_factory=dict)
    cache: "TokenCache | None" = None                      # --cache-blocks K > 0 only


@dataclass
class TokenCache:
    """The token caches of one shard (schema 1.1); see S.H5_CACHE_DTYPES."""
    blocks: int                                            # K
    frames_limit: int                                      # --cache-frames
    image_layers: int
    text_layers: int
    frame_shape: tuple[int, int]                           # (N, Dv): tokens per frame and width
    frame_tokens: list[np.ndarray] = field(default_factory=list)   # per ok video (n_c, N, Dv) float16
    frame_rows: list[np.ndarray] = field(default_factory=list)     # per ok video (n_c,) rows in S.H5_FRAMES
    text_tokens: list[np.ndarray] = field(default_factory=list)    # per caption (L_i, Dt), as ShardData.tokens
    keyword_tokens: list[np.ndarray] = field(default_factory=list)  # per keyword row (L_v, Dt)


def _concat(parts: list[np.ndarray], width: int, dtype: str) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, width), dtype)


def write_shard(out: Path, data: ShardData, image_proj: np.ndarray, text_proj: np.ndarray, attrs: dict) -> Path:
    """Write `data` as OUT/shards/shard-NNNNN atomically and return that path."""
    shards = Path(out) / S.SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    final = shards / S.shard_name(data.index)
    tag = uuid.uuid4().hex[:8]
    tmp = shards / f"{S.TMP_PREFIX}{final.name}-{tag}"
    old = shards / f"{S.TMP_PREFIX}{final.name}{_ASIDE}{tag}"
    tmp.mkdir()
    try:
        dv, dt = image_proj.shape[0], text_proj.shape[0]
        with h5py.File(tmp / S.FEATURES_FILE, "w") as h5:
            h5.attrs["schema_version"] = S.SCHEMA_VERSION
            for key in ("model", "pretrained"):
                h5.attrs[key] = str(attrs[key])
            h5.attrs["image_dim"], h5.attrs["text_dim"], h5.attrs["embed_dim"] = dv, dt, image_proj.shape[1]
            h5.create_dataset(S.H5_FRAMES, data=_concat(data.frames, dv, "float16"), chunks=None)
            h5.create_dataset(S.H5_FRAME_TIMES, data=np.concatenate(data.frame_times).astype("float32")
                              if data.frame_times else np.zeros(0, "float32"))
            h5.create_dataset(S.H5_TOKENS, data=_concat(data.tokens, dt, "float16"))
            kw = data.keyword_features if data.keyword_features is not None else np.zeros((0, dt), "float16")
            h5.create_dataset(S.H5_KEYWORDS, data=kw.astype("float16"))
            k_index = data.keyword_index if data.keyword_index is not None else np.zeros((len(data.captions), 0), "int32")
            h5.create_dataset(S.H5_KEYWORD_INDEX, data=k_index.astype("int32"))
            h5.create_dataset(S.H5_IMAGE_PROJ, data=image_proj.astype("float32"))
            h5.create_dataset(S.H5_TEXT_PROJ, data=text_proj.astype("float32"))
            if data.cache is not None:
                _write_cache(h5, data, dt)
        pq.write_table(pa.Table.from_pylist(data.videos, schema=S.VIDEO_SCHEMA), tmp / S.VIDEOS_FILE)
        pq.write_table(pa.Table.from_pylist(data.captions, schema=S.CAPTION_SCHEMA), tmp / S.CAPTIONS_FILE)
        (tmp / S.META_FILE).write_text(json.dumps(data.meta, indent=2))
        for f in tmp.iterdir():  # data on disk before the rename makes the shard visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        replacing = final.exists()
        if replacing:
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if replacing:  # an error, not a crash: put the old shard back at once
                os.rename(old, final)
            raise
        fsync_dir(shards)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replacing:  # garbage now; if this fails, the next run's cleanup deletes it
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_cache(h5: h5py.File, data: ShardData, dt: int) -> None:
    cache = data.cache
    if [len(t) for t in cache.text_tokens] != [len(t) for t in data.tokens]:
        raise ValueError("cached text tokens do not match the captions' tokens row for row")
    n_keywords = 0 if data.keyword_features is None else len(data.keyword_features)
    if len(cache.keyword_tokens) != n_keywords:
        raise ValueError(f"{len(cache.keyword_tokens)} cached keywords for {n_keywords} keyword rows")
    h5.attrs["schema_minor"] = S.SCHEMA_MINOR
    h5.attrs["cache_blocks"], h5.attrs["cache_frames"] = cache.blocks, cache.frames_limit
    h5.attrs["image_layers"], h5.attrs["text_layers"] = cache.image_layers, cache.text_layers
    n, dv = cache.frame_shape
    frames = (np.concatenate(cache.frame_tokens).astype("float16") if cache.frame_tokens
              else np.zeros((0, n, dv), "float16"))
    h5.create_dataset(S.H5_FRAME_BLOCK_TOKENS, data=frames)
    rows = np.concatenate(cache.frame_rows).astype("int64") if cache.frame_rows else np.zeros(0, "int64")
    if len(rows) != len(frames) or np.any(np.diff(rows) <= 0):
        raise ValueError(f"cached frame rows are not one increasing row per cached frame ({len(rows)} vs {len(frames)})")
    h5.create_dataset(S.H5_FRAME_BLOCK_ROWS, data=rows)
    h5.create_dataset(S.H5_TEXT_BLOCK_TOKENS, data=_concat(cache.text_tokens, dt, "float16"))
    lengths = np.array([len(t) for t in cache.keyword_tokens], "int32")
    h5.create_dataset(S.H5_KEYWORD_BLOCK_TOKENS, data=_concat(cache.keyword_tokens, dt, "float16"))
    h5.create_dataset(S.H5_KEYWORD_BLOCK_START, data=(np.cumsum(lengths) - lengths).astype("int64"))
    h5.create_dataset(S.H5_KEYWORD_BLOCK_LENGTH, data=lengths)


def remove_stale_temporaries(out: Path) -> int:
    """Delete half-written shards left by a killed run; they are never read. An old shard set aside
    by a run killed before the new one came in goes back to its name instead."""
    shards = Path(out) / S.SHARDS_DIR
    stale = sorted(shards.glob(f"{S.TMP_PREFIX}*")) if shards.is_dir() else []
    for path in stale:
        name, aside, _ = path.name[len(S.TMP_PREFIX):].partition(_ASIDE)
        if aside and not (shards / name).exists():  # set aside whole (one rename), so whole still
            os.rename(path, shards / name)
            fsync_dir(shards)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return len(stale)
