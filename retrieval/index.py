"""The saved index: everything a query needs that does not depend on the query, in a folder beside the features.

    FEATURES/index/clip/            without a run (plain CLIP)
    FEATURES/index/run-<hash>/      for one run (the hash of its resolved path; index.json names it)
        index.json                  what it was built from (shards, run, head), the stage-1 index and its parameters
        codes/<shard>-<key>/        per shard: the codes (codes.py) as .npy arrays, memory-mapped when searched,
                                    stage1.npy (videos), captions.npy (its captions' stage-1 vectors), seconds.npy
        videos.faiss, captions.faiss   an approximate stage-1 index, when one is used

Stage 1 is exact (FAISS IndexFlatIP, or a numpy matmul without FAISS: the same ranking) below `exact_below`
rows, and FAISS HNSW above it. A rebuild re-encodes only the shards that are new or changed; an HNSW index
grows in place when shards were only added.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import schema as S
from pipeline.atomic import TMP_MARK, atomic_path, atomic_write_text, fsync_dir, temporary_name
from pipeline.read import FeatureStore, uniform_indices

from . import SearchError
from .codes import CODE_NAMES, text_stage1, video_codes, video_stage1
from .scorer import CHUNK, Scorer

log = logging.getLogger(__name__)

INDEX_ROOT = "index"
INDEX_FILE = "index.json"
FORMAT = 1
CODE_DTYPE = np.float16  # codes on disk; scored in float32
EXACT_BELOW = 50_000  # rows: exact stage 1 below, HNSW at and above
PER_FRAME = {"frames", "beta", "keys", "values", "seconds"}  # (rows, max_frames, ...) arrays
FLOAT32 = {"stage1", "captions", "seconds"}  # kept exact: searched whole, or times in seconds
HNSW = {"M": 32, "efConstruction": 80, "efSearch": 256}  # efSearch is raised to 2 x the candidates asked for


class StaleIndexError(SearchError):
    """The saved index no longer matches its features or run."""


def default_folder(features: Path | str, run: Path | str | None) -> Path:
    if run is None:
        return Path(features) / INDEX_ROOT / "clip"
    return Path(features) / INDEX_ROOT / f"run-{hashlib.sha256(str(Path(run).resolve()).encode()).hexdigest()[:10]}"


def shard_keys(store: FeatureStore) -> list[dict]:
    """Name and key of every shard; the key changes when a shard is redone (its inputs, size, time of writing)."""
    out = []
    for d in store.shard_dirs:
        meta = json.loads((d / S.META_FILE).read_text()) if (d / S.META_FILE).exists() else {}
        st = (d / S.FEATURES_FILE).stat()
        key = json.dumps([d.name, meta.get("fingerprint"), st.st_size, st.st_mtime_ns])
        out.append({"name": d.name, "key": hashlib.sha256(key.encode()).hexdigest()[:12]})
    return out


def _faiss():
    try:
        import faiss  # optional: without it stage 1 is an exact numpy matmul
    except ImportError:
        return None
    return faiss


# --- stage 1 ---------------------------------------------------------------------------------------------
class VectorIndex:
    """Maximum inner product search over (N, D) vectors: FAISS flat or HNSW, or exact numpy."""

    def __init__(self, vectors: np.ndarray, params: dict, ann=None):
        self.vectors, self.params, self.ann = vectors, params, ann
        faiss = _faiss()
        if ann is None and faiss is not None and len(vectors):
            self.ann = faiss.IndexFlatIP(vectors.shape[1])
            self.ann.add(vectors)
            self.params = {**params, "search": "faiss IndexFlatIP (exact)"}
        elif ann is None:
            self.params = {**params, "search": "exact (numpy matmul)"}

    def describe(self) -> str:
        p = self.params
        if p.get("kind") == "hnsw" and self.ann is not None:
            return f"faiss HNSW (M {p['M']}, efConstruction {p['efConstruction']}, efSearch {p['efSearch']}+)"
        return p["search"]

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k rows with the largest inner product with q (D,), best first."""
        k = min(k, len(self.vectors))
        if k <= 0:
            return np.zeros(0, np.int64)
        q = np.ascontiguousarray(q, np.float32)[None]
        if self.ann is not None:
            if self.params.get("kind") == "hnsw":
                # a per-call parameter, so concurrent queries never race on the index's own efSearch
                faiss = _faiss()
                _, idx = self.ann.search(q, k, params=faiss.SearchParametersHNSW(
                    efSearch=max(self.params["efSearch"], 2 * k)))
            else:
                _, idx = self.ann.search(q, k)
            idx = idx[0]
            return idx[idx >= 0]
        scores = self.vectors @ q[0]  # (N,)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        return top[np.argsort(-scores[top], kind="stable")]


def _ann_params(n: int, exact_below: int) -> dict:
    if n < exact_below or _faiss() is None:
        return {"kind": "exact", "rows": n, "exact_below": exact_below,
                **({} if _faiss() else {"note": "faiss not installed"})}
    return {"kind": "hnsw", "rows": n, "exact_below": exact_below, **HNSW}


def _build_ann(vectors: np.ndarray, params: dict, path: Path, reuse: tuple[dict, int] | None) -> dict:
    """Write the approximate index when params ask for one; reuse = (old params, rows that are unchanged)."""
    if params["kind"] != "hnsw":
        path.unlink(missing_ok=True)
        return params
    faiss = _faiss()
    old, kept = reuse or ({}, 0)
    start = time.perf_counter()
    if (old.get("kind") == "hnsw" and kept == old.get("rows") and path.exists()
            and all(old.get(k) == params[k] for k in HNSW)):
        index = faiss.read_index(str(path))  # shards were only added: grow it
        added = vectors[kept:]
    else:
        index = faiss.IndexHNSWFlat(vectors.shape[1], params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        added = vectors
    index.add(np.ascontiguousarray(added, np.float32))
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return {**params, "added": len(added), "seconds": round(time.perf_counter() - start, 2)}


# --- codes on disk ---------------------------------------------------------------------------------------
@dataclass
class _Shard:
    name: str
    key: str
    folder: Path
    videos: int
    captions: int


def _encode_shard(store: FeatureStore, scorer: Scorer, pos: int, folder: Path, videos: list[int],
                  captions: list[int], device: str, bar) -> None:
    """Codes, seconds and stage-1 vectors of one shard's videos and captions, into `folder` (fresh)."""
    model, width = scorer.model, scorer.max_frames
    arrays: dict[str, np.ndarray] = {}

    def put(name: str, start: int, block: np.ndarray, total: int) -> None:
        if name not in arrays:
            dtype = np.float32 if name in FLOAT32 else CODE_DTYPE if block.dtype.kind == "f" else block.dtype
            shape = (total, width, *block.shape[2:]) if name in PER_FRAME else (total, *block.shape[1:])
            arrays[name] = np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, shape)
        rows = slice(start, start + len(block))
        if name in PER_FRAME:  # a block of short videos is narrower than max_frames: the rest is padding
            arrays[name][rows, :block.shape[1]] = block
            arrays[name][rows, block.shape[1]:] = 0
        else:
            arrays[name][rows] = block

    for s in range(0, len(videos), CHUNK):
        idx = videos[s:s + CHUNK]
        frames, mask = store.frames(idx, width)  # (B, F, Dv), (B, F)
        codes = video_codes(model, torch.from_numpy(frames).to(device), torch.from_numpy(mask).to(device))
        stage1 = video_stage1(model, codes)
        for name, value in codes.items():
            put(name, s, value.cpu().numpy(), len(videos))
        put("stage1", s, stage1.cpu().numpy(), len(videos))
        seconds = np.zeros((len(idx), frames.shape[1]), np.float32)
        for b, v in enumerate(idx):
            pick = uniform_indices(store.videos[v]["num_frames"], width)
            seconds[b, :len(pick)] = store.frame_times(v)[pick]
        put("seconds", s, seconds, len(videos))
        bar.update(len(idx))
    for s in range(0, len(captions), CHUNK):
        texts = store.texts(captions[s:s + CHUNK], scorer.max_words)
        with torch.inference_mode():
            text = model.encode_text(*(torch.from_numpy(texts[k]).to(device) for k in
                                       ("text_global", "tokens", "token_mask", "keywords", "keyword_mask")))
            put("captions", s, text_stage1(model, text).cpu().numpy(), len(captions))
    for a in arrays.values():
        a.flush()
    del arrays


class SavedIndex:
    """A saved index, opened: codes memory-mapped per shard, stage-1 vectors in memory."""

    def __init__(self, folder: Path, meta: dict, store: FeatureStore):
        self.folder, self.meta, self.store = folder, meta, store
        self.shards = [_Shard(**{**s, "folder": folder / s["folder"]}) for s in meta["shards"]]
        self.codes_of: list[dict[str, np.ndarray]] = []
        for sh in self.shards:
            self.codes_of.append({p.stem: np.load(p, mmap_mode="r") for p in sorted(sh.folder.glob("*.npy"))})
        # global video / caption -> (shard, row): the store lists them shard by shard, in order
        self.video_shard = np.repeat(np.arange(len(self.shards)), [s.videos for s in self.shards])
        self.video_row = np.concatenate([np.arange(s.videos) for s in self.shards]) if self.shards else np.zeros(0, int)
        self.video_vectors = self._stage1("stage1")
        self.caption_vectors = self._stage1("captions")
        self.videos = VectorIndex(self.video_vectors, meta["ann"]["videos"], self._read_ann("videos"))
        self.captions = VectorIndex(self.caption_vectors, meta["ann"]["captions"], self._read_ann("captions"))

    def _stage1(self, name: str) -> np.ndarray:
        parts = [c[name] for c in self.codes_of if name in c]
        if not parts:
            return np.zeros((0, 1), np.float32)
        return np.ascontiguousarray(np.concatenate(parts), np.float32)

    def _read_ann(self, kind: str):
        params = self.meta["ann"][kind]
        if params["kind"] != "hnsw":
            return None
        faiss = _faiss()
        if faiss is None:
            log.warning("%s: the index was built with FAISS HNSW, but faiss is not installed: exact search instead "
                        "(pip install faiss-cpu)", self.folder)
            return None
        return faiss.read_index(str(self.folder / f"{kind}.faiss"))

    # --- reading --------------------------------------------------------------------------------------
    def codes(self, videos: np.ndarray) -> dict[str, torch.Tensor]:
        """The codes of these videos (global indices), as float32 tensors in that order."""
        videos = np.asarray(videos, np.int64)
        shards, rows = self.video_shard[videos], self.video_row[videos]
        out: dict[str, np.ndarray] = {}
        for sh in np.unique(shards):
            pick = np.nonzero(shards == sh)[0]
            order = np.argsort(rows[pick])  # increasing rows: sequential reads of the memory map
            for name in (*CODE_NAMES, "seconds"):
                if name not in self.codes_of[sh]:
                    continue
                src = self.codes_of[sh][name]
                if name not in out:
                    out[name] = np.empty((len(videos), *src.shape[1:]), np.float32 if src.dtype == CODE_DTYPE
                                         else src.dtype)
                out[name][pick[order]] = src[rows[pick][order]]
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def second(self, video: int, frame: int) -> float:
        return float(self.codes_of[self.video_shard[video]]["seconds"][self.video_row[video], frame])

    def describe(self) -> dict:
        return {"folder": str(self.folder), "videos": int(len(self.video_vectors)),
                "captions": int(len(self.caption_vectors)), "stage1_dim": int(self.video_vectors.shape[1]),
                "stage1_videos": self.videos.describe(), "stage1_captions": self.captions.describe(),
                "scorer": self.meta["scorer"]["name"]}


# --- opening and building ----------------------------------------------------------------------------------
def _grouped(store: FeatureStore) -> tuple[list[list[int]], list[list[int]]]:
    videos = [[] for _ in store.shard_dirs]
    captions = [[] for _ in store.shard_dirs]
    for i, v in enumerate(store.videos):
        videos[v["shard_pos"]].append(i)
    for i, c in enumerate(store.captions):
        captions[c["shard_pos"]].append(i)
    return videos, captions


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def stale_reasons(meta: dict, store: FeatureStore, scorer: Scorer) -> list[str]:
    """Why a saved index does not fit these features and this scorer (empty: it fits)."""
    reasons = []
    if meta["scorer"]["identity"] != scorer.identity:
        reasons.append(f"it was built for {meta['scorer']['name']} "
                       f"({json.dumps(meta['scorer']['identity'].get('checkpoint'))}), not for {scorer.name} "
                       f"({json.dumps(scorer.identity.get('checkpoint'))})")
    saved = {s["name"]: s["key"] for s in meta["shards"]}
    now = {s["name"]: s["key"] for s in shard_keys(store)}
    new = sorted(set(now) - set(saved))
    changed = sorted(n for n in set(now) & set(saved) if now[n] != saved[n])
    gone = sorted(set(saved) - set(now))
    for what, names in (("new", new), ("changed", changed), ("removed", gone)):
        if names:
            reasons.append(f"{len(names)} shard(s) {what} since it was built: {', '.join(names[:5])}"
                           + (" ..." if len(names) > 5 else ""))
    return reasons


def open_index(folder: Path, store: FeatureStore, scorer: Scorer, rebuild_hint: str) -> SavedIndex:
    """The saved index in `folder`; a missing or stale one raises with the command that makes it."""
    meta = _read_meta(folder)
    if meta is None:
        raise StaleIndexError(f"no index in {folder}: build it with `{rebuild_hint}`")
    reasons = stale_reasons(meta, store, scorer)
    if reasons:
        raise StaleIndexError(f"the index in {folder} is stale: {'; '.join(reasons)}. Update it with "
                              f"`{rebuild_hint}` (only new or changed shards are encoded again)")
    return SavedIndex(folder, meta, store)


def build_index(folder: Path, store: FeatureStore, scorer: Scorer, device: str = "cpu",
                exact_below: int = EXACT_BELOW, progress: bool = True) -> tuple[SavedIndex, dict]:
    """Build or update the index in `folder`; returns it and a report (what was encoded, reused, timings)."""
    from tqdm import tqdm

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    old = _read_meta(folder)
    if old is not None and old["scorer"]["identity"] != scorer.identity:
        old = None  # another run or head: nothing can be reused
    reusable = {(s["name"], s["key"]): s for s in (old or {}).get("shards", [])
                if (folder / s["folder"]).is_dir()}
    videos, captions = _grouped(store)
    todo = [(pos, k) for pos, k in enumerate(shard_keys(store)) if (k["name"], k["key"]) not in reusable]
    bar = tqdm(total=sum(len(videos[pos]) for pos, _ in todo), unit="video", desc="index: encoding videos",
               disable=not progress or not todo, file=sys.stderr)
    shards = []
    (folder / "codes").mkdir(exist_ok=True)
    for pos, k in enumerate(shard_keys(store)):
        if (k["name"], k["key"]) in reusable:
            shards.append(reusable[(k["name"], k["key"])])
            continue
        rel = f"codes/{k['name']}-{k['key']}"
        # a temporary of its own (two `index` or `search` calls may build one folder at once); the codes of a
        # (shard, key) are the same whoever computes them, so the first rename wins and later ones are dropped
        tmp = temporary_name(folder / rel)
        tmp.mkdir(parents=True)
        try:
            _encode_shard(store, scorer, pos, tmp, videos[pos], captions[pos], device, bar)
            if not (folder / rel).is_dir():
                try:
                    tmp.rename(folder / rel)
                except OSError:  # another builder renamed its (identical) codes in between
                    pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shards.append({"name": k["name"], "key": k["key"], "folder": rel, "videos": len(videos[pos]),
                       "captions": len(captions[pos])})
    bar.close()
    fsync_dir(folder / "codes")
    encode_seconds = time.perf_counter() - start

    # unchanged leading shards keep their rows in an approximate index: it grows instead of being rebuilt
    kept_videos = kept_captions = 0
    for now, before in zip(shards, (old or {}).get("shards", [])):
        if (now["name"], now["key"]) != (before["name"], before["key"]):
            break
        kept_videos, kept_captions = kept_videos + now["videos"], kept_captions + now["captions"]
    meta = {"format": FORMAT, "features": str(store.root.resolve()), "shards": shards,
            "scorer": {"name": scorer.name, "identity": scorer.identity}, "ann": {}}
    probe = SavedIndex(folder, {**meta, "ann": {"videos": {"kind": "exact"}, "captions": {"kind": "exact"}}}, store)
    for kind, vectors, kept in (("videos", probe.video_vectors, kept_videos),
                                ("captions", probe.caption_vectors, kept_captions)):
        params = _ann_params(len(vectors), exact_below)
        reuse = (old["ann"][kind], kept) if old else None
        meta["ann"][kind] = _build_ann(vectors, params, folder / f"{kind}.faiss", reuse)
    meta["built_seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(folder / INDEX_FILE, json.dumps(meta, indent=2))
    live = {s["folder"] for s in shards}
    for d in (folder / "codes").iterdir():  # codes of shards that changed or went away
        if f"codes/{d.name}" not in live and TMP_MARK not in d.name:  # not another builder's work in progress
            shutil.rmtree(d, ignore_errors=True)
    index = SavedIndex(folder, meta, store)
    report = {"encoded_shards": [k["name"] for _, k in todo], "reused_shards": len(shards) - len(todo),
              "encoded_videos": sum(len(videos[pos]) for pos, _ in todo),
              "encode_seconds": round(encode_seconds, 2), "seconds": meta["built_seconds"],
              "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
              "stage1": {k: v for k, v in meta["ann"].items()}, **index.describe()}
    return index, report
