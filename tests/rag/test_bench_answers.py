"""benchmarks/bench_answers.py's own measures: reference coverage, share inside the evidence, loops; and the
ablation re-measures the rules on one generation."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_answers.py"
    spec = importlib.util.spec_from_file_location("bench_answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measures():
    bench = _bench()
    assert bench.coverage("finetune a 65B parameter model on a single 48GB GPU", "It uses a single 48GB GPU.") == 3 / 7
    assert bench.inside("A single 48GB GPU is enough.", "on a single 48GB GPU") == 3 / 4  # enough is not there
    assert bench.inside("", "anything") == 0.0  # an empty answer is not inside anything
    assert bench.loops("the memory of the main memory of the main memory")
    assert not bench.loops("the memory of the main GPU and of the main CPU")
    quote = "an expected win-rate of 65% here and an expected win-rate of 50% there"
    assert bench.loops(quote)
    assert not bench.loops(quote, [quote])  # the evidence sentence's own repetition, quoted: not a loop
    assert bench.loops(f"{quote}, an expected win-rate of 50%", [quote])  # a third time is the model's


def test_variant_rows_apply_the_support_check():
    bench = _bench()
    row = {"question": "Where do comets come from?", "reference": "the distant Oort cloud",
           "evidence_sentences": ["Long-period comets originate in the distant Oort cloud."]}
    kept = bench._variant_row(row, "They originate in the distant Oort cloud.", 0.8)
    assert kept["kind"] == "generated" and kept["covers"] == 1.0 and kept["inside"] == 1.0
    replaced = bench._variant_row(row, "Comets are painted green on Mars in 1999.", 0.8)
    assert replaced["kind"] == "evidence" and replaced["answer"] == row["evidence_sentences"][0]
    assert replaced["generated_inside"] < 0.5 and replaced["inside"] == 1.0
    assert bench._variant_row(row, "Comets are painted green on Mars.", None)["kind"] == "generated"
