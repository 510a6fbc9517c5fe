"""The grounded-answer adapter that ships with the bundled model: its files are there, are packaged, and say
how they were made (the training itself is ``scripts/train_answer_adapter.py``; its quality is measured in
``benchmarks/bench_answers.py``, not here)."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from fourbit.rag.llm import ANSWER_ADAPTER_DIR, answer_adapter

ROOT = Path(__file__).resolve().parents[2]


def test_the_answer_adapter_ships_with_its_record():
    assert answer_adapter(None) == ANSWER_ADAPTER_DIR  # the default of rag query, serve and the demo
    files = {p.name for p in ANSWER_ADAPTER_DIR.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json", "README.md",
            "rag_tune_examples.jsonl"} <= files
    assert not (ANSWER_ADAPTER_DIR / "checkpoints").exists()
    config = json.loads((ANSWER_ADAPTER_DIR / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and "SmolLM2-135M-Instruct" in config["base_model_name_or_path"]
    record = json.loads((ANSWER_ADAPTER_DIR / "training.json").read_text(encoding="utf-8"))
    data = sorted(p.name for p in (ROOT / "scripts" / "answer_adapter_data").glob("*.md"))
    assert record["data"] == data and "qlora_guide.md" not in data  # not the document the benchmarks ask about
    assert record["training"]["lora_r"] == config["r"]
    assert (ANSWER_ADAPTER_DIR / "adapter_model.safetensors").stat().st_size < 8 << 20


def test_the_answer_adapter_is_in_the_package_data():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is Python 3.11+
    line = re.search(r"^\[tool\.setuptools\.package-data\]\s*\nfourbit = \[(.*)\]$", text, re.MULTILINE)
    globs = re.findall(r'"([^"]+)"', line.group(1))
    assert "data/*" in globs
    package = ROOT / "fourbit"
    for path in ANSWER_ADAPTER_DIR.iterdir():
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, g) and relative.count("/") == g.count("/") for g in globs), relative
