"""``fourbit finetune`` / ``fourbit merge`` given bad input: one line naming the flag or file, exit 1, no
traceback, and the previous run in --out left exactly as it was (nothing deleted, nothing half-written)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from _cli import assert_clean_error, run_cli

from fourbit._io import TEMP_PREFIX

_FAST = ["--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8", "--batch-size", "2",
         "--gradient-accumulation-steps", "1", "--max-length", "64", "--save-steps", "1", "--eval-steps", "0",
         "--compute-dtype", "fp32", "--learning-rate", "1e-3", "--target-modules", "q_proj,v_proj",
         "--no-progress", "--json"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_temps(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama folder, a data file and a finished 2-step run (two checkpoints), built once."""
    from _tiny_models import make_llama, make_tokenizer

    root = tmp_path_factory.mktemp("finished")
    model = root / "tiny-llama"
    make_llama().eval().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}."}) + "\n"
                            for i in range(16)))
    run = root / "run"
    result = run_cli("finetune", model, "--data", data, "--out", run, *_FAST)
    assert result.code == 0, result.err
    return {"model": model, "data": data, "run": run}


@pytest.fixture
def setup(finished, tmp_path) -> dict[str, Path]:
    """A private copy of the finished run (tests may damage it), with the shared model and data."""
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    return {**finished, "run": run, "tmp": tmp_path}


def _finetune(s: dict[str, Path], *extra: str, out: Path | None = None):
    return run_cli("finetune", s["model"], "--data", s["data"], "--out", out or s["run"], *_FAST, *extra)


def test_invalid_target_modules_with_overwrite_keeps_the_previous_run(setup) -> None:
    before = _snapshot(setup["run"])
    result = _finetune(setup, "--overwrite", "--target-modules", "nonexistent_proj")
    message = assert_clean_error(result, "--target-modules", "nonexistent_proj")
    # the flag named once, and the linear modules the model does have, each once (short names)
    assert message.count("--target-modules") == 1, message
    have = message[message.index("its linear modules: ") + len("its linear modules: "):].split(")")[0]
    assert have.split(", ") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "lm_head"], message
    assert _snapshot(setup["run"]) == before
    _no_temps(setup["tmp"])


def test_existing_run_without_overwrite_is_refused(setup) -> None:
    before = _snapshot(setup["run"])
    assert_clean_error(_finetune(setup), "--out", str(setup["run"]), "--overwrite")
    assert _snapshot(setup["run"]) == before


def test_out_holding_the_data_is_refused_even_with_overwrite(setup) -> None:
    data = setup["run"] / "data.jsonl"
    shutil.copy(setup["data"], data)
    before = _snapshot(setup["run"])
    result = run_cli("finetune", setup["model"], "--data", data, "--out", setup["run"], *_FAST, "--overwrite")
    assert_clean_error(result, "--out", str(data))
    assert _snapshot(setup["run"]) == before


def test_out_that_is_a_file(setup) -> None:
    target = setup["tmp"] / "notes.txt"
    target.write_text("keep me\n")
    assert_clean_error(_finetune(setup, out=target), "--out", str(target))
    adapter = setup["run"]
    assert_clean_error(run_cli("merge", "--adapter", adapter, "--out", target), "--out", str(target))
    assert target.read_text() == "keep me\n"


def test_out_under_a_read_only_folder(setup, monkeypatch) -> None:
    locked = setup["tmp"] / "locked"
    locked.mkdir()
    real_access = os.access
    # (as root, chmod cannot make a folder unwritable: deny access the way a read-only mount would)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    assert_clean_error(_finetune(setup, out=locked / "run"), "--out", str(locked))
    assert_clean_error(run_cli("merge", "--adapter", setup["run"], "--out", locked / "m"), "--out", str(locked))
    assert list(locked.iterdir()) == []


def test_disk_full_while_writing_a_checkpoint(setup, monkeypatch) -> None:
    import fourbit.train.checkpoint as checkpoint

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_safetensors", full)
    before = _snapshot(setup["run"])
    # a new run over the old one fails at its first checkpoint: the old run is still there, whole
    result = _finetune(setup, "--overwrite")
    assert_clean_error(result, "optimizer.safetensors", "no space left")
    assert _snapshot(setup["run"]) == before
    # a resumed run fails writing step 3: no half-written step-000003, the older checkpoints intact
    result = _finetune(setup, "--resume", "--max-steps", "3")
    assert_clean_error(result, "optimizer.safetensors", "no space left")
    assert sorted(p.name for p in (setup["run"] / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert {k: v for k, v in _snapshot(setup["run"]).items() if k.startswith("checkpoints")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints")}
    _no_temps(setup["tmp"])


def test_resume_without_checkpoint_fails_before_loading_the_model(setup, monkeypatch) -> None:
    import fourbit.train.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(loading, "load_for_training", no_load)
    fresh = setup["tmp"] / "fresh"
    assert_clean_error(_finetune(setup, "--resume", out=fresh), "resume", str(fresh))
    assert not fresh.exists()
    missing = setup["tmp"] / "missing.jsonl"
    result = run_cli("finetune", setup["model"], "--data", missing, "--out", setup["tmp"] / "o", *_FAST)
    assert_clean_error(result, str(missing))


def test_resume_with_a_damaged_only_checkpoint_names_the_file(setup) -> None:
    ckpts = setup["run"] / "checkpoints"
    shutil.rmtree(ckpts / "step-000002")
    state = ckpts / "step-000001" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:40])
    message = assert_clean_error(_finetune(setup, "--resume"), "resume", str(state))
    assert "JSON" in message


def test_resume_that_changes_the_model_is_refused_and_rewrites_nothing(setup) -> None:
    before = _snapshot(setup["run"])
    result = _finetune(setup, "--resume", "--max-steps", "3", "--quant", "fp4", "--lora-r", "8")
    assert_clean_error(result, "--quant", "'nf4'", "'fp4'")
    result = _finetune(setup, "--resume", "--max-steps", "3", "--lora-r", "8")
    assert_clean_error(result, "--lora-r", "4", "8")
    result = _finetune(setup, "--resume", "--max-steps", "3", "--seed", "1")
    assert_clean_error(result, "--seed")
    assert _snapshot(setup["run"]) == before  # train_config.yaml included


def test_merge_refuses_another_quant_or_base_than_the_runs(setup) -> None:
    out = setup["tmp"] / "merged"
    assert_clean_error(run_cli("merge", "--adapter", setup["run"], "--out", out, "--quant", "fp4"),
                       "--quant", "nf4", "fp4", "--force")
    other = setup["tmp"] / "other-model"
    shutil.copytree(setup["model"], other)
    assert_clean_error(run_cli("merge", other, "--adapter", setup["run"], "--out", out),
                       "MODEL", str(other), str(setup["model"]), "--force")
    assert not out.exists()


def test_merge_bad_adapter_folder(setup) -> None:
    missing = setup["tmp"] / "nothing-here"
    assert_clean_error(run_cli("merge", "--adapter", missing, "--out", setup["tmp"] / "m"), str(missing))
    existing = setup["tmp"] / "full"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert_clean_error(run_cli("merge", "--adapter", setup["run"], "--out", existing), "--out", "--overwrite")
    assert (existing / "keep.txt").read_text() == "x"


def test_infinite_learning_rate_stops_cleanly_and_keeps_the_previous_run(setup) -> None:
    # Either the config refuses it up front or the first update turns the adapter non-finite and the run
    # stops there (tests/train/test_resume_and_faults.py checks the stop itself): never a NaN adapter.
    before = _snapshot(setup["run"])
    result = _finetune(setup, "--overwrite", "--learning-rate", "inf")
    message = assert_clean_error(result, "--learning-rate")
    assert "lower" in message or "must" in message
    assert result.out.strip() == ""  # no summary holding NaNs
    assert _snapshot(setup["run"]) == before
    _no_temps(setup["tmp"])
