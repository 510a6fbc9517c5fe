"""Resume after damage and faults: damaged checkpoints are skipped, a torn metrics line is ignored, a run that
diverges saves nothing of the bad step, and real signals (SIGKILL while a checkpoint is written, SIGINT between
steps) leave a folder from which ``--resume`` finishes bit-exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit._errors import FieldError
from fourbit._io import TEMP_PREFIX
from fourbit.train import step, trainer
from fourbit.train.checkpoint import find_resumable
from fourbit.train.config import TrainConfig
from fourbit.train.metrics import read_metrics
from fourbit.train.trainer import TrainingInterrupted, train

_REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ in process
def _cfg(tmp_path: Path, out: str, **kw) -> TrainConfig:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}."}) + "\n" for i in range(16)))
    base = dict(data=str(data), out=str(tmp_path / out), max_steps=4, batch_size=2, gradient_accumulation_steps=1,
                lora_r=4, lora_alpha=8, lora_dropout=0.1, compute_dtype="fp32", eval_steps=0, save_steps=1,
                progress=False, learning_rate=1e-3, eval_fraction=0.1, max_length=64)
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg: TrainConfig, log=None, **kw):
    return train(cfg, make_llama(), make_tokenizer(), log=log or (lambda *_: None), **kw)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:  # exact: same float ops in the same order on CPU, state restored bit for bit
        assert torch.equal(ta[k], tb[k]), k


def _curve(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run, in process."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg(tmp, "full")
    _run(cfg)
    return Path(cfg.out)


@pytest.mark.parametrize("damage", ["optimizer.safetensors", "trainer_state.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, damage, ctrl_c_after_step) -> None:
    cfg = _cfg(tmp_path, "part")
    ctrl_c_after_step(3)
    with pytest.raises(TrainingInterrupted):
        _run(cfg)
    newest = Path(cfg.out) / "checkpoints" / "step-000003" / damage
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])  # truncated, as by a full disk
    lines: list[str] = []
    res = _run(cfg.replace(resume=True), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert res.resumed_from == 2
    assert any("skipping damaged checkpoint" in line and str(newest) in line for line in lines), lines
    assert _curve(reference) == _curve(Path(cfg.out))
    _assert_same_adapter(reference, Path(cfg.out))


def test_torn_last_metrics_line_does_not_stop_resume(tmp_path, reference, ctrl_c_after_step) -> None:
    cfg = _cfg(tmp_path, "part")
    ctrl_c_after_step(2)
    with pytest.raises(TrainingInterrupted):
        _run(cfg)
    with (Path(cfg.out) / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.1')  # the writer was killed mid-line
    assert _run(cfg.replace(resume=True)).resumed_from == 2
    assert _curve(reference) == _curve(Path(cfg.out))
    _assert_same_adapter(reference, Path(cfg.out))


def test_resume_may_change_steps_and_learning_rate_schedule_fields(tmp_path) -> None:
    cfg = _cfg(tmp_path, "run", max_steps=2)
    _run(cfg)
    lines: list[str] = []
    res = _run(cfg.replace(resume=True, max_steps=3, eval_steps=1),
               log=lambda *a: lines.append(" ".join(map(str, a))))
    assert res.steps == 3 and res.resumed_from == 2
    assert any("max_steps changed: 2 -> 3" in line for line in lines), lines


def test_nan_loss_stops_before_saving_anything_of_that_step(tmp_path, monkeypatch) -> None:
    cfg = _cfg(tmp_path, "run")
    real, calls = step.loss_sum, []

    def poisoned(model, batch, config):
        calls.append(1)
        loss, logits = real(model, batch, config)
        return (loss * float("nan"), logits) if len(calls) == 2 else (loss, logits)

    monkeypatch.setattr(step, "loss_sum", poisoned)
    with pytest.raises(FieldError, match="diverged at step 2") as err:
        _run(cfg)
    assert err.value.field == "learning_rate" and "step-000001" in str(err.value)
    out = Path(cfg.out)
    assert not (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    checkpoint, skipped = find_resumable(out)
    assert checkpoint is not None and checkpoint.step == 1 and not skipped
    assert all(torch.isfinite(t).all() for t in _adapter(checkpoint.folder).values())
    assert all(r["loss"] is not None for r in read_metrics(out / "metrics.jsonl") if "loss" in r)


def test_a_new_run_replaces_the_old_one_only_at_its_first_checkpoint(tmp_path, monkeypatch) -> None:
    cfg = _cfg(tmp_path, "run", max_steps=2)
    _run(cfg)
    out = Path(cfg.out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    seen: list[bool] = []
    real = trainer._save

    def spy(*a, **k):
        seen.append({p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before)
        return real(*a, **k)

    monkeypatch.setattr(trainer, "_save", spy)
    _run(cfg.replace(overwrite=True, seed=1, save_steps=2))
    assert seen == [True]  # until the new run's first checkpoint, the old run was untouched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


# -------------------------------------------------------------------------------- real processes, signals
# Each run below is the real `fourbit finetune` in its own process, started through tests/train/_pause_launcher.py,
# which stops it at one exact point (it wraps a fourbit function, and fourbit knows nothing of it) so that the
# signal lands there and nowhere else.
_FLAGS = ["--max-steps", "4", "--lora-r", "4", "--lora-alpha", "8", "--batch-size", "2",
          "--gradient-accumulation-steps", "1", "--max-length", "64", "--eval-steps", "2", "--compute-dtype",
          "fp32", "--learning-rate", "1e-3", "--eval-fraction", "0.1", "--no-progress", "--json"]
_DEADLINE_S = 180
_LAUNCHER = Path(__file__).resolve().with_name("_pause_launcher.py")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signals")
    model = root / "tiny-llama"
    make_llama().eval().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}."}) + "\n" for i in range(16)))
    return {"root": root, "model": model, "data": data}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(_REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _finetune_args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["finetune", str(ws["model"]), "--data", str(ws["data"]), "--out", str(out), *_FLAGS, *extra]


def _finish(ws: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fourbit", *_finetune_args(ws, out, *extra)], env=_env(),
                          capture_output=True, text=True, timeout=_DEADLINE_S)
    assert done.returncode == 0, done.stderr
    return done


def _start_and_wait(ws: dict[str, Path], out: Path, pause: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """Start a finetune that pauses at ``pause`` (see the launcher) and return once it is there (its marker
    file exists), with the marker."""
    marker = ws["root"] / f"marker-{out.name}"
    proc = subprocess.Popen([sys.executable, str(_LAUNCHER), pause, str(marker), "--",
                             *_finetune_args(ws, out, *extra)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, marker, pause)
    return proc, marker


def _wait_for(proc: subprocess.Popen, marker: Path, pause: str) -> None:
    deadline = time.monotonic() + _DEADLINE_S
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err_text = proc.communicate()
            pytest.fail(f"finetune never reached {pause} (exit {proc.returncode}): {err_text[-2000:]}")
        time.sleep(0.05)


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(workspace) -> Path:
    out = workspace["root"] / "uninterrupted"
    _finish(workspace, out, "--save-steps", "1")
    return out


@pytest.mark.multiprocess
def test_sigkill_while_writing_a_checkpoint_then_resume(workspace, uninterrupted) -> None:
    out = workspace["root"] / "killed"
    proc, _ = _start_and_wait(workspace, out, "checkpoint:2", "--save-steps", "1")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=_DEADLINE_S)
    # Nothing looks complete that is not: only step 1 is a checkpoint, no adapter at the top yet.
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(TEMP_PREFIX)) == ["step-000001"]
    assert [p for p in ckpts.iterdir() if p.name.startswith(TEMP_PREFIX)], "the half-written step 2 is a temp"
    assert not (out / "adapter_model.safetensors").exists()
    done = _finish(workspace, out, "--save-steps", "1", "--resume")
    assert _summary(done.stdout)["resumed_from"] == 1
    assert not [p for p in ckpts.iterdir() if p.name.startswith(TEMP_PREFIX)], "stale temp cleaned on resume"
    _assert_same_adapter(uninterrupted, out)
    assert _curve(uninterrupted) == _curve(out)


# (pause point, --save-steps, the step the run stops after). Ctrl-C before the first step, between steps with
# no periodic checkpoint (the one to resume from is written because of the Ctrl-C), while a checkpoint is being
# written, during an evaluation, and after the last step: each stops at a step boundary with a checkpoint.
# Ctrl-C after the loading, before the trainer's own handler is in force, counts as one before the first step.
_CTRL_C_POINTS = [("train:0", "1", 1), ("step:0", "1", 1), ("step:2", "0", 2), ("checkpoint:2", "1", 2),
                  ("eval:1", "1", 2), ("step:4", "1", 4)]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("pause", "save_steps", "stopped_at"), _CTRL_C_POINTS,
                         ids=[p.replace(":", "-") for p, _, _ in _CTRL_C_POINTS])
def test_sigint_stops_at_a_step_with_a_checkpoint_then_resume(workspace, uninterrupted, pause: str,
                                                              save_steps: str, stopped_at: int) -> None:
    out = workspace["root"] / f"interrupted-{pause.replace(':', '-')}"
    proc, _ = _start_and_wait(workspace, out, pause, "--save-steps", save_steps)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=_DEADLINE_S)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    checkpoint = out / "checkpoints" / f"step-{stopped_at:06d}"
    assert f"interrupted at step {stopped_at}; checkpoint {checkpoint} written" in lines[0], lines
    assert "--resume" in lines[0]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ([checkpoint.name] if save_steps == "0" else [f"step-{i:06d}" for i in range(1, stopped_at + 1)])
    assert not (out / "adapter_model.safetensors").exists()
    done = _finish(workspace, out, "--save-steps", save_steps, "--resume")
    assert _summary(done.stdout)["resumed_from"] == stopped_at
    _assert_same_adapter(uninterrupted, out)
    assert _curve(uninterrupted) == _curve(out)


@pytest.mark.multiprocess
def test_a_second_sigint_stops_at_once_and_names_the_checkpoint_to_resume(workspace, uninterrupted) -> None:
    """The first Ctrl-C after step 2 asks for a stop; a second one while step 2's checkpoint is written stops at
    once: exit 130, one line naming step 1's checkpoint (step 2's was not finished, so it is not there), and
    --resume from it is exact."""
    out = workspace["root"] / "twice"
    proc, marker = _start_and_wait(workspace, out, "step:2,checkpoint:2", "--save-steps", "1")
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, Path(f"{marker}.1"), "checkpoint:2")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=_DEADLINE_S)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert f"checkpoint {out / 'checkpoints' / 'step-000001'} is the newest" in lines[0], lines
    assert "--resume" in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(TEMP_PREFIX)) == [
        "step-000001"]
    done = _finish(workspace, out, "--save-steps", "1", "--resume")
    assert _summary(done.stdout)["resumed_from"] == 1
    _assert_same_adapter(uninterrupted, out)
    assert _curve(uninterrupted) == _curve(out)


@pytest.mark.multiprocess
@pytest.mark.parametrize("pause", ["parse:0", "load:0"])
def test_sigint_before_training_stops_at_once_and_writes_nothing(workspace, pause: str) -> None:
    """While the command line is read or the model loads (Python's default handler, then the command's, raise
    at once): exit 130 and one line, no traceback, nothing under --out."""
    out = workspace["root"] / f"early-{pause.split(':')[0]}"
    proc, _ = _start_and_wait(workspace, out, pause, "--save-steps", "1")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=_DEADLINE_S)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0] == ("fourbit: interrupted" if pause == "parse:0" else
                        "fourbit finetune: interrupted before the first step; nothing was written"), lines
    assert not out.exists()
    assert not [p for p in workspace["root"].iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("pause", ["finish:0", "returned:0"])
def test_sigint_once_the_last_step_is_done_lets_the_run_complete(workspace, uninterrupted, pause: str) -> None:
    """A Ctrl-C after the last step's boundary (while the finished run writes its loss curve, or once the trainer
    has returned) has nothing left to stop: the run completes, exit 0, its results printed, no "interrupted"."""
    out = workspace["root"] / f"late-{pause.split(':')[0]}"
    proc, _ = _start_and_wait(workspace, out, pause, "--save-steps", "1")
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=_DEADLINE_S)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "interrupted" not in err, err[-3000:]
    assert _summary(stdout)["steps"] == 4
    _assert_same_adapter(uninterrupted, out)
    assert (out / "loss_curve.png").is_file()


@pytest.mark.multiprocess
def test_sigint_while_the_finished_process_exits_changes_nothing(workspace, uninterrupted) -> None:
    """A Ctrl-C after the command has returned, in the interpreter's teardown (which restores the default
    action of SIGINT), is ignored: the finished run exits 0, not by the signal (-2) nor with a traceback."""
    out = workspace["root"] / "exiting"
    proc, marker = _start_and_wait(workspace, out, "exit:0", "--save-steps", "1")
    proc.send_signal(signal.SIGINT)
    marker.with_name(marker.name + ".go").write_text("")
    stdout, err = proc.communicate(timeout=_DEADLINE_S)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "interrupted" not in err, err[-3000:]
    assert _summary(stdout)["steps"] == 4
    _assert_same_adapter(uninterrupted, out)


@pytest.mark.multiprocess
def test_leftovers_of_a_killed_new_run_are_removed_by_the_next_run(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{TEMP_PREFIX}{dead.pid}-0badc0de-run"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 1, "loss"')
    _run(_cfg(tmp_path, "run", max_steps=1))
    assert not stale.exists()
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
