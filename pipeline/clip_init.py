"""CLIP weights the heads start from, saved once per features folder as safetensors (no pickle), beside
config.json:

- the first blocks of the text transformer and its positional embedding, which CLIP4Clip copies into
  its temporal encoder (seqTransf);
- with `extract --cache-blocks K`, the tail of both towers: their last K residual blocks and everything
  after them (image: ln_post, pooling, proj; text: ln_final, EOT pooling, text_projection), which
  heads/clip_tail.py rebuilds to turn the cached tokens into features."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import schema as S
from .atomic import atomic_path

BLOCKS = 4  # CLIP4Clip's cross_num_hidden_layers: its seqTransf has 4 layers copied from CLIP


def _activation(block, where: str = "CLIP's text blocks") -> str:
    gelu = block.mlp.gelu
    if type(gelu).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(gelu, torch.nn.GELU) and gelu.approximate == "none":
        return "gelu"
    raise ValueError(f"unsupported activation {type(gelu).__name__} in {where}")


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


# --- the tail of both towers (extract --cache-blocks K) ------------------------------------------------
# Parameter names inside one block: open_clip's ResidualAttentionBlock, which heads/clip_tail.py mirrors.
_BLOCK_PARAMS = {"ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                 "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"}
_LAYER_SCALE = {"ls_1.gamma", "ls_2.gamma"}


def _blocks_info(transformer, k: int, where: str) -> dict:
    """Check that the last k blocks are plain open_clip pre-LN blocks heads/clip_tail.py can rebuild; describe them."""
    from .encode import CacheBlocksError

    blocks = transformer.resblocks
    if not 1 <= k <= len(blocks):
        raise CacheBlocksError(f"--cache-blocks {k}: the {where} has {len(blocks)} blocks (choose 1..{len(blocks)})")
    tail = list(blocks)[len(blocks) - k:]
    first = tail[0]
    for b in tail:
        names = set(b.state_dict())
        extra = names - _BLOCK_PARAMS - _LAYER_SCALE
        if type(b).__name__ != "ResidualAttentionBlock" or extra or not _BLOCK_PARAMS <= names:
            raise CacheBlocksError(f"--cache-blocks: the {where} uses {type(b).__name__} blocks "
                                   f"(parameters {sorted(extra) or 'missing'}), which the cached tail does not "
                                   "reproduce; use a plain open_clip ViT (e.g. ViT-B-32)")
    norms = {m.eps for b in tail for m in (b.ln_1, b.ln_2)}
    if len(norms) != 1:
        raise CacheBlocksError(f"--cache-blocks: the {where}'s blocks mix LayerNorm eps {sorted(norms)}")
    try:
        activation = _activation(first, f"the {where}'s blocks")
    except ValueError as e:
        raise CacheBlocksError(f"--cache-blocks: {e}") from None
    return {"layers": len(blocks), "first_block": len(blocks) - k, "width": int(first.ln_1.weight.shape[0]),
            "heads": int(first.attn.num_heads), "activation": activation, "layer_scale": "ls_1.gamma" in first.state_dict(),
            "ln_eps": float(norms.pop())}


def _copy(module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}": value.detach().float().cpu().clone().contiguous()
            for name, value in module.state_dict().items()}


def image_tail_state(visual, k: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The image tower's last k blocks, ln_post and proj (tensors named "visual.*"), and how it pools.

    Refused: attentional pooling (CoCa), pool_type "none", a tower without a separable projection. Patch
    dropout acts only in training mode (extraction runs in eval mode), so the cached tokens are whole."""
    from .encode import CacheBlocksError

    name = type(visual).__name__
    if name != "VisionTransformer" or not hasattr(visual, "transformer"):
        raise CacheBlocksError(f"--cache-blocks: the image tower is {name}; only open_clip's VisionTransformer "
                               "is supported")
    if getattr(visual, "attn_pool", None) is not None:
        raise CacheBlocksError("--cache-blocks: the image tower pools with attention (attn_pool, CoCa), which "
                               "the cached tail does not reproduce")
    pool = getattr(visual, "pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise CacheBlocksError(f"--cache-blocks: image pool_type '{pool}' is not supported (tok or avg)")
    if not isinstance(getattr(visual, "proj", None), torch.Tensor):
        raise CacheBlocksError("--cache-blocks: the image tower has no projection matrix (visual.proj)")
    info = _blocks_info(visual.transformer, k, "image tower")
    info.update(pool_type=pool, final_ln_after_pool=bool(getattr(visual, "final_ln_after_pool", False)),
                tokens=int(visual.positional_embedding.shape[0]), ln_post_eps=float(visual.ln_post.eps),
                output_dim=int(visual.proj.shape[1]))
    tensors = {}
    for j, block in enumerate(list(visual.transformer.resblocks)[info["first_block"]:]):
        tensors.update(_copy(block, f"visual.resblocks.{j}."))
    tensors.update(_copy(visual.ln_post, "visual.ln_post."))
    tensors["visual.proj"] = visual.proj.detach().float().cpu().clone().contiguous()
    return tensors, info


def text_tail_state(model, k: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The text tower's last k blocks, ln_final and text_projection (tensors named "text.*").

    Refused: a pooling other than the EOT (argmax) token, a class token appended to the text (CoCa), a
    tower without a causal mask (the cache cuts each text at its EOT, which is exact only when no token
    sees a later one), a projection that is not a plain matrix."""
    from .encode import CacheBlocksError, _text_tower

    tower = _text_tower(model)
    pool = getattr(model, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool != "argmax":
        raise CacheBlocksError(f"--cache-blocks: text pool_type '{pool}' is not supported (argmax: the EOT token)")
    if getattr(tower, "cls_emb", None) is not None:
        raise CacheBlocksError("--cache-blocks: the text tower appends a class token (CoCa); not supported")
    mask = getattr(tower, "attn_mask", None)
    if mask is None or not torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)):
        raise CacheBlocksError("--cache-blocks: the text tower is not causal; cutting texts at their EOT "
                               "would change their features")
    if not isinstance(getattr(tower, "text_projection", None), torch.Tensor):
        raise CacheBlocksError("--cache-blocks: the text projection is not a plain matrix")
    info = _blocks_info(tower.transformer, k, "text tower")
    info.update(pool="eot", context_length=int(tower.positional_embedding.shape[0]),
                ln_final_eps=float(tower.ln_final.eps), output_dim=int(tower.text_projection.shape[1]))
    tensors = {}
    for j, block in enumerate(list(tower.transformer.resblocks)[info["first_block"]:]):
        tensors.update(_copy(block, f"text.resblocks.{j}."))
    tensors.update(_copy(tower.ln_final, "text.ln_final."))
    tensors["text.text_projection"] = tower.text_projection.detach().float().cpu().clone().contiguous()
    return tensors, info


def tail_state(model, k: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of both towers' tails; a CacheBlocksError names what this model cannot do.
    The model must still hold its projections (a fresh load_clip, not a ClipEncoder's)."""
    image, image_info = image_tail_state(model.visual, k)
    text, text_info = text_tail_state(model, k)
    return {**image, **text}, {"cache_blocks": k, "visual": image_info, "text": text_info}


def save_tail(model, k: int, out: Path, attrs: dict) -> Path:
    """Write OUT/clip_tail.safetensors atomically; attrs (model, pretrained) go into its metadata."""
    from safetensors.torch import save_file

    tensors, info = tail_state(model, k)
    path = Path(out) / S.CLIP_TAIL_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"info": json.dumps({**info, **attrs})})
    return path


def tail_file_info(path: Path) -> dict | None:
    """The metadata of a saved tail, or None when the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["info"])
    except Exception:  # missing, truncated, foreign: the caller writes it again
        return None
