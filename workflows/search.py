"""The `index`, `search` and `serve` jobs: open a collection, its scorer and its saved index (retrieval/).

Two stages, because the full head cannot be an index (S4 pools each video with the query):
  1. the saved index's stage-1 vectors, in the run's own text-independent space (plain CLIP meanP
     without a run), pick `candidates` videos (retrieval/codes.py says how);
  2. the full head scores those candidates from their stored codes and finds each hit's best second.
`index` builds the index once (and updates it when shards are added); `search` builds it when there is
none and refuses a stale one; `serve` keeps one Searcher loaded for every request.
"""
from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from heads.config import HeadConfig
from pipeline.read import FeatureStore
from retrieval import CANDIDATES, SearchError
from retrieval.index import EXACT_BELOW, StaleIndexError, build_index, default_folder, open_index  # noqa: F401
from retrieval.page import format_result, thumbnail, write_html  # noqa: F401 (the job's outputs)
from retrieval.query import encode_text_query, encode_video_query, load_encoder  # noqa: F401
from retrieval.scorer import Scorer
from retrieval.searcher import TARGETS, Hit, Searcher, SearchResult  # noqa: F401

from .evaluate import load_run
from .tuned_features import store_for_run
from .train import build_head

log = logging.getLogger(__name__)

PLAIN_MAX_FRAMES, PLAIN_MAX_WORDS = 12, 32  # plain CLIP: the heads' defaults


def load_scorer(store: FeatureStore, run: Path | None, device: str = "cpu") -> Scorer:
    """The run's head (refusing features of another model), else plain CLIP meanP."""
    if run is None:
        model = build_head(HeadConfig(variant="meanp"), store).to(device).eval()
        return Scorer(model, PLAIN_MAX_FRAMES, PLAIN_MAX_WORDS, "plain CLIP (meanP)",
                      {"run": None, "head": "meanp", "max_frames": PLAIN_MAX_FRAMES, "max_words": PLAIN_MAX_WORDS})
    model, cfg, ckpt = load_run(run, store, device)
    st = Path(ckpt).stat()
    identity = {"run": str(Path(run).resolve()), "checkpoint": {"name": Path(ckpt).name, "size": st.st_size,
                                                                "mtime_ns": st.st_mtime_ns},
                "head": model.cfg.to_dict(), "max_frames": cfg.head.max_frames, "max_words": cfg.max_words}
    return Scorer(model.eval(), cfg.head.max_frames, cfg.max_words, f"{cfg.head.variant} head of {ckpt}", identity)


def index_hint(features: Path | str, run: Path | None, index_dir: Path | None) -> str:
    """The command that builds (or updates) this index."""
    args = ["python", "cli.py", "index", "--features", str(features)]
    args += ["--run", str(run)] if run is not None else []
    args += ["--index", str(index_dir)] if index_dir is not None else []
    return " ".join(shlex.quote(a) for a in args)


def _store(features: Path | str, run: Path | None = None, device: str = "cpu") -> FeatureStore:
    """The features to search: a run that trained CLIP's last blocks (--unfreeze-blocks) is scored on its own,
    recomputed through those blocks once (workflows/tuned_features.py), as eval does."""
    store = FeatureStore(features)
    if run is not None:
        store = store_for_run(run, store, device=device)
    if not store.videos:
        raise SearchError(f"{store.root}: no successfully extracted video to search")
    return store


def make_index(features: Path | str, run: Path | None = None, device: str = "cpu", index_dir: Path | None = None,
               exact_below: int = EXACT_BELOW, progress: bool = True, moments: int | None = None) -> dict:
    """The `index` job: build or update the saved index; returns its report."""
    store = _store(features, run, device)
    scorer = load_scorer(store, run, device)
    folder = Path(index_dir) if index_dir else default_folder(features, run)
    _, report = build_index(folder, store, scorer, device, exact_below, progress, moments)
    store.close()
    return report


def format_index_report(report: dict) -> str:
    lines = [f"index in {report['folder']}: {report['videos']} videos, {report['captions']} captions, "
             f"scored by {report['scorer']}",
             f"encoded {report['encoded_videos']} videos of {len(report['encoded_shards'])} new or changed shard(s), "
             f"reused {report['reused_shards']} shard(s); {report['seconds']:.1f} s, "
             f"{report['bytes'] / 2 ** 20:.1f} MiB on disk",
             f"stage 1: {report['stage1_dim']}-d vectors; videos: {report['stage1_videos']}; "
             f"captions: {report['stage1_captions']}"]
    for kind, params in report["stage1"].items():
        lines.append(f"  {kind} parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return "\n".join(lines)


def open_searcher(features: Path | str, run: Path | None = None, device: str = "cpu", pretrained: str | None = None,
                  index_dir: Path | None = None, build_missing: bool = True) -> Searcher:
    """A Searcher on the saved index. A missing index is built when build_missing (a stale one never is:
    `index` updates it, saying what changed)."""
    store = _store(features, run, device)
    scorer = load_scorer(store, run, device)
    folder = Path(index_dir) if index_dir else default_folder(features, run)
    hint = index_hint(features, run, index_dir)
    try:
        index = open_index(folder, store, scorer, hint)
    except StaleIndexError:
        if not build_missing or (folder / "index.json").exists():
            raise
        print(f"no index in {folder} yet: building it (once; `{hint}` does this ahead)", file=sys.stderr)
        index, _ = build_index(folder, store, scorer, device, progress=False)
    return Searcher(store, scorer, index, device, pretrained)


def search_text(features: Path | str, query: str, run: Path | None = None, top: int = 10,
                candidates: int = CANDIDATES, device: str = "cpu", pretrained: str | None = None,
                index_dir: Path | None = None) -> SearchResult:
    """The `top` videos for a text query: stage-1 candidates, then the full head with the best second."""
    if not query or not query.strip():
        raise SearchError('empty query: give the text to search for, e.g. search "a dog catches a frisbee"')
    start = time.perf_counter()
    searcher = open_searcher(features, run, device, pretrained, index_dir)
    searcher.encoder()
    load = time.perf_counter() - start
    result = searcher.text(query, top, candidates)
    result.timings = {"load": load, **result.timings}
    searcher.store.close()
    return result


def search_video(features: Path | str, video_path: Path | str, run: Path | None = None, target: str = "videos",
                 top: int = 10, candidates: int = CANDIDATES, device: str = "cpu", pretrained: str | None = None,
                 index_dir: Path | None = None) -> SearchResult:
    """The `top` videos or captions of the collection for a query video (see Searcher.video)."""
    if target not in TARGETS:
        raise SearchError(f"--target must be one of {', '.join(TARGETS)}, not '{target}'")
    start = time.perf_counter()
    searcher = open_searcher(features, run, device, pretrained, index_dir)
    searcher.encoder()
    load = time.perf_counter() - start
    result = searcher.video(video_path, target, top, candidates)
    result.timings = {"load": load, **result.timings}
    searcher.store.close()
    return result
