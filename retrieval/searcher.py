"""Searcher: a collection, its scorer and its saved index, loaded once; answers text and video queries.

A text query costs its encoding (CLIP text tower, then the head's text side), stage 1 (the index's
candidates by inner product in the run's space) and the full head on those candidates' stored codes.
Safe to call from several threads at once (the server does): nothing here is written after loading.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from heads.model import TEXT_KEYS, TextFeatures
from pipeline.read import FeatureStore, uniform_indices

from . import CANDIDATES, SearchError
from .codes import text_stage1, video_codes, video_stage1
from .index import SavedIndex
from .query import encode_text_query, encode_video_query, load_encoder
from .scorer import Scorer, rank, score

TARGETS = ("videos", "captions")


@dataclass
class Hit:
    rank: int                  # from 1
    score: float               # the head's score (plain CLIP: a cosine)
    video_id: str              # the hit's video (for a caption hit: the caption's video)
    path: str                  # that video's file, as recorded at extraction
    best_second: float         # the second of `moment_path` that matched best
    moment_path: str           # the video `best_second` refers to: the hit, or the query video for captions
    caption: str | None = None  # the caption, when captions are ranked
    video: int | None = None   # the hit's video as an index into the collection (None: not one of its videos)


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


class Clock:
    """Seconds per named stage, in order."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


class Searcher:

    def __init__(self, store: FeatureStore, scorer: Scorer, index: SavedIndex, device: str = "cpu",
                 pretrained: str | None = None):
        self.store, self.scorer, self.index, self.device, self.pretrained = store, scorer, index, device, pretrained
        self.model = scorer.model.to(device).eval()

    def encoder(self):
        return load_encoder(self.store, self.device, self.pretrained)

    @property
    def has_captions(self) -> bool:
        return len(self.index.caption_vectors) > 0

    @staticmethod
    def _check(top: int, candidates: int) -> None:
        if top < 1 or candidates < 1:
            raise SearchError(f"top and candidates must be at least 1 (got {top} and {candidates})")

    # --- text -> videos ---------------------------------------------------------------------------------
    def text(self, query: str, top: int = 10, candidates: int = CANDIDATES) -> SearchResult:
        """The `top` videos for a text query; candidates >= the collection is an exhaustive full-head search."""
        if not query or not query.strip():
            raise SearchError('empty query: give the text to search for, e.g. search "a dog catches a frisbee"')
        self._check(top, candidates)
        clock = Clock()
        arrays = encode_text_query(self.encoder(), self.store, query.strip(), self.scorer.max_words)
        return self.text_encoded(arrays, query.strip(), top, candidates, clock)

    @torch.inference_mode()
    def text_encoded(self, arrays: dict, label: str, top: int = 10, candidates: int = CANDIDATES,
                     clock: Clock | None = None) -> SearchResult:
        """As text(), for a query already laid out as TEXT_KEYS tensors of one row (a bench, a test)."""
        self._check(top, candidates)
        clock = clock or Clock()
        text = self.model.encode_text(*(arrays[k].to(self.device) for k in TEXT_KEYS))
        q = text_stage1(self.model, text)[0].cpu().numpy()
        clock.lap("encode query")
        cand = self.index.search_videos(q, candidates)
        clock.lap("stage 1")

        def block(idx: np.ndarray):
            codes = {k: v.to(self.device) for k, v in self.index.codes(idx).items()}
            clock.lap("read codes")
            s, rel = score(self.model, text, codes)
            clock.lap("stage 2: full head")
            return s[0].cpu(), rel[0].cpu()
        hits = [self._video_hit(r, s, v, self.index.second(v, f))
                for r, (s, v, f) in enumerate(rank(block, cand, top), 1)]
        clock.lap("stage 2: full head")
        return SearchResult(label, "videos", self.scorer.name, self.index.describe_videos(),
                            len(self.index.video_vectors), len(cand), hits, clock.timings)

    def _video_hit(self, rank_: int, s: float, v: int, second: float) -> Hit:
        row = self.store.videos[v]
        return Hit(rank_, s, row["video_id"], row["path"], second, row["path"], video=v)

    # --- video -> videos or captions ----------------------------------------------------------------------
    def video(self, path: Path | str, target: str = "videos", top: int = 10, candidates: int = CANDIDATES) -> SearchResult:
        """The `top` videos or captions for a query video, encoded as extraction does.

        Videos: the cosine of the stage-1 vectors (the run's text-independent space; plain CLIP's meanP
        without a run), and each hit's frame closest to the query's mean frame. Captions: stage 1 on the
        captions' vectors, then the full head scores each candidate caption against the query video; the
        best second is then a second of the query video.
        """
        if target not in TARGETS:
            raise SearchError(f"target must be one of {', '.join(TARGETS)}, not '{target}'")
        self._check(top, candidates)
        if target == "captions" and not self.has_captions:
            raise SearchError(f"{self.store.root}: no captions were extracted, so there are none to rank")
        clock = Clock()
        feats, times = encode_video_query(self.encoder(), Path(path))  # (n, Dv), (n,)
        pick = uniform_indices(len(feats), self.scorer.max_frames)
        with torch.inference_mode():
            frames = torch.from_numpy(feats[pick])[None].to(self.device)
            codes = video_codes(self.model, frames, torch.ones(1, len(pick), dtype=torch.bool, device=self.device))
            q = video_stage1(self.model, codes)[0]  # (Dc,)
        clock.lap("encode query")
        if target == "videos":
            hits, cand = self._video_to_videos(q, codes, top, candidates, clock)
        else:
            hits, cand = self._video_to_captions(q, codes, times[pick], str(Path(path).resolve()), top,
                                                 candidates, clock)
        scorer = (f"video-video cosine in the stage-1 space of {self.scorer.name}" if target == "videos"
                  else self.scorer.name)
        index, rows = ((self.index.describe_videos(), len(self.index.video_vectors)) if target == "videos"
                       else (self.index.captions.describe(), len(self.index.caption_vectors)))
        return SearchResult(str(path), target, scorer, index, rows, len(cand), hits, clock.timings)

    @torch.inference_mode()
    def _video_to_videos(self, q: torch.Tensor, codes: dict, top: int, candidates: int, clock: Clock):
        qn = F.normalize(q.cpu(), dim=0)
        cand = self.index.search_videos(qn.numpy(), candidates)
        clock.lap("stage 1")
        mean_frame = F.normalize(codes["frames"][0].sum(0).cpu(), dim=0)  # (D,)

        def block(idx: np.ndarray):
            vectors = F.normalize(torch.from_numpy(self.index.video_vectors[idx]), dim=-1)
            c = self.index.codes(idx)
            mask = torch.arange(c["frames"].shape[1])[None] < c["nframes"][:, None]
            rel = (c["frames"] @ mean_frame).masked_fill(~mask, -torch.inf)  # (B, F)
            return vectors @ qn, rel
        hits = [self._video_hit(r, s, v, self.index.second(v, f)) for r, (s, v, f) in
                enumerate(rank(block, cand, top), 1)]
        clock.lap("stage 2: rescore")
        return hits, cand

    @torch.inference_mode()
    def _video_to_captions(self, q: torch.Tensor, codes: dict, seconds: np.ndarray, path: str, top: int,
                           candidates: int, clock: Clock):
        cand = self.index.captions.search(q.cpu().numpy(), candidates)
        clock.lap("stage 1")

        def block(idx: np.ndarray):
            arrays = self.store.texts(idx, self.scorer.max_words)  # the index lists captions as the store does
            text: TextFeatures = self.model.encode_text(*(torch.from_numpy(arrays[k]).to(self.device)
                                                          for k in TEXT_KEYS))
            s, rel = score(self.model, text, codes)  # (B, 1), (B, 1, F)
            return s[:, 0].cpu(), rel[:, 0].cpu()
        hits = []
        for r, (s, c, f) in enumerate(rank(block, cand, top), 1):
            cap = self.store.captions[c]
            v = self.store.video_index[cap["video_id"]]
            row = self.store.videos[v]
            hits.append(Hit(r, s, row["video_id"], row["path"], float(seconds[f]), path, cap["caption"], video=v))
        clock.lap("stage 2: full head")
        return hits, cand
