"""Reader: the shards of an `extract` output folder, for the trainer, the evaluator and search.

Tables (videos, captions) are small and read whole with pyarrow; dense arrays stay in
HDF5 and are read by index, so a collection never has to fit in memory.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema as S


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
        self._local = threading.local()
        self._memory: list[dict[str, np.ndarray]] | None = None  # see preload()

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
    def preload(self, max_bytes: int) -> bool:
        """Read every shard's dense arrays into memory when together they take at most max_bytes.

        h5py costs ~0.1-0.3 ms per small read and a training batch makes ~5 per caption: 200 ms for a batch
        of 128 on a 2-core CPU, far slower than a GPU step. From memory the same batch takes a few ms.
        Returns whether the arrays are now in memory."""
        if self._memory is not None:
            return True
        names = (S.H5_FRAMES, S.H5_TOKENS, S.H5_KEYWORDS, S.H5_KEYWORD_INDEX)
        total = 0
        for pos in range(len(self.shard_dirs)):
            h5 = self._h5(pos)
            total += sum(h5[n].size * h5[n].dtype.itemsize for n in names)
        if total > max_bytes:
            return False
        self._memory = [{n: self._h5(pos)[n][()] for n in names} for pos in range(len(self.shard_dirs))]
        return True

    def _array(self, shard_pos: int, name: str):
        """A dense array of one shard: the in-memory copy after preload(), else the HDF5 dataset."""
        if self._memory is not None:
            return self._memory[shard_pos][name]
        return self._h5(shard_pos)[name]

    def _h5(self, shard_pos: int) -> h5py.File:
        files = getattr(self._local, "files", None)
        if files is None:  # one set of handles per thread: h5py handles are not shared safely
            files = self._local.files = {}
        if shard_pos not in files:
            files[shard_pos] = h5py.File(self.shard_dirs[shard_pos] / S.FEATURES_FILE, "r")
        return files[shard_pos]

    def frames(self, video_indices, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, F, Dv) float32 frames (uniformly sampled, zero padded) and (B, F) bool mask."""
        rows = [self.videos[i] for i in video_indices]
        picks = [uniform_indices(r["num_frames"], max_frames) for r in rows]
        width = max(1, max((len(p) for p in picks), default=1))
        out = np.zeros((len(rows), width, self.info.image_dim), np.float32)
        mask = np.zeros((len(rows), width), bool)
        for b, (r, p) in enumerate(zip(rows, picks)):
            block = self._array(r["shard_pos"], S.H5_FRAMES)[r["frame_start"]:r["frame_start"] + r["num_frames"]]
            out[b, :len(p)] = block[p]
            self._check_finite(out[b, :len(p)], r["shard_pos"], f"frames of video {r['video_id']}")
            mask[b, :len(p)] = True
        return out, mask

    def _check_finite(self, values: np.ndarray, shard_pos: int, what: str) -> None:
        """A NaN or inf feature would only surface as a NaN loss many steps later: name its file now."""
        if not np.isfinite(values).all():
            raise FeaturesError(f"{self.shard_dirs[shard_pos] / S.FEATURES_FILE}: non-finite values in the {what}; "
                                f"delete {self.shard_dirs[shard_pos]} and rerun extract to redo that shard")

    def frame_times(self, video_index: int) -> np.ndarray:
        r = self.videos[video_index]
        return self._h5(r["shard_pos"])[S.H5_FRAME_TIMES][r["frame_start"]:r["frame_start"] + r["num_frames"]]

    def texts(self, caption_indices, max_words: int) -> dict[str, np.ndarray]:
        """Global feature, tokens (SOT..EOT, at most max_words) and keyword features with masks."""
        rows = [self.captions[i] for i in caption_indices]
        n = len(rows)
        lengths = [min(r["num_tokens"], max_words) for r in rows]
        width = max(1, max(lengths, default=1))
        k_max = max(1, max((len(r["keywords"]) for r in rows), default=1))
        dt = self.info.text_dim
        out = {
            "text_global": np.zeros((n, dt), np.float32),
            "tokens": np.zeros((n, width, dt), np.float32),
            "token_mask": np.zeros((n, width), bool),
            "keywords": np.zeros((n, k_max, dt), np.float32),
            "keyword_mask": np.zeros((n, k_max), bool),
        }
        for b, r in enumerate(rows):
            pos = r["shard_pos"]
            toks = self._array(pos, S.H5_TOKENS)[r["token_start"]:r["token_start"] + r["num_tokens"]]
            out["text_global"][b] = toks[-1]  # the EOT token of the whole caption
            keep = lengths[b]
            # Long captions keep their first words and their EOT, as CLIP4Clip's truncation does.
            out["tokens"][b, :keep] = np.concatenate([toks[:keep - 1], toks[-1:]]) if keep < len(toks) else toks
            out["token_mask"][b, :keep] = True
            self._check_finite(out["tokens"][b, :keep], pos, f"tokens of caption {r['caption_id']} ({r['video_id']})")
            k_rows = self._array(pos, S.H5_KEYWORD_INDEX)[r["row_in_shard"]]
            k_rows = k_rows[k_rows >= 0]
            if len(k_rows):
                # h5py wants strictly increasing indices: read each row once, sorted, then put them back in
                # the caption's keyword order (a row named twice comes back twice)
                rows, order = np.unique(k_rows, return_inverse=True)
                out["keywords"][b, :len(k_rows)] = self._array(pos, S.H5_KEYWORDS)[rows][order]
                out["keyword_mask"][b, :len(k_rows)] = True
        return out

    def close(self) -> None:
        for f in getattr(self._local, "files", {}).values():
            f.close()
        self._local = threading.local()
