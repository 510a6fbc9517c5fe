"""Metrics as JSON Lines, and the loss-curve PNG drawn from them at the end of a run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fourbit._io import atomic_write_text

__all__ = ["MetricsLog", "plot_loss_curve", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file (empty list if it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLog:
    """Append-only JSONL log, flushed per record. ``truncate_after(step)`` drops records of steps beyond a
    resumed checkpoint (rewritten atomically) so that a resumed run's log equals an uninterrupted one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Draw train loss (and eval loss when present) against step into ``png_path`` (matplotlib, Agg).

    Returns:
        The PNG path, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
