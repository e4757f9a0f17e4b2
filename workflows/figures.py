"""Figures written beside a run's output: matplotlib without a display, saved atomically."""
from __future__ import annotations

from pathlib import Path

from pipeline.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed: runs on clusters and in CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path | str, dpi: int = 100) -> None:
    """Save `fig` to `path` atomically (a reader sees the old or the new image, never half of one), then
    close it, also on an error, so that long runs do not accumulate open figures."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)
