"""TrainConfig and YAML configs: every shipped config loads and validates; every numeric field rejects
non-finite and out-of-range values with a FieldError naming the field; a YAML file with an unknown key, a key
given twice, a wrong type, invalid YAML or no mapping is named with its line; the CLI turns names into flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli

from fourbit._errors import FieldError, InputFileError
from fourbit.quant import QUANT_TYPES
from fourbit.train.config import (
    TrainConfig,
    add_config_flags,
    config_from_args,
    load_yaml_overrides,
    save_config,
)

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_configs_folder_is_not_empty() -> None:
    assert {p.name for p in CONFIGS} >= {"qlora_paper.yaml", "dates_demo.yaml", "classify.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_and_validates(path: Path) -> None:
    import yaml

    overrides = load_yaml_overrides(path)
    raw = yaml.safe_load(path.read_text())
    assert set(overrides) == {k.replace("-", "_") for k in raw}  # nothing dropped or invented
    config = TrainConfig(**overrides)
    for name, value in overrides.items():
        assert getattr(config, name) == value, name
    # the same file through the command line's resolution (defaults < YAML < flags)
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    resolved = config_from_args(parser.parse_args(["--max-steps", "3"]), config_file=str(path))
    assert resolved.max_steps == 3
    assert dataclasses.replace(resolved, max_steps=config.max_steps) == config


def _numeric_fields() -> list[str]:
    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in dataclasses.fields(TrainConfig)
            if typing.get_args(hints[f.name]) and float in typing.get_args(hints[f.name])
            or hints[f.name] in (int, float)]


# (field, rejected values, accepted boundary values)
RANGES = {
    "learning_rate": ([0.0, -1e-4, math.inf, math.nan], [1e-12, 10.0]),
    "weight_decay": ([-0.1, math.inf, math.nan], [0.0]),
    "warmup_ratio": ([-0.1, 1.0, math.nan], [0.0, 0.99]),
    "lora_dropout": ([-0.1, 1.0, math.inf], [0.0, 0.5]),
    "eval_fraction": ([-0.1, 1.0, math.nan], [0.0]),
    "adam_beta1": ([1.0, -0.5, math.nan], [0.0, 0.9]),
    "adam_beta2": ([1.0, math.inf], [0.999]),
    "adam_epsilon": ([0.0, -1e-8, math.inf], [1e-8]),
    "lora_alpha": ([0.0, -1.0, math.inf], [1, 0.5]),
    "max_grad_norm": ([0.0, -1.0, math.inf, math.nan], [None, 1e-3]),
    "lora_r": ([0, -4, 1.5], [1]),
    "max_length": ([0], [1]),
    "max_steps": ([0, -1], [1]),
    "batch_size": ([0], [1]),
    "gradient_accumulation_steps": ([0], [1]),
    "eval_batch_size": ([0], [1]),
    "logging_steps": ([0], [1]),
    "warmup_steps": ([-1], [0]),
    "save_steps": ([-1], [0]),
    "eval_steps": ([-1], [0]),
    "loss_chunk_size": ([-1], [0]),
    "seed": ([-1, 2**32], [0, 2**32 - 1]),
    "loftq_iter": ([0, -1], [1, 5]),
    "beta": ([0, -0.1, float("nan")], [0.1, 2.0]),
    "label_smoothing": ([-0.1, 0.5], [0.0]),  # > 0 needs loss_type robust: see the next test
}


def test_every_numeric_field_has_a_range_test() -> None:
    assert set(_numeric_fields()) == set(RANGES)


@pytest.mark.parametrize("name", sorted(RANGES))
def test_numeric_fields_reject_bad_values_naming_the_field(name: str) -> None:
    rejected, accepted = RANGES[name]
    for value in [*rejected, True, "1", [1]]:
        with pytest.raises(FieldError, match=rf"^`{name}`: must be ") as info:
            TrainConfig(**{name: value})
        assert info.value.field == name and "--" not in str(info.value)
    for value in accepted:
        assert getattr(TrainConfig(**{name: value}), name) == value


def test_preference_fields_are_checked_against_the_task() -> None:
    assert TrainConfig(task="dpo", loss_type="robust", label_smoothing=0.2).label_smoothing == 0.2
    cases = [({"task": "dpo", "label_smoothing": 0.1}, "label_smoothing"),
             ({"task": "orpo", "loss_type": "ipo"}, "loss_type"), ({"task": "dpo", "packing": True}, "packing"),
             ({"task": "dpo", "format": "instruction"}, "format"), ({"task": "dpo", "loss_type": "kto"}, "loss_type")]
    for kwargs, name in cases:
        with pytest.raises(FieldError) as info:
            TrainConfig(**kwargs)
        assert info.value.field == name


def test_other_fields_reject_wrong_types_and_choices() -> None:
    cases = {"optim": "sgd", "lr_scheduler": "step", "quant": "int8", "format": "alpaca", "task": "rank",
             "compute_dtype": "fp16", "packing": 1, "resume": "yes", "text_column": "", "target_modules": " ",
             "label_column": 3, "data": 5}
    for name, value in cases.items():
        with pytest.raises(FieldError, match=rf"^`{name}`: must be ") as info:
            TrainConfig(**{name: value})
        assert info.value.field == name
    with pytest.raises(FieldError, match="`packing` and `group_by_length` are exclusive") as info:
        TrainConfig(packing=True, group_by_length=True)
    assert info.value.field == "group_by_length"
    with pytest.raises(FieldError, match="`resume`.*`overwrite`"):
        TrainConfig(resume=True, overwrite=True)
    with pytest.raises(FieldError, match="`task` classify"):
        TrainConfig(packing=True, task="classify")
    with pytest.raises(FieldError, match="`target_modules`: names no module"):
        TrainConfig(target_modules=" , ")
    assert TrainConfig(data=Path("d.jsonl"), lora_alpha=32).data == "d.jsonl"  # a path, a whole alpha
    assert isinstance(TrainConfig(lora_alpha=32).lora_alpha, float)


def test_quant_types_come_from_fourbit_quant() -> None:
    for quant in (*QUANT_TYPES, "none"):
        assert TrainConfig(quant=quant).quant == quant
    with pytest.raises(FieldError, match=", ".join(QUANT_TYPES)):
        TrainConfig(quant="nf8")


def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_yaml_values_are_read_as_their_field_types(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "# comment\nlearning_rate: 2e-4\nlora-alpha: 32\nmax_grad_norm: null\n"
                           "target_modules: [q_proj, v_proj]\nmax_steps: '100'\nwarmup_steps: 1.0e+1\n")
    assert load_yaml_overrides(path) == {"learning_rate": 2e-4, "lora_alpha": 32.0, "max_grad_norm": None,
                                         "target_modules": "q_proj,v_proj", "max_steps": 100, "warmup_steps": 10}
    assert load_yaml_overrides(_yaml(tmp_path, "# nothing set\n")) == {}


BAD_YAML = [
    ("lora_r: 8\nlora_rank: 8\n", 2, "unknown key 'lora_rank'; did you mean 'lora_r'?"),
    ("learning_rat: 1.0e-4\n", 1, "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
    ("zzz: 1\n", 1, "unknown key 'zzz'; the keys are TrainConfig's fields"),
    ("lora_r: 8\nmax_steps: 10\nlora-r: 4\n", 3, "'lora_r' is set twice \\(lines 1 and 3\\)"),
    ("max_steps: ten\n", 1, "'max_steps' must be a whole number >= 1; got 'ten'"),
    ("max_steps: 2.5\n", 1, "'max_steps' must be a whole number >= 1; got 2.5"),
    ("learning_rate: .inf\n", 1, "'learning_rate' must be a finite number > 0; got inf"),
    ("packing: 'yes'\n", 1, "'packing' must be true or false; got 'yes'"),
    ("optim: sgd\n", 1, "'optim' must be one of adamw, "),
    ("\n\nlora_dropout: [0.1]\n", 3, "'lora_dropout' must be a finite number in \\[0, 1\\); got \\[0.1\\]"),
    ("lora_r: 8\nlora_alpha: [16\n", 3, "not valid YAML"),
    ("lora_r: 8\n  bad indent: 1\n", 2, "not valid YAML"),
    ("- lora_r: 8\n", 1, "a config file holds 'field: value' lines, one per option; found a list"),
    ("just text\n", 1, "a config file holds .*; found the value 'just text'"),
    ("lora_r: 8\n---\nlora_r: 4\n", 2, "not valid YAML"),
    (b"lora_r: 8\nmodel: caf\xe9\n", 2, "not UTF-8"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_YAML)
def test_bad_yaml_names_file_line_and_key(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = _yaml(tmp_path, text)
    with pytest.raises(InputFileError, match=rf"run\.yaml:{line}: {message}") as info:
        load_yaml_overrides(path)
    assert info.value.path == str(path) and info.value.line == line


def test_missing_config_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"nope\.yaml: no such file"):
        load_yaml_overrides(tmp_path / "nope.yaml")
    with pytest.raises(InputFileError, match="is a folder"):
        load_yaml_overrides(tmp_path)


def test_saved_config_loads_back(tmp_path: Path) -> None:
    config = TrainConfig(data="d.jsonl", out="o", lora_r=8, max_grad_norm=None, quant="int4",
                         target_modules="q_proj,v_proj", learning_rate=3e-5)
    path = save_config(config, tmp_path)
    assert TrainConfig(**load_yaml_overrides(path)) == config


def test_optional_number_flag_takes_none() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert config_from_args(parser.parse_args(["--max-grad-norm", "none"])).max_grad_norm is None
    assert config_from_args(parser.parse_args(["--max-grad-norm", "1.5"])).max_grad_norm == 1.5


# --- through the command line: one line naming the flag or the YAML file and line; nothing written ----------


@pytest.mark.parametrize(("flags", "flag"), [
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--learning-rate=-1e-4"], "--learning-rate"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--warmup-ratio", "1"], "--warmup-ratio"),
    (["--lora-dropout", "1.0"], "--lora-dropout"),
    (["--lora-r", "0"], "--lora-r"),
    (["--lora-alpha", "0"], "--lora-alpha"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-grad-norm", "0"], "--max-grad-norm"),
    (["--adam-epsilon", "0"], "--adam-epsilon"),
    (["--optim", "sgd"], "--optim"),
    (["--quant", "nf8"], "--quant"),
    (["--packing", "--group-by-length"], "group-by-length"),  # the CLI names a boolean by its --no- form
])
def test_cli_names_the_flag(tmp_path: Path, flags: list[str], flag: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    result = run_cli("finetune", tmp_path / "no-model", "--data", data, "--out", out, *flags)
    message = assert_clean_error(result, flag)
    assert "`" not in message
    assert not out.exists()


def test_cli_names_the_yaml_file_line_and_key(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    for text, named in [("lora_r: 8\nlearning-rat: 1.0e-4\n", ("run.yaml:2", "'learning-rat'", "'learning_rate'")),
                        ("max_steps: many\n", ("run.yaml:1", "'max_steps'", "whole number")),
                        ("max_steps: [1\n", ("run.yaml:2", "not valid YAML"))]:
        path = _yaml(tmp_path, text)
        result = run_cli("finetune", tmp_path / "no-model", "--config", path, "--data", data, "--out", out)
        assert_clean_error(result, str(path), *named)
        assert not out.exists()
    assert_clean_error(run_cli("finetune", "--config", tmp_path / "none.yaml", "--data", data, "--out", out),
                       str(tmp_path / "none.yaml"))
    assert_clean_error(run_cli("finetune", "--data", data, "--out", out, "--max-grad-norm", "x"),
                       "--max-grad-norm", code=2)
