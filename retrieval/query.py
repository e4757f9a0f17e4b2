"""Query encoders: a text or a video turned into the features a shard would hold for it (same CLIP, same layout)."""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.decode import DecodeError, DecodeResult, decode_frames
from pipeline.encode import ClipEncoder, ModelSpec, WeightsError, center_crop
from pipeline.read import FeatureStore

from . import SearchError

FRAME_BATCH = 256
_lock = threading.Lock()  # models are loaded once per process, even when two first queries arrive together


@lru_cache(maxsize=2)
def _load_encoder(spec: ModelSpec) -> ClipEncoder:
    return ClipEncoder(spec)


@lru_cache(maxsize=2)
def _load_keywords(spec):
    from pipeline.keywords import KeywordExtractor
    return KeywordExtractor(spec)


def load_encoder(store: FeatureStore, device: str, pretrained: str | None = None) -> ClipEncoder:
    """The CLIP the features were made with: a query in another embedding space would rank noise."""
    spec = ModelSpec(store.info.model, pretrained or store.info.pretrained, device)
    try:
        with _lock:
            enc = _load_encoder(spec)
    except WeightsError as e:
        raise SearchError(f"cannot load the CLIP that made {store.root} ({store.info.model}, "
                          f"{store.info.pretrained}): {e}") from None
    if (enc.image_dim, enc.text_dim) != (store.info.image_dim, store.info.text_dim):
        raise SearchError(f"{spec.model} ({spec.pretrained}) gives widths image {enc.image_dim}, text {enc.text_dim}; "
                          f"{store.root} holds image {store.info.image_dim}, text {store.info.text_dim}")
    return enc


def query_keywords(store: FeatureStore, text: str) -> list[str]:
    """The query's keywords, as extraction found them for captions (none if it stored none)."""
    kw = store.config().get("config", {}).get("keywords", {})
    if not kw.get("top_k"):
        return []
    from pipeline.keywords import KeywordSpec
    spec = KeywordSpec(model=kw.get("model", "auto"), top_k=kw["top_k"], max_words=kw.get("max_words", 1),
                       lang=kw.get("lang", "en"))
    with _lock:
        extractor = _load_keywords(spec)
    return extractor([text])[0]


def encode_text_query(enc: ClipEncoder, store: FeatureStore, text: str, max_words: int) -> dict:
    """The TEXT_KEYS tensors of one query, laid out as FeatureStore.texts lays out a caption."""
    pooled, (tokens,) = enc.encode_texts([text])
    keep = min(len(tokens), max_words)
    # long queries keep their first words and their EOT, as captions do
    tokens = np.concatenate([tokens[:keep - 1], tokens[-1:]]) if keep < len(tokens) else tokens  # (N, Dt)
    words = query_keywords(store, text)
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
    if not crops:
        raise SearchError(f"query video: {path}: no frame could be decoded")
    feats = np.concatenate([enc.encode_frames(np.stack(crops[i:i + FRAME_BATCH]))
                            for i in range(0, len(crops), FRAME_BATCH)])
    return feats.astype(np.float32), np.asarray(result.times, np.float32)
