"""benchmarks/bench_serve.py keeps working (a smoke run on the tiny llama; no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
def test_bench_serve_smoke_run():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_serve.py", "--tiny", "--clients", "1,3", "--requests", "1",
         "--tokens", "4", "--threads", "1", "--json"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout[out.stdout.index("{"):])
    assert set(rows) == {f"{d}, {mode}, {c} clients" for d in ("auto", "hf") for mode in ("one by one", "batched")
                         for c in (1, 3)}
    assert all(r["tokens"] == 4 * c for name, r in rows.items() for c in (1, 3) if name.endswith(f" {c} clients"))
    assert all(rows[f"{d}, one by one, 3 clients"]["max_rows"] == 1 for d in ("auto", "hf"))
    assert rows["auto, batched, 3 clients"]["compiled_steps"] > 0
    assert rows["hf, batched, 3 clients"]["compiled_steps"] == 0


def test_bench_serve_many_adapters_smoke_run():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_serve.py", "--tiny", "--adapters", "4", "--batch", "3", "--tokens", "4",
         "--rounds", "1", "--threads", "1", "--json"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout[out.stdout.index("{"):])
    assert set(rows) == {"single adapter", "4 adapters, random mix", "4 adapters, random mix, per-adapter loop"}
    assert [r["resident"] for r in rows.values()] == [1, 4, 4]
    assert all(r["one_batch"] and r["rows"] == 3 and 0 < r["tokens"] <= 3 * 4 for r in rows.values())
    assert rows["single adapter"]["adapters_in_batch"] == 1 and rows["single adapter"]["vs_single"] == 1.0


def test_bench_answers_coverage_counts_content_words():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_answers
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    evidence = "saving an average\nof about 0.37 bits per parameter"
    assert bench_answers.content_words(evidence) == {"saving", "average", "0.37", "bits", "per", "parameter"}
    assert bench_answers.coverage(evidence, "Double quantization saves about 0.37 bits per parameter on average, "
                                            "saving memory.") == 1.0
    assert bench_answers.coverage(evidence, "It saves 0.37 bits.") == 2 / 6  # "0.37", "bits"
    assert bench_answers.coverage("reaching 99.3%", "Guanaco reaches 99.3% of ChatGPT") == 0.5
    assert bench_answers._p90([float(i) for i in range(1, 11)]) == 9.0
