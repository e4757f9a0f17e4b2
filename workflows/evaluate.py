"""The `eval` job: standard retrieval metrics of a trained run (or of plain CLIP) on one split,
plus per-query ranks for error analysis."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from heads.config import HeadConfig
from heads.evaluate import rank_all
from heads.trainer import load_head
from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.read import FeatureStore

from .data import EvalData
from .train import RUN_CONFIG, RunConfig, build_head
from .tuned_features import store_for_run


class EvalError(ValueError):
    """A run or features folder that cannot be evaluated; the message says which and why."""


def load_run(run: Path, store: FeatureStore, device: str = "cpu"):
    """The run's best checkpoint (else its last) and its config; refuses features of another model."""
    run = Path(run)
    ckpt = next((run / n for n in ("best.pt", "last.pt") if (run / n).exists()), None)
    if ckpt is None or not (run / RUN_CONFIG).exists():
        raise EvalError(f"{run}: not a trained run (no best.pt/last.pt and {RUN_CONFIG}); run train-heads first")
    saved = json.loads((run / RUN_CONFIG).read_text())
    trained_on = saved.get("features_model", {})
    here = {"model": store.info.model, "image_dim": store.info.image_dim, "text_dim": store.info.text_dim}
    if any(trained_on.get(k) != v for k, v in here.items()):
        raise EvalError(f"{run} was trained on features of {trained_on.get('model')} "
                        f"(image {trained_on.get('image_dim')}, text {trained_on.get('text_dim')}), but "
                        f"{store.root} holds {here['model']} (image {here['image_dim']}, text {here['text_dim']})")
    model = load_head(ckpt, map_location="cpu").to(device)
    return model, RunConfig.from_dict(saved["run"]), ckpt


def evaluate(features: Path, run: Path | None, split: str = "test", dsl: bool = False, device: str = "cpu",
             chunk: int = 256, max_frames: int | None = None, max_words: int | None = None,
             v2t_protocol: str = "group") -> dict:
    """Metrics of `run` (or CLIP zero-shot without one) on `split`; writes ranks and JSON into the run.

    Zero-shot is CLIP4Clip's meanP without training: each projected frame L2-normalised, averaged over
    the frames, normalised again, against the normalised text feature (the 31.1 R@1 row on MSR-VTT 1k-A).
    """
    store = FeatureStore(features)
    if run is not None:
        model, cfg, ckpt = load_run(run, store, device)
        store = store_for_run(run, store, ckpt, device)  # a run that trained CLIP's blocks: its own features
        max_frames = max_frames or cfg.head.max_frames
        max_words = max_words or cfg.max_words
    else:
        model, ckpt = build_head(HeadConfig(variant="meanp"), store).to(device), None
        max_frames, max_words = max_frames or 12, max_words or 32
    captions = store.split_captions(split)
    if not captions:
        raise EvalError(f"{features}: split '{split}' has no usable captions; splits found: {store.splits()}")
    data = EvalData(store, captions, max_frames, max_words, chunk)
    result = rank_all(model, data.texts(), data.text_to_video, data.video_chunks(), len(data.videos),
                      text_chunk=chunk, device=device, dsl=dsl, v2t_protocol=v2t_protocol)
    report = {
        "split": split, "dsl": dsl, "run": str(run) if run else None, "checkpoint": str(ckpt) if ckpt else None,
        "features": str(features), "model": store.info.model, "pretrained": store.info.pretrained,
        "v2t_protocol": v2t_protocol,
        "non_finite_own_scores": result.non_finite,
        "t2v": {k: round(float(v), 4) for k, v in result.t2v.items() if k != "n"},
        "v2t": {k: round(float(v), 4) for k, v in result.v2t.items() if k != "n"},
        "queries": {"t2v": len(captions), "v2t": len(data.videos)},
        "candidates": {"t2v": len(data.videos),
                       "v2t": len(data.videos) if v2t_protocol == "group" else len(captions)},
    }
    if run is not None:
        suffix = f"{split}{'_dsl' if dsl else ''}"
        _write_ranks(store, data, captions, result, Path(run) / f"ranks_{suffix}.parquet")
        atomic_write_text(Path(run) / f"eval_{suffix}.json", json.dumps(report, indent=2))
    store.close()
    return report


def _write_ranks(store: FeatureStore, data: EvalData, captions: list[int], result, path: Path) -> None:
    """One row per query: t2v rows per caption, v2t rows per video."""
    t2v_rows = [{"direction": "t2v", "caption_id": store.captions[c]["caption_id"],
                 "video_id": store.captions[c]["video_id"], "caption": store.captions[c]["caption"],
                 "rank": int(r)} for c, r in zip(captions, result.t2v_ranks.tolist())]
    v2t_rows = [{"direction": "v2t", "caption_id": None, "video_id": store.videos[v]["video_id"],
                 "caption": None, "rank": int(r)} for v, r in zip(data.videos, result.v2t_ranks.tolist())]
    schema = pa.schema([("direction", pa.string()), ("caption_id", pa.int64()), ("video_id", pa.string()),
                        ("caption", pa.string()), ("rank", pa.int64())])
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(t2v_rows + v2t_rows, schema=schema), tmp)


def format_table(report: dict) -> str:
    lines = [f"{report['split']} split ({report['model']}, {report['pretrained']})"
             f"{' with dual softmax' if report['dsl'] else ''}: "
             f"{report['queries']['t2v']} captions x {report['queries']['v2t']} videos",
             f"{'':6}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MdR':>8}{'MnR':>8}"]
    for side in ("t2v", "v2t"):
        m = report[side]
        lines.append(f"{side:6}{m['R1']:8.1f}{m['R5']:8.1f}{m['R10']:8.1f}{m['MdR']:8.1f}{m['MnR']:8.1f}")
    lines.append(f"v2t protocol: {report['v2t_protocol']} "
                 + ("(each video's caption group ranked among all groups)" if report["v2t_protocol"] == "group"
                    else "(best own caption ranked among all captions)"))
    if report.get("non_finite_own_scores"):
        lines.append(f"WARNING: {report['non_finite_own_scores']} caption(s) scored NaN or inf with their own "
                     "video and were ranked last: the model is broken (check its training log)")
    return "\n".join(lines)
