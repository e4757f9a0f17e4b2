"""Ablation table on the synthetic set: full model, baselines and each module switched off,
all trained the same way on the same extracted shards.

    python bench/synthetic.py --features data/demo/features          # shards already extracted
    python bench/synthetic.py --videos 600                            # makes and extracts them first

Prints one table (t2v and v2t R@1, R@5, R@10, MdR, MnR) and writes bench/results/synthetic.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads.config import HeadConfig  # noqa: E402
from heads.trainer import TrainConfig  # noqa: E402
from workflows.evaluate import evaluate  # noqa: E402
from workflows.train import RunConfig, train  # noqa: E402

# name -> HeadConfig overrides: the paper's ablation rows and the two CLIP4Clip baselines.
VARIANTS = {
    "full": {},
    "w/o video enhancement": {"video_enhance": False},
    "w/o text enhancement": {"text_enhance": False},
    "w/o interaction": {"interaction": False},
    "w/o temporal": {"temporal": False},
    "fine only": {"coarse": False},
    "coarse only": {"fine": False},
    "seqtransf": {"variant": "seqtransf"},
    "meanp": {"variant": "meanp"},
}


def prepare(args) -> Path:
    if args.features:
        return Path(args.features)
    work = Path(args.work)
    cli = [sys.executable, str(ROOT / "cli.py")]
    subprocess.run([*cli, "make-synthetic", str(work / "videos"), "--videos", str(args.videos), "--seed", "0"],
                   check=True)
    subprocess.run([*cli, "extract", str(work / "videos"), "--out", str(work / "features"), "--model", args.model,
                    "--pretrained", args.pretrained, "--quiet", "--cluster", "none"], check=True)
    return work / "features"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", help="extracted shards of a synthetic set (else made in --work)")
    p.add_argument("--work", default="data/synthetic-bench", help="where to make and extract the set")
    p.add_argument("--videos", type=int, default=600)
    p.add_argument("--model", default="ViT-Tiny-16")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--frozen-proj", action="store_true", help="keep CLIP's projections frozen")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="a subset of the rows")
    args = p.parse_args()

    features = prepare(args)
    runs = Path(args.work) / "runs"
    rows = {}
    for name in args.only or VARIANTS:
        per_seed = []
        for seed in args.seeds:
            head = HeadConfig(**VARIANTS[name], unfreeze_proj=not args.frozen_proj)
            cfg = RunConfig(features=str(features), head=head, batch_size=args.batch_size,
                            train=TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed, device="cpu", log_every=10**9))
            out = runs / f"{name.replace(' ', '_').replace('/', '')}-seed{seed}"
            t0 = time.perf_counter()
            train(cfg, out)
            report = evaluate(features, out, split="test")
            report["train_seconds"] = round(time.perf_counter() - t0, 1)
            per_seed.append(report)
        rows[name] = {side: {k: sum(r[side][k] for r in per_seed) / len(per_seed) for k in per_seed[0][side]}
                      for side in ("t2v", "v2t")}
        rows[name]["train_seconds"] = per_seed[0]["train_seconds"]
        rows[name]["test_videos"] = per_seed[0]["queries"]["v2t"]
        rows[name]["test_captions"] = per_seed[0]["queries"]["t2v"]

    n_videos = next(iter(rows.values()))["test_videos"]
    print(f"\nsynthetic test split: {n_videos} videos, chance R@1 = {100 / n_videos:.1f}%; "
          f"{args.epochs} epochs, seeds {args.seeds}, projections {'frozen' if args.frozen_proj else 'fine-tuned'}")
    header = f"{'variant':24}" + "".join(f"{k:>7}" for k in ("R@1", "R@5", "R@10", "MdR", "MnR")) + " |" + \
        "".join(f"{k:>7}" for k in ("R@1", "R@5", "R@10", "MdR", "MnR"))
    print(f"{'':24}{'text-to-video':^35} |{'video-to-text':^35}")
    print(header)
    for name, r in rows.items():
        cells = [r["t2v"][k] for k in ("R1", "R5", "R10", "MdR", "MnR")] + \
                [r["v2t"][k] for k in ("R1", "R5", "R10", "MdR", "MnR")]
        print(f"{name:24}" + "".join(f"{c:7.1f}" for c in cells[:5]) + " |" + "".join(f"{c:7.1f}" for c in cells[5:]))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "synthetic.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
