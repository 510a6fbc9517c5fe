"""Preference pairs: read alike from JSONL, JSON, CSV, Parquet and a saved dataset; chat pairs tokenized as
TRL tokenizes conversational data; bad pairs refused by ``fourbit finetune`` with one line naming the file,
the line and the field or flag, exit 1, nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli
from _tiny_models import make_llama, make_tokenizer

from fourbit.train.data import check_records
from fourbit.train.pairs import check_pairs, encode_pairs
from fourbit.train.records import load_records

PAIRS = [{"prompt": f"{i} plus 3 is", "chosen": f" {i + 3}.", "rejected": f" {i + 4}."} for i in range(6)]


def _write(folder: Path, kind: str, rows: list[dict]) -> Path:
    if kind == "jsonl":
        path = folder / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = folder / "pairs.json"
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path = folder / "pairs.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        from datasets import Dataset

        ds = Dataset.from_list(rows)
        if kind == "parquet":
            path = folder / "pairs.parquet"
            ds.to_parquet(str(path))
        else:
            path = folder / "saved"
            ds.save_to_disk(str(path))
    return path


def test_pairs_read_alike_from_every_format(tmp_path) -> None:
    tokenizer = make_tokenizer()
    encoded = {}
    for kind in ("jsonl", "json", "csv", "parquet", "saved"):
        records = load_records(_write(tmp_path, kind, PAIRS))
        data = encode_pairs(records, tokenizer, max_length=64)
        encoded[kind] = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.examples]
    assert all(v == encoded["jsonl"] for v in encoded.values())
    first = encoded["jsonl"][0]
    assert tokenizer.decode(first[1]) == " 3.<|endoftext|>" and tokenizer.decode(first[0]) == "0 plus 3 is"


def test_chat_pairs_are_tokenized_as_trl_does(tmp_path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = make_tokenizer()
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS]
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], max_length=64, use_cpu=True, bf16=False)
    trl_rows = DPOTrainer(model=make_llama(0).float(), ref_model=make_llama(0).float(), args=args,
                          train_dataset=Dataset.from_list(conversational), processing_class=tokenizer).train_dataset
    expected = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trl_rows]
    messages_form = [{"messages": c["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                     for c, r in zip(conversational, PAIRS, strict=True)]
    for records, fmt in ((conversational, "auto"), (messages_form, "auto"), (PAIRS, "chat")):
        data = encode_pairs(records, tokenizer, format=fmt, max_length=64)
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.examples] == expected
    assert "<|im_start|>assistant" in tokenizer.decode(expected[0][0])


def test_replies_longer_than_max_length_are_cut_and_counted() -> None:
    data = encode_pairs(PAIRS, make_tokenizer(), max_length=13)
    assert data.n_truncated == len(PAIRS)
    assert all(len(p.prompt_ids) + len(p.chosen_ids) <= 13 for p in data.examples)


@pytest.fixture
def model(shared_tiny_llama_dir) -> Path:
    return shared_tiny_llama_dir


_BAD = [
    ("dpo", {"prompt": "p", "chosen": " same", "rejected": " same"}, ("'chosen' equals 'rejected'",), []),
    ("dpo", {"prompt": "p", "chosen": " ", "rejected": " no"}, ("'chosen' is empty",), []),
    ("orpo", {"prompt": "p", "chosen": " yes", "rejected": ""}, ("'rejected' is empty",), []),
    ("dpo", {"prompt": "p", "chosen": " a", "rejected": " b", "text": "t"}, ("'text'", "'chosen'"), []),
    ("dpo", {"text": "a supervised record"}, ("missing 'prompt'", "'text'"), []),
    ("causal", {"text": "t", "chosen": " a"}, ("'chosen'", "--task"), []),
    ("dpo", {"prompt": "x" * 40, "chosen": " a", "rejected": " b"}, ("--max-length", "40 tokens"),
     ["--max-length", "32"]),
]


@pytest.mark.parametrize(("task", "bad", "names", "extra"), _BAD,
                         ids=["equal", "empty-chosen", "empty-rejected", "mixed", "supervised", "pair-in-causal",
                              "prompt-fills-max-length"])
def test_bad_pairs_fail_with_one_line_naming_file_line_and_field(tmp_path, model, task, bad, names, extra) -> None:
    data = tmp_path / "pairs.jsonl"
    good = PAIRS if task != "causal" else [{"text": r["prompt"] + r["chosen"]} for r in PAIRS]
    data.write_text("".join(json.dumps(r) + "\n" for r in [*good[:2], bad, *good[2:]]))
    out = tmp_path / "run"
    result = run_cli("finetune", model, "--task", task, "--data", data, "--out", out, "--max-steps", "1",
                     "--lora-r", "2", "--batch-size", "2", "--no-progress", "--compute-dtype", "fp32", *extra)
    assert_clean_error(result, f"{data}:3", *names)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_checks_without_a_tokenizer_name_the_record() -> None:
    with pytest.raises(ValueError, match="record 2: 'chosen' equals 'rejected'"):
        check_pairs([PAIRS[0], {"prompt": "p", "chosen": "a", "rejected": "a"}], source="data")
    with pytest.raises(ValueError, match="record 1: preference field 'chosen'"):
        check_records([{"text": "t", "chosen": "a"}], source="data")
    with pytest.raises(ValueError, match="record 1: preference field 'chosen'.*`task` dpo"):
        check_records(PAIRS, source="data")  # pairs given to supervised training
