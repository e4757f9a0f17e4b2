"""CLIP weights the heads start from: the first blocks of the text transformer and its positional
embedding, which CLIP4Clip copies into its temporal encoder (seqTransf). Saved once per features
folder as safetensors (no pickle), beside config.json; a few MB for ViT-B/32."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import schema as S
from .atomic import atomic_path

BLOCKS = 4  # CLIP4Clip's cross_num_hidden_layers: its seqTransf has 4 layers copied from CLIP


def _activation(block) -> str:
    gelu = block.mlp.gelu
    if type(gelu).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(gelu, torch.nn.GELU) and gelu.approximate == "none":
        return "gelu"
    raise ValueError(f"unsupported activation {type(gelu).__name__} in CLIP's text blocks")


def text_blocks_state(model, n_blocks: int = BLOCKS) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with open_clip names, metadata) of the text tower's first n_blocks blocks."""
    from .encode import _text_tower

    tower = _text_tower(model)
    blocks = tower.transformer.resblocks
    first = blocks[0]
    if not all(isinstance(getattr(b, name, torch.nn.Identity()), torch.nn.Identity)
               for b in blocks for name in ("ls_1", "ls_2")):
        raise ValueError("CLIP's text blocks use layer scale, which the temporal encoder does not have")
    n = min(n_blocks, len(blocks))
    tensors = {"positional_embedding": tower.positional_embedding.detach().float().cpu().clone()}
    for i in range(n):
        for name, value in blocks[i].state_dict().items():
            tensors[f"resblocks.{i}.{name}"] = value.detach().float().cpu().clone().contiguous()
    meta = {"blocks": n, "width": int(tower.positional_embedding.shape[-1]), "heads": int(first.attn.num_heads),
            "activation": _activation(first)}
    return tensors, meta


def save_text_blocks(model, out: Path, attrs: dict) -> Path:
    """Write OUT/clip_text_blocks.safetensors atomically; attrs (model, pretrained) go into its metadata."""
    from safetensors.torch import save_file

    tensors, meta = text_blocks_state(model)
    path = Path(out) / S.CLIP_BLOCKS_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"info": json.dumps({**meta, **attrs})})
    return path


def load_text_blocks(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) saved by save_text_blocks."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["info"])
        return {k: f.get_tensor(k) for k in f.keys()}, info
