"""Encode stage: frozen open_clip towers turn frames and texts into features before projection.

`ClipEncoder` is the thin holder of the loaded model (loaded once per worker); the pure
cores are `image_features` and `text_features`. Both return what the towers produce
*before* CLIP's final projections, which are kept separately (`image_proj`, `text_proj`).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Small configs that ship with the project (tests, smoke runs, the offline demo).
_CONFIG_DIR = Path(__file__).parent / "model_configs"
RANDOM_WEIGHTS = "none"


class WeightsError(RuntimeError):
    """Weights that cannot be loaded; raised before any work starts."""


class CacheBlocksError(ValueError):
    """A --cache-blocks request this model cannot serve (too many blocks, a tower layout the cached
    tail cannot reproduce); raised before any work starts."""


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load and where to run it; small and picklable, sent to every worker."""
    model: str = "ViT-B-32"         # open_clip model name
    pretrained: str = "openai"      # open_clip tag, a local checkpoint path, or "none" (random)
    device: str = "cpu"             # a concrete torch device ("cpu", "cuda", "cuda:1")
    precision: str = "auto"         # "auto": fp16 autocast on CUDA, fp32 on CPU; or "fp32"


def resolve_device(device: str) -> str:
    """`auto` picks CUDA when a GPU is visible, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsError(f"--device {device} was asked for, but torch sees no CUDA device")
    return device


def _register_configs() -> None:
    import open_clip
    if "ViT-Tiny-16" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def load_clip(spec: ModelSpec):
    """The open_clip model in eval mode with frozen weights, or a WeightsError that says what to do."""
    import open_clip
    _register_configs()
    if spec.model not in open_clip.list_models():
        raise WeightsError(f"unknown open_clip model '{spec.model}'; see open_clip.list_models()")
    pretrained = None if spec.pretrained.lower() == RANDOM_WEIGHTS else spec.pretrained
    if pretrained and not Path(pretrained).exists() and "/" in pretrained:
        raise WeightsError(f"checkpoint {pretrained} for model {spec.model} does not exist\n"
                           "Remedy: pass --pretrained PATH to an existing checkpoint, an open_clip tag "
                           "(e.g. openai), or --pretrained none for a smoke run with random weights.")
    offline = pretrained is not None and not Path(pretrained).exists() and not _hub_reachable()
    try:
        with warnings.catch_warnings(), _hub_offline(offline), torch.random.fork_rng(devices=[]), _quiet_root():
            warnings.simplefilter("ignore")
            # Random weights are seeded: every worker and every rerun must build the same model.
            torch.manual_seed(0)
            local = pretrained is not None and Path(pretrained).is_file()
            model = open_clip.create_model(spec.model, pretrained=None if local else pretrained, device=spec.device)
            if local:
                # our own call, with weights_only spelled out: a checkpoint holding pickled code is refused
                # here whatever torch's or open_clip's defaults are
                open_clip.load_checkpoint(model, pretrained, weights_only=True, device=spec.device)
    except Exception as e:  # offline, unknown tag, unreadable checkpoint: all end the same way
        raise WeightsError(
            f"could not load weights '{spec.pretrained}' for model {spec.model}"
            f"{' (offline: the Hugging Face hub is unreachable and they are not cached)' if offline else ''}: "
            f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}\n"
            f"Remedy: pass --pretrained PATH to a local checkpoint of {spec.model}, "
            f"or --pretrained none for a smoke run with random weights.") from None
    if pretrained is None:
        log.warning("RANDOM WEIGHTS: %s has no pretrained weights (--pretrained none); "
                    "features are only good for tests and smoke runs", spec.model)
    model.eval().requires_grad_(False)
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look for the network, so an offline machine fails in seconds, not after retries."""
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Cache-only Hugging Face downloads while offline (cached weights still load)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet_root():
    """open_clip logs its own messages on the root logger; ours below say the same more plainly."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _text_tower(model):
    # CLIP keeps the text tower's parts on the model itself; CustomTextCLIP has model.text.
    return model.text if hasattr(model, "text") else model


def split_projections(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Detach CLIP's projections so the towers return pre-projection features."""
    visual = model.visual
    if not isinstance(getattr(visual, "proj", None), torch.Tensor):
        raise WeightsError(f"{type(visual).__name__}: the image tower has no separable projection; "
                           "use an open_clip ViT model")
    text = _text_tower(model)
    if not isinstance(getattr(text, "text_projection", None), torch.Tensor):
        raise WeightsError("the text tower has no separable projection matrix; use an open_clip ViT model")
    image_proj = visual.proj.detach().float().cpu().clone()
    visual.proj = None
    return image_proj, text.text_projection.detach().float().cpu().clone()


@contextlib.contextmanager
def capture_block_input(transformer, cache_blocks: int):
    """Record what enters the last `cache_blocks` residual blocks of an open_clip Transformer.

    A forward pre-hook on block L - K sees exactly the sequence the remaining K blocks get, whatever
    open_clip does before it (embeddings, patch dropout, ln_pre, masks), so the tower's own forward stays
    the one that runs. Yields a list that holds the (B, N, D) input after the forward."""
    blocks = transformer.resblocks
    if not 1 <= cache_blocks <= len(blocks):
        raise CacheBlocksError(f"--cache-blocks {cache_blocks}: the tower has {len(blocks)} blocks "
                               f"(choose 1..{len(blocks)})")
    box: list[torch.Tensor] = []
    batch_first = getattr(transformer, "batch_first", False)  # older open_clip runs blocks on (N, B, D)

    def hook(_module, args):
        box.append(args[0] if batch_first else args[0].transpose(0, 1))

    handle = blocks[len(blocks) - cache_blocks].register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def image_features(visual, pixels: torch.Tensor, cache_blocks: int = 0):
    """(B, 3, S, S) normalised pixels -> (B, Dv) image-tower output before projection; with
    cache_blocks = K also the (B, N, Dv) tokens entering the tower's last K blocks."""
    if not cache_blocks:
        return visual(pixels)
    with capture_block_input(visual.transformer, cache_blocks) as box:
        pooled = visual(pixels)
    return pooled, box[0]


def text_features(model, ids: torch.Tensor, cache_blocks: int = 0):
    """Token ids (B, 77) -> global (B, Dt), tokens (B, L, Dt), lengths (B,), before projection;
    with cache_blocks = K also the (B, L, Dt) tokens entering the tower's last K blocks.

    The tower runs only up to the longest caption's EOT: with a causal mask no token
    attends to anything after it, so the result equals the full 77-token pass (and a
    caption's block input cut at its own EOT is all its later blocks ever see).
    """
    tower = _text_tower(model)
    eot = ids.argmax(dim=-1)                                   # (B,) EOT has the largest id
    length = int(eot.max()) + 1
    ids = ids[:, :length]                                      # (B, L)
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast) + tower.positional_embedding[:length].to(cast)  # (B, L, Dt)
    with (capture_block_input(tower.transformer, cache_blocks) if cache_blocks
          else contextlib.nullcontext([])) as box:
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)                                      # (B, L, Dt)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, Dt)
    if cache_blocks:
        return pooled, x, eot + 1, box[0]
    return pooled, x, eot + 1


class ClipEncoder:
    """The loaded CLIP and its preprocessing constants; one per worker."""

    def __init__(self, spec: ModelSpec):
        import open_clip
        self.spec = spec
        self.device = torch.device(spec.device)
        self.model = load_clip(spec)
        self.image_proj, self.text_proj = split_projections(self.model)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.squash = cfg.get("resize_mode", "shortest") == "squash"
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1) * 255
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.context_length = int(_text_tower(self.model).positional_embedding.shape[0])
        self.use_amp = self.device.type == "cuda" and spec.precision != "fp32"

    @property
    def image_dim(self) -> int:
        return int(self.image_proj.shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.text_proj.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.image_proj.shape[1])

    @property
    def image_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def text_layers(self) -> int:
        return len(_text_tower(self.model).transformer.resblocks)

    @property
    def image_tokens(self) -> int:
        """Tokens per frame in the image tower: patches + CLS (50 for ViT-B/32)."""
        return int(self.model.visual.positional_embedding.shape[0])

    def _autocast(self):
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(frames)
        if self.device.type == "cuda":  # uint8 over the bus is 4x less than float
            x = x.pin_memory().to(self.device, non_blocking=True)
        return (x.permute(0, 3, 1, 2).float() - self.mean) / self.std  # (B, 3, S, S)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB crops -> (B, Dv) float16."""
        x = self._pixels(frames)
        with self._autocast():
            out = image_features(self.model.visual, x)
        return out.float().cpu().numpy().astype(np.float16)

    @torch.inference_mode()
    def encode_frames_cached(self, frames: np.ndarray, cache_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 crops -> (B, Dv) float16 features and the (B, N, Dv) float16 tokens that
        enter the image tower's last cache_blocks blocks (N = patches + CLS: 50 for ViT-B/32)."""
        x = self._pixels(frames)
        with self._autocast():
            out, tokens = image_features(self.model.visual, x, cache_blocks)
        return _half(out), _half(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Texts -> global (B, Dt) float16 and per-text tokens [(L_i, Dt) float16]."""
        ids = self.tokenize(texts).to(self.device)
        with self._autocast():
            pooled, tokens, lengths = text_features(self.model, ids)
        tokens = tokens.float().cpu().numpy().astype(np.float16)
        return pooled.float().cpu().numpy().astype(np.float16), [t[:n] for t, n in zip(tokens, lengths.tolist())]

    @torch.inference_mode()
    def encode_texts_cached(self, texts: list[str], cache_blocks: int):
        """As encode_texts, plus per text the (L_i, Dt) float16 tokens that enter the text tower's last
        cache_blocks blocks, cut at the text's own EOT like its output tokens."""
        ids = self.tokenize(texts).to(self.device)
        with self._autocast():
            pooled, tokens, lengths, block_in = text_features(self.model, ids, cache_blocks)
        n = lengths.tolist()
        tokens, block_in = _half(tokens), _half(block_in)
        return _half(pooled), [t[:k] for t, k in zip(tokens, n)], [b[:k] for b, k in zip(block_in, n)]


def _half(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy().astype(np.float16)


def center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) with short side `size` -> (size, size, 3), as CLIP's CenterCrop."""
    h, w = frame.shape[:2]
    if h < size or w < size:  # ffmpeg's even rounding can leave one pixel short
        pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
        frame = np.pad(frame, pad, mode="edge")
        h, w = frame.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # as torchvision
    return frame[top:top + size, left:left + size]
