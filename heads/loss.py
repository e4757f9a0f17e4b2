"""Symmetric InfoNCE over an in-batch similarity matrix (CLIP's loss)."""
import torch
import torch.nn.functional as F
from torch import Tensor


def symmetric_infonce(logits: Tensor) -> Tensor:
    """Mean of text->video and video->text cross-entropy; logits (B, B) with the match of row i at column i."""
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
