"""Timing helpers shared by the benchmarks: medians of repeats, wall and CPU time, machine load."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` + ``repeats`` times; return median wall and CPU seconds of the repeats."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "walls": walls}
