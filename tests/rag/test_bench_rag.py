"""benchmarks/bench_rag.py hands both sides the same number of distinct parents per query."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rag.py"
    spec = importlib.util.spec_from_file_location("bench_rag", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_distinct_parents_asks_for_more_references_until_k_parents():
    bench = _bench()
    # Ranked references: the first four point at parent "a", as a recursive retriever's often do.
    ranked = [("a", "A"), ("a", "A"), ("a", "A"), ("a", "A"), ("b", "B"), ("a", "A"), ("c", "C"), ("d", "D")]
    asked = []

    def search(n):
        asked.append(n)
        return ranked[:n]

    got = bench.first_distinct_parents(search, 2, len(ranked))
    assert [h.text for h in got] == ["A", "B"] and asked == [2, 4, 8]
    assert [h.text for h in bench.first_distinct_parents(search, 5, len(ranked))] == ["A", "B", "C", "D"]
    assert [h.text for h in bench.first_distinct_parents(lambda n: ranked[:n], 1, len(ranked))] == ["A"]
