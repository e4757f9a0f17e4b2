"""Mean +- std over seeds of bench/grid.py results: one line per (features set, steps, row).

    python bench/summarise_grid.py bench/results/issue12-*.jsonl
Runs that stopped (for example on a non-finite gradient) are counted apart: `n` is finished/all.
"""
from __future__ import annotations

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


def main(paths: list[str]) -> None:
    groups = defaultdict(list)
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            amp = r.get("train", {}).get("amp", "none")
            groups[(r["set"], r["steps"], r["row"] + ("" if amp == "none" else f" [{amp}]"))].append(r)
    print(f"{'set':11}{'steps':>6}  {'row':44}{'n':>5}  {'t2v R@1':>12}  {'v2t R@1':>12}  {'twins %':>12}")
    for key in sorted(groups):
        runs = groups[key]
        done = [r for r in runs if "error" not in r]
        print(f"{key[0]:11}{key[1]:6}  {key[2]:44}{len(done):>2}/{len(runs):<2}  "
              f"{mean_std(r['t2v']['R1'] for r in done)}  {mean_std(r['v2t']['R1'] for r in done)}  "
              f"{mean_std(r.get('twins') for r in done)}")


if __name__ == "__main__":
    main(sys.argv[1:])
