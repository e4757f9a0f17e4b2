"""Token-cache reader: the tokens `extract --cache-blocks K` stores (schema 1.1) and the towers' tail weights.

Shards are taken in the same order as pipeline/read.py's FeatureStore, so its rows (shard_pos,
frame_start, num_frames, token_start, num_tokens, keyword rows) index these caches as they index the
features. A folder or shard extracted without caches, or with another K, is refused with the command
that makes them.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from . import schema as S
from .read import ShardFiles


class TokensError(ValueError):
    """Token caches that are missing or do not fit together; the message names the file and the remedy."""


def _remedy(k: int | str = "K") -> str:
    return (f"rerun `python cli.py extract VIDEOS --out FOLDER --cache-blocks {k}` on it (only shards without "
            "those caches are redone)")


def schema_version(h5: h5py.File) -> tuple[int, int]:
    """(version, minor) of an open features.h5; a shard written before minors existed is (1, 0)."""
    return int(h5.attrs["schema_version"]), int(h5.attrs.get("schema_minor", 0))


def cache_bytes(image_tokens: int, image_width: int, text_width: int) -> dict[str, int]:
    """Bytes the caches add, from the architecture: per cached frame (its fp16 tokens and its int64 row) and
    per text token (fp16; a caption or keyword of L tokens takes L of them). ViT-B/32: 50 x 768 x 2 + 8 =
    76,808 bytes a frame, 512 x 2 = 1,024 bytes a text token."""
    return {"frame": image_tokens * image_width * 2 + 8, "text_token": text_width * 2}


def load_tail(root: Path | str):
    """(tensors, info) of OUT/clip_tail.safetensors, for heads.clip_tail.ClipTail.from_state."""
    from safetensors import safe_open

    path = Path(root) / S.CLIP_TAIL_FILE
    if not path.exists():
        raise TokensError(f"{path} does not exist: {root} was extracted without --cache-blocks; {_remedy()}")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
            return {k: f.get_tensor(k) for k in f.keys()}, info
    except Exception as e:  # truncated or foreign
        raise TokensError(f"{path}: unreadable ({type(e).__name__}: {e}); {_remedy()}") from None


class TokenStore:
    """The token caches of every shard of a features folder (dense arrays stay in HDF5, read by index)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        shards = self.root / S.SHARDS_DIR
        self.shard_dirs = sorted(shards.glob(f"{S.SHARD_PREFIX}*")) if shards.is_dir() else []
        if not self.shard_dirs:
            raise TokensError(f"{self.root}: no shards found (run `python cli.py extract` first)")
        blocks = set()
        for d in self.shard_dirs:
            path = d / S.FEATURES_FILE
            try:
                with h5py.File(path, "r") as h5:
                    version, minor = schema_version(h5)
                    k = int(h5.attrs.get("cache_blocks", 0))
                    missing = [n for n in S.H5_CACHE_DTYPES if n not in h5]
            except (OSError, KeyError) as e:
                raise TokensError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
            if version != S.SCHEMA_VERSION:
                raise TokensError(f"{path}: schema version {version}, this code reads {S.SCHEMA_VERSION}")
            if minor < 1 or k < 1 or missing:
                raise TokensError(f"{path}: no token caches (schema {version}.{minor}, extracted without "
                                  f"--cache-blocks); {_remedy()}")
            blocks.add(k)
        if len(blocks) != 1:
            raise TokensError(f"{self.root}: shards cache different block counts {sorted(blocks)} (an interrupted "
                              f"rerun with another --cache-blocks); {_remedy(max(blocks))}")
        self.blocks = blocks.pop()
        self._h5 = ShardFiles(self.shard_dirs)
        self._maps: dict[tuple[int, str], np.ndarray] = {}  # see array()

    def tail(self):
        """(tensors, info) of the saved tail, checked against the shards' K."""
        tensors, info = load_tail(self.root)
        if int(info.get("cache_blocks", -1)) != self.blocks:
            raise TokensError(f"{self.root / S.CLIP_TAIL_FILE} holds {info.get('cache_blocks')} blocks, the shards "
                              f"cache {self.blocks}; {_remedy(self.blocks)}")
        return tensors, info

    def array(self, shard_pos: int, name: str):
        """One cache dataset of a shard, for reads by index: a read-only numpy memmap when it is stored
        contiguous and uncompressed (as pipeline/write.py stores it), else the h5py dataset of this thread.
        A memmap needs neither h5py's per-read cost nor its global lock, so several loader threads read at once."""
        key = (shard_pos, name)
        if key not in self._maps:
            ds = self._h5(shard_pos)[name]
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            if offset is None or ds.size == 0:  # chunked, filtered or empty: no single byte range to map
                return ds
            self._maps[key] = np.memmap(self.shard_dirs[shard_pos] / S.FEATURES_FILE, dtype=ds.dtype, mode="r",
                                        offset=offset, shape=ds.shape)
        return self._maps[key]

    def frame_rows(self, shard_pos: int) -> np.ndarray:
        """(Tc,) int64: the row in `frames` of each cached frame of the shard, increasing."""
        return np.asarray(self._h5(shard_pos)[S.H5_FRAME_BLOCK_ROWS][()], np.int64)

    def keyword_table(self, shard_pos: int) -> np.ndarray:
        """(C, K) int64: each caption's rows in the shard's keyword table (-1 = none), the shard's keyword_index."""
        return np.asarray(self._h5(shard_pos)[S.H5_KEYWORD_INDEX][()], np.int64)

    def keyword_spans(self, shard_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """(V,) start and (V,) length of each keyword row's tokens in keyword_block_tokens."""
        h5 = self._h5(shard_pos)
        return (np.asarray(h5[S.H5_KEYWORD_BLOCK_START][()], np.int64),
                np.asarray(h5[S.H5_KEYWORD_BLOCK_LENGTH][()], np.int64))

    def frame_tokens(self, shard_pos: int, frame_start: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """A video's cached frames: tokens (n_c, N, Dv) float16 and their frame indices in the video (n_c,)."""
        h5 = self._h5(shard_pos)
        rows = h5[S.H5_FRAME_BLOCK_ROWS][()]  # small: one int per cached frame of the shard
        lo, hi = np.searchsorted(rows, [frame_start, frame_start + num_frames])
        return h5[S.H5_FRAME_BLOCK_TOKENS][lo:hi], rows[lo:hi] - frame_start

    def caption_tokens(self, shard_pos: int, token_start: int, num_tokens: int) -> np.ndarray:
        """A caption's (L, Dt) float16 block input, SOT..EOT (the rows of its `tokens`)."""
        return self._h5(shard_pos)[S.H5_TEXT_BLOCK_TOKENS][token_start:token_start + num_tokens]

    def keyword_tokens(self, shard_pos: int, row: int) -> np.ndarray:
        """Keyword row `row` of the shard's keyword table: its (L, Dt) float16 block input, SOT..EOT."""
        h5 = self._h5(shard_pos)
        start, n = int(h5[S.H5_KEYWORD_BLOCK_START][row]), int(h5[S.H5_KEYWORD_BLOCK_LENGTH][row])
        return h5[S.H5_KEYWORD_BLOCK_TOKENS][start:start + n]

    def close(self) -> None:
        self._maps = {}
        self._h5.close()
