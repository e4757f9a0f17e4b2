"""Reader: the shards of an `extract` output folder, for the trainer, the evaluator and search.

Tables (videos, captions) are small and read whole with pyarrow; dense arrays stay in
HDF5 and are read by index, so a collection never has to fit in memory.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import schema as S


_ARRAYS = (S.H5_FRAMES, S.H5_TOKENS, S.H5_KEYWORDS)  # the dense arrays batches are gathered from


class FeaturesError(ValueError):
    """A features folder that cannot be read; the message names the folder or file."""


@dataclass(frozen=True)
class ModelInfo:
    model: str
    pretrained: str
    image_dim: int
    text_dim: int
    embed_dim: int


def uniform_indices(n: int, k: int) -> np.ndarray:
    """At most k of n frame indices, spread uniformly (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.linspace(0, n - 1, num=k).round().astype(np.int64)


def _float32(values: np.ndarray) -> np.ndarray:
    """An exact float16 -> float32 copy, on the calling thread.

    This is most of a batch's cost. numpy's astype converts one value at a time (~3 ns each); torch uses the
    CPU's F16C instructions (~0.4 ns) but spreads a large copy over its intra-op threads, which belong to
    the training step running beside the loader: on a busy 2-core machine that took 8 ms of CPU for one
    batch's frames instead of 0.5. Blocks below ATen's parallel grain (32,768 elements) stay on this thread.
    """
    src = torch.from_numpy(np.ascontiguousarray(values)).view(-1)
    out = torch.empty(src.shape, dtype=torch.float32)
    block = 24_576  # a multiple of 512 and 768
    for start in range(0, len(src), block):
        out[start:start + block].copy_(src[start:start + block])
    return out.numpy().reshape(values.shape)


class ShardFiles:
    """Read handles of the shards' features.h5, opened on first use, one set per thread (h5py handles are
    not shared safely between threads). Shared by FeatureStore and pipeline/tokens.py's TokenStore.

    At most max_open handles a thread stay open (the least recently used is closed): each open file keeps
    HDF5's metadata (~0.5 MiB), and those long-lived blocks, spread between the reads' transient arrays, kept
    the allocator from reusing freed memory, so a pass over 313 shards (20k videos) had grown the process by
    690 MiB, and a 100k gallery would have grown it by gigabytes."""

    def __init__(self, shard_dirs: list[Path], max_open: int = 32):
        self.shard_dirs, self.max_open = shard_dirs, max_open
        self._local = threading.local()

    def _open(self, shard_pos: int) -> tuple[h5py.File, dict]:
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = OrderedDict()  # shard -> (file, its dataset objects)
        if shard_pos in files:
            files.move_to_end(shard_pos)
        else:
            while len(files) >= self.max_open:
                files.popitem(last=False)[1][0].close()
            files[shard_pos] = (h5py.File(self.shard_dirs[shard_pos] / S.FEATURES_FILE, "r"), {})
        return files[shard_pos]

    def __call__(self, shard_pos: int) -> h5py.File:
        """The open file; use it at once (a handle may be closed once max_open others have been opened)."""
        return self._open(shard_pos)[0]

    def dataset(self, shard_pos: int, name: str) -> h5py.Dataset:
        """A dataset object, kept with its file: h5py's name lookup costs as much as a small read."""
        h5, datasets = self._open(shard_pos)
        if name not in datasets:
            datasets[name] = h5[name]
        return datasets[name]

    def close(self) -> None:
        """Close this thread's handles; later reads open new ones."""
        for f, _ in getattr(self._local, "files", {}).values():
            f.close()
        self._local = threading.local()


class FeatureStore:
    """Every complete shard of a features folder; videos that failed extraction are left out."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        shard_dirs = sorted((self.root / S.SHARDS_DIR).glob(f"{S.SHARD_PREFIX}*")) \
            if (self.root / S.SHARDS_DIR).is_dir() else []
        if not shard_dirs:
            raise FeaturesError(f"{self.root}: no shards found (run `python cli.py extract` first)")
        self.shard_dirs = shard_dirs
        videos, captions, infos = [], [], []
        for i, d in enumerate(shard_dirs):
            try:
                with h5py.File(d / S.FEATURES_FILE, "r") as h5:
                    version = int(h5.attrs["schema_version"])
                    if version != S.SCHEMA_VERSION:
                        raise FeaturesError(f"{d}: schema version {version}, this code reads {S.SCHEMA_VERSION}")
                    infos.append(ModelInfo(str(h5.attrs["model"]), str(h5.attrs["pretrained"]),
                                           int(h5.attrs["image_dim"]), int(h5.attrs["text_dim"]),
                                           int(h5.attrs["embed_dim"])))
                    if i == 0:
                        self.image_proj = h5[S.H5_IMAGE_PROJ][()]
                        self.text_proj = h5[S.H5_TEXT_PROJ][()]
                v = pq.read_table(d / S.VIDEOS_FILE)
                v = v.append_column("shard_pos", pa.array([i] * v.num_rows, pa.int32()))
                c = pq.read_table(d / S.CAPTIONS_FILE)
                c = c.append_column("shard_pos", pa.array([i] * c.num_rows, pa.int32()))
                c = c.append_column("row_in_shard", pa.array(np.arange(c.num_rows), pa.int64()))
            except (OSError, KeyError, pa.ArrowInvalid) as e:
                raise FeaturesError(f"{d}: unreadable shard ({type(e).__name__}: {e})") from None
            videos.append(v)
            captions.append(c)
        if len(set(infos)) != 1:
            raise FeaturesError(f"{self.root}: shards come from different models: {sorted(set(infos), key=str)}")
        self.info = infos[0]
        all_videos = pa.concat_tables(videos).to_pylist()
        self.videos = [v for v in all_videos if v["status"] == S.STATUS_OK]
        self.video_index = {v["video_id"]: i for i, v in enumerate(self.videos)}
        self.captions = [c for c in pa.concat_tables(captions).to_pylist() if c["video_id"] in self.video_index]
        self._h5 = ShardFiles(self.shard_dirs)
        self._memory: dict[str, np.ndarray] | None = None  # see preload()
        self._frame_picks: dict[int, np.ndarray] = {}  # max_frames -> stored-frame offsets (_picks)
        self._columns()

    # --- tables -----------------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.captions:
            counts[c["split"]] = counts.get(c["split"], 0) + 1
        return counts

    def split_captions(self, split: str) -> list[int]:
        """Indices into self.captions of one split."""
        return [i for i, c in enumerate(self.captions) if c["split"] == split]

    def caption_video(self, caption_indices: list[int]) -> np.ndarray:
        return np.array([self.video_index[self.captions[i]["video_id"]] for i in caption_indices], np.int64)

    def config(self) -> dict:
        path = self.root / S.CONFIG_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def clip_blocks(self):
        """(tensors, info) of CLIP's first text blocks (pipeline/clip_init.py), or None for a folder
        extracted before they were saved."""
        from .clip_init import load_text_blocks

        path = self.root / S.CLIP_BLOCKS_FILE
        if not path.exists():
            return None
        try:
            return load_text_blocks(path)
        except Exception as e:  # a truncated or foreign file: say which
            raise FeaturesError(f"{path}: unreadable ({type(e).__name__}: {e}); rerun extract on this "
                                "folder to write it again") from None

    # --- arrays -----------------------------------------------------------------------
    # Every dense array of every shard is addressed in one global row space: shard s's rows start at
    # self._offsets[name][s], and row self._offsets[name][-1] (one past the last) reads as zeros. A batch is
    # then one (items, positions) table of rows per array (-1 = padding),
    # gathered at once: from memory after preload() with one numpy take, else from HDF5 with one read per
    # shard it touches. No Python runs per caption or per frame.

    def _columns(self) -> None:
        """The row numbers that reads need, as numpy columns (no per-caption Python when reading)."""
        sizes = {n: [] for n in _ARRAYS}
        keyword_index = []
        for d in self.shard_dirs:
            try:
                with h5py.File(d / S.FEATURES_FILE, "r") as h5:
                    for n in _ARRAYS:
                        sizes[n].append(h5[n].shape[0])
                    keyword_index.append(np.asarray(h5[S.H5_KEYWORD_INDEX][()], np.int64))  # (C, K)
            except (OSError, KeyError) as e:
                raise FeaturesError(f"{d}: unreadable shard ({type(e).__name__}: {e})") from None
        self._offsets = {n: np.concatenate([[0], np.cumsum(sizes[n])]).astype(np.int64) for n in _ARRAYS}
        self._widths = {S.H5_FRAMES: self.info.image_dim, S.H5_TOKENS: self.info.text_dim,
                        S.H5_KEYWORDS: self.info.text_dim}
        v, c = self.videos, self.captions
        v_shard = np.array([r["shard_pos"] for r in v], np.int64)
        self._v_count = np.array([r["num_frames"] for r in v], np.int64)
        self._v_first = self._offsets[S.H5_FRAMES][v_shard] + np.array([r["frame_start"] for r in v], np.int64)
        c_shard = np.array([r["shard_pos"] for r in c], np.int64)
        self._c_count = np.array([r["num_tokens"] for r in c], np.int64)
        self._c_first = self._offsets[S.H5_TOKENS][c_shard] + np.array([r["token_start"] for r in c], np.int64)
        self._c_keywords = np.array([len(r["keywords"] or ()) for r in c], np.int64)  # keyword strings of the table
        # each caption's keyword rows (global, -1 = none); the valid ones first, in the caption's own (score)
        # order, which a stable sort on "is padding" keeps (a row named twice stays twice)
        k = max((a.shape[1] for a in keyword_index), default=0)
        table = np.full((sum(len(a) for a in keyword_index), k), -1, np.int64)
        at = 0
        for s, a in enumerate(keyword_index):
            table[at:at + len(a), :a.shape[1]] = np.where(a >= 0, a + self._offsets[S.H5_KEYWORDS][s], -1)
            at += len(a)
        first_caption = np.concatenate([[0], np.cumsum([len(a) for a in keyword_index])]).astype(np.int64)
        rows = table[first_caption[c_shard] + np.array([r["row_in_shard"] for r in c], np.int64)]
        self._c_keyword_rows = np.take_along_axis(rows, np.argsort(rows < 0, axis=1, kind="stable"), axis=1)

    def preload(self, max_bytes: int) -> bool:
        """Read every shard's dense arrays into memory when together they take at most max_bytes.

        h5py costs ~0.1 ms per read and a batch touches about one shard per caption; from memory a batch is
        a few numpy gathers. Returns whether the arrays are now in memory."""
        if self._memory is not None:
            return True
        total = sum(int(self._offsets[n][-1] + 1) * self._widths[n] * 2 for n in _ARRAYS)  # float16
        if total > max_bytes:
            return False
        memory = {}
        for n in _ARRAYS:
            # one allocation per array, filled shard by shard (no second copy); the last row stays zero: padding
            out = np.empty((int(self._offsets[n][-1]) + 1, self._widths[n]), np.float16)
            out[-1] = 0
            for pos in range(len(self.shard_dirs)):
                a, b = self._offsets[n][pos], self._offsets[n][pos + 1]
                if b > a:
                    self._h5(pos)[n].read_direct(out, dest_sel=np.s_[a:b])
            memory[n] = out
        self._memory = memory
        return True

    def _gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        """float16 (*rows.shape, width) of global rows; -1 reads as zeros (padding)."""
        pad = self._offsets[name][-1]  # one past the last row: zeros in memory, skipped in HDF5
        rows = np.where(rows < 0, pad, rows)
        if self._memory is not None:
            return np.take(self._memory[name], rows, axis=0)
        wanted, inverse = np.unique(rows, return_inverse=True)  # sorted: h5py wants increasing indices
        shard = np.searchsorted(self._offsets[name], wanted, side="right") - 1
        values = np.zeros((len(wanted), self._widths[name]), np.float16)
        bounds = np.flatnonzero(np.diff(shard, prepend=-1, append=-1))
        for a, b in zip(bounds[:-1], bounds[1:]):
            pos = int(shard[a])
            if pos >= len(self.shard_dirs):  # the padding row
                continue
            local = wanted[a:b] - self._offsets[name][pos]
            lo, hi = int(local[0]), int(local[-1]) + 1
            ds = self._h5.dataset(pos, name)
            # one contiguous read when the rows are dense enough in it (a slice is far cheaper in h5py than a
            # point selection), else h5py's fancy read of exactly these rows
            values[a:b] = ds[lo:hi][local - lo] if hi - lo <= 2 * len(local) + 64 else ds[local]
        return values[inverse.reshape(rows.shape)]

    def _read(self, name: str, rows: np.ndarray, owners: np.ndarray, describe) -> np.ndarray:
        """float32 (*rows.shape, width) of global rows (rows: (B, P), -1 = padding, read as zeros).

        A NaN or inf feature would only surface as a NaN loss many steps later, so the error names its file
        now. owners: (B,) store index of each row of `rows`; describe(i) gives
        (what, shard position) of item i."""
        values = _float32(self._gather(name, rows))  # (B, P, width)
        if not np.isfinite(values).all():  # (numpy's isfinite is fast on float32, emulated on float16)
            bad = ~np.isfinite(values.reshape(len(values), -1)).all(1)  # (B,)
            what, shard_pos = describe(int(owners[int(np.flatnonzero(bad)[0])]))
            shard = self.shard_dirs[shard_pos]
            raise FeaturesError(f"{shard / S.FEATURES_FILE}: non-finite values in the {what}; "
                                f"delete {shard} and rerun extract to redo that shard")
        return values

    def _picks(self, max_frames: int) -> np.ndarray:
        """(Nv, min(max_frames, longest)) offsets of the stored frames each video keeps (uniform_indices),
        -1 after its last; one uniform_indices call per distinct frame count, cached per max_frames."""
        if max_frames not in self._frame_picks:
            width = max(1, min(max_frames, int(self._v_count.max(initial=0))))
            table = np.full((len(self.videos), width), -1, np.int64)
            for n in np.unique(self._v_count):
                p = uniform_indices(int(n), max_frames)
                table[self._v_count == n, :len(p)] = p
            self._frame_picks[max_frames] = table
        return self._frame_picks[max_frames]

    def frames(self, video_indices, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, F, Dv) float32 frames (uniformly sampled, zero padded) and (B, F) bool mask."""
        idx = np.asarray(video_indices, np.int64).reshape(-1)
        picks = self._picks(max_frames)[idx]  # (B, F_max)
        width = max(1, int(np.minimum(self._v_count[idx], max_frames).max(initial=1)))
        picks = picks[:, :width]
        mask = picks >= 0
        rows = np.where(mask, self._v_first[idx, None] + picks, -1)  # (B, F)
        frames = self._read(S.H5_FRAMES, rows, idx, lambda i: (f"frames of video {self.videos[i]['video_id']}",
                                                               self.videos[i]["shard_pos"]))
        return frames, mask  # (B, F, Dv), (B, F)

    def frame_times(self, video_index: int) -> np.ndarray:
        r = self.videos[video_index]
        return self._h5(r["shard_pos"])[S.H5_FRAME_TIMES][r["frame_start"]:r["frame_start"] + r["num_frames"]]

    def _caption_what(self, i: int, what: str) -> tuple[str, int]:
        c = self.captions[i]
        return f"{what} of caption {c['caption_id']} ({c['video_id']})", c["shard_pos"]

    def texts(self, caption_indices, max_words: int) -> dict[str, np.ndarray]:
        """Global feature, tokens (SOT..EOT, at most max_words) and keyword features with masks."""
        idx = np.asarray(caption_indices, np.int64).reshape(-1)
        count, first = self._c_count[idx], self._c_first[idx]  # (B,)
        keep = np.minimum(count, max_words)  # (B,)
        width = max(1, int(keep.max(initial=1)))
        at = np.arange(width)[None, :]  # (1, N)
        # Long captions keep their first words and their EOT, as CLIP4Clip's truncation does: position keep-1
        # is the caption's own EOT (row first + count - 1), whether or not it was truncated
        rows = np.where(at == keep[:, None] - 1, (first + count - 1)[:, None], first[:, None] + at)
        token_mask = at < keep[:, None]  # (B, N)
        tokens = self._read(S.H5_TOKENS, np.where(token_mask, rows, -1), idx,
                            lambda i: self._caption_what(i, "tokens"))  # (B, N, Dt)
        k_max = max(1, int(self._c_keywords[idx].max(initial=1)))
        k_rows = self._c_keyword_rows[idx]  # (B, K), valid rows first
        if k_rows.shape[1] < k_max:
            k_rows = np.pad(k_rows, ((0, 0), (0, k_max - k_rows.shape[1])), constant_values=-1)
        k_rows = k_rows[:, :k_max]
        return {
            "text_global": tokens[np.arange(len(idx)), np.maximum(keep - 1, 0)].copy(),  # the EOT of the caption
            "tokens": tokens,
            "token_mask": token_mask,
            "keywords": self._read(S.H5_KEYWORDS, k_rows, idx, lambda i: self._caption_what(i, "keywords")),
            "keyword_mask": k_rows >= 0,
        }

    def close(self) -> None:
        self._h5.close()
