"""TunedHead: CLIP's last K blocks (a ClipTail) in front of a RetrievalHead, trained together on cached tokens.

A batch of cached block inputs (workflows/token_data.py builds it) goes through the tail to the features a shard
stores (frames, the words' tokens, the EOT feature, the keywords; all before CLIP's projection), and those go
into the head's forward as if they had been read from the shards. The keywords go through the text tail too:
the keyword encoder shares the text tower's blocks, as the patent says. With the tail's weights untouched the
features equal the stored ones (within fp16), so K = 0 and an untrained K > 0 start from the same point.

Batch keys (B captions, each with its own video; F frames, L text positions, U distinct keywords):
  frame_tokens (n, N, Dv)   block input of each real frame, in (video, frame) order of frame_mask's True cells
  frame_mask (B, F)         True = real frame (a prefix per row)
  text_tokens (B, L, Dt)    block input of each caption, SOT..EOT, zero padded; text_lengths (B,)
  token_index (B, W)        which positions of the caption feed the head's W word tokens (the first words and
                            the EOT, as FeatureStore.texts cuts a long caption); token_mask (B, W)
  keyword_tokens (U, Lk, Dt), keyword_lengths (U,)   each distinct keyword of the batch once
  keyword_index (B, K)      row of keyword_tokens of each of a caption's keywords, -1 = none; keyword_mask (B, K)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .clip_tail import ClipTail
from .model import RetrievalHead

HEAD_PREFIX, TAIL_PREFIX = "head.", "tail."  # parameter names in a TunedHead's state dict (trainer.py reads them)


class TunedHead(nn.Module):
    """A ClipTail whose last `blocks` blocks train, feeding a RetrievalHead.

    Trainable in the tail: the last `blocks` blocks of each tower and the final norms (ln_post, ln_final).
    Frozen: its earlier cached blocks and its projections (the head's own Projections are CLIP's, trained only
    with unfreeze_proj). Everything before the cached blocks (patch and token embeddings, the first blocks) is
    not in the model at all."""

    def __init__(self, tail: ClipTail, head: RetrievalHead, blocks: int, checkpoint: bool = False,
                 tail_info: dict | None = None):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"a TunedHead trains at least one block, not {blocks}")
        self.tail, self.head, self.blocks = tail, head, blocks
        self.tail_info = tail_info or {}  # the saved tail's description, kept in checkpoints
        tail.set_trainable(blocks, norms=True, projections=False)
        tail.image.checkpoint = tail.text.checkpoint = checkpoint

    @property
    def cfg(self):
        return self.head.cfg

    @torch.no_grad()
    def clamp_logit_scale_(self):
        self.head.clamp_logit_scale_()

    def checkpoint_info(self) -> dict:
        """What fit() stores beside the weights so that a checkpoint says how to rebuild the tail."""
        return {"tuned_blocks": self.blocks, "tail_info": self.tail_info}

    # ---- cached tokens -> stored features ----------------------------------------------------------------
    def encode_frames(self, frame_tokens: Tensor, frame_mask: Tensor) -> Tensor:
        """(n, N, Dv) block inputs of the real frames, (B, F) mask -> (B, F, Dv) frame features, 0 on padding."""
        feats = self.tail.image(frame_tokens)  # (n, Dv)
        frames = feats.new_zeros(*frame_mask.shape, feats.shape[-1])  # (B, F, Dv)
        frames[frame_mask] = feats
        return frames

    def encode_captions(self, text_tokens: Tensor, text_lengths: Tensor, token_index: Tensor,
                        token_mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> text_global (B, Dt), the EOT feature, and tokens (B, W, Dt), the positions token_index names."""
        x, eot = self.tail.text(text_tokens, text_lengths)  # (B, L, Dt), (B, Dt)
        picked = x.gather(1, token_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, W, Dt)
        return eot, torch.where(token_mask.unsqueeze(-1), picked, 0)

    def encode_keywords(self, keyword_tokens: Tensor, keyword_lengths: Tensor, keyword_index: Tensor) -> Tensor:
        """-> (B, K, Dt) keyword features (the EOT feature of each keyword), 0 where keyword_index is -1."""
        width = self.tail.text.spec.width
        if len(keyword_tokens) == 0:  # no caption of the batch has a keyword
            return keyword_index.new_zeros(*keyword_index.shape, width, dtype=torch.float32)
        eot = self.tail.text(keyword_tokens, keyword_lengths)[1]  # (U, Dt)
        picked = eot[keyword_index.clamp(min=0)]  # (B, K, Dt)
        return torch.where((keyword_index >= 0).unsqueeze(-1), picked, 0)

    def text_inputs(self, batch: dict) -> dict:
        """The head's TEXT_KEYS inputs computed from a batch's cached caption and keyword tokens."""
        text_global, tokens = self.encode_captions(batch["text_tokens"], batch["text_lengths"],
                                                   batch["token_index"], batch["token_mask"])
        keywords = self.encode_keywords(batch["keyword_tokens"], batch["keyword_lengths"], batch["keyword_index"])
        return {"text_global": text_global, "tokens": tokens, "token_mask": batch["token_mask"],
                "keywords": keywords, "keyword_mask": batch["keyword_index"] >= 0}

    def video_inputs(self, batch: dict) -> dict:
        """The head's VIDEO_KEYS inputs computed from a batch's cached frame tokens."""
        return {"frames": self.encode_frames(batch["frame_tokens"], batch["frame_mask"]),
                "frame_mask": batch["frame_mask"]}

    def features(self, batch: dict) -> dict:
        """The head's input dict (RetrievalHead.forward) computed from a batch of cached tokens."""
        return {**self.video_inputs(batch), **self.text_inputs(batch)}

    def forward(self, batch: dict) -> tuple[Tensor, dict]:
        """The head's symmetric InfoNCE on features computed through the tail."""
        return self.head(self.features(batch))


def head_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The RetrievalHead's part of a TunedHead state dict (a plain head's state dict is returned as it is)."""
    if not any(k.startswith(TAIL_PREFIX) for k in state):
        return state
    return {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}


def tail_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ClipTail's part of a TunedHead state dict (empty for a plain head)."""
    return {k[len(TAIL_PREFIX):]: v for k, v in state.items() if k.startswith(TAIL_PREFIX)}
