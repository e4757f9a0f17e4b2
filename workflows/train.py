"""The `train-heads` job: heads trained on cached shards; config, metrics, curves and
checkpoints in the run folder."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from heads.config import HeadConfig
from heads.evaluate import rank_all
from heads.model import RetrievalHead
from heads.trainer import TrainConfig, fit
from pipeline.atomic import atomic_write_text
from pipeline.read import FeatureStore
from pipeline.schema import CLIP_BLOCKS_FILE

from .data import EvalData, TrainData
from .figures import pyplot, save_figure
from .token_data import TokenIndex, TokenTrainData, build_tuned, open_tokens, tuned_inputs

log = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CURVES_EVERY = 30.0  # seconds between redraws of curves.png during training (always after the last epoch)


@dataclass
class RunConfig:
    """Everything a run needs besides the shards; saved as RUN/config.json."""
    features: str
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    batch_size: int = 128            # captions per step, each video at most once
    max_words: int = 32              # word tokens per caption (SOT..EOT), longer ones are cut
    train_split: str = "train"
    val_split: str = "val"           # best.pt by this split's t2v R@1 when it exists
    eval_chunk: int = 256            # videos (and texts) per scoring block during validation
    unfreeze_blocks: int = 0         # CLIP's last K blocks of each tower train with the head, on the tokens that
    # `extract --cache-blocks K` cached (heads/tuned.py); 0: the head alone on the stored features
    checkpoint_activations: bool = False  # with unfreeze_blocks: recompute the blocks' activations in the backward

    def to_dict(self) -> dict:
        d = {"features": self.features, "head": self.head.to_dict(), "train": asdict(self.train),
             "batch_size": self.batch_size, "max_words": self.max_words, "train_split": self.train_split,
             "val_split": self.val_split, "eval_chunk": self.eval_chunk}
        if self.unfreeze_blocks:
            d.update(unfreeze_blocks=self.unfreeze_blocks, checkpoint_activations=self.checkpoint_activations)
        else:  # a head-only run's config stays what it was before CLIP's blocks could train (ablate compares them)
            d["train"].pop("clip_lr")
        if not self.head.terms_apart():  # one loss, one clip: the option does nothing, so it is not recorded
            d["train"].pop("clip_terms")
        if not (self.head.terms_apart() and self.train.clip_terms):  # no clip per term: nor is term_clip
            d["train"].pop("term_clip")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["head"] = HeadConfig.from_dict(d["head"])
        # a config without clip_terms was written before the option existed, or by a head it does nothing for:
        # those runs clipped the sum of their loss's terms; one with clip_terms but no term_clip clipped each term
        # after the loss's 1 / n weight
        d["train"] = TrainConfig(**{"clip_terms": False, "term_clip": "weighted", **d["train"]})
        return cls(**d)


def build_head(cfg: HeadConfig, store: FeatureStore) -> RetrievalHead:
    """A fresh head on the store's projections; with temporal_init "clip" the temporal encoder starts from
    CLIP's first text blocks (and takes their head count and activation into cfg, which is saved)."""
    blocks = None
    if cfg.temporal and cfg.temporal_init == "clip":
        found = store.clip_blocks()
        if found is None:
            raise ValueError(f"{store.root} has no {CLIP_BLOCKS_FILE} (extracted by an older version): rerun "
                             f"`python cli.py extract VIDEOS --out {store.root}` with the same options (it skips "
                             "every finished shard and writes the file), or pass --temporal-init random")
        blocks, info = found
        if info["width"] != store.info.embed_dim:
            raise ValueError(f"{store.info.model}: CLIP's text blocks are {info['width']} wide but the joint "
                             f"embedding is {store.info.embed_dim}, so they cannot start the temporal encoder; "
                             "pass --temporal-init random")
        cfg.temporal_heads, cfg.temporal_activation = int(info["heads"]), str(info["activation"])
    return RetrievalHead(cfg, torch.from_numpy(store.image_proj), torch.from_numpy(store.text_proj),
                         clip_blocks=blocks)


def draw_curves(history: list[dict], path: Path) -> None:
    """Loss (and each loss term of a full head's parts) and R@1 against epoch, side by side."""
    plt = pyplot()

    epochs = [r["epoch"] + 1 for r in history]
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o", label="loss")
    for key in sorted({k for r in history for k in r if k.startswith("loss_")}):  # a full head's terms
        ax_loss.plot([r["epoch"] + 1 for r in history if key in r], [r[key] for r in history if key in r],
                     marker=".", linestyle="--", label=key[len("loss_"):] + " term")
    if len(ax_loss.lines) > 1:
        ax_loss.legend()
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("t2v_R1", "text-to-video"), ("v2t_R1", "video-to-text")):
        if any(key in r for r in history):
            ax_r1.plot([r["epoch"] + 1 for r in history if key in r], [r[key] for r in history if key in r],
                       marker="o", label=label)
    ax_r1.set(xlabel="epoch", ylabel="R@1 (%)", title="validation R@1")
    if ax_r1.lines:
        ax_r1.legend()
    else:
        ax_r1.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax_r1.transAxes)
    fig.tight_layout()
    save_figure(fig, path)


def _write_metrics(history: list[dict], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def auto_epochs(steps_per_epoch: int, min_steps: int) -> int:
    """At least 10 epochs (MSR-VTT-sized sets) and at least min_steps steps (a few hundred videos
    give a handful of steps per epoch, far too few to learn anything in 10 epochs)."""
    return max(10, math.ceil(min_steps / max(1, steps_per_epoch)))


def train(cfg: RunConfig, out: Path, resume: bool = False, min_steps: int = 1000) -> list[dict]:
    """Train (or continue) a run in `out`; returns the per-epoch history. cfg.train.epochs == 0
    means auto_epochs()."""
    out = Path(out)
    store = FeatureStore(cfg.features)
    train_caps = store.split_captions(cfg.train_split)
    if len(train_caps) < 2:
        raise ValueError(f"{cfg.features}: split '{cfg.train_split}' has {len(train_caps)} usable captions; "
                         f"splits found: {store.splits() or 'none (no captions were extracted)'}")
    if resume:
        saved = out / RUN_CONFIG
        if not (out / "last.pt").exists() or not saved.exists():
            raise ValueError(f"{out}: nothing to resume (no last.pt); run without --resume")
        cfg = RunConfig.from_dict(json.loads(saved.read_text())["run"])
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.train.device)
    tokens = open_tokens(cfg.features, cfg.unfreeze_blocks) if cfg.unfreeze_blocks else None
    val_caps = store.split_captions(cfg.val_split)
    if tokens is None:
        data = TrainData(store, train_caps, cfg.batch_size, cfg.head.max_frames, cfg.max_words, cfg.train.seed,
                         pin_memory=device.type == "cuda")
        validate = _validator(store, val_caps, cfg, device) if val_caps else None
    else:
        index = TokenIndex(store, tokens)
        data = TokenTrainData(index, train_caps, cfg.batch_size, cfg.head.max_frames, cfg.max_words, cfg.train.seed,
                              pin_memory=device.type == "cuda")
        validate = _tuned_validator(index, val_caps, cfg, device) if val_caps else None
    torch.manual_seed(cfg.train.seed)  # the initial weights are part of the run: same seed, same run
    steps = data.steps_per_epoch()
    if cfg.train.epochs <= 0:
        cfg.train.epochs = auto_epochs(steps, min_steps)
        print(f"epochs: {cfg.train.epochs} ({steps} steps per epoch; at least 10 epochs and {min_steps} steps)",
              flush=True)
    model = build_head(cfg.head, store)
    if tokens is not None:
        model = build_tuned(model, tokens, cfg.unfreeze_blocks, cfg.checkpoint_activations)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"run": cfg.to_dict(), "features_model": asdict(store.info), "train_captions": len(train_caps),
            "train_videos": len(set(data.videos.tolist())), "val_captions": len(val_caps),
            "steps_per_epoch": steps, "trainable_parameters": n_params}
    atomic_write_text(out / RUN_CONFIG, json.dumps(info, indent=2))
    log.info("training %s: %s", out, info)

    drawn = [-math.inf]  # when curves.png was last drawn: a figure costs more than a short epoch

    def on_epoch_end(record: dict) -> None:
        history.append(record)
        _write_metrics(history, out / METRICS)
        if record["epoch"] + 1 == cfg.train.epochs or time.perf_counter() - drawn[0] >= CURVES_EVERY:
            draw_curves(history, out / CURVES)
            drawn[0] = time.perf_counter()
        val_text = f"  val t2v R@1 {record['t2v_R1']:.1f}" if "t2v_R1" in record else ""
        print(f"epoch {record['epoch'] + 1}/{cfg.train.epochs}  loss {record['loss']:.4f}{val_text}  "
              f"{record['seconds']:.1f} s  data wait {100 * record['data_wait_share']:.1f}%", flush=True)

    history: list[dict] = []
    if resume:
        history = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["history"]
    fit(model, data, steps, cfg.train, out, validate=validate, on_epoch_end=on_epoch_end,
        resume=resume)
    store.close()
    if tokens is not None:
        tokens.close()
    return history


def _validator(store: FeatureStore, captions: list[int], cfg: RunConfig, device):
    val = EvalData(store, captions, cfg.head.max_frames, cfg.max_words, cfg.eval_chunk)
    val_texts = val.texts()

    def validate(model):
        return rank_all(model, val_texts, val.text_to_video, val.video_chunks(), len(val.videos),
                        text_chunk=cfg.eval_chunk, device=device).as_dict()
    return validate


def _tuned_validator(index: TokenIndex, captions: list[int], cfg: RunConfig, device):
    """Validation of a TunedHead: the split's features through the current blocks, then the head as above."""
    own = index.store.caption_video(captions)

    def validate(model):
        texts, videos, chunks = tuned_inputs(model, index, captions, cfg.head.max_frames, cfg.max_words,
                                             cfg.eval_chunk, device)
        position = {v: i for i, v in enumerate(videos)}
        text_to_video = torch.tensor([position[v] for v in own.tolist()], dtype=torch.long)
        starts = [sum(len(c["frames"]) for c in chunks[:i]) for i in range(len(chunks))]
        return rank_all(model.head, texts, text_to_video, lambda: zip(starts, chunks), len(videos),
                        text_chunk=cfg.eval_chunk, device=device).as_dict()
    return validate
