"""Metrics as JSON Lines, and the loss-curve PNG drawn from them at the end of a run.

``metrics.jsonl`` is a log appended to line by line: a run killed mid-write leaves a torn last line, which
readers skip (the records before it are intact). Non-finite numbers are written as ``null`` so every line
stays standard JSON.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

from fourbit._io import atomic_write_bytes, atomic_write_text, read_jsonl

__all__ = ["MetricsLog", "plot_loss_curve", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file (empty list if it does not exist; a torn last line is skipped).

    Raises:
        InputFileError: a damaged line before the last one (naming the file and line).
    """
    p = Path(path)
    if not p.is_file():
        return []
    return read_jsonl(p, skip_torn_last_line=True)


def _json_line(record: dict[str, Any]) -> str:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


class MetricsLog:
    """Append-only JSONL log, flushed per record. ``truncate_after(step)`` drops records of steps beyond a
    resumed checkpoint (rewritten atomically) so that a resumed run's log equals an uninterrupted one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(_json_line(r) for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(_json_line(record))


def _plot_rewards(ax: Any, records: list[dict[str, Any]]) -> None:
    """The preference rewards of the training steps: chosen, rejected and their margin, and (right axis) the
    fraction of pairs whose chosen reply has the higher reward."""
    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if r.get(key) is not None and "loss" in r]

    for key, style in (("rewards/chosen", "-"), ("rewards/rejected", "-"), ("rewards/margins", "-")):
        points = series(key)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key.split("/")[1], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    accuracy = series("rewards/accuracies")
    if accuracy:
        right = ax.twinx()
        right.plot(*zip(*accuracy, strict=True), ":", color="gray", label="accuracy", lw=1)
        right.set_ylim(-0.05, 1.05)
        right.set_ylabel("preference accuracy")
        right.legend(loc="lower right")


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Draw train loss (and eval loss when present) against step into ``png_path`` (matplotlib, Agg); for
    preference training a second panel draws the rewards, their margin and the preference accuracy.

    Returns:
        The PNG path, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train:
        return None
    preference = any(r.get("rewards/margins") is not None for r in records)
    fig, axes = plt.subplots(2 if preference else 1, 1, figsize=(7, 7 if preference else 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("preference loss (per pair)" if preference else "loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        _plot_rewards(axes[1][0], records)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(png_path, buffer.getvalue())
