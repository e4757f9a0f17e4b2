"""Retrieval metrics from ranks (R@K, MdR, MnR) and ranks from a full score matrix (small sets, tests).

Tie rule: rank = 1 + the number of candidates with a strictly greater score, so a tie counts in the query's
favour. This is what CLIP4Clip's compute_metrics does (the first position of the own score in the sorted row).
"""
import torch
from torch import Tensor


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


def ranks_from_scores(scores: Tensor, text_to_video: Tensor, dsl: bool = False,
                      dsl_temp: float = 100.0) -> tuple[Tensor, Tensor]:
    """t2v and v2t ranks from a full (Nt, Nv) matrix; caption t describes video text_to_video[t].

    t2v: rank of each text's own video among all videos, (Nt,).
    v2t: for each video, the rank of its best-ranked own caption among all captions, (Nv,) (the
    multi-caption protocol; with one caption per video it is the transpose of t2v).
    """
    n_texts, n_videos = scores.shape
    text_to_video = text_to_video.to(scores.device)
    check_text_to_video(text_to_video, n_videos)
    t2v_scores, v2t_scores = dual_softmax(scores, dsl_temp) if dsl else (scores, scores)
    own = t2v_scores.gather(1, text_to_video[:, None])  # (Nt, 1)
    t2v_ranks = 1 + (t2v_scores > own).sum(1)
    own = v2t_scores.gather(1, text_to_video[:, None]).squeeze(1)  # (Nt,)
    best_own = torch.full((n_videos,), -torch.inf, dtype=scores.dtype, device=scores.device)
    best_own = best_own.scatter_reduce(0, text_to_video, own, "amax")  # (Nv,)
    v2t_ranks = 1 + (v2t_scores > best_own[None, :]).sum(0)
    return t2v_ranks.cpu(), v2t_ranks.cpu()
