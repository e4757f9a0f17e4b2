"""CLIP's tower tails: the last K residual blocks of each tower and what follows them, rebuilt from the
weights `extract --cache-blocks K` saves, so cached tokens become features without CLIP's other blocks.

image: tokens (B, N, Dv) -> K blocks -> ln_post + pooling (CLS or mean) -> (B, Dv), then @ proj -> (B, D)
text:  tokens (B, L, Dt) -> K causal blocks -> ln_final -> (B, L, Dt); EOT token -> (B, Dt), @ proj -> (B, D)

The pre-projection outputs are what a shard stores (`frames`, `tokens`, `keywords`); the projected ones are
CLIP's embeddings. Torch only: the caller loads the tensors and their description (pipeline/tokens.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint


@dataclass(frozen=True)
class TowerSpec:
    """One tower's tail, as described in the saved metadata."""
    layers: int                # blocks in the whole tower
    first_block: int           # index of the first cached block (layers - K)
    width: int                 # token width
    heads: int                 # attention heads
    activation: str            # "gelu" | "quick_gelu" (OpenAI's weights)
    layer_scale: bool          # blocks carry ls_1/ls_2 gammas
    ln_eps: float              # LayerNorm eps inside the blocks

    @classmethod
    def from_info(cls, info: dict) -> "TowerSpec":
        return cls(**{k: info[k] for k in cls.__dataclass_fields__})

    @property
    def blocks(self) -> int:
        return self.layers - self.first_block


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class ResidualBlock(nn.Module):
    """open_clip's pre-LN ResidualAttentionBlock, with its parameter names, so its state dict loads as is."""

    def __init__(self, spec: TowerSpec, mlp_width: int):
        super().__init__()
        w = spec.width
        self.ln_1 = nn.LayerNorm(w, eps=spec.ln_eps)
        self.attn = nn.MultiheadAttention(w, spec.heads, batch_first=True)
        self.ls_1 = LayerScale(w) if spec.layer_scale else nn.Identity()
        self.ln_2 = nn.LayerNorm(w, eps=spec.ln_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(w, mlp_width))
        self.mlp.add_module("gelu", QuickGELU() if spec.activation == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, w))
        self.ls_2 = LayerScale(w) if spec.layer_scale else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])  # (B, L, W)
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def run_blocks(blocks: nn.ModuleList, x: Tensor, attn_mask: Tensor | None = None, checkpoint: bool = False) -> Tensor:
    """x through the blocks; checkpoint: recompute each trainable block's activations in the backward pass
    instead of keeping them (less memory, about a third more compute), only where a gradient is being taken."""
    for block in blocks:
        if checkpoint and torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
            x = _checkpoint(block, x, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask)
    return x


def _blocks(spec: TowerSpec, tensors: dict[str, Tensor], prefix: str) -> nn.ModuleList:
    blocks = nn.ModuleList()
    for j in range(spec.blocks):
        p = f"{prefix}resblocks.{j}."
        block = ResidualBlock(spec, tensors[p + "mlp.c_fc.weight"].shape[0])
        block.load_state_dict({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)})
        blocks.append(block)
    return blocks


class ImageTail(nn.Module):
    """The image tower after its first layers - K blocks: tokens (B, N, Dv) -> features."""

    def __init__(self, spec: TowerSpec, tensors: dict[str, Tensor], pool_type: str, final_ln_after_pool: bool,
                 ln_post_eps: float):
        super().__init__()
        if pool_type not in ("tok", "avg"):
            raise ValueError(f"image pool_type {pool_type!r} is not supported (tok or avg)")
        self.spec, self.pool_type, self.final_ln_after_pool = spec, pool_type, final_ln_after_pool
        self.checkpoint = False  # activation checkpointing of the trainable blocks (run_blocks)
        self.resblocks = _blocks(spec, tensors, "visual.")
        self.ln_post = nn.LayerNorm(spec.width, eps=ln_post_eps)
        self.ln_post.load_state_dict({"weight": tensors["visual.ln_post.weight"],
                                      "bias": tensors["visual.ln_post.bias"]})
        self.proj = nn.Parameter(tensors["visual.proj"].clone().float())  # (Dv, D)

    def _pool(self, x: Tensor) -> Tensor:
        return x[:, 1:].mean(dim=1) if self.pool_type == "avg" else x[:, 0]  # (B, Dv)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, Dv) block input -> (B, Dv) pooled feature before projection (a shard's `frames` row)."""
        x = run_blocks(self.resblocks, tokens.to(self.proj.dtype), checkpoint=self.checkpoint)  # (B, N, Dv)
        if self.final_ln_after_pool:
            return self.ln_post(self._pool(x))
        return self._pool(self.ln_post(x))

    def encode(self, tokens: Tensor) -> Tensor:
        """(B, N, Dv) -> (B, D) CLIP image embedding."""
        return self(tokens) @ self.proj


class TextTail(nn.Module):
    """The text tower after its first layers - K blocks: tokens (B, L, Dt) SOT..EOT, zero padded -> features.

    Causal, as CLIP's text tower: a token never sees a later one, so the padding after a text's EOT changes
    nothing before it, and the EOT (position length - 1) pools the text."""

    def __init__(self, spec: TowerSpec, tensors: dict[str, Tensor], ln_final_eps: float):
        super().__init__()
        self.spec = spec
        self.checkpoint = False  # activation checkpointing of the trainable blocks (run_blocks)
        self.resblocks = _blocks(spec, tensors, "text.")
        self.ln_final = nn.LayerNorm(spec.width, eps=ln_final_eps)
        self.ln_final.load_state_dict({"weight": tensors["text.ln_final.weight"],
                                       "bias": tensors["text.ln_final.bias"]})
        self.text_projection = nn.Parameter(tensors["text.text_projection"].clone().float())  # (Dt, D)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, Dt) block input, (B,) lengths -> per-token features (B, L, Dt) after ln_final (a shard's
        `tokens` rows; positions past a text's length are padding) and the EOT feature (B, Dt)."""
        x = tokens.to(self.text_projection.dtype)
        n = x.shape[1]
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)  # (L, L)
        x = self.ln_final(run_blocks(self.resblocks, x, causal, self.checkpoint))  # (B, L, Dt)
        eot = lengths.to(x.device).long() - 1
        return x, x[torch.arange(x.shape[0], device=x.device), eot]

    def encode(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, L, Dt), (B,) -> (B, D) CLIP text embedding."""
        return self(tokens, lengths)[1] @ self.text_projection


class ClipTail(nn.Module):
    """Both towers' tails; the keyword encoder is the text tail (the same parameters, as the patent says)."""

    def __init__(self, image: ImageTail, text: TextTail):
        super().__init__()
        self.image, self.text = image, text

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], info: dict) -> "ClipTail":
        """From the tensors and "info" metadata that pipeline/clip_init.py's save_tail writes."""
        v, t = info["visual"], info["text"]
        if t.get("pool", "eot") != "eot":
            raise ValueError(f"text pooling {t.get('pool')!r} is not supported (eot)")
        image = ImageTail(TowerSpec.from_info(v), tensors, v["pool_type"], bool(v["final_ln_after_pool"]),
                          float(v["ln_post_eps"]))
        text = TextTail(TowerSpec.from_info(t), tensors, float(t["ln_final_eps"]))
        return cls(image, text)

    @property
    def blocks(self) -> int:
        return len(self.image.resblocks)

    def set_trainable(self, blocks: int, norms: bool = True, projections: bool = False) -> list[nn.Parameter]:
        """Freeze everything, then let the last `blocks` blocks of each tower train (with the final norms
        when norms, and the projections when projections). Returns the trainable parameters."""
        if not 0 <= blocks <= self.blocks:
            raise ValueError(f"{blocks} trainable blocks asked for, {self.blocks} cached")
        self.requires_grad_(False)
        for tower in (self.image, self.text):
            for block in tower.resblocks[len(tower.resblocks) - blocks:] if blocks else []:
                block.requires_grad_(True)
        if norms and blocks:
            self.image.ln_post.requires_grad_(True)
            self.text.ln_final.requires_grad_(True)
        if projections:
            self.image.proj.requires_grad_(True)
            self.text.text_projection.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]


def pad_sequences(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """[(L_i, D)] -> zero padded (B, max L, D) and lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 0
    out = torch.stack([F.pad(s, (0, 0, 0, width - len(s))) for s in seqs]) if seqs else torch.zeros(0, 0, 0)
    return out, lengths
