"""Bounded-memory retrieval evaluation: ranks for every text and video without the full Nt x Nv matrix.

S4 makes the video feature depend on the (text, video) pair, so scores cannot be a product of two
embedding tables. Instead videos stream in chunks, each scored against all texts in text chunks, and only
per-query counts are kept. Memory grows with the chunk sizes (the largest block is
text_chunk x video_chunk x words x frames for the fine term) and with the gallery only up to
video_cache_bytes (below); the encoded texts are held for the whole evaluation (as large as the `texts` given).

Passes over video_chunks():
  1. own-pair scores (score_pairs: each text with its own video), cheap;
  (dsl only) the softmax normalisers: for each video the logsumexp over all texts of temp * s, for each
     text the logsumexp over all videos; both need every score, hence a full extra pass;
  2. counts: for each text, other videos scoring strictly higher than its own video; for each video,
     other caption groups (or captions, v2t_protocol="caption") scoring strictly higher than its best own
     caption (see metrics.py for ties and non-finite scores). The group protocol keeps an (Nv, video_chunk)
     buffer of group maxima when some video has several captions; with one caption per video it needs none.
Each pass needs every encoded video; they are encoded once and kept when they fit in video_cache_bytes
(512 MiB by default, ~1,200 videos of the full head at 12 frames x 512), else encoded again per pass.
Videos are laid out for ranking (RetrievalHead.for_ranking) and texts scored in order of length, each
chunk cut to its longest caption (_encode_texts); ranks and top-k come back in the caller's order.
Own pairs are excluded from the counts by index, not by score, so a last-bit difference between
score_pairs and score() can never move a rank.
"""
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from .metrics import (beats, candidate_score, check_protocol, check_text_to_video, dsl_rescale, group_max,
                      last_if_non_finite, metrics_from_ranks, own_score, ranks_from_scores)
from .model import TEXT_KEYS, VIDEO_KEYS, RetrievalHead, TextFeatures, VideoFeatures

VideoChunks = Callable[[], Iterable[tuple[int, dict]]]


@dataclass
class EvalResult:
    t2v_ranks: Tensor  # (Nt,) rank of each text's own video, from 1
    v2t_ranks: Tensor  # (Nv,) rank of each video's best own caption, from 1
    t2v: dict  # metrics_from_ranks(t2v_ranks)
    v2t: dict  # metrics_from_ranks(v2t_ranks)
    top_k_indices: Optional[Tensor] = None  # (Nt, k) best videos per text, best first (if asked)
    top_k_scores: Optional[Tensor] = None  # (Nt, k) their scores (DSL-rescaled with dsl=True)
    v2t_protocol: str = "group"  # metrics.V2T_PROTOCOLS
    non_finite: int = 0  # texts whose score with their own video is NaN or infinite (each ranked last)

    def as_dict(self) -> dict:
        """Flat metrics such as t2v_R1, v2t_MdR (what the trainer's validate() returns)."""
        return {f"{side}_{k}": v for side in ("t2v", "v2t") for k, v in getattr(self, side).items()}


def by_length(texts: dict) -> Tensor:
    """The texts in order of their word count (stable): chunks of this order hold captions of similar length."""
    return torch.sort(texts["token_mask"].sum(1), stable=True).indices  # (Nt,)


def _encode_texts(model: RetrievalHead, texts: dict, text_chunk: int, device,
                  order: Optional[Tensor] = None) -> list[tuple[int, TextFeatures]]:
    """Encoded text chunks; chunk i holds texts order[i * text_chunk:...] (all in their order without `order`).

    Each chunk is cut to its longest caption: the padding words would only be masked out, yet the fine term's
    word x frame cosines cost in proportion to the padded width (MSR-VTT captions fill ~12 of 32 tokens).
    Only columns that no text of the chunk uses are cut, so the cut is exact."""
    n_texts = len(texts["text_global"])
    out = []
    for s in range(0, n_texts, text_chunk):
        rows = slice(s, s + text_chunk) if order is None else order[s:s + text_chunk]
        chunk = {k: texts[k][rows] for k in TEXT_KEYS}
        for seq, mask in (("tokens", "token_mask"), ("keywords", "keyword_mask")):
            used = chunk[mask].any(0).nonzero()  # columns that some text of the chunk uses
            width = int(used.max()) + 1 if len(used) else min(1, chunk[mask].shape[1])
            chunk[seq], chunk[mask] = chunk[seq][:, :width], chunk[mask][:, :width]
        out.append((s, model.encode_text(*(chunk[k].to(device) for k in TEXT_KEYS))))
    return out


def _encode_videos(model: RetrievalHead, video_chunks: VideoChunks, n_videos: int,
                   device) -> Iterator[tuple[int, VideoFeatures]]:
    seen = 0
    for start, batch in video_chunks():
        video = model.for_ranking(model.encode_video(*(batch[k].to(device) for k in VIDEO_KEYS)))
        seen += len(video)
        yield start, video
    if seen != n_videos:
        raise ValueError(f"video_chunks() yielded {seen} videos, expected {n_videos}")


def _nbytes(video: VideoFeatures) -> int:
    return sum(t.numel() * t.element_size() for t in vars(video).values() if t is not None)


class _VideoPasses:
    """The encoded video chunks, once per pass. The first pass keeps them while they fit in cache_bytes, so
    later passes skip the temporal encoder and S2 (at 1k videos about a tenth of rank_all's time on a CPU);
    a gallery too large for the budget is encoded again on each pass, in bounded memory as before."""

    def __init__(self, model, video_chunks: VideoChunks, n_videos: int, device, cache_bytes: int):
        self.encode = lambda: _encode_videos(model, video_chunks, n_videos, device)  # noqa: E731
        self.cache_bytes = cache_bytes
        self.cached: Optional[list[tuple[int, VideoFeatures]]] = None

    def __call__(self) -> Iterator[tuple[int, VideoFeatures]]:
        if self.cached is not None:
            yield from self.cached
            return
        kept: Optional[list] = [] if self.cache_bytes > 0 else None
        size = 0
        for start, video in self.encode():
            if kept is not None:
                size += _nbytes(video)
                if size <= self.cache_bytes:
                    kept.append((start, video))
                else:  # over budget: stop keeping
                    kept = None
            yield start, video
        self.cached = kept


class _Evaluating:
    """inference_mode + eval(), restoring the model's previous mode (the trainer validates mid-run)."""

    def __init__(self, model):
        self.model, self.inference = model, torch.inference_mode()

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc):
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def score_matrix(model: RetrievalHead, texts: dict, video_chunks: VideoChunks, n_videos: int,
                 text_chunk: int = 256, device="cpu") -> Tensor:
    """The full (Nt, Nv) score matrix, on the CPU; for small sets only."""
    with _Evaluating(model):
        order = by_length(texts)
        text_feats = _encode_texts(model, texts, text_chunk, device, order)
        n_texts = len(texts["text_global"])
        scores = torch.empty(n_texts, n_videos)
        for start, video in _encode_videos(model, video_chunks, n_videos, device):
            for ts, text in text_feats:
                scores[order[ts:ts + len(text)], start:start + len(video)] = model.score(text, video).float().cpu()
        return scores


def rank_all(model: RetrievalHead, texts: dict, text_to_video: Tensor, video_chunks: VideoChunks,
             n_videos: int, text_chunk: int = 256, device="cpu", dsl: bool = False, dsl_temp: float = 100.0,
             top_k: int = 0, v2t_protocol: str = "group", video_cache_bytes: int = 512 << 20) -> EvalResult:
    """Ranks of all Nt texts (t2v) and Nv videos (v2t) in bounded memory; see the module docstring.

    texts: the TEXT_KEYS tensors for all Nt queries. text_to_video: (Nt,) own video of each caption.
    video_chunks(): yields (start, {frames, frame_mask}) for videos start..start+len; called once per pass.
    dsl: rank on dual-softmax scores (metrics.dual_softmax) with temperature dsl_temp.
    top_k: also return the best top_k videos (indices, scores) per text.
    v2t_protocol: "group" or "caption" (metrics.V2T_PROTOCOLS); non-finite scores as in metrics.py.
    video_cache_bytes: encoded videos kept between passes when they fit (_VideoPasses); 0 encodes every pass.
    """
    check_protocol(v2t_protocol)
    device = torch.device(device)
    text_to_video = text_to_video.to(device)
    check_text_to_video(text_to_video, n_videos)
    n_texts = len(text_to_video)
    captions_per_video = torch.bincount(text_to_video, minlength=n_videos)  # (Nv,)
    # with one caption per video the group and caption protocols coincide: skip the (Nv, chunk) group buffer
    grouped = v2t_protocol == "group" and bool((captions_per_video > 1).any())
    # texts are scored in order of length (by_length), so each text chunk is cut to its own longest caption;
    # everything below indexes texts in that order, and the per-text results are put back at the end
    order = by_length(texts)
    text_to_video = text_to_video[order.to(device)]
    with _Evaluating(model):
        text_feats = _encode_texts(model, texts, text_chunk, device, order)
        videos = _VideoPasses(model, video_chunks, n_videos, device, video_cache_bytes)

        # pass 1: own-pair scores
        own = torch.empty(n_texts, device=device)
        for start, video in videos():
            for ts, text in text_feats:
                mine = text_to_video[ts:ts + len(text)] - start  # (nt,) own video, relative to this chunk
                sel = ((mine >= 0) & (mine < len(video))).nonzero().flatten()
                if len(sel):
                    own[ts + sel] = model.score_pairs(text.index(sel), video.index(mine[sel])).float()

        # dsl pass: logsumexp of temp * s over texts per video (t2v prior) and over videos per text (v2t prior)
        lse_texts = torch.full((n_videos,), -torch.inf, device=device)
        lse_videos = torch.full((n_texts,), -torch.inf, device=device)
        if dsl:
            for start, video in videos():
                for ts, text in text_feats:
                    s = model.score(text, video).float() * dsl_temp  # (nt, nv)
                    te, ve = ts + len(text), start + len(video)
                    lse_videos[ts:te] = torch.logaddexp(lse_videos[ts:te], s.logsumexp(1))
                    lse_texts[start:ve] = torch.logaddexp(lse_texts[start:ve], s.logsumexp(0))
        own_t2v = dsl_rescale(own, lse_texts[text_to_video], dsl_temp) if dsl else own  # (Nt,)
        own_v2t = dsl_rescale(own, lse_videos, dsl_temp) if dsl else own  # (Nt,)
        best_own = torch.full((n_videos,), -torch.inf, device=device)
        best_own = best_own.scatter_reduce(0, text_to_video, own_score(own_v2t), "amax")  # (Nv,) best own caption

        # pass 2: counts of competitors ranked above the query's own (metrics.beats)
        t2v_count = torch.zeros(n_texts, dtype=torch.long, device=device)
        v2t_count = torch.zeros(n_videos, dtype=torch.long, device=device)
        k = min(top_k, n_videos)
        top_scores = torch.full((n_texts, k), -torch.inf, device=device)
        top_indices = torch.zeros((n_texts, k), dtype=torch.long, device=device)
        for start, video in videos():
            ve = start + len(video)
            video_idx = torch.arange(start, ve, device=device)  # (nv,)
            groups = torch.full((n_videos, len(video)), -torch.inf, device=device) if grouped else None
            for ts, text in text_feats:
                te = ts + len(text)
                s = model.score(text, video).float()  # (nt, nv)
                s_t2v = dsl_rescale(s, lse_texts[None, start:ve], dsl_temp) if dsl else s
                s_v2t = dsl_rescale(s, lse_videos[ts:te, None], dsl_temp) if dsl else s
                is_own = text_to_video[ts:te, None] == video_idx[None, :]  # (nt, nv)
                t2v_count[ts:te] += (beats(s_t2v, own_t2v[ts:te, None]) & ~is_own).sum(1)
                if grouped:  # (Nv groups, nv): the best caption of each group against each video of the chunk
                    groups = torch.maximum(groups, group_max(s_v2t, text_to_video[ts:te], n_videos))
                else:
                    v2t_count[start:ve] += (beats(s_v2t, best_own[None, start:ve]) & ~is_own).sum(0)
                if k:
                    merged = torch.cat([top_scores[ts:te], candidate_score(s_t2v)], 1)  # (nt, k + nv)
                    merged_idx = torch.cat([top_indices[ts:te], video_idx.expand(te - ts, -1)], 1)
                    top_scores[ts:te], pos = merged.topk(k, dim=1)
                    top_indices[ts:te] = merged_idx.gather(1, pos)
            if grouped:
                groups[video_idx, torch.arange(len(video), device=device)] = -torch.inf  # own group
                v2t_count[start:ve] = (groups > best_own[None, start:ve]).sum(0)

    t2v_count = last_if_non_finite(t2v_count, own_t2v, n_videos - 1)
    v2t_competitors = n_videos - 1 if v2t_protocol == "group" else n_texts - captions_per_video
    v2t_count = last_if_non_finite(v2t_count, best_own, v2t_competitors)
    t2v_ranks, v2t_ranks = torch.empty(n_texts, dtype=torch.long), (1 + v2t_count).cpu()
    t2v_ranks[order] = (1 + t2v_count).cpu()  # back to the caller's order of texts
    if k:
        back = torch.argsort(order)  # row i of the sorted order is text order[i]
        top_scores, top_indices = top_scores.cpu()[back], top_indices.cpu()[back]
    return EvalResult(t2v_ranks=t2v_ranks, v2t_ranks=v2t_ranks,
                      t2v=metrics_from_ranks(t2v_ranks), v2t=metrics_from_ranks(v2t_ranks),
                      top_k_indices=top_indices if k else None, top_k_scores=top_scores if k else None,
                      v2t_protocol=v2t_protocol, non_finite=int((~torch.isfinite(own)).sum()))


def rank_small(model: RetrievalHead, texts: dict, text_to_video: Tensor, video_chunks: VideoChunks,
               n_videos: int, dsl: bool = False, dsl_temp: float = 100.0, v2t_protocol: str = "group",
               **kw) -> EvalResult:
    """Reference path for small sets: ranks_from_scores on the full score_matrix."""
    scores = score_matrix(model, texts, video_chunks, n_videos, **kw)
    t2v_ranks, v2t_ranks = ranks_from_scores(scores, text_to_video, dsl=dsl, dsl_temp=dsl_temp,
                                             v2t_protocol=v2t_protocol)
    own = scores[torch.arange(len(scores)), text_to_video]
    return EvalResult(t2v_ranks, v2t_ranks, metrics_from_ranks(t2v_ranks), metrics_from_ranks(v2t_ranks),
                      v2t_protocol=v2t_protocol, non_finite=int((~torch.isfinite(own)).sum()))
