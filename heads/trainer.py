"""The training loop for a RetrievalHead on cached features: AdamW, warm-up + cosine, checkpoints, resume.

Data order is the caller's: train_batches(epoch) must yield the same batches for the same epoch (derive any
shuffling from seed + epoch), which with the saved optimiser, scheduler and RNG state makes a resumed run end
with exactly the weights of an uninterrupted one (on the CPU; CUDA kernels need not be deterministic).
"""
import itertools
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .config import HeadConfig
from .model import RetrievalHead
from .tuned import HEAD_PREFIX, TAIL_PREFIX, head_state

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 10  # the schedule spans all of them; a resumed run must use the same value (0: the caller decides)
    lr: float = 1e-3  # peak learning rate of the heads (frozen features: 1e-4 learnt 5x slower on the synthetic set)
    temporal_lr: Optional[float] = None  # peak learning rate of the temporal encoder (copied from CLIP's text
    # blocks); None: lr
    clip_lr: float = 1e-6  # peak learning rate of CLIP's own blocks when they train (train-heads --unfreeze-blocks):
    # X-Pool's clip_lr, and CLIP4Clip's ratio (coef_lr 1e-3 x its lr) applied to our head lr 1e-3
    weight_decay: float = 0.2  # AdamW decay on weight matrices only
    warmup: float = 0.1  # fraction of all steps spent in linear warm-up before the cosine decay
    grad_clip: float = 2.0  # max gradient norm of a step (of each term's own gradient with clip_terms). 2: the
    # effective clip every full-head figure in the README was measured with (1 on each term after the loss's 1/2
    # weight, before term_clip existed), now the same for every head, so the parts and baselines train with the
    # full head's clip; it bites on 59-100 % of the steps, and the parts differ between 1 and 2 by less than
    # their seed spread at 1,000 steps, while fine only is better with 2 at 200 (README, "Training the full head")
    clip_terms: bool = True  # with a loss made of terms (the full head's loss_terms "parts" / "each"): clip each
    # term's gradient to grad_clip on its own, then add them, instead of clipping their sum, so that the step each
    # term's parameters take does not depend on the other term's gradient norm. One backward pass per term (a
    # full-head step ~1.3x). The default since it measured above one global clip in 6 of 8 seeds on two held-out
    # sets (README, "Training the full head"); False: one clip of the sum, as before
    term_clip: str = "own"  # with clip_terms, which gradient of a term meets grad_clip: "own", the term's own
    # InfoNCE gradient, before the loss weights it 1 / n (so each term is clipped exactly as the same head part
    # trained alone with the same grad_clip: an equal-recipe comparison); "weighted", after that weight (the
    # behaviour before: an effective clip of n x grad_clip on each term, twice the parts' with two terms; a
    # config saved without this field ran so)
    seed: int = 0  # seeds the global torch RNG (dropout) at the start of a fresh run
    device: str = "cpu"  # where the model and the batches go
    amp: str = "none"  # "none" | "bf16" | "fp16" autocast; ignored off CUDA
    log_every: int = 50  # steps between log lines
    checkpoint_every: float = 30.0  # seconds: last.pt after an epoch only once this long has passed since the
    # last one (and always after the final epoch); small sets run hundreds of sub-second epochs, and a
    # checkpoint with its optimiser state costs more than such an epoch. 0: after every epoch.

    def __post_init__(self):
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"unknown amp mode {self.amp!r}; expected 'none', 'bf16' or 'fp16'")
        if self.term_clip not in ("own", "weighted"):
            raise ValueError(f"term_clip must be 'own' or 'weighted', not {self.term_clip!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, not {self.grad_clip}")


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; last.pt still holds the last finished epoch."""


def param_groups(model: nn.Module, weight_decay: float, temporal_lr: Optional[float] = None,
                 clip_lr: Optional[float] = None) -> list[dict]:
    """Decay weight matrices only; no decay on biases, LayerNorm (and LayerScale) gains, position embeddings or
    tau (as CLIP does). temporal_lr: a learning rate of its own for the temporal encoder; clip_lr: one for CLIP's
    own blocks in a TunedHead (its "tail."); such groups carry "lr". None: the same as the rest."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "position_embedding" in name or "logit_scale" in name
        own = "base"
        if clip_lr is not None and name.startswith(TAIL_PREFIX):
            own = "clip"
        elif temporal_lr is not None and name.removeprefix(HEAD_PREFIX).split(".")[0] in ("temporal", "temporal_coarse"):
            own = "temporal"
        groups.setdefault((own, skip), []).append(p)
    out = []
    for own, lr in (("base", None), ("temporal", temporal_lr), ("clip", clip_lr)):
        for skip in (False, True):
            if (own, skip) in groups or own == "base":  # the two plain groups always exist
                group = {"params": groups.get((own, skip), []), "weight_decay": 0.0 if skip else weight_decay}
                out.append({**group, "lr": lr} if lr is not None and own != "base" else group)
    return out


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1, then cosine to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save(obj: dict, path: Path):
    """Write a temporary of this writer's own, fsync, rename, fsync the folder: a crash never leaves a
    truncated checkpoint behind, and two writers never share a temporary. (pipeline/atomic.py does
    this for every other file; heads/ is a torch-only library and imports nothing of pipeline/.)"""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}{path.suffix}")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(v):
    """Python scalars for anything logged, so checkpoints hold only what weights_only loading accepts."""
    return v.item() if torch.is_tensor(v) and v.numel() == 1 else v


def fit(model: nn.Module, train_batches: Callable[[int], Iterable[dict]], steps_per_epoch: int,
        cfg: TrainConfig, run_dir, validate: Optional[Callable[[RetrievalHead], dict]] = None,
        on_epoch_end: Optional[Callable[[dict], None]] = None, resume: bool = False) -> list[dict]:
    """Train for cfg.epochs; return one dict per epoch (epoch, loss, lr, seconds, data_wait_share, loss_<term> for
    each term of a loss made of terms, grad_norm and clipped (or grad_norm_<term> and clipped_<term> when each
    term is clipped on its own), validate()).

    model: a RetrievalHead, or a module that wraps one as heads/tuned.py's TunedHead does (forward(batch) ->
    (loss, logs), .cfg, clamp_logit_scale_(), and optionally checkpoint_info(): more entries for checkpoints).

    train_batches(epoch): batches of the model's input dict for that epoch, deterministic in epoch; at most
    steps_per_epoch are taken. validate(model) -> metrics dict; best.pt tracks its "t2v_R1" (or "R1").
    last.pt is written after an epoch when cfg.checkpoint_every seconds have passed since the last one, and
    after the final epoch, before on_epoch_end(record) is called; resume=True continues from it.
    data_wait_share: the fraction of the epoch's training time spent waiting for the next batch.
    grad_norm: the mean over the epoch's steps of the gradient norm the clip compares with cfg.grad_clip (before
    clipping); clipped: the share of steps whose norm exceeded it; grad_norm_max: the largest of those norms in the
    epoch (a spike the mean hides), and grad_norm_max_by_module: that step's norm split by the head's module
    ({"temporal": ..., "pool": ...}: where the spike came from). Each with "_<term>" when terms are clipped apart.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.temporal_lr, cfg.clip_lr), lr=cfg.lr)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup * total_steps), total_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)  # bf16 needs no loss scaling
    params = [p for p in model.parameters() if p.requires_grad]
    groups, group_of = _module_groups(model, params)
    group_of = group_of.to(device)

    start_epoch, step, best, history = 0, 0, -math.inf, []
    saved_epochs, last_saved = 0, time.perf_counter()  # epochs in last.pt, and when it was written
    if resume:
        ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, best, history = ckpt["epochs_done"], ckpt["step"], ckpt["best_metric"], ckpt["history"]
        saved_epochs = start_epoch
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        log.info("resumed from %s at epoch %d, step %d", run_dir / "last.pt", start_epoch, step)
    else:
        torch.manual_seed(cfg.seed)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started, waited, loss_sum, n_steps = time.perf_counter(), 0.0, torch.zeros((), device=device), 0
        term_sums: dict[str, torch.Tensor] = {}  # each loss term's sum over the epoch (a full head's parts)
        # the gradient norm the clip sees, per step, summed over the epoch, and how many steps it clipped: one
        # norm ("") for one clip of the whole loss, one per term with clip_terms (device tensors: no sync)
        norm_sums: dict[str, torch.Tensor] = {}
        clipped_sums: dict[str, torch.Tensor] = {}
        norm_max: dict[str, torch.Tensor] = {}  # the epoch's largest pre-clip norm, and that step's norm per module
        norm_max_modules: dict[str, torch.Tensor] = {}
        batches = iter(itertools.islice(train_batches(epoch), steps_per_epoch))
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t0
            if batch is None:
                break
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, logs = model(batch)
            # one host sync per step (microseconds against a step's milliseconds): a NaN must stop the run
            # before the optimiser writes it into the weights, and last.pt must stay the last good epoch
            if not torch.isfinite(loss).item():
                raise NonFiniteLoss(_non_finite_message("loss", loss.item(), epoch, step, run_dir, saved_epochs))
            optimizer.zero_grad(set_to_none=True)
            terms = logs.pop("terms", None)  # the loss's terms, still in the graph (a full head's "parts" / "each")
            names = logs.pop("term_names", ())
            for name, term in zip(names, terms or ()):
                term_sums[name] = term_sums.get(name, 0) + term.detach()
            if cfg.clip_terms and terms:
                param_norms: list[torch.Tensor] = []
                term_norms = _clipped_term_grads(terms, params, cfg.grad_clip,
                                                 scaler.get_scale() if scaler.is_enabled() else 1.0,
                                                 own=cfg.term_clip == "own", param_norms_out=param_norms)
                scaler.unscale_(optimizer)  # fp16: back to true gradients, and the scaler's overflow check
                term_keys = names or [str(i) for i in range(len(terms))]
                seen = dict(zip(term_keys, term_norms))
                by_param = dict(zip(term_keys, param_norms))
                norm = term_norms.max()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                by_param = {"": _param_norms(params)}
                norm = torch.linalg.vector_norm(by_param[""])  # what clip_grad_norm_ computes, not computed twice
                nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
                seen = {"": norm}
            for name, n in seen.items():
                n = n.detach()
                norm_sums[name] = norm_sums.get(name, 0) + n
                clipped_sums[name] = clipped_sums.get(name, 0) + (n > cfg.grad_clip).float()
                modules = torch.zeros(len(groups), device=device).index_add_(
                    0, group_of, by_param[name].detach().float() ** 2).sqrt()
                if name not in norm_max:
                    norm_max[name], norm_max_modules[name] = n, modules
                else:  # on the device, without a sync: keep the step with the larger norm
                    larger = n > norm_max[name]
                    norm_max[name] = torch.where(larger, n, norm_max[name])
                    norm_max_modules[name] = torch.where(larger, modules, norm_max_modules[name])
            # fp16 loss scaling overflows on purpose now and then (the scaler skips that step); anything else
            # non-finite is a fault
            if not scaler.is_enabled() and not torch.isfinite(norm).item():
                raise NonFiniteLoss(_non_finite_message("gradient norm", norm.item(), epoch, step, run_dir,
                                                         saved_epochs))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            model.clamp_logit_scale_()
            step, n_steps, loss_sum = step + 1, n_steps + 1, loss_sum + loss.detach()
            if step % cfg.log_every == 0:  # .item() syncs the device, so only here
                log.info("epoch %d step %d %s lr %.3g", epoch, step,
                         " ".join(f"{k} {_plain(v):.4f}" for k, v in logs.items()), scheduler.get_last_lr()[0])
        seconds = time.perf_counter() - started

        record = {"epoch": epoch, "loss": (loss_sum / max(1, n_steps)).item(), "lr": scheduler.get_last_lr()[0],
                  "seconds": seconds, "data_wait_share": waited / seconds if seconds > 0 else 0.0}
        # which term lags: each term's own InfoNCE, mean over the epoch ("loss" is their mean)
        record.update({f"loss_{name}": (v / max(1, n_steps)).item() for name, v in term_sums.items()})
        # how hard the clip bites: the mean pre-clip norm and the share of steps clipped ("_<term>" per term)
        for name, v in norm_sums.items():
            key = f"_{name}" if name else ""
            record[f"grad_norm{key}"] = (v / max(1, n_steps)).item()
            record[f"clipped{key}"] = (clipped_sums[name] / max(1, n_steps)).item()
            record[f"grad_norm_max{key}"] = norm_max[name].item()
            record[f"grad_norm_max_by_module{key}"] = dict(zip(groups, norm_max_modules[name].tolist()))
        if validate is not None:
            record.update({k: _plain(v) for k, v in validate(model).items()})
        history.append(record)
        metric = record.get("t2v_R1", record.get("R1"))
        is_best = metric is not None and math.isfinite(metric) and metric > best
        best = metric if is_best else best

        # the RNG state is taken after validate(), the last thing before the next epoch in an unbroken run
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epochs_done": epoch + 1, "step": step, "best_metric": best, "history": history,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "head_config": model.cfg.to_dict(), "train_config": asdict(cfg),
                **(model.checkpoint_info() if hasattr(model, "checkpoint_info") else {})}
        if epoch + 1 == cfg.epochs or time.perf_counter() - last_saved >= cfg.checkpoint_every:
            _save(ckpt, run_dir / "last.pt")
            saved_epochs, last_saved = epoch + 1, time.perf_counter()
        if is_best:
            _save(ckpt, run_dir / "best.pt")
        log.debug("epoch %d done: %s", epoch, record)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history


def _module_groups(model: nn.Module, params: list) -> tuple[list[str], torch.Tensor]:
    """The head's modules that own the trainable parameters ("temporal", "pool", "logit_scale", ...; a wrapper's
    "head." prefix dropped), and for each parameter the index of its module."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)].removeprefix("head.").split(".")[0] for p in params]
    groups = list(dict.fromkeys(names))
    return groups, torch.tensor([groups.index(n) for n in names], dtype=torch.long)


def _param_norms(params: list) -> torch.Tensor:
    """Each parameter's gradient norm (0 where it has none)."""
    return torch.stack([torch.linalg.vector_norm(p.grad) if p.grad is not None
                        else torch.zeros((), device=p.device) for p in params])


def _clipped_term_grads(terms, params: list, max_norm: float, loss_scale: float = 1.0,
                        own: bool = True, param_norms_out: Optional[list] = None) -> torch.Tensor:
    """Set each parameter's .grad to the sum over the loss's terms of that term's gradient, each clipped to
    max_norm on its own and weighted 1 / len(terms) (the loss is the terms' mean). own: clip the gradient of the
    term itself, then weight it (a term is clipped as the same part trained alone would be); else weight, then
    clip (an effective clip of len(terms) x max_norm on the term's own gradient). Returns each term's norm
    before clipping, of the gradient the clip compares with max_norm.

    loss_scale: fp16's loss scale; each term is backpropagated scaled, clipped unscaled, and .grad is left
    scaled again, as a plain scaled backward leaves it for GradScaler.unscale_ (an overflow stays inf/NaN).
    param_norms_out: a list to append, per term, each parameter's norm within that clipped gradient (before
    clipping; 0 where the term does not reach the parameter)."""
    grads = [torch.zeros_like(p) for p in params]
    weight = 1.0 / len(terms)
    norms = []
    for i, term in enumerate(terms):
        g = torch.autograd.grad(term * (loss_scale if own else loss_scale * weight), params,
                                retain_graph=i + 1 < len(terms), allow_unused=True)
        used = [(acc, gi / loss_scale) for acc, gi in zip(grads, g) if gi is not None]  # a term may skip params
        each = torch.stack([torch.linalg.vector_norm(gi) for _, gi in used])
        norm = torch.linalg.vector_norm(each)
        if param_norms_out is not None:
            full = torch.zeros(len(params), device=each.device, dtype=each.dtype)
            full[[i for i, gi in enumerate(g) if gi is not None]] = each
            param_norms_out.append(full)
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0) * (weight if own else 1.0)
        for acc, gi in used:
            acc.add_(gi * factor)
        norms.append(norm)
    for p, acc in zip(params, grads):
        p.grad = acc * loss_scale if loss_scale != 1.0 else acc
    return torch.stack(norms)


def _non_finite_message(what: str, value: float, epoch: int, step: int, run_dir: Path, saved_epochs: int) -> str:
    kept = (f"{run_dir / 'last.pt'} holds the weights after epoch {saved_epochs} (the last one saved)"
            if saved_epochs > 0 else "no checkpoint was written before it")
    return (f"training stopped: {what} is {value} at epoch {epoch + 1}, step {step + 1}; {kept}. "
            "Try a lower --lr, a longer warm-up, or --amp none")


def load_head(path, map_location="cpu") -> RetrievalHead:
    """Rebuild a RetrievalHead from a fit() checkpoint (config + weights, projections included). Of a TunedHead's
    checkpoint this is the head alone: its inputs must come through the trained tail (workflows/tuned_features.py)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    state = head_state(ckpt["model"])
    model = RetrievalHead(HeadConfig.from_dict(ckpt["head_config"]), state["proj.image"], state["proj.text"])
    model.load_state_dict(state)
    return model
