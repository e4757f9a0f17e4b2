"""The saved index: everything a query needs that does not depend on the query, in a folder beside the features.

    FEATURES/index/clip/            without a run (plain CLIP)
    FEATURES/index/run-<hash>/      for one run (the hash of its resolved path; index.json names it)
        index.json                  what it was built from (shards, run, head), the stage-1 index and its parameters
        codes/<shard>-<key>/        per shard: the codes (codes.py) as .npy arrays, memory-mapped when searched,
                                    stage1.npy (whole videos), moments.npy (M vectors a video, when M > 1),
                                    captions.npy (its captions' stage-1 vectors), seconds.npy
        videos.faiss, captions.faiss   an approximate stage-1 index, when one is used

Text stage 1 searches the videos' moment vectors (codes.py: M per video, `moments`; a video counts by
its best moment) and returns distinct videos. Stage 1 is exact (FAISS IndexFlatIP, or a numpy matmul
without FAISS: the same ranking) below `exact_below` rows, and a FAISS inverted file (IVF-Flat: k-means lists,
exact inner products inside the lists it probes) above it. A rebuild re-encodes only the shards that are new or
changed; the inverted file grows in place (its lists kept) when shards were only added, and is trained again
when the collection has grown enough to want more lists. Indexes built with FAISS HNSW (before IVF) still open.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
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

from . import EXACT_BELOW, SearchError
from .codes import CODE_NAMES, moments_of, text_stage1, video_codes, video_moments, video_stage1
from .scorer import CHUNK, Scorer

log = logging.getLogger(__name__)

INDEX_ROOT = "index"
INDEX_FILE = "index.json"
FORMAT = 1
CODE_DTYPE = np.float16  # codes on disk; scored in float32
MOMENTS = 4  # stage-1 vectors per video (contiguous groups of its frames); 1 = one vector of the whole video
PER_FRAME = {"frames", "beta", "keys", "values", "seconds"}  # (rows, max_frames, ...) arrays
FLOAT32 = {"stage1", "moments", "captions", "seconds"}  # kept exact: searched whole, or times in seconds
# Why IVF and not HNSW (bench/stage1.py: 100,000 videos x 4 moments = 400,000 rows of 1,024, 50 queries, 2-core
# CPU): the same share of queries keep the exhaustive top 10 (92-94%), but HNSW (M 32, efConstruction 80) took
# 247 s to build and 11 ms a query, IVF-Flat with 1,024 lists 19-21 s and 4-6 ms (16-32 lists probed). The misses
# left are mostly the same for every index tried: a video of the head's top 10 that ranks 233-276th in stage 1,
# in a list far from the query; exact stage 1 with 300 candidates keeps 100%.
IVF = {"nprobe": 32, "train_per_list": 50}  # lists probed per query; training rows per list (FAISS wants >= 39)


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
    """Maximum inner product search over (N, D) vectors: FAISS flat, IVF (or HNSW, older indexes), or exact numpy."""

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
        if p.get("kind") == "ivf" and self.ann is not None:
            return f"faiss IVF-Flat ({p['nlist']} lists, {p['nprobe']}+ probed)"
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
            faiss = _faiss()  # per-call parameters, so concurrent queries never race on the index's own
            if self.params.get("kind") == "ivf":
                # enough lists to hold about 2k rows, however many candidates (x moments) a query asks for
                per_list = max(self.ann.ntotal / self.params["nlist"], 1.0)
                nprobe = min(self.params["nlist"], max(self.params["nprobe"], int(np.ceil(2 * k / per_list))))
                _, idx = self.ann.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
            elif self.params.get("kind") == "hnsw":
                _, idx = self.ann.search(q, k, params=faiss.SearchParametersHNSW(
                    efSearch=max(self.params["efSearch"], 2 * k)))
            else:
                _, idx = self.ann.search(q, k)
            idx = idx[0]
            return idx[idx >= 0]
        scores = self.vectors @ q[0]  # (N,)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        return top[np.argsort(-scores[top], kind="stable")]


def _nlist(n: int) -> int:
    """Lists of the inverted file for n rows: the power of two nearest 2 x sqrt(n), and no more than the rows
    can train (39 per list, FAISS's floor). It changes only when the collection has roughly doubled twice."""
    want = 2 ** int(round(np.log2(max(2 * np.sqrt(n), 1))))
    while want > 1 and want * 39 > n:
        want //= 2
    return want


def _ann_params(n: int, exact_below: int) -> dict:
    if n < exact_below or _faiss() is None:
        return {"kind": "exact", "rows": n, "exact_below": exact_below,
                **({} if _faiss() else {"note": "faiss not installed"})}
    nlist = _nlist(n)
    return {"kind": "ivf", "rows": n, "exact_below": exact_below, "nlist": nlist,
            "nprobe": min(IVF["nprobe"], nlist), "spherical": False}


def _build_ann(vectors: np.ndarray, params: dict, path: Path, reuse: tuple[dict, int] | None) -> dict:
    """Write the inverted file when params ask for one; reuse = (old params, rows that are unchanged): when
    those are all the old index's rows and its lists fit, the new rows are added to it, else it is trained again
    (k-means on a fixed sample, so a rebuild of the same vectors gives the same index)."""
    if params["kind"] != "ivf":
        path.unlink(missing_ok=True)
        return params
    faiss = _faiss()
    old, kept = reuse or ({}, 0)
    start = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, np.float32)
    if (old.get("kind") == "ivf" and kept == old.get("rows") and path.exists()
            and old.get("nlist") == params["nlist"]):
        index = faiss.read_index(str(path))  # shards were only added: grow it
        added, trained = vectors[kept:], old.get("trained_rows", kept)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], params["nlist"],
                                   faiss.METRIC_INNER_PRODUCT)
        # FAISS makes inner-product k-means spherical by default (unit-length centroids); with a trained head
        # plain means kept 90-92% of the exhaustive top 10 against 76-80% (bench/stage1.py, 100k videos)
        index.cp.spherical = False
        rows = min(len(vectors), IVF["train_per_list"] * params["nlist"])
        sample = np.random.default_rng(0).choice(len(vectors), rows, replace=False) if rows < len(vectors) else None
        index.train(vectors if sample is None else vectors[np.sort(sample)])
        added, trained = vectors, rows
    index.add(added)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return {**params, "trained_rows": int(trained), "added": len(added),
            "seconds": round(time.perf_counter() - start, 2)}


# --- codes on disk ---------------------------------------------------------------------------------------
@dataclass
class _Shard:
    name: str
    key: str
    folder: Path
    videos: int
    captions: int


def _encode_shard(store: FeatureStore, scorer: Scorer, pos: int, folder: Path, videos: list[int],
                  captions: list[int], device: str, bar, moments: int = 1) -> None:
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
        if moments > 1:
            put("moments", s, video_moments(model, codes, moments).cpu().numpy(), len(videos))
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


def distinct_videos(rows: np.ndarray, moments: int, k: int) -> np.ndarray:
    """The first k distinct videos of moment rows (video-major: row = video x moments + moment) in rank order."""
    videos = rows // moments
    first = np.sort(np.unique(videos, return_index=True)[1])  # each video at its best row, in rank order
    return videos[first][:k]


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
        self.video_vectors = self._stage1("stage1")  # (V, Dc) whole videos
        self.moments = int(meta.get("moments", 1))
        # (V * M, Dc) what text stage 1 searches: the M moment vectors of each video, video after video
        moments = self._stage1("moments") if self.moments > 1 else self.video_vectors
        moments = moments.reshape(-1, moments.shape[-1])  # (V, M, Dc) -> (V * M, Dc)
        self.caption_vectors = self._stage1("captions")
        self.videos = VectorIndex(moments, meta["ann"]["videos"], self._read_ann("videos"))
        self.captions = VectorIndex(self.caption_vectors, meta["ann"]["captions"], self._read_ann("captions"))

    def _stage1(self, name: str) -> np.ndarray:
        parts = [c[name] for c in self.codes_of if name in c]
        if not parts:
            return np.zeros((0, 1), np.float32)
        return np.ascontiguousarray(np.concatenate(parts), np.float32)

    def _read_ann(self, kind: str):
        params = self.meta["ann"][kind]
        if params["kind"] not in ("ivf", "hnsw"):
            return None
        faiss = _faiss()
        if faiss is None:
            log.warning("%s: the index was built with FAISS (%s), but faiss is not installed: exact search "
                        "instead (pip install faiss-cpu)", self.folder, params["kind"])
            return None
        return faiss.read_index(str(self.folder / f"{kind}.faiss"))

    # --- reading --------------------------------------------------------------------------------------
    def search_videos(self, q: np.ndarray, k: int) -> np.ndarray:
        """The k distinct videos whose best moment has the largest inner product with q (Dc,), best first."""
        if self.moments == 1:
            return self.videos.search(q, k)
        # enough rows for k videos even if every moment of the best ones comes first
        return distinct_videos(self.videos.search(q, k * self.moments), self.moments, k)

    def describe_videos(self) -> str:
        moments = f", {self.moments} moments a video" if self.moments > 1 else ""
        return f"{self.videos.describe()}{moments}"

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
                "moments": self.moments, "stage1_videos": self.describe_videos(),
                "stage1_captions": self.captions.describe(), "scorer": self.meta["scorer"]["name"]}


# --- opening and building ----------------------------------------------------------------------------------
def _disk_bytes(folder: Path) -> int:
    """Bytes of the index's files. Another builder's temporaries are not the index's and may vanish while
    being walked, so the walk never enters them and a file or folder that goes away is simply not counted."""
    total = 0
    for parent, dirs, files in os.walk(folder):  # os.walk skips a folder it cannot list (Path.rglob raises)
        dirs[:] = [d for d in dirs if TMP_MARK not in d]
        for name in files:
            if TMP_MARK in name:
                continue
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass
    return total


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
                exact_below: int = EXACT_BELOW, progress: bool = True,
                moments: int | None = None) -> tuple[SavedIndex, dict]:
    """Build or update the index in `folder`; returns it and a report (what was encoded, reused, timings).
    moments: stage-1 vectors per video (codes.py; None: the saved index's own, else MOMENTS); heads whose
    stage 1 is exact use 1."""
    from tqdm import tqdm

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    old = _read_meta(folder)
    if moments is None:
        moments = old.get("moments", 1) if old is not None else MOMENTS
    moments = moments_of(scorer.model, moments)
    if old is not None and (old["scorer"]["identity"] != scorer.identity or old.get("moments", 1) != moments):
        old = None  # another run, head or number of moments: nothing can be reused
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
            _encode_shard(store, scorer, pos, tmp, videos[pos], captions[pos], device, bar, moments)
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
            "scorer": {"name": scorer.name, "identity": scorer.identity}, "moments": moments, "ann": {}}
    probe = SavedIndex(folder, {**meta, "ann": {"videos": {"kind": "exact"}, "captions": {"kind": "exact"}}}, store)
    for kind, vectors, kept in (("videos", probe.videos.vectors, kept_videos * moments),
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
              "bytes": _disk_bytes(folder),
              "stage1": {k: v for k, v in meta["ann"].items()}, **index.describe()}
    return index, report
