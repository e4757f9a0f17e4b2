"""Each term of trained full heads scored on its own: test t2v R@1 of the coarse (S4) term alone, of the fine
term alone, of their sum (what the head ranks by), and of w x coarse + (1 - w) x fine with w the best of
0, 0.05, ..., 1 on the VAL split (applied to test). The README's per-term figures of "Training the full head".

    python bench/terms.py FEATURES "RUNS_GLOB"     e.g. bench/terms.py f7 "runs/grid/f7-full*"
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heads.model import TEXT_KEYS, VIDEO_KEYS  # noqa: E402
from pipeline.read import FeatureStore  # noqa: E402
from workflows.data import EvalData  # noqa: E402
from workflows.evaluate import load_run  # noqa: E402


@torch.no_grad()
def terms(model, store: FeatureStore, split: str, frames: int, words: int):
    """(coarse, fine) score matrices (texts x videos) of one split, and each text's video index."""
    data = EvalData(store, store.split_captions(split), frames, words)
    texts = data.texts()
    model.eval()
    text = model.encode_text(*(texts[k] for k in TEXT_KEYS))
    coarse, fine = [], []
    for _, batch in data.video_chunks()():
        c, f = model._terms(text, model.encode_video(*(batch[k] for k in VIDEO_KEYS)), False)
        coarse.append(c)
        fine.append(f)
    return torch.cat(coarse, 1), torch.cat(fine, 1), data.text_to_video


def r1(scores, text_to_video) -> float:
    return float((scores.argmax(1) == text_to_video).float().mean() * 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features")
    p.add_argument("runs", help="a glob of run folders of full heads (both terms on)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    a = p.parse_args()
    store = FeatureStore(a.features)
    weights = [i / 20 for i in range(21)]
    for run in sorted(glob.glob(a.runs)):
        model = load_run(run, store)[0]
        if not (model.cfg.fine and model.cfg.coarse):
            print(f"{run}: not a head with both terms, skipped")
            continue
        cv, fv, tv = terms(model, store, "val", a.frames, a.words)
        w = max(weights, key=lambda w: (r1(w * cv + (1 - w) * fv, tv), -abs(w - 0.5)))  # ties: nearest 1/2
        c, f, tt = terms(model, store, "test", a.frames, a.words)
        print(f"{Path(run).name:50s} coarse {r1(c, tt):5.1f}  fine {r1(f, tt):5.1f}  sum {r1(c + f, tt):5.1f}  "
              f"val-chosen w_c={w:.2f}: {r1(w * c + (1 - w) * f, tt):5.1f}", flush=True)


if __name__ == "__main__":
    main()
