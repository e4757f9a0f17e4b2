"""Command line: extract features once, train retrieval heads on them, evaluate, search.

    python cli.py extract videos/ --captions captions.jsonl --out features/
    python cli.py train-heads --features features/ --out runs/full
    python cli.py eval --features features/ --run runs/full
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from retrieval import CANDIDATES, EXACT_BELOW

# Dask's own INFO chatter drowns the progress bar; its warnings and errors still show.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Text-video retrieval on cached CLIP features (LSECA heads).")


@app.callback()
def main() -> None:
    """Text-video retrieval on cached CLIP features (LSECA heads)."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _default_workers(device: str) -> int:
    """One worker per visible GPU when the device is plain `cuda`; one worker otherwise."""
    if device == "cuda":
        import torch
        return max(1, torch.cuda.device_count())
    return 1


@app.command()
def extract(
    videos: Path = typer.Argument(..., help="Folder of videos (searched recursively)."),
    captions: Optional[Path] = typer.Option(None, help="JSONL or CSV with video, caption, split. "
                                            "Default: VIDEOS/captions.jsonl or .csv if present."),
    out: Path = typer.Option(Path("features"), help="Output folder for the shards."),
    model: str = typer.Option("ViT-B-32", help="open_clip model name."),
    pretrained: str = typer.Option("openai", help="open_clip weights tag, a checkpoint PATH, or 'none' (random, smoke runs only)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    batch_size: int = typer.Option(256, min=1, help="Frames (and captions) per model call."),
    workers: Optional[int] = typer.Option(None, min=1, help="Local Dask workers; default: one per GPU on CUDA, else 1."),
    shard_size: int = typer.Option(64, min=1, help="Videos per shard (the unit of resume)."),
    decode_threads: int = typer.Option(3, min=1, help="ffmpeg decoders per worker."),
    decode_timeout: float = typer.Option(120.0, min=0.1, help="Kill ffmpeg after this many seconds without a frame."),
    keywords: int = typer.Option(3, "--keywords", min=0, help="Keywords per caption (K); 0 disables keywords."),
    keyword_length: int = typer.Option(1, min=1, help="Words per keyword (L)."),
    keyword_model: str = typer.Option("auto", help="sentence-transformers model for KeyBERT (name or folder)."),
    keyword_lang: str = typer.Option("en", help="Caption language for stop words and lemmas."),
    cache_blocks: int = typer.Option(0, min=0, help="Also cache the tokens entering each CLIP tower's last K "
                                     "blocks (and those blocks' weights), so the heads can train them; 0: none."),
    cache_frames: int = typer.Option(32, min=1, help="With --cache-blocks: at most this many of a video's 1 FPS "
                                     "frames (uniform) get cached tokens; every frame keeps its feature."),
    scheduler: Optional[str] = typer.Option(None, help="Join a running Dask scheduler (tcp://HOST:PORT)."),
    cluster: str = typer.Option("local", help="local | slurm | none (in-process, no Dask)."),
    cluster_config: Optional[Path] = typer.Option(None, help="JSON/YAML options for --cluster slurm."),
    overwrite: bool = typer.Option(False, help="Delete previous shards in OUT and start afresh."),
    strict: bool = typer.Option(False, help="Exit non-zero when any video or caption failed."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    verbose: bool = typer.Option(False, help="Log more."),
):
    """Decode videos at 1 FPS, encode frames, captions and keywords with frozen CLIP, write shards."""
    _setup_logging(verbose)
    from pipeline.captions import default_captions_file
    from pipeline.config import ExtractConfig
    from pipeline.clip_init import tail_state
    from pipeline.encode import CacheBlocksError, ModelSpec, WeightsError, load_clip, resolve_device
    from pipeline.distributed import ClusterError
    from pipeline.extract import ExtractError, exit_code, extract as run_extract
    from pipeline.keywords import KeywordSpec

    if cluster not in ("local", "slurm", "none"):
        _fail(f"--cluster must be local, slurm or none, not '{cluster}'")
    if not videos.is_dir():
        _fail(f"videos folder {videos} does not exist or is not a folder")
    captions = captions or default_captions_file(videos)
    try:
        dev = resolve_device(device)
        spec = ModelSpec(model=model, pretrained=pretrained, device=dev)
        loaded = load_clip(ModelSpec(model=model, pretrained=pretrained, device="cpu"))  # fail now, not in a worker
        if cache_blocks:
            tail_state(loaded, cache_blocks)  # a tower layout the cached tail cannot reproduce stops here too
    except WeightsError as e:
        _fail(str(e))
    except CacheBlocksError as e:
        _fail(f"{model}: {e}")
    if pretrained.lower() == "none":
        typer.secho(f"WARNING: random weights for {model} (--pretrained none): features are for "
                    "tests and smoke runs only, not for retrieval.", fg=typer.colors.YELLOW, bold=True, err=True)
    cfg = ExtractConfig(
        videos=str(videos.resolve()), out=str(out.resolve()),
        captions=str(captions.resolve()) if captions else None, clip=spec,
        keywords=KeywordSpec(model=keyword_model, top_k=keywords, max_words=keyword_length, lang=keyword_lang),
        batch_size=batch_size, shard_size=shard_size, decode_threads=decode_threads,
        decode_timeout=decode_timeout, workers=workers or _default_workers(dev), scheduler=scheduler, cluster=cluster,
        cluster_config=str(cluster_config) if cluster_config else None, strict=strict,
        cache_blocks=cache_blocks, cache_frames=cache_frames)
    if captions is None:
        typer.echo("no captions file: extracting video features only")
    try:
        summary = run_extract(cfg, overwrite=overwrite, progress=not quiet)
    except (ExtractError, ClusterError) as e:
        _fail(str(e))
    typer.echo(
        f"done: {summary['ok']} videos ok, {summary['failed']} failed, "
        f"{summary['videos_skipped_complete']} skipped (already complete), {summary['captions']} captions, "
        f"{summary['frames']} frames, {summary['seconds']} s"
        + (f", {summary['frames_per_s']} frames/s" if summary["frames_per_s"] else ""))
    if summary["failures"]:
        typer.echo(f"{summary['failures']} problem(s) listed in {out / 'failures.csv'}")
    if summary["shard_errors"]:
        typer.secho(f"{len(summary['shard_errors'])} shard(s) failed; rerun to redo them: "
                    f"{summary['shard_errors'][:3]}", fg=typer.colors.RED, err=True)
    typer.echo(f"shards, manifest and config in {out}")
    raise typer.Exit(exit_code(summary, strict))


def _device(device: str) -> str:
    from pipeline.encode import WeightsError, resolve_device
    try:
        return resolve_device(device)
    except WeightsError as e:
        _fail(str(e))


@app.command("train-heads")
def train_heads(
    features: Path = typer.Option(Path("features"), help="Output folder of `extract`."),
    out: Path = typer.Option(..., help="Run folder (checkpoints, config, metrics.jsonl, curves.png)."),
    variant: str = typer.Option("full", help="full (S2-S5) | meanp | seqtransf (CLIP4Clip baselines)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Default: at least 10 epochs and at least --min-steps optimizer steps."),
    min_steps: int = typer.Option(1000, min=0, help="With the default --epochs: train at least this many steps (small sets)."),
    batch_size: int = typer.Option(128, min=2, help="Captions per step; each video at most once per batch."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate of the heads (warm-up, then cosine)."),
    weight_decay: float = typer.Option(0.2, min=0.0),
    warmup: float = typer.Option(0.1, min=0.0, max=1.0, help="Share of steps in linear warm-up."),
    max_frames: int = typer.Option(12, min=1, help="Frames per video, uniform over the stored 1 FPS frames."),
    max_words: int = typer.Option(32, min=2, help="Word tokens per caption (SOT..EOT)."),
    dropout: float = typer.Option(0.1, min=0.0, max=0.9),
    temporal_layers: int = typer.Option(4, min=1),
    temporal_init: str = typer.Option("clip", help="clip: start the temporal encoder from CLIP's first text "
                                      "blocks and positions (CLIP4Clip) | random."),
    temporal_lr: Optional[float] = typer.Option(None, min=0.0, help="Peak learning rate of the temporal encoder "
                                                "(default: --lr)."),
    fusion: str = typer.Option("sum", help="How S5 joins the terms: sum (fine + coarse, the patent) | mean | "
                               "weighted (a learnt convex mix)."),
    loss_terms: str = typer.Option("parts", help="parts: InfoNCE on the fine and on the coarse score alone, joined "
                                   "only at inference (an ensemble) | fused: on the joined score | each: on all three "
                                   "(deep supervision). --fusion weighted needs fused or each."),
    temporal_grad: str = typer.Option("separate", help="How the fine and coarse terms use the temporal encoder: "
                                      "separate (each its own; the default) | both (one, trained by both terms; "
                                      "the default before) | fine (one; the coarse term reads it through a "
                                      "stop-gradient)."),
    temperature: str = typer.Option("shared", help="With --loss-terms parts: shared (one learnt tau for both "
                                    "terms) | per-term (each term's InfoNCE its own tau)."),
    pool_init: str = typer.Option("identity", help="S4's attention at the start: identity (X-Pool's: CLIP's own "
                                  "text-frame similarity) | uniform (a zero query: S4 starts as mean pooling)."),
    pool_norm: str = typer.Option("input", help="S4's inputs: input (X-Pool's LayerNorm on the text feature and the "
                                  "frames before the attention: its logits then do not grow with the features' "
                                  "norms) | none (as they come; the default before). README \"Training the full "
                                  "head\"."),
    frame_weights: str = typer.Option("patent", help="S2's adaptive frame weights: patent (sigmoid(FC2(SelfAttn("
                                      "FC1(h)))) as written) | residual (FC2(x + SelfAttn(x)), x = FC1(h): the "
                                      "untrained self-attention gives every frame the same output, so the patent's "
                                      "weights start uniform). README \"Training the full head\"."),
    frame_norm: str = typer.Option("none", help="S2's frame weights' input: none (as the patent writes it: their "
                                   "logits grow with the temporal features and saturate) | input (a LayerNorm "
                                   "before FC1, as --pool-norm input for S4). README \"Training the full head\"."),
    clip_terms: Optional[bool] = typer.Option(None, "--clip-terms/--global-clip", help="With a loss of several "
                                              "terms (--loss-terms parts or each): clip each term's gradient to "
                                              "the norm on its own, then add them | clip their sum once. Default: "
                                              "TrainConfig's (README, \"Training the full head\")."),
    grad_clip: Optional[float] = typer.Option(None, help="Largest gradient norm a step may take (each term's own "
                                              "with --clip-terms). Default: TrainConfig's (README, \"Training the "
                                              "full head\")."),
    term_clip: Optional[str] = typer.Option(None, help="With --clip-terms: own (each term's own gradient meets "
                                            "--grad-clip, as the same part trained alone would) | weighted (after "
                                            "the loss's 1/2 weight: an effective clip of twice --grad-clip; the "
                                            "behaviour before). Default: TrainConfig's (own)."),
    checkpoint_every: float = typer.Option(30.0, min=0.0, help="Seconds between last.pt checkpoints (always after "
                                           "the last epoch); 0: after every epoch."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    amp: str = typer.Option("none", help="Mixed precision on CUDA: none (fp32, the default: with bf16, 9 of 33 "
                            "full-head runs on an H200 hit a NaN/inf gradient) | bf16 | fp16; ignored on CPU."),
    unfreeze_proj: bool = typer.Option(False, help="Fine-tune CLIP's image and text projections too."),
    unfreeze_blocks: int = typer.Option(0, min=0, help="Train CLIP's last K blocks of each tower with the head, on "
                                        "the tokens `extract --cache-blocks K` (or more) cached; 0: the head alone."),
    clip_lr: float = typer.Option(1e-6, min=0.0, help="Peak learning rate of CLIP's blocks with --unfreeze-blocks "
                                  "(X-Pool's; CLIP4Clip's 1e-3 x the head's lr)."),
    checkpoint_activations: bool = typer.Option(False, help="With --unfreeze-blocks: recompute the blocks' "
                                                "activations in the backward pass (less GPU memory, more compute)."),
    no_video_enhance: bool = typer.Option(False, help="Ablation: no S2 LSTM / adaptive frame weights."),
    no_text_enhance: bool = typer.Option(False, help="Ablation: no S3 keyword-guided word features."),
    no_interaction: bool = typer.Option(False, help="Ablation: mean-pooled video feature instead of S4."),
    no_temporal: bool = typer.Option(False, help="Ablation: no temporal transformer."),
    fine_only: bool = typer.Option(False, help="Ablation: fine-grained score only."),
    coarse_only: bool = typer.Option(False, help="Ablation: coarse score only."),
    val_split: str = typer.Option("val", help="Split for per-epoch validation and best.pt (skipped if absent)."),
    resume: bool = typer.Option(False, help="Continue the killed run in OUT from its last checkpoint."),
    verbose: bool = typer.Option(False),
):
    """Train the retrieval heads on cached shards (never touches a video)."""
    _setup_logging(verbose)
    logging.getLogger("heads.trainer").setLevel(logging.INFO)  # a line every 50 steps: epochs can be long
    from heads.config import HeadConfig
    from heads.trainer import NonFiniteLoss, TrainConfig
    from pipeline.read import FeaturesError
    from workflows.train import CURVES, METRICS, RunConfig, train

    if fine_only and coarse_only:
        _fail("--fine-only and --coarse-only exclude each other")
    dev = _device(device)
    try:
        head = HeadConfig(variant=variant, temporal=not no_temporal, video_enhance=not no_video_enhance,
                          text_enhance=not no_text_enhance, interaction=not no_interaction,
                          fine=not coarse_only, coarse=not fine_only, max_frames=max_frames,
                          temporal_layers=temporal_layers, temporal_init=temporal_init, dropout=dropout,
                          unfreeze_proj=unfreeze_proj, fusion=fusion, loss_terms=loss_terms,
                          temporal_grad=temporal_grad, pool_init=pool_init, pool_norm=pool_norm,
                          temperature=temperature, frame_weights=frame_weights,
                          frame_norm=frame_norm)
        cfg = RunConfig(features=str(features.resolve()), head=head,
                        train=TrainConfig(epochs=epochs or 0, lr=lr, temporal_lr=temporal_lr,
                                          weight_decay=weight_decay, warmup=warmup, clip_lr=clip_lr,
                                          seed=seed, device=dev, amp=amp, checkpoint_every=checkpoint_every,
                                          **{k: v for k, v in (("clip_terms", clip_terms), ("grad_clip", grad_clip),
                                                               ("term_clip", term_clip)) if v is not None}),
                        batch_size=batch_size, max_words=max_words, val_split=val_split,
                        unfreeze_blocks=unfreeze_blocks, checkpoint_activations=checkpoint_activations)
        train(cfg, out, resume=resume, min_steps=min_steps)
    except (FeaturesError, ValueError) as e:
        _fail(str(e))
    except NonFiniteLoss as e:
        _fail(str(e), code=1)
    typer.echo(f"run in {out}: config.json, {METRICS}, {CURVES}, last.pt"
               + (", best.pt" if (out / "best.pt").exists() else ""))


@app.command("eval")
def eval_(
    features: Path = typer.Option(Path("features"), help="Output folder of `extract`."),
    run: Optional[Path] = typer.Option(None, help="Run folder of train-heads; without it: plain CLIP (meanP)."),
    split: str = typer.Option("test"),
    dsl: bool = typer.Option(False, help="Dual softmax at inference (reported apart from plain numbers)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics JSON here."),
    chunk: int = typer.Option(256, min=1, help="Texts and videos per scoring block (bounds memory)."),
    v2t_protocol: str = typer.Option("group", help="Video-to-text with several captions per video: group "
                                     "(CLIP4Clip / X-Pool: each video's caption group ranked among the groups) "
                                     "| caption (best own caption among all captions; stricter)."),
    device: str = typer.Option("auto"),
):
    """R@1/5/10, MdR, MnR for text-to-video and video-to-text on one split."""
    import json as _json
    from pipeline.read import FeaturesError
    from workflows.evaluate import EvalError, evaluate, format_table

    try:
        report = evaluate(features, run, split=split, dsl=dsl, device=_device(device), chunk=chunk,
                          v2t_protocol=v2t_protocol)
    except (FeaturesError, EvalError, ValueError) as e:
        _fail(str(e))
    typer.echo(format_table(report))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(_json.dumps(report, indent=2))
    if run:
        typer.echo(f"per-query ranks and metrics in {run}")


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="msrvtt | msvd | didemo | activitynet | lsmdc | vatex | generic"),
    annotations: list[Path] = typer.Argument(..., help="Folder with the published annotation files, or the files."),
    out: Path = typer.Option(Path("captions.jsonl"), help="Captions JSONL to write."),
    videos_dir: Optional[Path] = typer.Option(None, help="Keep only captions whose video is in this folder."),
    train_split: str = typer.Option("9k", help="MSR-VTT training list: 9k | 7k."),
):
    """Write the captions file `extract` reads, with the dataset's standard splits."""
    from corpora.adapters import AnnotationError, prepare as run_prepare

    options = {"videos_dir": videos_dir} if videos_dir else {}
    if dataset == "msrvtt":
        options["train_split"] = train_split
    try:
        report = run_prepare(dataset, annotations if len(annotations) > 1 else annotations[0], out, **options)
    except (AnnotationError, ValueError) as e:
        _fail(str(e))
    d = report.to_dict()
    for split, counts in d["splits"].items():
        typer.echo(f"{split:6} {counts['videos']:7} videos {counts['captions']:8} captions")
    for note in d["notes"]:
        typer.echo(f"note: {note}")
    if d["skipped"]:
        typer.echo(f"{len(d['skipped'])} row(s) skipped, listed in {Path(d['path']).with_suffix('.prepare.json')}")
    typer.echo(f"wrote {d['path']}")


@app.command("make-synthetic")
def make_synthetic_cmd(
    out: Path = typer.Argument(..., help="Folder for the videos and captions.jsonl."),
    videos: int = typer.Option(200, min=4, help="Number of videos."),
    seed: int = typer.Option(0),
    partial_captions: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of captions (every split) "
                                           "that name only one event of the clip (aimed at S4 pooling)."),
    wordy_captions: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of captions buried in filler "
                                         "words (aimed at S3 keywords; train with --max-words 77)."),
    distractor_seconds: float = typer.Option(0.0, min=0.0, help="Seconds of unmentioned clutter per clip, "
                                             "between or around the events (aimed at S2 frame weights)."),
):
    """Write a synthetic text-video set (real mp4 files, captions, train/val/test, time-reversed twins)."""
    from corpora.synthetic import SyntheticSettings, make_synthetic

    settings = SyntheticSettings(partial_captions=partial_captions, wordy_captions=wordy_captions,
                                 distractor_s=distractor_seconds)
    info = make_synthetic(out, videos, seed, settings=settings)
    knobs = info["settings"]
    typer.echo(f"wrote {info['n_videos']} videos to {out}: splits {info['splits']}, "
               f"{len(info['twins'])} time-reversed twin pairs; captions in {info['captions_file']}; "
               f"knobs: partial captions {knobs['partial_captions']:g}, wordy captions "
               f"{knobs['wordy_captions']:g}, distractors {knobs['distractor_s']:g} s")


@app.command()
def ablate(
    features: Path = typer.Option(Path("features"), help="Output folder of `extract`."),
    out: Path = typer.Option(Path("runs/ablate"), help="Folder for the runs (OUT/runs/ROW-seedS) and the tables."),
    seeds: int = typer.Option(3, min=1, help="Seeds 0..N-1; every row runs once per seed."),
    steps: Optional[int] = typer.Option(None, min=1, help="Budget: ceil(STEPS / steps per epoch) epochs for "
                                        "every run. Default: train-heads' (>= 10 epochs, >= 1000 steps)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Budget: this many epochs for every run (not with --steps)."),
    preset: str = typer.Option("all", help="Rows: modules (full and each module off) | baselines (full, "
                               "seqtransf, meanp) | all."),
    grid: Optional[Path] = typer.Option(None, help="YAML/JSON mapping row name -> HeadConfig/TrainConfig "
                                        'overrides, e.g. {"lr 1e-4": {"lr": 1e-4}}; adds or replaces rows.'),
    only: Optional[list[str]] = typer.Option(None, help="Run only this row (repeat for several)."),
    split: str = typer.Option("test", help="Split every run is evaluated on."),
    batch_size: int = typer.Option(128, min=2, help="Captions per step, the same for every row."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate, unless a row sets its own."),
    max_frames: int = typer.Option(12, min=1, help="Frames per video, as train-heads."),
    max_words: int = typer.Option(32, min=2, help="Word tokens per caption, as train-heads (77 for wordy captions)."),
    unfreeze_proj: bool = typer.Option(False, help="Fine-tune CLIP's projections in every row."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    amp: str = typer.Option("none", help="Mixed precision on CUDA: none (fp32, the default: with bf16, 9 of 33 "
                            "full-head runs on an H200 hit a NaN/inf gradient) | bf16 | fp16; ignored on CPU."),
    cluster: str = typer.Option("local", help="local | slurm | none (in-process, one run after the other)."),
    cluster_config: Optional[Path] = typer.Option(None, help="JSON/YAML options for --cluster slurm (as extract)."),
    scheduler: Optional[str] = typer.Option(None, help="Join a running Dask scheduler (tcp://HOST:PORT)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Local Dask workers, one run each; default: one "
                                          "per GPU on CUDA, else 1."),
    verbose: bool = typer.Option(False),
):
    """Train and evaluate every row of an ablation table for several seeds; write OUT/table.md, .csv, .png.

    A finished run is skipped on rerun, a killed one resumes, a failed one is a row of the table.
    Exit code 1 only when every run failed."""
    _setup_logging(verbose)
    from heads.config import HeadConfig
    from heads.trainer import TrainConfig
    from pipeline.distributed import ClusterError, ClusterSpec
    from pipeline.read import FeaturesError
    from workflows.ablate import AblateConfig, AblateError, ablate as run_ablate, read_grid, select_rows
    from workflows.ablate_table import format_table
    from workflows.train import RunConfig

    if cluster not in ("local", "slurm", "none"):
        _fail(f"--cluster must be local, slurm or none, not '{cluster}'")
    if steps and epochs:
        _fail("give --steps or --epochs, not both")
    dev = _device(device)
    try:
        rows = select_rows(preset, read_grid(grid) if grid else None, only)
        base = RunConfig(features=str(features.resolve()),
                         head=HeadConfig(unfreeze_proj=unfreeze_proj, max_frames=max_frames),
                         train=TrainConfig(lr=lr, device=dev, amp=amp), batch_size=batch_size, max_words=max_words)
        cfg = AblateConfig(base=base, out=str(out.resolve()), rows=rows, seeds=list(range(seeds)), steps=steps,
                           epochs=epochs, split=split,
                           cluster=ClusterSpec(cluster=cluster, workers=workers or _default_workers(dev),
                                               scheduler=scheduler, device=dev,
                                               cluster_config=str(cluster_config) if cluster_config else None))
        summary = run_ablate(cfg)
    except (AblateError, FeaturesError, ClusterError, ValueError) as e:
        _fail(str(e))
    typer.echo("\n" + format_table(summary))
    typer.echo(f"table.md, table.csv, table.png, runs.csv and ablate.json in {out}")
    if all(r["status"] == "failed" for r in summary["runs"]):
        raise typer.Exit(1)


@app.command()
def search(
    query: Optional[str] = typer.Argument(None, help="The text to search for (or use --video)."),
    features: Path = typer.Option(Path("features"), help="Output folder of `extract`."),
    run: Optional[Path] = typer.Option(None, help="Run folder of train-heads; without it: plain CLIP (meanP)."),
    top: int = typer.Option(10, min=1, help="Hits to show."),
    candidates: int = typer.Option(CANDIDATES, min=1, help="Videos (or captions) stage 1 passes to the full head."),
    video: Optional[Path] = typer.Option(None, help="Search with this video instead of a text."),
    target: str = typer.Option("videos", help="With --video: rank the collection's videos or captions."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a page with a thumbnail of each hit."),
    index: Optional[Path] = typer.Option(None, help="Index folder (default: FEATURES/index/clip or "
                                         "FEATURES/index/run-<hash>, as `index` builds it)."),
    pretrained: Optional[str] = typer.Option(None, help="CLIP weights for the query, if the features' own tag "
                                             "or path has moved (same model and weights!)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    verbose: bool = typer.Option(False),
):
    """Rank the collection against a text (or a video): the saved index, then the full head; best second of each hit.

    Builds the index when there is none; refuses a stale one (run `index` to update it)."""
    _setup_logging(verbose)
    from pipeline.read import FeaturesError
    from pipeline.tokens import TokensError
    from workflows.evaluate import EvalError
    from workflows.search import SearchError, format_result, search_text, search_video, write_html

    if (query is None) == (video is None):
        _fail('give either a text query or --video PATH, e.g. search "a dog catches a frisbee"')
    dev = _device(device)
    try:
        if video is not None:
            result = search_video(features, video, run=run, target=target, top=top, candidates=candidates,
                                  device=dev, pretrained=pretrained, index_dir=index)
        else:
            result = search_text(features, query, run=run, top=top, candidates=candidates, device=dev,
                                 pretrained=pretrained, index_dir=index)
    except (SearchError, FeaturesError, EvalError, TokensError) as e:
        _fail(str(e))
    typer.echo(format_result(result))
    if html:
        typer.echo(f"page with thumbnails in {write_html(result, html)}")


@app.command()
def index(
    features: Path = typer.Option(Path("features"), help="Output folder of `extract`."),
    run: Optional[Path] = typer.Option(None, help="Run folder of train-heads; without it: plain CLIP (meanP)."),
    out: Optional[Path] = typer.Option(None, "--index", help="Index folder (default: FEATURES/index/clip or "
                                       "FEATURES/index/run-<hash>)."),
    exact_below: int = typer.Option(EXACT_BELOW, min=1, help="Stage-1 rows (videos x moments) fewer than this are "
                                    "searched exactly; more go to a FAISS inverted file, IVF-Flat (exact without "
                                    "faiss)."),
    moments: Optional[int] = typer.Option(None, min=1, help="Stage-1 vectors per video, each of a contiguous "
                                          "group of its frames; a video ranks by its best one. Default: the saved "
                                          "index's own, else 4; 1 = one vector of the whole video."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (to encode the videos)"),
    verbose: bool = typer.Option(False),
):
    """Build (or update) the saved search index: the head's query-independent codes of every video and the
    stage-1 index. A rerun encodes only new or changed shards."""
    _setup_logging(verbose)
    from pipeline.read import FeaturesError
    from pipeline.tokens import TokensError
    from workflows.evaluate import EvalError
    from workflows.search import SearchError, format_index_report, make_index

    try:
        report = make_index(features, run, _device(device), out, exact_below, moments=moments)
    except (SearchError, FeaturesError, EvalError, TokensError) as e:
        _fail(str(e))
    typer.echo(format_index_report(report))


@app.command()
def serve(
    features: Path = typer.Option(Path("features"), help="Output folder of `extract`."),
    run: Optional[Path] = typer.Option(None, help="Run folder of train-heads; without it: plain CLIP (meanP)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default serves this machine only."),
    port: int = typer.Option(8000, min=0, max=65535),
    index: Optional[Path] = typer.Option(None, help="Index folder (as `search --index`)."),
    candidates: int = typer.Option(CANDIDATES, min=1, help="Stage-1 candidates per query."),
    pretrained: Optional[str] = typer.Option(None, help="CLIP weights for queries, as `search --pretrained`."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    verbose: bool = typer.Option(False),
):
    """Serve a search page and a JSON API over the collection (needs the [serve] extra: fastapi, uvicorn)."""
    _setup_logging(verbose)
    from pipeline.read import FeaturesError
    from pipeline.tokens import TokensError
    from workflows.evaluate import EvalError
    from workflows.search import SearchError, open_searcher

    try:
        from retrieval.serve import Limits, serve as run_server
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        _fail(f"serve needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'")
    try:
        searcher = open_searcher(features, run, _device(device), pretrained, index, build_missing=False)
        searcher.encoder()  # load CLIP now, not on the first query
    except (SearchError, FeaturesError, EvalError, TokensError) as e:
        _fail(str(e))
    limits = Limits()
    limits.candidates = candidates
    run_server(searcher, host, port, limits)


if __name__ == "__main__":
    app()
