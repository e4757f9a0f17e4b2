"""Retrieval metrics from ranks (R@K, MdR, MnR) and ranks from a full score matrix (small sets, tests).

Tie rule: rank = 1 + the number of candidates with a strictly greater score, so a tie counts in the query's
favour. This is what CLIP4Clip's compute_metrics does (the first position of the own score in the sorted row).

Non-finite scores never count in a query's favour: a query whose own score is NaN or infinite ranks last,
and a candidate scoring NaN or +inf ranks above the query's own candidate. (CLIP4Clip and X-Pool turn NaN
into -inf, which hands a broken model's NaN candidates to the query: a dead model then looks perfect.)

Video-to-text with several captions per video (V2T_PROTOCOLS):
  "group" (default, CLIP4Clip's tensor_video_to_text_sim, X-Pool's v2t_metrics): each video's captions form
      a group scoring max over its captions against each video; a video ranks its own group among the Nv
      groups (an Nv x Nv matrix).
  "caption": a video's best own caption ranked among all captions of all videos (stricter; not comparable
      with published numbers when videos have several captions).
With one caption per video both are the transpose of text-to-video.
"""
import math

import torch
from torch import Tensor

V2T_PROTOCOLS = ("group", "caption")


def own_score(s: Tensor) -> Tensor:
    """A query's own score as compared: non-finite -> -inf (ranks it last, with last_if_non_finite)."""
    return torch.where(torch.isfinite(s), s, -math.inf)


def candidate_score(s: Tensor) -> Tensor:
    """A competing candidate's score as compared: NaN -> +inf, so it beats the query's own."""
    return torch.where(torch.isnan(s), math.inf, s)


def beats(candidate: Tensor, own: Tensor) -> Tensor:
    """True where a competing candidate ranks above the query's own (ties go to the query)."""
    return candidate_score(candidate) > own_score(own)


def last_if_non_finite(counts: Tensor, own: Tensor, competitors) -> Tensor:
    """Candidates ranked above the query; a non-finite own score ranks below all its competitors (an int or a
    per-query tensor: the candidates other than the query's own)."""
    return torch.where(torch.isfinite(own), counts, competitors)


def metrics_from_ranks(ranks: Tensor) -> dict:
    """R1/R5/R10 in percent, median and mean rank (ranks start at 1), and the number of queries n."""
    ranks = ranks.double()
    return {
        "R1": 100 * (ranks <= 1).double().mean().item(),
        "R5": 100 * (ranks <= 5).double().mean().item(),
        "R10": 100 * (ranks <= 10).double().mean().item(),
        "MdR": torch.quantile(ranks, 0.5).item(),  # mid-point of the two middle ranks when n is even, as np.median
        "MnR": ranks.mean().item(),
        "n": len(ranks),
    }


def dsl_rescale(scores: Tensor, log_norm: Tensor, temp: float) -> Tensor:
    """scores * exp(temp * scores - log_norm): a score times its softmax prior, given the softmax's log
    normaliser. Shared by the full-matrix and the streaming evaluators so both compute the same numbers."""
    return scores * torch.exp(scores * temp - log_norm)


def dual_softmax(scores: Tensor, temp: float = 100.0) -> tuple[Tensor, Tensor]:
    """Dual softmax (CAMoE / CLIP4Clip DSL) of a (Nt, Nv) matrix -> (t2v_scores, v2t_scores).

    t2v ranks videos for a text with s[t, v] * softmax_t'(temp * s[t', v]): the prior normalises over the
    text axis (dim 0, each video's column), i.e. how much this video prefers this text over all others.
    v2t is the transpose analogue: s[t, v] * softmax_v'(temp * s[t, v']) normalised over the video axis (dim 1).
    CAMoE's extra constant factor is dropped: it cannot change a rank.
    """
    t2v = dsl_rescale(scores, torch.logsumexp(scores * temp, dim=0, keepdim=True), temp)
    v2t = dsl_rescale(scores, torch.logsumexp(scores * temp, dim=1, keepdim=True), temp)
    return t2v, v2t


def check_text_to_video(text_to_video: Tensor, n_videos: int):
    """Every caption names a video in range and every video has at least one caption (v2t needs one)."""
    if len(text_to_video) and (text_to_video.min() < 0 or text_to_video.max() >= n_videos):
        raise ValueError(f"text_to_video holds video indices outside [0, {n_videos})")
    missing = (torch.bincount(text_to_video.cpu(), minlength=n_videos) == 0).nonzero().flatten()
    if len(missing):
        raise ValueError(f"{len(missing)} videos have no caption (first: {missing[0].item()}); v2t is undefined")


def check_protocol(v2t_protocol: str) -> None:
    if v2t_protocol not in V2T_PROTOCOLS:
        raise ValueError(f"unknown v2t protocol {v2t_protocol!r}; expected one of {V2T_PROTOCOLS}")


def group_max(scores: Tensor, text_to_video: Tensor, n_groups: int) -> Tensor:
    """(n_groups, Nv): for each caption group (video) the max of candidate_score over its captions."""
    out = torch.full((n_groups, scores.shape[1]), -math.inf, dtype=scores.dtype, device=scores.device)
    index = text_to_video[:, None].expand_as(scores)
    return out.scatter_reduce(0, index, candidate_score(scores), "amax")


def ranks_from_scores(scores: Tensor, text_to_video: Tensor, dsl: bool = False, dsl_temp: float = 100.0,
                      v2t_protocol: str = "group") -> tuple[Tensor, Tensor]:
    """t2v and v2t ranks from a full (Nt, Nv) matrix; caption t describes video text_to_video[t].

    t2v: rank of each text's own video among all videos, (Nt,).
    v2t: for each video, the rank of its own caption group among all groups ("group") or of its best own
    caption among all captions ("caption"), (Nv,); see the module docstring.
    """
    check_protocol(v2t_protocol)
    n_texts, n_videos = scores.shape
    text_to_video = text_to_video.to(scores.device)
    check_text_to_video(text_to_video, n_videos)
    t2v_scores, v2t_scores = dual_softmax(scores, dsl_temp) if dsl else (scores, scores)
    rows = torch.arange(n_texts, device=scores.device)
    is_own = torch.zeros_like(scores, dtype=torch.bool)
    is_own[rows, text_to_video] = True
    own = t2v_scores[rows, text_to_video]  # (Nt,)
    t2v_count = (beats(t2v_scores, own[:, None]) & ~is_own).sum(1)
    t2v_ranks = 1 + last_if_non_finite(t2v_count, own, n_videos - 1)
    own = own_score(v2t_scores[rows, text_to_video])  # (Nt,)
    best_own = torch.full((n_videos,), -math.inf, dtype=scores.dtype, device=scores.device)
    best_own = best_own.scatter_reduce(0, text_to_video, own, "amax")  # (Nv,)
    if v2t_protocol == "group":
        groups = group_max(v2t_scores, text_to_video, n_videos)  # (Nv groups, Nv videos)
        groups.fill_diagonal_(-math.inf)  # a video's own group is the query's own candidate
        v2t_count = (groups > best_own[None, :]).sum(0)
        competitors = n_videos - 1
    else:
        v2t_count = (beats(v2t_scores, best_own[None, :]) & ~is_own).sum(0)
        competitors = n_texts - torch.bincount(text_to_video, minlength=n_videos)
    v2t_ranks = 1 + last_if_non_finite(v2t_count, best_own, competitors)
    return t2v_ranks.cpu(), v2t_ranks.cpu()
