"""Mean +- std over seeds of bench/grid.py results: one line per (features set, steps, row).

    python bench/summarise_grid.py bench/results/issue12-*.jsonl [--against "fine only"]
Runs that stopped (for example on a non-finite gradient) are counted apart: `n` is finished/all. Runs made
with "eval_val" add a column: the val split's t2v R@1 (what a setting such as the learning rate is chosen on).
--against ROW: also each row's t2v R@1 minus ROW's, seed by seed (same set, steps and seed; the same test
queries), as mean +- std of the differences and wins/ties/losses: a paired comparison, tighter than two
spreads side by side when the seeds move both rows alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return f"{'-':>12}"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):5.1f} +- {spread:4.1f}"


def main(paths: list[str], against: str | None = None) -> None:
    groups = defaultdict(list)
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            amp = r.get("train", {}).get("amp", "none")
            groups[(r["set"], r["steps"], r["row"] + ("" if amp == "none" else f" [{amp}]"))].append(r)
    val = any("val_t2v" in r for runs in groups.values() for r in runs)  # grid runs with "eval_val"
    print(f"{'set':11}{'steps':>6}  {'row':44}{'n':>5}  {'t2v R@1':>12}  {'v2t R@1':>12}  {'twins %':>12}"
          + (f"  {'val t2v R@1':>12}" if val else ""))
    for key in sorted(groups):
        runs = groups[key]
        done = [r for r in runs if "error" not in r]
        print(f"{key[0]:11}{key[1]:6}  {key[2]:44}{len(done):>2}/{len(runs):<2}  "
              f"{mean_std(r['t2v']['R1'] for r in done)}  {mean_std(r['v2t']['R1'] for r in done)}  "
              f"{mean_std(r.get('twins') for r in done)}"
              + (f"  {mean_std(r['val_t2v']['R1'] if 'val_t2v' in r else None for r in done)}" if val else ""))
    if against:
        paired(groups, against)


def paired(groups: dict, against: str) -> None:
    print(f"\nt2v R@1 minus '{against}', seed by seed (same set, steps, seed)")
    print(f"{'set':11}{'steps':>6}  {'row':44}{'seeds':>6}  {'difference':>12}  {'wins/ties/losses':>17}")
    for (name, steps, row), runs in sorted(groups.items()):
        ref = {r["seed"]: r["t2v"]["R1"] for r in groups.get((name, steps, against), []) if "error" not in r}
        if row == against or not ref:
            continue
        diffs = [r["t2v"]["R1"] - ref[r["seed"]] for r in runs if "error" not in r and r["seed"] in ref]
        if not diffs:
            continue
        record = f"{sum(d > 0 for d in diffs)}/{sum(d == 0 for d in diffs)}/{sum(d < 0 for d in diffs)}"
        print(f"{name:11}{steps:6}  {row:44}{len(diffs):>6}  {mean_std(diffs)}  {record:>17}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="bench/grid.py JSON lines")
    p.add_argument("--against", help="a row to compare every other row with, seed by seed")
    a = p.parse_args()
    main(a.paths, a.against)
