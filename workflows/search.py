"""The `search` job: rank a collection's videos (or captions) against a text or a video query.

Two stages, because the full head cannot be an index: S4 pools each video with the query, so
its score is not a dot product of two stored tables.
  1. coarse: a text-independent CLIP embedding per video (the projected mean of its frames, as
     meanP) sits in an index beside the features (`FEATURES/index/`, rebuilt when a shard
     changes); the query's CLIP embedding picks `candidates` videos from it (FAISS when it is
     installed, else an exact matmul);
  2. full: the run's head scores the candidates and `explain` finds each hit's best second.
Without a run the head is plain CLIP meanP, so stage 2 reproduces stage 1's order and adds
the best second (the frame closest to the query).
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from heads.config import HeadConfig
from heads.model import TEXT_KEYS, VIDEO_KEYS, RetrievalHead
from pipeline import schema as S
from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.decode import DecodeError, DecodeResult, decode_frames, ffmpeg_exe
from pipeline.encode import ClipEncoder, ModelSpec, WeightsError, center_crop
from pipeline.read import FeatureStore, uniform_indices

from .evaluate import load_run
from .train import build_head

log = logging.getLogger(__name__)

INDEX_DIR = "index"
COARSE_MAX_FRAMES = 12     # frames per video in the coarse embedding (the heads' default max_frames)
CHUNK = 256                # videos or captions per block when building the index or scoring
TARGETS = ("videos", "captions")


class SearchError(ValueError):
    """A query, collection or run that cannot be searched; the message says which and why."""


@dataclass
class Hit:
    rank: int                  # from 1
    score: float               # the head's score (plain CLIP: a cosine)
    video_id: str              # the hit's video (for a caption hit: the caption's video)
    path: str                  # that video's file, as recorded at extraction
    best_second: float         # the second of `moment_path` that matched best
    moment_path: str           # the video `best_second` refers to: the hit, or the query video for captions
    caption: str | None = None  # the caption, when captions are ranked


@dataclass
class SearchResult:
    query: str                 # the text, or the query video's path
    target: str                # "videos" or "captions"
    scorer: str                # what produced the scores
    index: str                 # what produced the candidates
    gallery: int               # videos (or captions) searched
    candidates: int            # how many reached the full head
    hits: list[Hit] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, in order


# --- the collection, the scorer, the query encoder ------------------------------------------------------
# Models are kept per process: a caller that searches many times (a bench, a service) loads them once.
@lru_cache(maxsize=2)
def _load_encoder(spec: ModelSpec) -> ClipEncoder:
    return ClipEncoder(spec)


@lru_cache(maxsize=2)
def _load_keywords(spec):
    from pipeline.keywords import KeywordExtractor
    return KeywordExtractor(spec)


def _scorer(store: FeatureStore, run: Path | None, device: str):
    """The run's head (refusing features of another model), else plain CLIP meanP; and its input sizes."""
    if run is None:
        return build_head(HeadConfig(variant="meanp"), store).to(device).eval(), COARSE_MAX_FRAMES, 32, \
            "plain CLIP (meanP)"
    model, cfg, ckpt = load_run(run, store, device)
    return model.eval(), cfg.head.max_frames, cfg.max_words, f"{cfg.head.variant} head of {ckpt}"


def _encoder(store: FeatureStore, device: str, pretrained: str | None) -> ClipEncoder:
    """The CLIP the features were made with: a query in another embedding space would rank noise."""
    spec = ModelSpec(store.info.model, pretrained or store.info.pretrained, device)
    try:
        enc = _load_encoder(spec)
    except WeightsError as e:
        raise SearchError(f"cannot load the CLIP that made {store.root} ({store.info.model}, "
                          f"{store.info.pretrained}): {e}") from None
    if (enc.image_dim, enc.text_dim) != (store.info.image_dim, store.info.text_dim):
        raise SearchError(f"{spec.model} ({spec.pretrained}) gives widths image {enc.image_dim}, text {enc.text_dim}; "
                          f"{store.root} holds image {store.info.image_dim}, text {store.info.text_dim}")
    return enc


def _keywords(store: FeatureStore, text: str) -> list[str]:
    """The query's keywords, as extraction found them for captions (none if it stored none)."""
    kw = store.config().get("config", {}).get("keywords", {})
    if not kw.get("top_k"):
        return []
    from pipeline.keywords import KeywordSpec
    spec = KeywordSpec(model=kw.get("model", "auto"), top_k=kw["top_k"], max_words=kw.get("max_words", 1),
                       lang=kw.get("lang", "en"))
    return _load_keywords(spec)([text])[0]


def encode_text_query(enc: ClipEncoder, store: FeatureStore, text: str, max_words: int) -> dict:
    """The TEXT_KEYS tensors of one query, laid out as FeatureStore.texts lays out a caption."""
    pooled, (tokens,) = enc.encode_texts([text])
    keep = min(len(tokens), max_words)
    # long queries keep their first words and their EOT, as captions do
    tokens = np.concatenate([tokens[:keep - 1], tokens[-1:]]) if keep < len(tokens) else tokens  # (N, Dt)
    words = _keywords(store, text)
    keywords = enc.encode_texts(words)[0] if words else np.zeros((1, enc.text_dim), np.float16)  # (K, Dt)
    arrays = {"text_global": pooled, "tokens": tokens[None], "token_mask": np.ones((1, keep), bool),
              "keywords": keywords[None], "keyword_mask": np.full((1, len(keywords)), bool(words))}
    return {k: torch.from_numpy(np.asarray(v, np.float32 if v.dtype != bool else bool)) for k, v in arrays.items()}


def encode_video_query(enc: ClipEncoder, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A video's 1 FPS frame features (n, Dv) and their times (n,), made as extraction makes them."""
    result, crops = DecodeResult(), []
    try:
        for frame in decode_frames(Path(path), enc.image_size, squash=enc.squash, result=result):
            crops.append(center_crop(frame, enc.image_size))
    except DecodeError as e:
        raise SearchError(f"query video: {e}") from None
    feats = np.concatenate([enc.encode_frames(np.stack(crops[i:i + CHUNK])) for i in range(0, len(crops), CHUNK)])
    return feats.astype(np.float32), np.asarray(result.times, np.float32)


# --- stage 1: the coarse index --------------------------------------------------------------------------
def _fingerprint(store: FeatureStore, kind: str) -> str:
    """Changes when any shard is redone: its inputs' fingerprint, size and time of writing."""
    parts = [kind, COARSE_MAX_FRAMES]
    for d in store.shard_dirs:
        meta = json.loads((d / S.META_FILE).read_text()) if (d / S.META_FILE).exists() else {}
        st = (d / S.FEATURES_FILE).stat()
        parts.append([d.name, meta.get("fingerprint"), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _build(store: FeatureStore, kind: str) -> np.ndarray:
    """(N, D) normalised CLIP embeddings: videos as meanP (projected mean of frames), captions as t."""
    out = []
    if kind == "videos":
        for s in range(0, len(store.videos), CHUNK):
            frames, mask = store.frames(range(s, min(s + CHUNK, len(store.videos))), COARSE_MAX_FRAMES)
            mean = (frames * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # (B, Dv)
            out.append(mean @ store.image_proj)  # the mean commutes with the linear projection
    else:
        for s in range(0, len(store.captions), CHUNK):
            texts = store.texts(range(s, min(s + CHUNK, len(store.captions))), 2)  # t is the EOT: few tokens suffice
            out.append(texts["text_global"] @ store.text_proj)
    emb = np.concatenate(out) if out else np.zeros((0, store.image_proj.shape[1]), np.float32)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def coarse_index(store: FeatureStore, kind: str = "videos") -> tuple[np.ndarray, bool]:
    """The stage-1 embeddings of every video (or caption), from FEATURES/index/ when still current.

    Built streaming, CHUNK rows at a time; returns (embeddings, loaded_from_cache).
    """
    folder = store.root / INDEX_DIR
    key = _fingerprint(store, kind)
    path = folder / f"coarse_{kind}.npz"
    ids = [v["video_id"] for v in store.videos] if kind == "videos" else [c["caption_id"] for c in store.captions]
    cached = _load_cached(path, {"key": key, "ids": ids})
    if cached is not None:
        return cached, True
    emb = _build(store, kind)
    try:  # a read-only features folder still searches, only without the cache
        folder.mkdir(exist_ok=True)
        # One file holds the embeddings and what they were built from, so one atomic rename replaces both:
        # concurrent builds (each under its own temporary name) can never leave one's array beside
        # another's description.
        meta = np.frombuffer(json.dumps({"key": key, "ids": ids}).encode(), np.uint8)
        with atomic_path(path) as tmp:
            np.savez(tmp, emb=emb, meta=meta)
    except OSError as e:
        log.warning("coarse index not cached in %s: %s", folder, e)
    return emb, False


def _load_cached(path: Path, expected: dict) -> np.ndarray | None:
    """The cached embeddings when the file's description matches `expected`, else None (rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = json.loads(z["meta"].tobytes())
            if any(saved.get(k) != v for k, v in expected.items()):
                return None
            return z["emb"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, torn or foreign: built again
        return None


def top_candidates(emb: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """Indices of the k rows of emb with the largest inner product with query (D,), best first."""
    k = min(k, len(emb))
    try:
        import faiss  # optional: a tuned exact search; without it the matmul below is exact too
    except ImportError:
        faiss = None
    if faiss is not None:
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb, np.float32))
        _, idx = index.search(np.ascontiguousarray(query[None], np.float32), k)
        return idx[0], "faiss IndexFlatIP"
    scores = torch.from_numpy(emb) @ torch.from_numpy(query)  # (N,)
    return scores.topk(k).indices.numpy(), "exact (torch matmul)"


# --- stage 2 and the best second ------------------------------------------------------------------------
def _best_frame(relevance: torch.Tensor, mask: torch.Tensor) -> int:
    return int(relevance.masked_fill(~mask, -torch.inf).argmax())


def _video_second(store: FeatureStore, video: int, frame: int, max_frames: int) -> float:
    """The time of a sampled frame: frames were sampled uniformly, so map back to the stored 1 FPS row."""
    stored = uniform_indices(store.videos[video]["num_frames"], max_frames)[frame]
    return float(store.frame_times(video)[stored])


@torch.inference_mode()
def _score_videos(model: RetrievalHead, store: FeatureStore, text, cand: np.ndarray, max_frames: int,
                  device: str) -> list[tuple[float, int, int]]:
    """(score, video, best sampled frame) for each candidate video against one encoded text."""
    out = []
    for s in range(0, len(cand), CHUNK):
        idx = cand[s:s + CHUNK]
        frames, mask = store.frames(idx, max_frames)
        video = model.encode_video(torch.from_numpy(frames).to(device), torch.from_numpy(mask).to(device))
        scores, rel = model.score(text, video)[0], model.explain(text, video)[0]  # (B,), (B, F)
        out += [(float(scores[j]), int(v), _best_frame(rel[j], video.mask[j])) for j, v in enumerate(idx)]
    return out


def _clip_query(emb: np.ndarray) -> np.ndarray:
    return (emb / max(np.linalg.norm(emb), 1e-12)).astype(np.float32)


class _Clock:
    """Seconds per named stage, in order."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now


def _open(features, top: int, candidates: int) -> FeatureStore:
    if top < 1 or candidates < 1:
        raise SearchError(f"--top and --candidates must be at least 1 (got {top} and {candidates})")
    store = FeatureStore(features)
    if not store.videos:
        raise SearchError(f"{store.root}: no successfully extracted video to search")
    return store


def search_text(features: Path | str, query: str, run: Path | None = None, top: int = 10,
                candidates: int = 200, device: str = "cpu", pretrained: str | None = None) -> SearchResult:
    """The `top` videos for a text query: coarse candidates, then the full head with the best second.

    candidates >= the number of videos is an exhaustive search with the full head.
    """
    if not query or not query.strip():
        raise SearchError('empty query: give the text to search for, e.g. search "a dog catches a frisbee"')
    query = query.strip()
    clock = _Clock()
    store = _open(features, top, candidates)
    model, max_frames, max_words, scorer = _scorer(store, run, device)
    enc = _encoder(store, device, pretrained)
    clock.lap("load")
    text_in = encode_text_query(enc, store, query, max_words)
    with torch.inference_mode():
        text = model.encode_text(*(text_in[k].to(device) for k in TEXT_KEYS))
    clock.lap("encode query")
    emb, cached = coarse_index(store, "videos")
    clock.lap("index (cached)" if cached else "index (built)")
    q = _clip_query(text_in["text_global"][0].numpy() @ store.text_proj)  # CLIP's space, not the run's
    cand, index_kind = top_candidates(emb, q, candidates)
    clock.lap("stage 1: coarse")
    scored = sorted(_score_videos(model, store, text, cand, max_frames, device), key=lambda r: -r[0])[:top]
    hits = []
    for rank, (score, v, frame) in enumerate(scored, 1):
        row = store.videos[v]
        hits.append(Hit(rank, score, row["video_id"], row["path"],
                        _video_second(store, v, frame, max_frames), row["path"]))
    clock.lap("stage 2: full head")
    store.close()
    return SearchResult(query, "videos", scorer, index_kind, len(store.videos), len(cand), hits, clock.timings)


@torch.inference_mode()
def _rescore_videos(store: FeatureStore, q: np.ndarray, cand: np.ndarray) -> list[tuple[float, int, int]]:
    """(cosine, video, frame closest to the query) of each candidate, in CLIP's meanP space."""
    out, qt = [], torch.from_numpy(q)
    for s in range(0, len(cand), CHUNK):
        idx = cand[s:s + CHUNK]
        frames, mask = store.frames(idx, COARSE_MAX_FRAMES)
        f0 = torch.from_numpy(frames @ store.image_proj)  # (B, F, D)
        mean = F.normalize((f0 * torch.from_numpy(mask)[..., None]).sum(1), dim=-1)  # (B, D)
        rel = F.normalize(f0, dim=-1) @ qt  # (B, F)
        out += [(float(mean[j] @ qt), int(v), _best_frame(rel[j], torch.from_numpy(mask[j])))
                for j, v in enumerate(idx)]
    return out


@torch.inference_mode()
def _score_captions(model: RetrievalHead, store: FeatureStore, video, cand: np.ndarray, max_words: int,
                    device: str) -> list[tuple[float, int, int]]:
    """(score, caption, best sampled frame of the query video) for each candidate caption."""
    out = []
    for s in range(0, len(cand), CHUNK):
        idx = cand[s:s + CHUNK]
        arrays = store.texts(idx, max_words)
        text = model.encode_text(*(torch.from_numpy(arrays[k]).to(device) for k in TEXT_KEYS))
        scores, rel = model.score(text, video)[:, 0], model.explain(text, video)[:, 0]  # (B,), (B, F)
        out += [(float(scores[j]), int(c), _best_frame(rel[j], video.mask[0])) for j, c in enumerate(idx)]
    return out


def search_video(features: Path | str, video_path: Path | str, run: Path | None = None,
                 target: str = "videos", top: int = 10, candidates: int = 200, device: str = "cpu",
                 pretrained: str | None = None) -> SearchResult:
    """The `top` videos or captions of the collection for a query video, encoded as extraction does.

    Videos: the heads score text-video pairs only, so video-to-video is the cosine of meanP
    embeddings (a run is not used) and a hit's best second is its frame closest to the query.
    Captions: the head (or plain CLIP) scores each candidate caption against the query video;
    the best second is then a second of the query video.
    """
    if target not in TARGETS:
        raise SearchError(f"--target must be one of {', '.join(TARGETS)}, not '{target}'")
    clock = _Clock()
    store = _open(features, top, candidates)
    if target == "captions" and not store.captions:
        raise SearchError(f"{store.root}: no captions were extracted, so there are none to rank")
    model, max_frames, max_words, scorer = _scorer(store, run if target == "captions" else None, device)
    if target == "videos":
        scorer = "plain CLIP (meanP video-video cosine)" + (", the run is not used" if run else "")
    enc = _encoder(store, device, pretrained)
    clock.lap("load")
    feats, times = encode_video_query(enc, Path(video_path))  # (n, Dv), (n,)
    q = _clip_query(feats[uniform_indices(len(feats), COARSE_MAX_FRAMES)].mean(0) @ store.image_proj)
    clock.lap("encode query")
    emb, cached = coarse_index(store, target)
    clock.lap("index (cached)" if cached else "index (built)")
    cand, index_kind = top_candidates(emb, q, candidates)
    clock.lap("stage 1: coarse")
    hits = []
    if target == "videos":
        scored = sorted(_rescore_videos(store, q, cand), key=lambda r: -r[0])[:top]
        for rank, (score, v, frame) in enumerate(scored, 1):
            row = store.videos[v]
            hits.append(Hit(rank, score, row["video_id"], row["path"],
                            _video_second(store, v, frame, COARSE_MAX_FRAMES), row["path"]))
        clock.lap("stage 2: rescore")
    else:
        pick = uniform_indices(len(feats), max_frames)
        with torch.inference_mode():
            video = model.encode_video(torch.from_numpy(feats[pick])[None].to(device),
                                       torch.ones(1, len(pick), dtype=torch.bool, device=device))
        scored = sorted(_score_captions(model, store, video, cand, max_words, device), key=lambda r: -r[0])[:top]
        for rank, (score, c, frame) in enumerate(scored, 1):
            cap = store.captions[c]
            row = store.videos[store.video_index[cap["video_id"]]]
            hits.append(Hit(rank, score, row["video_id"], row["path"], float(times[pick[frame]]),
                            str(Path(video_path).resolve()), cap["caption"]))
        clock.lap("stage 2: full head")
    gallery = len(store.videos) if target == "videos" else len(store.captions)
    store.close()
    return SearchResult(str(video_path), target, scorer, index_kind, gallery, len(cand), hits, clock.timings)


# --- output ---------------------------------------------------------------------------------------------
def format_result(result: SearchResult) -> str:
    """The hits as a table, then the time of each stage."""
    lines = [f"{result.target} for {result.query!r}: {result.scorer}; {result.candidates} of {result.gallery} "
             f"candidates from {result.index}",
             f"{'rank':>4} {'score':>8} {'second':>7}  {'caption  |  ' if result.target == 'captions' else ''}path"]
    for h in result.hits:
        caption = f"{h.caption}  |  " if h.caption is not None else ""
        lines.append(f"{h.rank:>4} {h.score:8.4f} {h.best_second:7.1f}  {caption}{h.path}")
    lines.append("time: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result.timings.items()))
    return "\n".join(lines)


def thumbnail(video: str, second: float, width: int = 320) -> bytes | None:
    """A JPEG of the frame at `second`, or None when the video can no longer be read."""
    args = [ffmpeg_exe(), "-v", "error", "-ss", f"{max(second, 0.0):.3f}", "-i", f"file:{os.path.abspath(video)}",
            "-frames:v", "1", "-vf", f"scale={width}:-2", "-f", "image2pipe", "-vcodec", "mjpeg", "pipe:1"]
    try:
        out = subprocess.run(args, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 and out.stdout else None


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>search: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.hit {{ display: flex; gap: 1em; align-items: center; margin: .6em 0; }}
.hit img {{ width: 240px; border: 1px solid #ccc; }}
.missing {{ width: 240px; height: 135px; background: #eee; display: flex; align-items: center;
           justify-content: center; color: #777; }}
.meta {{ font-size: .95em; }} .path {{ font-family: monospace; word-break: break-all; }}
</style></head>
<body><h1>{title}</h1><p>{summary}</p>
{hits}
<script>
// marks each image that decoded, so a headless browser (and a test) can tell a broken page
window.addEventListener("load", () => {{
  for (const img of document.images) img.dataset.loaded = img.complete && img.naturalWidth > 0 ? "1" : "0";
  document.body.dataset.ready = "1";
}});
</script>
</body></html>
"""


def write_html(result: SearchResult, path: Path | str) -> Path:
    """A self-contained page (thumbnails embedded) of the hits: matching second, score, path."""
    path = Path(path)
    rows = []
    for h in result.hits:
        jpeg = thumbnail(h.moment_path, h.best_second)
        picture = (f'<img alt="{html.escape(h.video_id)} at {h.best_second:.1f} s" '
                   f'src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">' if jpeg
                   else '<div class="missing">no thumbnail (video unreadable)</div>')
        caption = f"<div>{html.escape(h.caption)}</div>" if h.caption is not None else ""
        rows.append(f'<div class="hit" data-rank="{h.rank}">{picture}<div class="meta">'
                    f"<b>#{h.rank}</b> score {h.score:.4f} at {h.best_second:.1f} s{caption}"
                    f'<div class="path">{html.escape(h.path)}</div></div></div>')
    summary = (f"{html.escape(result.scorer)}; {result.candidates} of {result.gallery} candidates from "
               f"{html.escape(result.index)}")
    page = _PAGE.format(title=html.escape(f"{result.target} for {result.query}"), summary=summary,
                        hits="\n".join(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, page)
