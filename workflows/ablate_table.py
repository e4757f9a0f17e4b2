"""The tables of an ablation: per-row mean and std over seeds, as OUT/table.md, table.csv,
runs.csv, table.png and summary.json."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from pipeline.atomic import atomic_write_text

from .figures import pyplot, save_figure

METRICS = ("R1", "R5", "R10", "MdR", "MnR")
LABELS = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MdR": "MdR", "MnR": "MnR"}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None from fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(rows: dict[str, dict], results: list[dict]) -> list[dict]:
    """One dict per row: mean and std of every metric over the seeds that finished, and the errors."""
    table = []
    for name, overrides in rows.items():
        done = [r for r in results if r["row"] == name and r["status"] != "failed"]
        entry = {"row": name, "overrides": overrides, "seeds_done": len(done),
                 "seeds": len([r for r in results if r["row"] == name]),
                 "errors": [f"seed {r['seed']}: {r['error']}" for r in results
                            if r["row"] == name and r["status"] == "failed"]}
        for side in ("t2v", "v2t"):
            for m in METRICS:
                entry[f"{side}_{m}"] = _mean_std([r[side][m] for r in done])
        entry["twins"] = _mean_std([r["twins"] for r in done if r["twins"] is not None])
        table.append(entry)
    return table


def _cell(mean_std: tuple[float | None, float | None]) -> str:
    mean, std = mean_std
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def format_table(summary: dict) -> str:
    """The Markdown table (table.md, and what the command prints)."""
    table, budget = summary["table"], summary["budget"]
    has_twins = any(e["twins"][0] is not None for e in table)
    epochs = sorted({b["epochs"] for b in budget.values()})
    steps = sorted({b["epochs"] * b["steps_per_epoch"] for b in budget.values()})
    lines = [f"# Ablation on {summary['features']}",
             "",
             f"{summary['split']} split: {summary['videos']} videos, chance R@1 = {summary['chance_R1']:.1f}%; "
             f"seeds {summary['seeds']}; epochs per run: {'/'.join(map(str, epochs))} "
             f"({'/'.join(map(str, steps))} optimizer steps); mean ± sample std over the seeds done."
             + (" twins: % of time-reversed twin pairs whose two captions each rank their own clip "
                "above its twin." if has_twins else ""),
             ""]
    header = ["row", "seeds"] + [f"{side} {LABELS[m]}" for side in ("t2v", "v2t") for m in METRICS]
    header += ["twins"] if has_twins else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in table:
        cells = [e["row"], f"{e['seeds_done']}/{e['seeds']}"]
        cells += [_cell(e[f"{side}_{m}"]) for side in ("t2v", "v2t") for m in METRICS]
        cells += [_cell(e["twins"])] if has_twins else []
        lines.append("| " + " | ".join(cells) + " |")
    failed = [(e["row"], err) for e in table for err in e["errors"]]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {row}, {err}" for row, err in failed]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def _table_rows(table: list[dict]) -> list[dict]:
    out = []
    for e in table:
        row = {"row": e["row"], "seeds_done": e["seeds_done"], "seeds": e["seeds"]}
        for key in [f"{side}_{m}" for side in ("t2v", "v2t") for m in METRICS] + ["twins"]:
            row[f"{key}_mean"], row[f"{key}_std"] = e[key]
        row["errors"] = "; ".join(e["errors"])
        out.append(row)
    return out


def _run_rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        row = {"row": r["row"], "seed": r["seed"], "status": r["status"], "run": r["run"], "seconds": r["seconds"]}
        for side in ("t2v", "v2t"):
            row.update({f"{side}_{m}": (r[side] or {}).get(m) for m in METRICS})
        row.update(twins=r["twins"], error=r["error"])
        out.append(row)
    return out


def draw_table(summary: dict, path: Path) -> None:
    """t2v and v2t R@1 per row, std error bars, chance as a dashed line."""
    plt = pyplot()

    table = summary["table"]
    x = list(range(len(table)))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table) + 2), 4))
    for offset, side, label in ((-0.2, "t2v", "text-to-video"), (0.2, "v2t", "video-to-text")):
        means = [e[f"{side}_R1"][0] or 0.0 for e in table]
        stds = [e[f"{side}_R1"][1] or 0.0 for e in table]
        ax.bar([i + offset for i in x], means, width=0.4, yerr=stds, capsize=3, label=label)
    for i, e in zip(x, table):
        if e["seeds_done"] == 0:
            ax.text(i, 0, "failed", ha="center", va="bottom", color="red")
    ax.axhline(summary["chance_R1"], color="k", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, [e["row"] for e in table], rotation=30, ha="right")
    ax.set(ylabel=f"{summary['split']} R@1 (%)", title=f"R@1, mean ± std over {len(summary['seeds'])} seed(s)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(out: Path, summary: dict) -> None:
    atomic_write_text(out / "table.md", format_table(summary))
    _write_csv(out / "table.csv", _table_rows(summary["table"]))
    _write_csv(out / "runs.csv", _run_rows(summary["runs"]))
    draw_table(summary, out / "table.png")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
