"""The reference workflows in examples/ run end to end on tiny models (by hand they run on the bundled model):
each prints what it measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import make_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _printed_report(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n"):])


def test_quotes_finetuning_like_the_qlora_notebook(tmp_path, capsys):
    torch.manual_seed(0)
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=259,
        max_position_embeddings=256, bos_token_id=256, eos_token_id=256, pad_token_id=256))
    model = _save(neox, tmp_path / "neox")
    report = _example("finetune_quotes").main([str(model), "--out", str(tmp_path / "run"), "--max-steps", "6"])
    assert _printed_report(capsys) == report
    assert report["target_modules"] == "query_key_value" and report["steps"] == 6
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32 and adapter["target_modules"] == ["query_key_value"]


def test_review_classification_with_qlora_on_gpt2(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=259, n_positions=256, bos_token_id=256, eos_token_id=256,
        pad_token_id=256))
    model = _save(gpt2, tmp_path / "gpt2")
    report = _example("classify_reviews").main([str(model), "--out", str(tmp_path / "run"), "--max-steps", "30",
                                               "--learning-rate", "5e-3"])
    assert _printed_report(capsys) == report
    assert report["labels"] == [f"{i} stars" for i in range(1, 6)]
    # a random 2-layer GPT-2 reading bytes: the loss must fall; accuracy (50 held-out reviews) is reported
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert 0.0 <= report["accuracy_before"] <= 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    assert adapter["fan_in_fan_out"] is False, "LoRA over the 4-bit layers, which store [out, in]"


def test_shipped_example_data_is_what_the_scripts_say():
    import csv

    quotes = [json.loads(line) for line in (EXAMPLES / "data" / "quotes.jsonl").read_text().splitlines()]
    assert len(quotes) == 40 and all(q["text"].startswith("\u201c") for q in quotes)
    with open(EXAMPLES / "data" / "reviews.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 250 and {r["label"] for r in rows} == {f"{i} stars" for i in range(1, 6)}


@pytest.mark.slow
def test_examples_run_on_the_bundled_model(tmp_path):
    assert _example("finetune_quotes").main(["--out", str(tmp_path / "q"), "--max-steps", "2"])["steps"] == 2


def test_parent_child_retrieval_with_metadata_over_a_pdf(tmp_path, capsys, make_llama):
    import chromadb  # noqa: F401 - the rag extra
    import fpdf  # noqa: F401 - the dev extra: makes the PDF
    folder = _save(make_llama().eval(), tmp_path / "llama")
    example = _example("rag_pdf")
    pdf = example.guide_pdf(tmp_path / "guide.pdf")
    report = example.main([str(pdf), "What are paged optimizers?", "--db", str(tmp_path / "db"), "--model",
                           str(folder), "--parent-tokens", "128", "--child-tokens", "32,64", "--child-overlap", "4",
                           "--n-questions", "1"])
    assert _printed_report(capsys) == report
    sources = report["answer"]["sources"]
    assert sources and all(s["id"].startswith("guide-") for s in sources)
    assert "answer" in report["answer"]


def test_preference_pairs_are_regenerated_byte_for_byte(tmp_path, monkeypatch):
    shipped = (EXAMPLES / "preference" / "date_pairs.jsonl").read_bytes()
    make = _example("preference/make_pairs")
    monkeypatch.setattr(make, "HERE", tmp_path)
    assert make.main().read_bytes() == shipped
    pairs = [json.loads(line) for line in shipped.decode().splitlines()]
    assert len(pairs) == 200 and all(p["chosen"] != p["rejected"] for p in pairs)
    assert {len(p["chosen"]) for p in pairs} == {10}  # every chosen reply is a bare ISO date


@pytest.mark.parametrize("task", ["dpo", "orpo"])
def test_preference_training_on_the_date_pairs(tmp_path, capsys, task):
    from _tiny_models import make_llama

    model = _save(make_llama(0), tmp_path / "llama")
    report = _example("preference_dates").main([str(model), "--task", task, "--out", str(tmp_path / "run"),
                                                "--max-steps", "4", "--eval-steps", "2"])
    assert _printed_report(capsys) == report
    assert report["steps"] == 4 and [e["step"] for e in report["evaluations"]] == [2, 4]
    assert all(0 <= e["accuracy"] <= 1 for e in report["evaluations"])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
