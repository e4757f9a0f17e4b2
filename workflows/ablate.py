"""The `ablate` job: every row of an ablation table trained and evaluated for several seeds on one
budget, each (row, seed) an independent run (in-process or a Dask task), summarised in OUT/table.*.

A run is a plain train-heads run folder, OUT/runs/<row>-seed<S>/; rerunning skips the evaluated
ones, resumes those with a last.pt and no evaluation, and retries the failed ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from heads.config import HeadConfig
from heads.evaluate import score_matrix
from heads.trainer import TrainConfig
from pipeline.atomic import atomic_write_text
from pipeline.distributed import ClusterSpec, run_tasks
from pipeline.read import FeatureStore

from .ablate_table import summarise, write_outputs
from .data import EvalData, TrainData
from .evaluate import evaluate, load_run
from .train import RUN_CONFIG, RunConfig, auto_epochs, train
from .tuned_features import store_for_run

# Row name -> HeadConfig overrides: the paper's module ablations and the two CLIP4Clip baselines.
MODULE_ROWS = {
    "full": {},
    "w/o video enhancement": {"video_enhance": False},
    "w/o text enhancement": {"text_enhance": False},
    "w/o interaction": {"interaction": False},
    "w/o temporal": {"temporal": False},
    "fine only": {"coarse": False},
    "coarse only": {"fine": False},
}
BASELINE_ROWS = {"full": {}, "seqtransf": {"variant": "seqtransf"}, "meanp": {"variant": "meanp"}}
PRESETS = {"modules": MODULE_ROWS, "baselines": BASELINE_ROWS, "all": {**MODULE_ROWS, **BASELINE_ROWS}}

HEAD_KEYS = {f.name for f in dataclasses.fields(HeadConfig)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
# The same for every row, or rows would not be comparable: set by --seeds, the budget and --device.
SHARED_KEYS = {"seed", "epochs", "device"}


class AblateError(ValueError):
    """A grid file, row set or features folder the ablation cannot use; the message says which and why."""


@dataclass
class AblateConfig:
    """The whole ablation; saved as OUT/ablate.json with the budget each seed got."""
    base: RunConfig                        # what every row shares (features, batch, lr, device, ...)
    out: str                               # the ablation folder: runs/, table.*, ablate.json
    rows: dict[str, dict] = field(default_factory=lambda: dict(PRESETS["all"]))  # name -> overrides of base
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None               # ceil(steps / steps per epoch) epochs for every run
    epochs: int | None = None              # or this many epochs; neither: train-heads' default (auto_epochs)
    split: str = "test"                    # evaluated split
    cluster: ClusterSpec = field(default_factory=lambda: ClusterSpec(cluster="none"))

    def to_dict(self) -> dict:
        return {"features": self.base.features, "out": self.out, "rows": self.rows, "seeds": self.seeds,
                "steps": self.steps, "epochs": self.epochs, "split": self.split, "base": self.base.to_dict(),
                "cluster": dataclasses.asdict(self.cluster)}


# --- rows ---------------------------------------------------------------------------------------

def check_overrides(row: str, overrides: dict, where: str = "") -> None:
    """Unknown or shared keys are errors: a typo must not silently train the default model."""
    for key in overrides:
        if key in SHARED_KEYS:
            raise AblateError(f"{where}row '{row}': '{key}' is the same for every row "
                              "(set by --seeds, --steps/--epochs and --device)")
        if key not in HEAD_KEYS | TRAIN_KEYS:
            raise AblateError(f"{where}row '{row}': unknown key '{key}'; expected HeadConfig fields "
                              f"({', '.join(sorted(HEAD_KEYS))}) or TrainConfig fields "
                              f"({', '.join(sorted(TRAIN_KEYS - SHARED_KEYS))})")


def read_grid(path: Path) -> dict[str, dict]:
    """Rows from a YAML or JSON mapping: row name -> {HeadConfig or TrainConfig field: value}."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # missing file, YAML or JSON syntax: all the same to the user
        raise AblateError(f"grid file {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not data:
        raise AblateError(f"grid file {path}: expected a mapping of row name -> overrides, "
                          f'e.g. {{"lr 1e-4": {{"lr": 1e-4}}}}')
    rows = {}
    for name, overrides in data.items():
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, dict):
            raise AblateError(f"grid file {path}: row '{name}': expected a mapping of overrides, "
                              f"not {type(overrides).__name__}")
        check_overrides(str(name), overrides, where=f"grid file {path}: ")
        rows[str(name)] = dict(overrides)
    return rows


def slug(name: str) -> str:
    """A row name as a folder name: 'w/o video enhancement' -> 'w_o_video_enhancement'."""
    return re.sub(r"[^a-z0-9.+-]+", "_", name.lower()).strip("_") or "row"


def select_rows(preset: str, grid: dict[str, dict] | None = None, only: list[str] | None = None) -> dict[str, dict]:
    """The preset's rows, then the grid's (a grid row of the same name replaces the preset's)."""
    if preset not in PRESETS:
        raise AblateError(f"unknown preset '{preset}'; expected one of {', '.join(PRESETS)}")
    rows = {**PRESETS[preset], **(grid or {})}
    if only:
        missing = [n for n in only if n not in rows]
        if missing:
            raise AblateError(f"--only {missing}: no such row; rows: {list(rows)}")
        rows = {n: rows[n] for n in rows if n in only}
    seen: dict[str, str] = {}
    for name in rows:
        if slug(name) in seen:  # two rows in one folder would skip each other
            raise AblateError(f"rows '{seen[slug(name)]}' and '{name}' would share the folder {slug(name)}")
        seen[slug(name)] = name
    return rows


def row_config(base: RunConfig, overrides: dict, seed: int, epochs: int) -> RunConfig:
    """base with one row's overrides; raises ValueError/TypeError for a row HeadConfig refuses."""
    head = {k: v for k, v in overrides.items() if k in HEAD_KEYS}
    train_ = {k: v for k, v in overrides.items() if k in TRAIN_KEYS}
    return dataclasses.replace(
        base, head=HeadConfig(**{**base.head.to_dict(), **head}),
        train=TrainConfig(**{**dataclasses.asdict(base.train), **train_, "seed": seed, "epochs": epochs}))


# --- twins ---------------------------------------------------------------------------------------

def twin_accuracy(scores, text_to_video, pairs: list[tuple[int, int]]) -> float | None:
    """Share (%) of twin pairs (a, b) told apart both ways: every caption of a scores a above b, and
    every caption of b scores b above a (a tie tells nothing apart). scores: (Nt, Nv) tensor;
    text_to_video: (Nt,) column of each caption's own video; pairs: video columns. None when no
    pair has captions on both sides."""
    judged = right = 0
    for a, b in pairs:
        caps_a, caps_b = (text_to_video == a).nonzero().flatten(), (text_to_video == b).nonzero().flatten()
        if len(caps_a) == 0 or len(caps_b) == 0:
            continue
        judged += 1
        right += bool((scores[caps_a, a] > scores[caps_a, b]).all() and (scores[caps_b, b] > scores[caps_b, a]).all())
    return 100.0 * right / judged if judged else None


def synthetic_twins(store: FeatureStore) -> list[tuple[str, str]]:
    """The time-reversed twin pairs of the make-synthetic folder the features were extracted from;
    [] for any other collection."""
    videos = store.config().get("config", {}).get("videos")
    path = Path(videos) / "synthetic.json" if videos else None
    if path is None or not path.is_file():
        return []
    return [(a, b) for a, b in json.loads(path.read_text()).get("twins", [])]


def run_twin_accuracy(features: str, run: Path, split: str, twins: list[tuple[str, str]],
                      device: str = "cpu") -> float | None:
    """twin_accuracy of a trained run on the twin pairs whose videos both have captions in split."""
    store = FeatureStore(features)
    try:
        model, cfg, ckpt = load_run(run, store, device)
        store = store_for_run(run, store, ckpt, device)  # a run that trained CLIP's blocks: its own features
        names = {n for pair in twins for n in pair}
        captions = [i for i in store.split_captions(split) if store.captions[i]["video_id"] in names]
        if not captions:
            return None
        data = EvalData(store, captions, cfg.head.max_frames, cfg.max_words, cfg.eval_chunk)
        column = {store.videos[v]["video_id"]: j for j, v in enumerate(data.videos)}
        pairs = [(column[a], column[b]) for a, b in twins if a in column and b in column]
        scores = score_matrix(model, data.texts(), data.video_chunks(), len(data.videos), device=device)
        return twin_accuracy(scores, data.text_to_video, pairs)
    finally:
        store.close()


# --- one run (runs on a worker) ------------------------------------------------------------------

@dataclass(frozen=True)
class RunTask:
    """One (row, seed). Only names, dicts and paths travel to a worker, never a model or data."""
    row: str
    seed: int
    run_dir: str
    config: dict                                  # RunConfig.to_dict()
    split: str
    twins: tuple[tuple[str, str], ...] = ()       # synthetic twin pairs (video ids), if any


REQUESTED = "ablate_run.json"  # the config this ablation asked for (train() may fill in more in config.json)


def _same_run(saved: dict, wanted: dict) -> bool:
    """Same run config, wherever it ran: the device (a worker's GPU) does not make another run."""
    def strip(d):
        return {**d, "train": {k: v for k, v in d["train"].items() if k != "device"}}
    return strip(saved) == strip(wanted)


def _asked_for(task: RunTask) -> bool:
    """The run folder holds a run of this task's config."""
    try:
        saved = json.loads((Path(task.run_dir) / REQUESTED).read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    return _same_run(saved, task.config)


def is_finished(task: RunTask) -> bool:
    """Evaluated with this config (the eval JSON is the last file a run writes)."""
    return (Path(task.run_dir) / f"eval_{task.split}.json").exists() and _asked_for(task)


def read_result(task: RunTask, status: str, seconds: float = 0.0) -> dict:
    run = Path(task.run_dir)
    report = json.loads((run / f"eval_{task.split}.json").read_text())
    twins_file = run / f"twins_{task.split}.json"
    twins = json.loads(twins_file.read_text())["twins"] if twins_file.exists() else None
    return {"row": task.row, "seed": task.seed, "run": task.run_dir, "status": status, "error": None,
            "seconds": round(seconds, 1), "t2v": report["t2v"], "v2t": report["v2t"], "twins": twins,
            "videos": report["queries"]["v2t"]}


def failed_result(row: str, seed: int, run_dir: str, error: BaseException) -> dict:
    return {"row": row, "seed": seed, "run": run_dir, "status": "failed", "error": f"{type(error).__name__}: {error}",
            "seconds": 0.0, "t2v": None, "v2t": None, "twins": None, "videos": None}


def run_one(task: RunTask, device: str | None = None) -> dict:
    """Train (or resume) and evaluate one run; an already evaluated one is read back, a failure is
    returned as a failed result (traceback in the run's train.log). device: the worker's GPU instead
    of the config's. Safe to run twice (Dask reruns a killed worker's task)."""
    start = time.perf_counter()
    if is_finished(task):
        return read_result(task, "skipped")
    run = Path(task.run_dir)
    cfg = RunConfig.from_dict(task.config)
    cfg.train.device = device or cfg.train.device
    resume = (run / "last.pt").exists() and (run / RUN_CONFIG).exists() and _asked_for(task)
    if resume:  # train(resume=True) takes the saved config, device included: use this worker's
        info = json.loads((run / RUN_CONFIG).read_text())
        info["run"]["train"]["device"] = cfg.train.device
        atomic_write_text(run / RUN_CONFIG, json.dumps(info, indent=2))
    elif run.exists():  # another config, or killed before its first checkpoint: start afresh
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / REQUESTED,
                      json.dumps({"row": task.row, "seed": task.seed, "config": task.config}, indent=2))
    # Epoch lines go to the run's own log: several runs share the terminal.
    with open(run / "train.log", "a") as log, contextlib.redirect_stdout(log):
        try:
            train(cfg, run, resume=resume)
            twins = run_twin_accuracy(cfg.features, run, task.split, list(task.twins), cfg.train.device) \
                if task.twins else None
            atomic_write_text(run / f"twins_{task.split}.json", json.dumps({"twins": twins, "pairs": len(task.twins)}))
            evaluate(cfg.features, run, split=task.split, device=cfg.train.device, chunk=cfg.eval_chunk)
        except Exception as e:  # the row fails, the table goes on; a rerun tries it again
            traceback.print_exc(file=log)
            return failed_result(task.row, task.seed, task.run_dir, e)
    return read_result(task, "resumed" if resume else "trained", time.perf_counter() - start)


# --- the job -------------------------------------------------------------------------------------

def plan_budget(cfg: AblateConfig, store: FeatureStore) -> dict[int, dict]:
    """Epochs per seed, the same for every row: the batches (so steps per epoch) depend on the seed."""
    captions = store.split_captions(cfg.base.train_split)
    if len(captions) < 2:
        raise AblateError(f"{cfg.base.features}: split '{cfg.base.train_split}' has {len(captions)} usable "
                          f"captions; splits found: {store.splits() or 'none'}")
    budget = {}
    for seed in cfg.seeds:
        per_epoch = TrainData(store, captions, cfg.base.batch_size, cfg.base.head.max_frames, cfg.base.max_words,
                              seed).steps_per_epoch()
        if cfg.epochs:
            epochs = cfg.epochs
        elif cfg.steps:
            epochs = math.ceil(cfg.steps / max(1, per_epoch))
        else:
            epochs = auto_epochs(per_epoch, 1000)  # train-heads' default
        budget[seed] = {"epochs": epochs, "steps_per_epoch": per_epoch}
    return budget


def _progress(done: int, total: int, r: dict) -> str:
    head = f"[{done}/{total}] {r['row']} seed {r['seed']}: "
    if r["status"] == "failed":
        return head + f"failed: {r['error']}"
    twins = f", twins {r['twins']:.0f}%" if r["twins"] is not None else ""
    when = "(done before)" if r["status"] == "skipped" else f"({r['seconds']:.0f} s)"
    return head + f"t2v R@1 {r['t2v']['R1']:.1f}, v2t R@1 {r['v2t']['R1']:.1f}{twins} {when}"


def ablate(cfg: AblateConfig) -> dict:
    """Run (or finish) every (row, seed), write table.md/.csv/.png, runs.csv, ablate.json, summary.json
    in cfg.out; returns the summary. Progress lines go to stdout as runs finish."""
    if cfg.steps and cfg.epochs:
        raise AblateError("give --steps or --epochs, not both")
    if not cfg.rows or not cfg.seeds:
        raise AblateError("nothing to run: no rows or no seeds")
    for name, overrides in cfg.rows.items():
        check_overrides(name, overrides)
    out = Path(cfg.out)
    store = FeatureStore(cfg.base.features)
    try:
        test_captions = store.split_captions(cfg.split)
        if not test_captions:
            raise AblateError(f"{cfg.base.features}: split '{cfg.split}' has no usable captions; "
                              f"splits found: {store.splits()}")
        n_videos = len(set(store.caption_video(test_captions).tolist()))
        budget = plan_budget(cfg, store)
        twins = tuple(synthetic_twins(store))
    finally:
        store.close()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablate.json", json.dumps({**cfg.to_dict(), "budget": budget, "twin_pairs": len(twins)},
                                                      indent=2))

    results, tasks = [], []
    for seed in cfg.seeds:
        for name, overrides in cfg.rows.items():
            run_dir = out / "runs" / f"{slug(name)}-seed{seed}"
            try:
                run_cfg = row_config(cfg.base, overrides, seed, budget[seed]["epochs"])
            except (ValueError, TypeError) as e:  # a row HeadConfig refuses fails alone
                results.append(failed_result(name, seed, str(run_dir), e))
                continue
            task = RunTask(name, seed, str(run_dir), run_cfg.to_dict(), cfg.split, twins)
            if is_finished(task):
                results.append(read_result(task, "skipped"))
            else:
                tasks.append(task)
    total = len(results) + len(tasks)
    for i, r in enumerate(results, 1):
        print(_progress(i, total, r), flush=True)
    for task, result in run_tasks(run_one, tasks, cfg.cluster, key=lambda t: f"ablate-{Path(t.run_dir).name}"):
        if isinstance(result, Exception):
            result = failed_result(task.row, task.seed, task.run_dir, result)
        results.append(result)
        print(_progress(len(results), total, result), flush=True)

    order = {(name, seed): i for i, (seed, name) in enumerate((s, n) for s in cfg.seeds for n in cfg.rows)}
    results.sort(key=lambda r: order[(r["row"], r["seed"])])
    summary = {"features": cfg.base.features, "split": cfg.split, "seeds": cfg.seeds, "videos": n_videos,
               "chance_R1": 100.0 / n_videos, "budget": budget, "twin_pairs": len(twins),
               "table": summarise(cfg.rows, results), "runs": results}
    write_outputs(out, summary)
    return summary
