"""Does S4 look where a partial caption points? For every caption of a `make-synthetic --partial-captions`
set that names one event of a clip with two or more, the share of S4's attention (its text-conditioned
pooling, averaged over heads) that falls on the frames of the named event, against the share those frames
have of the clip (what mean pooling gives them). A pooling that does its job puts more than that share
there; one that has learnt nothing puts about that share.

    python bench/s4_attention.py FEATURES SYNTHETIC_JSON "RUNS_GLOB" [--split test]

Frames are assigned to events by their timestamps (`frame_times`, the middle of each stored second)
against the events' spans in synthetic.json (frames at the set's fps, distractor seconds included).
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
from heads.model import TEXT_KEYS, VIDEO_KEYS  # noqa: E402
from pipeline.read import FeatureStore  # noqa: E402
from workflows.data import _tensors  # noqa: E402
from workflows.evaluate import load_run  # noqa: E402


def event_of_seconds(video: dict, fps: float, times: np.ndarray) -> np.ndarray:
    """For each timestamp (seconds), the index of the event playing then, or -1 (a distractor, or past
    the end). Events play in synthetic.json's order, around the distractor seconds (start_s, end_s)."""
    gaps = sorted((d["start_s"], d["end_s"]) for d in video.get("distractors", []))
    spans, start = [], 0.0
    for e in video["events"]:
        for a, b in gaps:  # a distractor that starts where this event would: the event follows it
            if abs(a - start) < 1e-6:
                start = b
        spans.append((start, start + e["frames"] / fps))
        start += e["frames"] / fps
    out = np.full(len(times), -1, np.int64)
    for k, (a, b) in enumerate(spans):
        out[(times >= a) & (times < b)] = k
    return out


def partial_items(store: FeatureStore, synthetic: dict, split: str):
    """(caption index in the store, video index, mask of the named event's stored frames) for every caption
    of `split` that names exactly one event of a clip with two or more events."""
    fps = synthetic["settings"]["fps"]
    by_video = {v["video"]: v for v in synthetic["videos"]}
    items = []
    for i in store.split_captions(split):
        c = store.captions[i]
        v = by_video[c["video_id"]]
        if len(v["events"]) < 2:
            continue
        info = [inf for cap, inf in zip(v["captions"], v["caption_info"]) if cap == c["caption"]]
        if not info or len(info[0]["events"]) != 1:
            continue
        vi = store.video_index[c["video_id"]]
        events = event_of_seconds(v, fps, np.asarray(store.frame_times(vi), np.float64))
        items.append((i, vi, events == info[0]["events"][0]))
    return items


@torch.no_grad()
def attention_shares(model, store: FeatureStore, items, frames: int, words: int):
    """(attention share, uniform share, the largest weight) per item, on the named event's frames."""
    model.eval()
    caps = [i for i, _, _ in items]
    vids = [v for _, v, _ in items]
    text = model.encode_text(*(_tensors(store.texts(caps, words), False)[k] for k in TEXT_KEYS))
    f, m = store.frames(vids, frames)
    video = model.encode_video(*(_tensors({"frames": f, "frame_mask": m}, False)[k] for k in VIDEO_KEYS))
    attn = model.pool.attention(text.t, video.pool_keys, video.mask, aligned=True).mean(1)  # (N, F)
    att, uni, peak = [], [], []
    for row, (_, vi, named) in enumerate(items):
        picks = store._picks(frames)[vi]
        picks = picks[picks >= 0]
        on = torch.tensor(named[picks])
        att.append(float(attn[row, :len(picks)][on].sum()))
        uni.append(float(on.float().mean()))
        peak.append(float(attn[row, :len(picks)].max()))
    return att, uni, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features")
    p.add_argument("synthetic")
    p.add_argument("runs", help="a glob of run folders of heads with S4")
    p.add_argument("--split", default="test")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    a = p.parse_args()
    store = FeatureStore(a.features)
    synthetic = json.loads(Path(a.synthetic).read_text())
    items = partial_items(store, synthetic, a.split)
    print(f"{a.split}: {len(items)} captions naming one event of a clip with two or more")
    print("run | attention on the named event | its share of the frames | captions above that share | largest weight (uniform: 1 / frames)")
    for run in sorted(glob.glob(a.runs)):
        model, cfg, _ = load_run(Path(run), store)
        if model.pool is None:
            print(f"{run}: no S4 (skipped)")
            continue
        att, uni, peak = attention_shares(model, store, items, cfg.head.max_frames, cfg.max_words)
        above = sum(x > u + 1e-6 for x, u in zip(att, uni)) / len(att) * 100
        print(f"{Path(run).name} | {statistics.mean(att):.3f} | {statistics.mean(uni):.3f} | {above:.0f} % | {statistics.mean(peak):.2f}",
              flush=True)
    store.close()


if __name__ == "__main__":
    main()
