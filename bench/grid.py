"""A grid of (features set, row, seed, steps) trainings in parallel processes on one machine, one JSON
line per run: what produced the README's "Training the full head" figures on a lent H200, which had
torch but no Dask (on a machine with the project installed, `python cli.py ablate` does the same
through Dask, one table per features set).

    python bench/grid.py bench/grids/issue12-call1.json out.jsonl --procs 12 --device cuda
    python bench/summarise_grid.py out.jsonl

GRID.json: {"sets": {name: {"features": DIR, "synthetic": synthetic.json or null,
                             "make": the commands that build DIR (optional; not run: run them first)}},
            "runs": [{"set": name, "row": label, "head": {HeadConfig overrides},
                      "train": {TrainConfig overrides}, "steps": N, "seed": S, "max_words": 32,
                      "run": {RunConfig fields, e.g. "unfreeze_blocks": 1 on features extracted with
                              --cache-blocks},
                      "eval_val": true to report the val split's figures as well (val_t2v, val_v2t)}, ...]}
Each run trains ceil(N / steps per epoch) epochs with train-heads' trainer (no validation split),
then evaluates the test split (`eval`'s numbers) and the twin pair accuracy when a synthetic.json
is given. Results come back in completion order.

Defaults move: a grid runs with today's TrainConfig and HeadConfig defaults where it names nothing. Grids
written before 2026-12-07 ran with grad_clip 1 (each term clipped after the loss's 1/2 weight: term_clip
"weighted"); the full head's rows are the same run under today's grad_clip 2 and term_clip "own", but a
single-term row (fine only, coarse only, seqTransf, meanP) needs "train": {"grad_clip": 1.0} to repeat them.

Resuming a grid: `--skip-done` skips every run whose (set, row, seed, steps) already has a row without an
error in OUT, so a stopped grid, or one whose runs were reordered, goes on where it was.

Stopping a grid: kill its process group (it is started with setsid: kill -- -PGID), not just the parent;
the pool's workers outlive a killed parent and go on with the queued runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(run: dict, sets: dict, runs_dir: str, device: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(1)  # many runs share the machine's cores
    from heads.config import HeadConfig
    from heads.trainer import TrainConfig
    from pipeline.read import FeatureStore
    from workflows.ablate import run_twin_accuracy
    from workflows.data import TrainData
    from workflows.evaluate import evaluate, load_run
    from workflows.train import RunConfig, train

    spec = sets[run["set"]]
    name = f"{run['set']}-{run['row']}-s{run['seed']}-n{run['steps']}".replace(" ", "_").replace("/", "")
    out = Path(runs_dir) / name
    record, start = dict(run), time.time()
    try:
        store = FeatureStore(spec["features"])
        per_epoch = TrainData(store, store.split_captions("train"), run.get("batch", 128), 12, 32,
                              run["seed"], preload_bytes=0).steps_per_epoch()
        epochs = math.ceil(run["steps"] / per_epoch)
        cfg = RunConfig(features=spec["features"], head=HeadConfig(**run["head"]),
                        train=TrainConfig(epochs=epochs, seed=run["seed"], device=device, log_every=10 ** 9,
                                          **run.get("train", {})),
                        val_split="none", batch_size=run.get("batch", 128), max_words=run.get("max_words", 32),
                        **run.get("run", {}))  # RunConfig fields, e.g. {"unfreeze_blocks": 1}
        with contextlib.redirect_stdout(io.StringIO()):
            history = train(cfg, out)
        record.update(train_s=round(time.time() - start, 1), epochs=epochs, steps_done=epochs * per_epoch,
                      loss_first=history[0]["loss"], loss_last=history[-1]["loss"])
        record["clip"] = clip_summary(history)
        report = evaluate(spec["features"], out, split="test", device=device)
        record.update(t2v=report["t2v"], v2t=report["v2t"])
        if run.get("eval_val"):  # the val split's figures too, to choose a setting (a learning rate) per row
            val = evaluate(spec["features"], out, split="val", device=device)
            record.update(val_t2v=val["t2v"], val_v2t=val["v2t"])
        if spec.get("synthetic"):
            twins = json.loads(Path(spec["synthetic"]).read_text())["twins"]
            record["twins"] = run_twin_accuracy(spec["features"], out, "test", twins, device)
        weights = load_run(out, store, device)[0].fusion_logits
        if weights is not None:
            record["fusion_w"] = [round(x, 3) for x in weights.softmax(0).tolist()]
    except Exception as e:  # a failed run is a row of the results, not the end of the grid
        record.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
    record["seconds"] = round(time.time() - start, 1)
    return record


def clip_summary(history: list[dict]) -> dict:
    """How hard the gradient clip bit over a run: its pre-clip norm (each epoch's mean, and its largest step) and
    the share of steps clipped, per term where the terms are clipped apart, as first epoch / mean / largest / last
    epoch; and the run's largest step split by module, with its epoch (where a gradient spike came from)."""
    out = {k: {"first": round(history[0][k], 4), "mean": round(sum(h[k] for h in history) / len(history), 4),
               "max": round(max(h[k] for h in history), 4), "last": round(history[-1][k], 4)}
           for k, v in history[0].items() if k.startswith(("grad_norm", "clipped")) and isinstance(v, float)}
    for k in (k for k in history[0] if k.startswith("grad_norm_max_by_module")):
        worst = max(history, key=lambda h: h[k.replace("_by_module", "")])
        out[k] = {"epoch": worst["epoch"], **{m: round(v, 3) for m, v in worst[k].items()}}
    return out


def run_key(run: dict) -> tuple:
    return run["set"], run["row"], run["seed"], run["steps"]


def pending_runs(runs: list[dict], out: Path) -> list[dict]:
    """The runs of a grid that have no finished row (one without an error) in the results file `out`."""
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "error" not in row:
                    done.add(run_key(row))
    left = [r for r in runs if run_key(r) not in done]
    if len(left) < len(runs):
        print(f"skipping {len(runs) - len(left)} run(s) already in {out}", flush=True)
    return left


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid")
    p.add_argument("out", help="JSON lines, appended")
    p.add_argument("--procs", type=int, default=8, help="runs at a time")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs-dir", default="/tmp/grid-runs")
    p.add_argument("--skip-done", action="store_true",
                   help="skip the runs that already have a row without an error in OUT")
    args = p.parse_args()
    grid = json.loads(Path(args.grid).read_text())
    if args.skip_done:
        grid["runs"] = pending_runs(grid["runs"], Path(args.out))
    import multiprocessing as mp
    start = time.time()
    with ProcessPoolExecutor(args.procs, mp_context=mp.get_context("spawn")) as pool, open(args.out, "a") as fh:
        futures = [pool.submit(run_one, r, grid["sets"], args.runs_dir, args.device) for r in grid["runs"]]
        for i, future in enumerate(as_completed(futures), 1):
            r = future.result()
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            told = r.get("error") or f"t2v R@1 {r['t2v']['R1']:.1f} twins {r.get('twins')}"
            print(f"[{i}/{len(futures)} {time.time() - start:.0f}s] {r['set']} {r['row']} s{r['seed']} "
                  f"n{r['steps']}: {told} ({r['seconds']}s)", flush=True)


if __name__ == "__main__":
    main()
