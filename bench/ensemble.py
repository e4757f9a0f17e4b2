"""Separately trained runs joined at inference: the test score matrices of several runs added up, and each
run alone. The baseline a full head with two independent terms (`--temporal-grad separate`) has to beat,
since such a head is close to a fine-only and a coarse-only head trained side by side: is its sum better than
the sum of a fine-only and a coarse-only run trained apart, or of two fine-only runs (other seeds)?

    python bench/ensemble.py FEATURES RUN_A RUN_B [RUN_C ...] [--synthetic synthetic.json]

Prints t2v and v2t R@1 (and the twin pair accuracy with --synthetic) of every run alone and of the sum of
their scores, as `eval` computes them (same protocol: v2t ranks caption groups).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heads.evaluate import score_matrix  # noqa: E402
from heads.metrics import metrics_from_ranks, ranks_from_scores  # noqa: E402
from pipeline.read import FeatureStore  # noqa: E402
from workflows.ablate import twin_accuracy  # noqa: E402
from workflows.data import EvalData  # noqa: E402
from workflows.evaluate import load_run  # noqa: E402


def figures(scores, text_to_video, pairs) -> dict:
    t2v, v2t = ranks_from_scores(scores, text_to_video)
    out = {"t2v_R1": metrics_from_ranks(t2v)["R1"], "v2t_R1": metrics_from_ranks(v2t)["R1"]}
    if pairs:
        out["twins"] = twin_accuracy(scores, text_to_video, pairs)
    return out


def ensemble(features: str, runs: list[str], split: str = "test", synthetic: str | None = None) -> dict:
    """{run name or "sum": figures}; every run must sample the same frames and words (checked)."""
    store = FeatureStore(features)
    try:
        models = [load_run(r, store)[:2] for r in runs]
        shapes = {(cfg.head.max_frames, cfg.max_words) for _, cfg in models}
        if len(shapes) != 1:
            raise SystemExit(f"the runs sample different (frames, words): {sorted(shapes)}; they cannot share data")
        frames, words = shapes.pop()
        data = EvalData(store, store.split_captions(split), frames, words)
        pairs = []
        if synthetic:
            column = {store.videos[v]["video_id"]: j for j, v in enumerate(data.videos)}
            twins = json.loads(Path(synthetic).read_text())["twins"]
            pairs = [(column[a], column[b]) for a, b in twins if a in column and b in column]
        texts, out, total = data.texts(), {}, None
        for run, (model, _) in zip(runs, models):
            scores = score_matrix(model, texts, data.video_chunks(), len(data.videos))
            out[Path(run).name] = figures(scores, data.text_to_video, pairs)
            total = scores if total is None else total + scores
        out["sum"] = figures(total, data.text_to_video, pairs)
        return out
    finally:
        store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features")
    p.add_argument("runs", nargs="+", help="run folders (train-heads outputs), two or more")
    p.add_argument("--split", default="test")
    p.add_argument("--synthetic", help="make-synthetic's synthetic.json: adds the twin pair accuracy")
    a = p.parse_args()
    if len(a.runs) < 2:
        p.error("give two or more runs")
    for name, f in ensemble(a.features, a.runs, a.split, a.synthetic).items():
        twins = f" twins {f['twins']:5.1f}" if f.get("twins") is not None else ""
        print(f"{name:55s} t2v R@1 {f['t2v_R1']:5.1f}  v2t R@1 {f['v2t_R1']:5.1f}{twins}", flush=True)


if __name__ == "__main__":
    main()
