"""``finetune`` refuses a run whose planned peak is above the memory available, before the model loads: exit 1,
one line with the planned and available GiB and the settings that would fit, nothing written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli

from fourbit.train import memory_check
from fourbit.train.config import TrainConfig
from fourbit.train.memory_check import MemoryWontFit, check_finetune_fits, finetune_plan


@pytest.fixture
def model(shared_tiny_llama_dir) -> Path:
    return shared_tiny_llama_dir


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"sample {i} " * 20}) + "\n" for i in range(8)))
    return path


def _peak(model: Path, **settings) -> int:
    return finetune_plan(TrainConfig(model=str(model), **settings)).peak("finetune")


def test_refusal_names_only_the_settings_that_fit(model):
    config = TrainConfig(model=str(model), max_length=2048, batch_size=8)
    with_ckpt = _peak(model, max_length=2048, batch_size=8, gradient_checkpointing=True)
    batch_1 = _peak(model, max_length=2048, batch_size=1)
    available = (max(with_ckpt, batch_1) + _peak(model, max_length=2048, batch_size=8)) // 2
    with pytest.raises(MemoryWontFit) as err:
        check_finetune_fits(config, available=available)
    text = str(err.value)
    fits = {"`gradient_checkpointing`": with_ckpt <= available, "`batch_size` 1": batch_1 <= available}
    for name, fit in fits.items():
        assert (name in text) == fit, text
    assert check_finetune_fits(config, available=10 * _peak(model, max_length=2048, batch_size=8)) == config


def test_auto_checkpointing_drops_the_kept_outputs_when_only_that_fits(model):
    config = TrainConfig(model=str(model), max_length=1024, batch_size=8, gradient_checkpointing=True)
    keep, full = _peak(model, **_settings(config)), _peak(model, **_settings(config, "full"))
    assert full < keep
    assert check_finetune_fits(config, available=keep) == config
    chosen = check_finetune_fits(config, available=(keep + full) // 2)
    assert chosen.gradient_checkpointing_policy == "full"
    with pytest.raises(MemoryWontFit):
        check_finetune_fits(dataclasses.replace(config, gradient_checkpointing_policy="keep-matmuls"),
                            available=(keep + full) // 2)


def _settings(config: TrainConfig, policy: str = "auto") -> dict:
    return dict(max_length=config.max_length, batch_size=config.batch_size, gradient_checkpointing=True,
                gradient_checkpointing_policy=policy)


def test_two_processes_need_twice_the_memory(model):
    config = TrainConfig(model=str(model))
    peak = _peak(model)
    check_finetune_fits(config, available=peak, processes=1)
    with pytest.raises(MemoryWontFit, match="2 processes"):
        check_finetune_fits(config, available=peak, processes=2)


def test_nothing_fits_says_so(model):
    with pytest.raises(MemoryWontFit, match="no single setting"):
        check_finetune_fits(TrainConfig(model=str(model)), available=1)


def test_cli_refuses_before_loading_and_writes_nothing(model, data, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "available_memory_bytes", lambda: 64 * 2**20)
    loads = []
    monkeypatch.setattr("fourbit.train.loading.load_for_training", lambda *a, **k: loads.append(1))
    out = tmp_path / "run"
    result = run_cli("finetune", model, "--data", data, "--out", out, "--max-steps", "1", "--no-progress")
    message = assert_clean_error(result, "GiB", "--memory-check")
    assert "fourbit plan" in message and not loads and not out.exists()
    assert list(tmp_path.iterdir()) == [data]


def test_no_memory_check_runs_anyway(model, data, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "available_memory_bytes", lambda: 64 * 2**20)
    out = tmp_path / "run"
    result = run_cli("finetune", model, "--data", data, "--out", out, "--max-steps", "1", "--no-progress",
                     "--no-memory-check", "--lora-r", "4", "--max-length", "32", "--batch-size", "2",
                     "--eval-steps", "0", "--save-steps", "0", "--compute-dtype", "fp32")
    assert result.code == 0, result.err
    assert (out / "adapter_model.safetensors").is_file()


def test_unplannable_model_is_not_checked(tmp_path):
    config = TrainConfig(model=str(tmp_path / "model.gguf"))
    assert check_finetune_fits(config, available=1) is config


def test_a_tokenizer_larger_than_the_embedding_is_named_before_training(model, data, tmp_path):
    import transformers
    from _tiny_models import make_tokenizer

    small = tmp_path / "small-vocab"
    config = transformers.AutoConfig.from_pretrained(model)
    config.vocab_size, config.pad_token_id = 200, 0
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(small)
    make_tokenizer().save_pretrained(small)
    result = run_cli("finetune", small, "--data", data, "--out", tmp_path / "run", "--max-steps", "1",
                     "--no-progress")
    message = assert_clean_error(result, "MODEL", "tokenizer")
    assert "200" in message and "259" in message and not (tmp_path / "run").exists()


def test_auto_checkpointing_keeps_matmul_outputs_only_under_the_budget(model, monkeypatch):
    """``auto`` keeps the LoRA layers' outputs when they cost at most ``AUTO_KEEP_MAX_BYTES`` (the tiny model at
    1 x 512); with the budget below what they cost, the checked config says ``full`` and the plan drops them."""
    from fourbit.models import memory_plan

    config = TrainConfig(model=str(model), max_length=512, batch_size=1, gradient_checkpointing=True)
    huge = 100 * _peak(model, max_length=512, batch_size=1)
    assert check_finetune_fits(config, available=huge).gradient_checkpointing_policy == "auto"
    kept = memory_plan.kept_matmul_output_bytes(memory_plan.model_counts(model), memory_check.finetune_settings(config))
    assert kept > 0
    auto_peak = _peak(model, **_settings(config))
    monkeypatch.setattr(memory_plan, "AUTO_KEEP_MAX_BYTES", kept - 1)
    assert check_finetune_fits(config, available=huge).gradient_checkpointing_policy == "full"
    assert _peak(model, **_settings(config)) == _peak(model, **_settings(config, "full")) < auto_peak
