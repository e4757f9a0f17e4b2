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
    workers: int = typer.Option(1, min=1, help="Local Dask workers (on CUDA: one per GPU)."),
    shard_size: int = typer.Option(64, min=1, help="Videos per shard (the unit of resume)."),
    decode_threads: int = typer.Option(3, min=1, help="ffmpeg decoders per worker."),
    decode_timeout: float = typer.Option(120.0, min=0.1, help="Kill ffmpeg after this many seconds without a frame."),
    keywords: int = typer.Option(3, "--keywords", min=0, help="Keywords per caption (K); 0 disables keywords."),
    keyword_length: int = typer.Option(1, min=1, help="Words per keyword (L)."),
    keyword_model: str = typer.Option("auto", help="sentence-transformers model for KeyBERT (name or folder)."),
    keyword_lang: str = typer.Option("en", help="Caption language for stop words and lemmas."),
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
    from pipeline.encode import ModelSpec, WeightsError, load_clip, resolve_device
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
        load_clip(ModelSpec(model=model, pretrained=pretrained, device="cpu"))  # fail now, not in a worker
    except WeightsError as e:
        _fail(str(e))
    if pretrained.lower() == "none":
        typer.secho(f"WARNING: random weights for {model} (--pretrained none): features are for "
                    "tests and smoke runs only, not for retrieval.", fg=typer.colors.YELLOW, bold=True, err=True)
    cfg = ExtractConfig(
        videos=str(videos.resolve()), out=str(out.resolve()),
        captions=str(captions.resolve()) if captions else None, clip=spec,
        keywords=KeywordSpec(model=keyword_model, top_k=keywords, max_words=keyword_length, lang=keyword_lang),
        batch_size=batch_size, shard_size=shard_size, decode_threads=decode_threads,
        decode_timeout=decode_timeout, workers=workers, scheduler=scheduler, cluster=cluster,
        cluster_config=str(cluster_config) if cluster_config else None, strict=strict)
    if captions is None:
        typer.echo("no captions file: extracting video features only")
    try:
        summary = run_extract(cfg, overwrite=overwrite, progress=not quiet)
    except ExtractError as e:
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


if __name__ == "__main__":
    app()
