"""Scorer: the full head on stored codes, and the one loop that ranks candidates with each hit's best frame.

score() is RetrievalHead.score and RetrievalHead.explain at once, on codes (retrieval/codes.py) instead of
raw frames: the query-independent work (temporal encoder, LSTM, frame weights, S4's keys and values) was
done when the index was built. tests/test_index.py checks it against the head's own functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from heads.model import RetrievalHead, TextFeatures

from .codes import video_features

CHUNK = 256  # candidates per block


@torch.inference_mode()
def score(model: RetrievalHead, text: TextFeatures, codes: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Scores (Nt, Nv) of every text with every coded video, and each pair's frame relevance (Nt, Nv, F)
    (RetrievalHead.score_explained on the codes), -inf on padding so that a padding frame never wins."""
    video = video_features(codes)
    scores, relevance = model.score_explained(text, video)
    return scores, relevance.masked_fill(~video.mask[None], -math.inf)


# (scores (B,), frame relevance (B, F), -inf on padding) of a block of candidate indices
BlockScorer = Callable[[np.ndarray], tuple[Tensor, Tensor]]


def rank(score_block: BlockScorer, candidates: np.ndarray, top: int,
         chunk: int = CHUNK) -> list[tuple[float, int, int]]:
    """The `top` best (score, candidate, best frame) over the candidates, best first; scored `chunk` at a
    time. The one loop behind text-to-video, video-to-text and video-to-video."""
    scores, frames = [], []
    for s in range(0, len(candidates), chunk):
        block, rel = score_block(candidates[s:s + chunk])
        scores.append(block.float())
        frames.append(rel.argmax(-1))
    if not scores:
        return []
    scores, frames = torch.cat(scores), torch.cat(frames)
    # NaN never wins: a broken model's NaN scores go last, as eval ranks them
    order = torch.nan_to_num(scores, nan=-math.inf).topk(min(top, len(scores))).indices
    return [(float(scores[i]), int(candidates[i]), int(frames[i])) for i in order.tolist()]


@dataclass
class Scorer:
    """The head that scores, with its input sizes; `identity` ties a saved index to it."""
    model: RetrievalHead
    max_frames: int  # frames per video the head sees (its training max_frames)
    max_words: int  # word tokens per text
    name: str  # what scores, for people
    identity: dict  # run path, checkpoint name/size/mtime, head config: an index built for another is stale
