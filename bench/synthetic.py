"""Ablation table on the synthetic set with the README's settings: `python cli.py ablate` (the rows
live in workflows/ablate.py), 30 epochs, batch 64, lr 1e-3, projections fine-tuned, in-process.

    python bench/synthetic.py --features data/demo/features --seeds 0 1   # shards already extracted
    python bench/synthetic.py --videos 600                                 # makes and extracts them first

Prints the table, writes it to WORK/ablate/ (table.md, .csv, .png) and bench/results/synthetic.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads.config import HeadConfig  # noqa: E402
from heads.trainer import TrainConfig  # noqa: E402
from workflows.ablate import AblateConfig, ablate, select_rows  # noqa: E402
from workflows.ablate_table import format_table  # noqa: E402
from workflows.train import RunConfig  # noqa: E402


def prepare(args) -> Path:
    if args.features:
        return Path(args.features).resolve()
    work = Path(args.work)
    cli = [sys.executable, str(ROOT / "cli.py")]
    subprocess.run([*cli, "make-synthetic", str(work / "videos"), "--videos", str(args.videos), "--seed", "0"],
                   check=True)
    subprocess.run([*cli, "extract", str(work / "videos"), "--out", str(work / "features"), "--model", args.model,
                    "--pretrained", args.pretrained, "--quiet", "--cluster", "none"], check=True)
    return (work / "features").resolve()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", help="extracted shards of a synthetic set (else made in --work)")
    p.add_argument("--work", default="data/synthetic-bench", help="where to make and extract the set, and the runs")
    p.add_argument("--videos", type=int, default=600)
    p.add_argument("--model", default="ViT-Tiny-16")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--frozen-proj", action="store_true", help="keep CLIP's projections frozen")
    p.add_argument("--only", nargs="+", help="a subset of the rows")
    args = p.parse_args()

    base = RunConfig(features=str(prepare(args)), head=HeadConfig(unfreeze_proj=not args.frozen_proj),
                     train=TrainConfig(lr=args.lr, device="cpu"), batch_size=args.batch_size)
    summary = ablate(AblateConfig(base=base, out=str(Path(args.work).resolve() / "ablate"),
                                  rows=select_rows("all", only=args.only), seeds=args.seeds, epochs=args.epochs))
    print("\n" + format_table(summary))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "synthetic.json").write_text(json.dumps({"args": vars(args), **summary}, indent=2))


if __name__ == "__main__":
    main()
