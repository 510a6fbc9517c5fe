"""Data loading, formats, response-only labels, truncation, splits, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_models import make_llama, make_tokenizer

from fourbit.train.batching import BatchPlan, collate
from fourbit.train.data import IGNORE_INDEX, encode_records, load_records, split_records
from fourbit.train.loss import causal_lm_loss

ROWS = [{"text": f"row {i}", "instruction": f"say {i}", "output": f"{i}!", "label": "ab"[i % 2]} for i in range(6)]


def test_all_file_types_give_same_records(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved"):
        assert load_records(tmp_path / name) == ROWS, name


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        load_records(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_records(empty)
    with pytest.raises(ValueError, match=r"nope\.jsonl: no such file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported"):
        load_records(tmp_path / "x.txt")


def test_instruction_labels_cover_response_only() -> None:
    tok = make_tokenizer()
    ds = encode_records([{"instruction": "Say hi", "input": "", "output": "hello"}], tok, max_length=512)
    ex = ds.examples[0]
    assert ds.format == "instruction"
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == "hello<|endoftext|>"
    assert ex.input_ids[-len(labelled):] == labelled
    full = encode_records([{"instruction": "Say hi", "output": "hello"}], tok, train_on_inputs=True)
    assert full.examples[0].labels == full.examples[0].input_ids


def test_chat_labels_cover_assistant_turns() -> None:
    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]
    ex = encode_records([{"messages": msgs}], tok).examples[0]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    labelled = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert labelled == "yo<|im_end|>\nsure<|im_end|>\n"
    with pytest.raises(ValueError, match="chat template"):
        encode_records([{"messages": msgs}], make_tokenizer(chat_template=False))


def test_missing_column_truncation_and_drop() -> None:
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="record 2: missing column 'output'"):
        encode_records([{"instruction": "a", "output": "b"}, {"instruction": "c"}], tok, format="instruction")
    with pytest.raises(ValueError, match="cannot tell the format"):
        encode_records([{"foo": 1}], tok)
    ds = encode_records([{"text": "x" * 50}, {"text": "short"}], tok, max_length=20)
    assert ds.n_truncated == 1 and max(len(e) for e in ds.examples) == 20
    split = encode_records([{"text": "x" * 50}, {"text": "short"}], tok, max_length=20, split_long_text=True)
    whole = encode_records([{"text": "x" * 50}], tok, max_length=1000)
    # no token lost: the long document becomes consecutive max_length pieces
    assert split.n_split == 1 and split.n_truncated == 0 and max(len(e) for e in split.examples) == 20
    pieces = [e for e in split.examples if len(e) == 20 or e.input_ids[0] == whole.examples[0].input_ids[40]]
    assert sum((e.input_ids for e in pieces), []) == whole.examples[0].input_ids
    # every piece passes the same check as a whole example: one token has no target, so max_length 1 keeps none
    with pytest.raises(ValueError, match="max_length.*no example of data has a response token left"):
        encode_records([{"text": "x" * 50}], tok, max_length=1, split_long_text=True)
    long_prompt = [{"instruction": "y" * 300, "output": "z"}]
    with pytest.raises(ValueError, match="max_length.*no example of data has a response token left"):
        encode_records(long_prompt, tok, max_length=64)


def test_split_is_deterministic_and_disjoint() -> None:
    rows = [{"text": str(i)} for i in range(50)]
    a, b = split_records(rows, 0.2, seed=3)
    assert (a, b) == split_records(rows, 0.2, seed=3)
    assert len(b) == 10 and len(a) == 40
    assert sorted(r["text"] for r in a + b) == sorted(r["text"] for r in rows)


def test_packed_loss_equals_unpacked() -> None:
    tok = make_tokenizer()
    rows = [{"text": f"repeat {'ab' * i} ok"} for i in range(5)]
    ds = encode_records(rows, tok, max_length=512)
    model = make_llama().eval()
    pad = tok.pad_token_id
    packed_plan = BatchPlan(ds.examples, 8, max_length=128, packing=True, shuffle=False)
    assert len(packed_plan.rows) == 1 and len(packed_plan.rows[0]) == 5  # all five share one row
    packed = collate(packed_plan.rows, pad, packed=True)
    assert packed.attention_mask is None and packed.position_ids[0, 0] == 0
    unpacked = collate([[e] for e in ds.examples], pad, packed=False)
    with torch.no_grad():
        lp = causal_lm_loss(model, packed, chunk_size=0)
        lu = causal_lm_loss(model, unpacked, chunk_size=0)
        # a packed row without the position reset (one long sequence) must differ: attention leaks
        leak = causal_lm_loss(model, collate(packed_plan.rows, pad, packed=False), chunk_size=0)
    assert packed.n_targets == unpacked.n_targets
    # same per-example math in a different layout: fp32 noise only
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lp, leak, rtol=1e-3)


def test_group_by_length_and_epoch_order() -> None:
    tok = make_tokenizer()
    ds = encode_records([{"text": "x" * (i + 1)} for i in range(40)], tok)
    plan = BatchPlan(ds.examples, 4, seed=1, group_by_length=True)
    b0 = plan.batches(0)
    assert sum(len(b) for b in b0) == 40
    spread = [max(map(len, (r[0] for r in b))) - min(map(len, (r[0] for r in b))) for b in b0]
    assert max(spread) <= 4  # one megabatch holds everything: batches are contiguous in length
    b1 = plan.batches(1)
    assert plan.batches(0) == b0 and b1 != b0
    assert sorted(map(id, (r for b in b1 for r in b))) == sorted(map(id, (r for b in b0 for r in b)))
