"""What a trained head's temporal encoder did to the frames: per run, on the test split, the mean norm of the
projected CLIP frames (f0) and of the temporal features the fine and the coarse term read (f, f_coarse), the
mean cosine between two frames of one clip before and after the encoder (near 1: the frames have collapsed onto
one vector, and a word x frame match has little left to tell apart), and S2's frame-weight logits (their range,
and the share of frames whose sigmoid is saturated, above 0.99 or below 0.01, where the weights get no gradient).
The figures behind "a fine term can blow up" in README "Training the full head".

    python bench/feature_norms.py FEATURES "RUNS_GLOB" [--split test] [--videos 256]
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heads.model import VIDEO_KEYS  # noqa: E402
from pipeline.read import FeatureStore  # noqa: E402
from workflows.data import _tensors  # noqa: E402
from workflows.evaluate import load_run  # noqa: E402


def frame_cosine(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean cosine between two different real frames of one clip."""
    xn = F.normalize(x, dim=-1)
    pair = (mask.unsqueeze(2) & mask.unsqueeze(1)) & ~torch.eye(mask.shape[1], dtype=torch.bool)  # (B, F, F)
    return float((xn @ xn.transpose(1, 2))[pair].mean())


@torch.no_grad()
def stats(model, store: FeatureStore, videos: list[int], frames: int) -> dict:
    model.eval()
    f, m = store.frames(videos, frames)
    t = _tensors({"frames": f, "frame_mask": m}, False)
    frames_, mask = (t[k] for k in VIDEO_KEYS)
    f0 = model.proj.project_image(frames_)
    out = {"|f0|": float(f0.norm(dim=-1)[mask].mean()), "cos f0": frame_cosine(f0, mask)}
    for name, enc in (("f", model.temporal), ("f_coarse", model.temporal_coarse)):
        if enc is not None:
            x = enc(f0, mask)
            out[f"|{name}|"] = float(x.norm(dim=-1)[mask].mean())
            out[f"cos {name}"] = frame_cosine(x, mask)
    if model.frame_weights is not None:
        video = model.encode_video(frames_, mask)
        logits = model.frame_weights(video.h, mask)[mask]
        sig = torch.sigmoid(logits)
        out.update({"logit min": float(logits.min()), "logit max": float(logits.max()),
                    "saturated %": float(((sig > 0.99) | (sig < 0.01)).float().mean() * 100)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features")
    p.add_argument("runs", help="a glob of run folders")
    p.add_argument("--split", default="test")
    p.add_argument("--videos", type=int, default=256, help="the split's first N videos")
    p.add_argument("--frames", type=int, default=12)
    a = p.parse_args()
    store = FeatureStore(a.features)
    videos = sorted(set(store.caption_video(store.split_captions(a.split)).tolist()))[:a.videos]
    for run in sorted(glob.glob(a.runs)):
        model = load_run(Path(run), store)[0]
        s = stats(model, store, videos, a.frames)
        print(f"{Path(run).name}: " + "  ".join(f"{k} {v:.3g}" for k, v in s.items()), flush=True)
    store.close()


if __name__ == "__main__":
    main()
