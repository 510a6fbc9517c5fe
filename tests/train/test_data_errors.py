"""Bad training data is refused with one line naming the file and the line (issue 9), through the CLI and the
library: records keep their file and line through the evaluation split, readers name the line of a bad byte,
a CSV quote or a ragged row, and a record of the wrong type or without a response is named, not trained on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli
from _tiny_models import make_tokenizer

from fourbit._errors import InputFileError
from fourbit.train.data import Source, check_records, encode_records, load_records, split_records

ROWS = [{"instruction": f"add {i} and 1", "output": str(i + 1)} for i in range(40)]


def _jsonl(path: Path, rows: list, lead: str = "") -> Path:
    path.write_text(lead + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _finetune(model_dir: Path, data: Path, out: Path, *extra: str):
    return run_cli("finetune", model_dir, "--data", data, "--out", out, "--max-steps", "1", "--no-progress",
                   "--json", *extra)


# --- through the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["0", "1", "2"])
def test_null_is_named_by_file_line_whatever_the_split(tmp_path: Path, tiny_llama_dir: Path, seed: str) -> None:
    rows = [dict(r) for r in ROWS]
    rows[33]["output"] = None  # file line 35: a blank first line, then record 34
    data = _jsonl(tmp_path / "train.jsonl", rows, lead="\n")
    out = tmp_path / "out"
    # a large evaluation share and several seeds: the bad record lands in the training or the held-out part
    message = assert_clean_error(_finetune(tiny_llama_dir, data, out, "--eval-fraction", "0.5", "--seed", seed),
                                 f"{data}:35", "'output'")
    assert "null" in message and "record" not in message
    assert not out.exists()


def _bad_files(tmp: Path) -> list[tuple[Path, str]]:
    """(file, what the one error line must name: file and line)."""
    cases = []
    csv_quote = tmp / "quote.csv"
    csv_quote.write_text('instruction,output\nadd 1 and 1,2\n"add 2" and 1,3\nadd 3 and 1,4\n', encoding="utf-8")
    cases.append((csv_quote, f"{csv_quote}:3"))
    csv_open = tmp / "unclosed.csv"  # a quote that opens a field and never closes swallows the rest
    csv_open.write_text('instruction,output\nadd 1 and 1,2\n"add 2 and 1,3\nadd 3 and 1,4\n', encoding="utf-8")
    cases.append((csv_open, f"{csv_open}:3"))
    csv_ragged = tmp / "ragged.csv"
    csv_ragged.write_text("instruction,output\nadd 1 and 1,2\nadd 2, and 1,3\n", encoding="utf-8")
    cases.append((csv_ragged, f"{csv_ragged}:3"))
    csv_bytes = tmp / "latin1.csv"
    csv_bytes.write_bytes("instruction,output\nsay hi,hello\nsay café,bon\n".encode("latin-1"))
    cases.append((csv_bytes, f"{csv_bytes}:3"))
    jsonl_bytes = tmp / "latin1.jsonl"
    jsonl_bytes.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    cases.append((jsonl_bytes, f"{jsonl_bytes}:2"))
    json_bytes = tmp / "latin1.json"
    json_bytes.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]\n')
    cases.append((json_bytes, f"{json_bytes}:3"))
    json_bad = tmp / "cut.json"
    json_bad.write_text('[\n{"text": "ok"},\n{"text": "no\n', encoding="utf-8")
    cases.append((json_bad, f"{json_bad}:3"))
    jsonl_bad = tmp / "bad.jsonl"
    jsonl_bad.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    cases.append((jsonl_bad, f"{jsonl_bad}:3"))
    not_records = tmp / "numbers.json"
    not_records.write_text('[\n{"text": "ok"},\n 7\n]', encoding="utf-8")
    cases.append((not_records, f"{not_records}:3"))
    parquet = tmp / "cut.parquet"
    parquet.write_bytes(b"PAR1 not really")
    cases.append((parquet, str(parquet)))
    not_a_dataset = tmp / "folder"
    not_a_dataset.mkdir()
    cases.append((not_a_dataset, str(not_a_dataset)))
    text = tmp / "notes.txt"
    text.write_text("hello\n")
    cases.append((text, str(text)))
    empty = tmp / "empty.jsonl"
    empty.write_text("\n\n")
    cases.append((empty, str(empty)))
    cases.append((tmp / "missing.jsonl", str(tmp / "missing.jsonl")))
    return cases


def test_unreadable_files_are_named_with_their_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    for data, named in _bad_files(tmp_path):
        out = tmp_path / f"out-{data.name}"
        assert_clean_error(_finetune(tiny_llama_dir, data, out), named)
        assert not out.exists(), data


def _bad_records(tmp: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """(file, names the error must hold) for records that read fine but cannot be trained on."""
    out_list = _jsonl(tmp / "list.jsonl", [*ROWS[:3], {"instruction": "add 3 and 1", "output": ["4"]}])
    inst_dict = _jsonl(tmp / "dict.jsonl", [{"instruction": {"task": "add"}, "output": "4"}, *ROWS[:3]])
    messages = _jsonl(tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": ["yo"]}]}] * 3)
    missing = _jsonl(tmp / "missing.jsonl", [*ROWS[:2], {"instruction": "add 2 and 1"}])
    unknown = _jsonl(tmp / "columns.jsonl", [{"question": "q", "answer": "a"}] * 3)
    empty = _jsonl(tmp / "empty.jsonl", [{"instruction": r["instruction"], "output": ""} for r in ROWS[:5]])
    return [
        (out_list, (f"{out_list}:4", "'output'", "string", "list")),
        (inst_dict, (f"{inst_dict}:1", "'instruction'", "string", "object")),
        (messages, (f"{messages}:", "'content'", "string")),
        (missing, (f"{missing}:3", "'output'")),
        (unknown, (f"{unknown}:1", "--format", "--text-column")),
        (empty, (str(empty), "no record has a response to learn from")),
    ]


def test_records_that_cannot_be_trained_on_are_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    for data, names in _bad_records(tmp_path):
        out = tmp_path / f"out-{data.stem}"
        assert_clean_error(_finetune(tiny_llama_dir, data, out, "--eval-fraction", "0"), *names)
        assert not out.exists(), data


def test_chat_data_needs_a_chat_template(tmp_path: Path) -> None:
    from _tiny_models import make_llama

    model_dir = tmp_path / "no-template"
    make_llama().save_pretrained(model_dir)
    make_tokenizer(chat_template=False).save_pretrained(model_dir)
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yo"}]}] * 3)
    out = tmp_path / "out"
    assert_clean_error(_finetune(model_dir, data, out), str(data), "chat template")
    assert not out.exists()


# --- the library --------------------------------------------------------------------------------------------


def test_records_keep_file_and_line_through_the_split(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", ROWS, lead="\n\n")
    records = load_records(data)
    train, held = split_records(records, 0.25, seed=0)
    assert len(held) == 10
    for r in train + held:
        i = int(r["instruction"].split()[1])
        assert r.source == Source(str(data), line=i + 3)
        assert str(r.source) == f"{data}:{i + 3}"


def test_json_lines_are_found_in_every_layout(tmp_path: Path) -> None:
    rows = ROWS[:5]
    indented = tmp_path / "indented.json"
    indented.write_text(json.dumps(rows, indent=2))  # each record takes 4 lines after the "["
    assert [r.source.line for r in load_records(indented)] == [2, 6, 10, 14, 18]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"name": "x", "data": rows, "extra": [1, {"a": "]"}]}, indent=1))
    lines = wrapped.read_text().splitlines()
    found = [r.source.line for r in load_records(wrapped)]
    assert [lines[n - 1].strip() for n in found] == ["{"] * 5
    assert [json.loads("".join(lines[n - 1:n + 3]).rstrip(",")) for n in found] == rows
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps(rows))
    assert [r.source.line for r in load_records(one_line)] == [1] * 5
    named_json = _jsonl(tmp_path / "lines.json", rows, lead="\n")  # JSON Lines named .json
    assert [r.source.line for r in load_records(named_json)] == [2, 3, 4, 5, 6]
    assert load_records(named_json) == rows


def test_csv_is_read_as_text_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes('\ufeffinstruction,input,output\n"say\nit",,1\n\nplain,x,"a ""quoted"", b"\n'.encode())
    records = load_records(path)
    assert records == [{"instruction": "say\nit", "input": "", "output": "1"},
                       {"instruction": "plain", "input": "x", "output": 'a "quoted", b'}]
    assert [r.source.line for r in records] == [2, 5]
    dupes = tmp_path / "dupes.csv"
    dupes.write_text("text,text\na,b\n")
    with pytest.raises(InputFileError, match=r"dupes\.csv:1: .*repeats the column 'text'"):
        load_records(dupes)


def test_rows_of_parquet_and_saved_datasets(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a", "n": 1}, {"text": None, "n": 2}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        records = load_records(path)
        assert [r.source.row for r in records] == [1, 2] and records[1].source.line is None
        with pytest.raises(InputFileError, match=rf"{path.name}: row 2: 'text' is null"):
            check_records(records)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputFileError, match=r"dict: .*no 'train' split"):
        load_records(tmp_path / "dict")


def test_check_records_types() -> None:
    ok = check_records([{"instruction": "a", "input": None, "output": 5}, {"instruction": 2.5, "output": "x"}])
    assert ok.format == "instruction" and ok.skipped == []
    bad = [
        ({"instruction": "a", "output": True}, "'output' must be a string, found true/false"),
        ({"instruction": "a", "output": {"x": 1}}, "'output' must be a string, found an object"),
        ({"instruction": "a", "input": ["x"], "output": "b"}, "'input' must be a string, found a list"),
        ({"instruction": None, "output": "b"}, "'instruction' is null"),
    ]
    for record, message in bad:
        with pytest.raises(ValueError, match=rf"my data: record 2: {message}"):
            check_records([{"instruction": "a", "output": "b"}, record], source="my data")
    chats = [
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list.*an empty list"),
        ({"messages": ["hi"]}, "'messages' item 1 must be an object"),
        ({"messages": [{"content": "hi"}]}, "'messages' item 1: 'role' must be a string, found nothing"),
        ({"messages": [{"role": "user", "content": None}]}, "'messages' item 1: 'content' must be a string"),
    ]
    good_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    for record, message in chats:
        with pytest.raises(ValueError, match=rf"record 2: {message}"):
            check_records([good_chat, record])
    with pytest.raises(ValueError, match=r"record 1: 'label' is empty"):
        check_records([{"text": "a", "label": " "}], label_column="label")
    assert check_records([{"text": "a", "label": True}], label_column="label").format == "text"
    with pytest.raises(ValueError, match="`format`: must be one of"):
        check_records([{"text": "a"}], format="alpaca")


def test_records_without_a_response_are_skipped_with_their_lines(tmp_path: Path, caplog) -> None:
    rows = [dict(r) for r in ROWS[:6]]
    rows[1]["output"] = ""
    rows[4]["output"] = "   "
    data = _jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="fourbit.train.data"):
        ds = encode_records(load_records(data), make_tokenizer())
    assert len(ds) == 4 and ds.n_skipped == 2
    assert f"{data}: skipping 2 of 6 records" in caplog.text and "lines 2, 5" in caplog.text
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": c}]}
             for c in ("", " ")]
    with pytest.raises(ValueError, match=r"no record has a response to learn from \(no assistant message has "
                                         r"content on records 1, 2\)"):
        encode_records(chats, make_tokenizer())
    with pytest.raises(ValueError, match=r"'body' is empty on record 1"):
        encode_records([{"body": ""}], make_tokenizer(), format="text", text_column="body")


def test_label_outside_the_training_labels_names_the_line(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "eval.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "z"}])
    with pytest.raises(InputFileError, match=r"eval\.jsonl:2: label 'z' is not one of the training labels"):
        encode_records(load_records(data), make_tokenizer(), label_column="label", label_names=["x", "y"])
