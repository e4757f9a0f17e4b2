"""Codes: what the head computes once per video (or caption), without the query, and the stage-1 vectors.

The full head cannot be an index: S4 pools each video with the query. But everything before the query
meets the video can be computed once and stored:
  frames  (V, F, D)    the fine match's per-frame vectors, L2-normalised (h; f when the head has no fine term)
  beta    (V, F)       the fine match's frame weights
  nframes (V,)         real frames (the rest is padding)
  keys    (V, F, H, d) S4's attention keys k(f), per head
  values  (V, F, H, D) S4's values v(f) already through its output projection, per head
  pooled  (V, D)       the normalised pooled video, for a coarse term without S4 (meanP, seqTransf)
Stage 1 ranks by an inner product in the run's own space (never plain CLIP's, unless there is no run):
  video   [w_c * normalise(S4 pooling with uniform attention, or v_bar), w_f * sum_i beta_i h_i]
  text    [normalise(t), sum_n alpha_n normalise(w_e_n)]
The coarse part is what S4 gives a query that attends to every frame alike; the fine part is the
frame- and word-weighted means, a lower bound of DRL's max-based match. w_c, w_f are the head's
fusion weights. For meanP and seqTransf the inner product is the head's score exactly.

Moments: a query that describes one event of a longer video matches a few of its frames, and a vector of
the whole video dilutes them with the rest. So the text stage 1 ranks M vectors per video instead, each
the same construction over one of M contiguous groups of the video's real frames (uniform attention and
beta over that group only), and a video counts by its best moment: a max over its parts, like the
head's own max-based fine match and its text-conditioned pooling. M = 1 is the whole-video vector. Heads
whose inner product is already exact (meanP, seqTransf) keep M = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.model import RetrievalHead, TextFeatures, VideoFeatures

CODE_NAMES = ("frames", "beta", "nframes", "keys", "values", "pooled")


def frame_mask(nframes: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=nframes.device)[None, :] < nframes[:, None]  # (V, F)


def fusion_weights(model: RetrievalHead) -> tuple[float, float]:
    """(w_c, w_f) of the head's own fusion: score = w_c * coarse + w_f * fine."""
    one, zero = torch.ones(()), torch.zeros(())
    if not (model.cfg.coarse and model.cfg.fine):
        return 1.0, 1.0
    return float(model._fuse(one, zero)), float(model._fuse(zero, one))


@torch.inference_mode()
def video_codes(model: RetrievalHead, frames: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The stored codes of a block of videos: frames (V, F, Dv) before projection, mask (V, F)."""
    video = model.encode_video(frames, mask)
    out = {"nframes": mask.sum(1).to(torch.int16),
           "frames": F.normalize(video.h if model.cfg.fine else video.f, dim=-1),
           "beta": video.beta.float()}
    if model.pool is not None:
        out["keys"], out["values"] = video.pool_keys, video.pool_values  # (V, F, H, d), (V, F, H, D)
    elif model.cfg.coarse:
        out["pooled"] = F.normalize(video.v_bar, dim=-1)  # (V, D)
    return out


def video_features(codes: dict[str, Tensor]) -> VideoFeatures:
    """The head's VideoFeatures rebuilt from codes, for its own score / explain: frames stand in for h and f
    (the head normalises them again; normalising twice changes nothing), the pooled vector for v_bar."""
    frames = codes["frames"]
    return VideoFeatures(f0=None, f=frames, v_bar=codes.get("pooled"), h=frames, beta=codes["beta"],
                         mask=frame_mask(codes["nframes"], frames.shape[1]),
                         pool_keys=codes.get("keys"), pool_values=codes.get("values"))


def moments_of(model: RetrievalHead, moments: int) -> int:
    """The moments a head's stage 1 uses: 1 where the inner product is already its score (no S4, no fine)."""
    return max(1, int(moments)) if (model.pool is not None or model.cfg.fine) else 1


def moment_masks(nframes: Tensor, width: int, moments: int) -> Tensor:
    """(V, M, F): the real frames of each of M contiguous groups (a group a short video lacks: all its frames)."""
    f = torch.arange(width, device=nframes.device)[None, :]  # (1, F)
    real = f < nframes[:, None].long()  # (V, F)
    group = (f * moments) // nframes[:, None].long().clamp(min=1)  # (V, F): the group of each frame
    masks = (group[:, None, :] == torch.arange(moments, device=nframes.device)[None, :, None]) & real[:, None, :]
    return torch.where(masks.any(-1, keepdim=True), masks, real[:, None, :])


@torch.inference_mode()
def video_moments(model: RetrievalHead, codes: dict[str, Tensor], moments: int) -> Tensor:
    """(V, M, Dc) stage-1 vectors of each video's M moments, from its codes (M = 1: the whole video)."""
    w_c, w_f = fusion_weights(model)
    masks = moment_masks(codes["nframes"], codes["frames"].shape[1], moments).to(codes["frames"].dtype)
    parts = []
    if model.cfg.coarse:
        if model.pool is not None:
            values = codes["values"]  # (V, F, H, D)
            uniform = masks / masks.sum(-1, keepdim=True)  # (V, M, F): the group's frames alike
            attn = uniform.transpose(0, 1).unsqueeze(2).expand(-1, -1, values.shape[2], -1)  # (M, V, H, F)
            pooled = model.pool.pool(None, None, values, None, attn=attn.to(values.dtype)).transpose(0, 1)
            pooled = F.normalize(pooled, dim=-1)  # (V, M, D)
        else:
            pooled = codes["pooled"][:, None].expand(-1, moments, -1)  # v_bar has no parts
        parts.append(w_c * pooled)
    if model.cfg.fine:
        beta = codes["beta"][:, None, :] * masks  # (V, M, F): the frame weights within each group
        beta = beta / beta.sum(-1, keepdim=True).clamp(min=torch.finfo(beta.dtype).tiny)
        parts.append(w_f * torch.einsum("vmf,vfd->vmd", beta, codes["frames"]))
    return torch.cat(parts, -1).float()


def video_stage1(model: RetrievalHead, codes: dict[str, Tensor]) -> Tensor:
    """(V, Dc) stage-1 vectors of whole videos from their codes (video queries, rescoring)."""
    return video_moments(model, codes, 1)[:, 0]


def text_stage1(model: RetrievalHead, text: TextFeatures) -> Tensor:
    """(Nt, Dc) stage-1 vectors of encoded texts."""
    parts = []
    if model.cfg.coarse:
        parts.append(F.normalize(text.t, dim=-1))
    if model.cfg.fine:
        parts.append(torch.einsum("tn,tnd->td", text.alpha, F.normalize(text.w_e, dim=-1)))
    return torch.cat(parts, 1).float()
