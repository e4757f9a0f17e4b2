"""Do S2's adaptive frame weights look away from clutter? For every clip of a `make-synthetic
--distractor-seconds` set, the share of the fine match's frame weights (beta, normalised over the stored
frames) that falls on distractor seconds, against the share those frames have of the clip (what uniform
weights give them). Weights that do their job put less than that share there; weights that have learnt
nothing put exactly that share (and a within-clip spread of the logits near 0).

    python bench/s2_frame_weights.py FEATURES SYNTHETIC_JSON "RUNS_GLOB" [--split test]

Frames are assigned to distractor seconds by their timestamps (`frame_times`) against the (start_s, end_s)
spans that synthetic.json records for each clip.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heads.model import VIDEO_KEYS  # noqa: E402
from pipeline.read import FeatureStore  # noqa: E402
from workflows.data import _tensors  # noqa: E402
from workflows.evaluate import load_run  # noqa: E402


def distractor_items(store: FeatureStore, synthetic: dict, split: str):
    """(video index, mask of its stored seconds that fall in a distractor span) for every clip of `split`
    that has distractor seconds."""
    items = []
    for v in synthetic["videos"]:
        if v["split"] != split or not v.get("distractors") or v["video"] not in store.video_index:
            continue
        vi = store.video_index[v["video"]]
        times = np.asarray(store.frame_times(vi), np.float64)
        on = np.zeros(len(times), bool)
        for d in v["distractors"]:
            on |= (times >= d["start_s"]) & (times < d["end_s"])
        items.append((vi, on))
    return items


@torch.no_grad()
def weight_shares(model, store: FeatureStore, items, frames: int):
    """(beta's share on distractor frames, their share of the frames, within-clip std of the logits, mean
    sigmoid of the logits: near 1 is saturated, where beta is uniform whatever the logits; near 0, beta is a
    softmax of the logits) per clip."""
    model.eval()
    f, m = store.frames([vi for vi, _ in items], frames)
    t = _tensors({"frames": f, "frame_mask": m}, False)
    video = model.encode_video(*(t[k] for k in VIDEO_KEYS))
    logits = model.frame_weights(video.h, video.mask)
    picked = store._picks(frames)  # (videos, frames) stored-frame positions, -1 for padding
    shares, uniform, spread, level = [], [], [], []
    for row, (vi, on) in enumerate(items):
        picks = picked[vi][picked[vi] >= 0]
        sel = torch.tensor(on[picks])
        n = len(picks)
        shares.append(float(video.beta[row, :n][sel].sum()))
        uniform.append(float(sel.float().mean()))
        spread.append(float(logits[row, :n].std()) if n > 1 else 0.0)
        level.append(float(torch.sigmoid(logits[row, :n]).mean()))
    return shares, uniform, spread, level


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features")
    p.add_argument("synthetic")
    p.add_argument("runs", help="a glob of run folders of heads with S2's frame weights")
    p.add_argument("--split", default="test")
    p.add_argument("--frames", type=int, default=12)
    a = p.parse_args()
    store = FeatureStore(a.features)
    items = distractor_items(store, json.loads(Path(a.synthetic).read_text()), a.split)
    print(f"{a.split}: {len(items)} clips with distractor seconds")
    print("run | weight on distractor frames | their share of the frames | clips below that share | "
          "within-clip logit std | mean sigmoid (near 1: saturated, beta uniform; near 0: beta = softmax(logits))")
    for run in sorted(glob.glob(a.runs)):
        model, cfg, _ = load_run(Path(run), store)
        if model.frame_weights is None:
            print(f"{Path(run).name}: no frame weights (skipped)")
            continue
        shares, uniform, spread, level = weight_shares(model, store, items, cfg.head.max_frames)
        below = sum(s < u - 1e-6 for s, u in zip(shares, uniform)) / len(shares) * 100
        print(f"{Path(run).name} | {statistics.mean(shares):.3f} | {statistics.mean(uniform):.3f} | {below:.0f} % | "
              f"{statistics.mean(spread):.3f} | {statistics.mean(level):.4f}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
