"""``fourbit finetune --task dpo|orpo`` end to end on the tiny llama (4-bit base): the reward margin rises on the
training pairs, metrics.jsonl records the rewards and the loss plot draws them, the run resumes exactly after
SIGKILL in the middle of a checkpoint, and 2 processes (torchrun, gloo; ddp and fsdp) train as one process
over the same global batches.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli import child_env, run_cli
from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit.train.metrics import read_metrics

_REPO = Path(__file__).resolve().parents[2]
_LAUNCHER = Path(__file__).resolve().with_name("_pause_launcher.py")
_DEADLINE_S = 180
_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preference")
    make_llama(0).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"{i} plus 3 is", "chosen": f" {i + 3}.", "rejected": f" about {i + 4}"}) + "\n"
        for i in range(32)))
    return root


def _args(folder: Path, task: str, out: str, *extra: str) -> list[str]:
    return [str(folder / "model"), "--task", task, "--data", str(folder / "pairs.jsonl"), "--out",
            str(folder / out), "--max-steps", "4", "--batch-size", "2", "--gradient-accumulation-steps", "2",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--compute-dtype", "fp32",
            "--eval-steps", "2", "--save-steps", "1", "--no-progress", "--learning-rate", "1e-2",
            "--eval-fraction", "0.125", "--max-length", "64", "--json", *extra]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _curve(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("task", ["dpo", "orpo"])
def test_reward_margin_rises_and_is_recorded_and_plotted(folder, task) -> None:
    out = folder / f"long-{task}"
    # evaluated on the training pairs themselves: preference training must separate them
    result = run_cli("finetune", *_args(folder, task, out.name, "--max-steps", "24", "--eval-steps", "12",
                                        "--save-steps", "0", "--eval-data", str(folder / "pairs.jsonl"),
                                        "--lora-dropout", "0"))
    assert result.code == 0, result.err
    steps = [r for r in _curve(out) if "loss" in r]
    evals = [r for r in _curve(out) if "eval_loss" in r]
    assert len(steps) == 24 and all(set(_REWARDS) <= r.keys() for r in steps)
    for r in steps:  # the margin is the chosen reward minus the rejected one; accuracy a fraction of pairs
        assert abs(r["rewards/margins"] - (r["rewards/chosen"] - r["rewards/rejected"])) < 1e-9
        assert 0 <= r["rewards/accuracies"] <= 1
    if task == "dpo":  # the policy starts as the reference: zero rewards, loss log 2
        assert steps[0]["rewards/margins"] == 0 and abs(steps[0]["loss"] - 0.6931472) < 1e-5
    # the first step's rewards are measured before its update: the margin the run starts from
    start = sum(r["rewards/margins"] for r in steps[:2]) / 2
    end = sum(r["rewards/margins"] for r in steps[-4:]) / 4
    assert end > start + 0.05, (start, end)
    assert evals[-1]["eval_rewards/margins"] > 0.05 and evals[-1]["eval_rewards/accuracies"] >= 0.75
    assert (out / "loss_curve.png").stat().st_size > 0


def test_loss_plot_draws_the_rewards(folder, monkeypatch) -> None:
    import matplotlib.axes

    from fourbit.train.metrics import plot_loss_curve

    drawn: list[str] = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, label=None, **k: drawn.append(label) or real(self, *a, label=label, **k))
    metrics = folder / "plot.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "rewards/chosen": 0.1 * s,
                                           "rewards/rejected": -0.1 * s, "rewards/margins": 0.2 * s,
                                           "rewards/accuracies": 0.5}) + "\n" for s in range(1, 4)))
    assert plot_loss_curve(metrics, folder / "plot.png") is not None
    assert drawn == ["train loss", "chosen", "rejected", "margins", "accuracy"]


# ------------------------------------------------------------------ SIGKILL while writing a checkpoint
def _start_paused(folder: Path, argv: list[str], pause: str) -> subprocess.Popen:
    marker = folder / f"marker-{Path(argv[argv.index('--out') + 1]).name}"
    proc = subprocess.Popen([sys.executable, str(_LAUNCHER), pause, str(marker), "--", "finetune", *argv],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + _DEADLINE_S
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"finetune never reached {pause}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return proc


def _finish(argv: list[str], log: list[str] | None = None) -> dict:
    done = subprocess.run([sys.executable, "-m", "fourbit", "finetune", *argv], env=child_env(), capture_output=True,
                          text=True, timeout=_DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    if log is not None:
        log.extend(done.stderr.splitlines())
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.multiprocess
@pytest.mark.parametrize("task", ["dpo", "orpo"])
def test_sigkill_while_writing_a_checkpoint_then_resume_is_exact(folder, task) -> None:
    whole = _args(folder, task, f"whole-{task}")
    _finish(whole)
    killed = _args(folder, task, f"killed-{task}")
    proc = _start_paused(folder, killed, "checkpoint:3")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=_DEADLINE_S)
    out = folder / f"killed-{task}"
    assert not (out / "adapter_model.safetensors").exists()
    log: list[str] = []
    assert _finish([*killed, "--resume"], log)["resumed_from"] == 2
    if task == "dpo":  # the reference log-probs of the killed run's start, read back: no reference pass again
        assert any("reference log-probs of 32 pairs read from" in line for line in log), log
        assert not any("(the base, adapter off) in" in line for line in log), log
    a, b = _adapter(folder / f"whole-{task}"), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact: same ops, restored state
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(_curve(folder / f"whole-{task}")) == strip(_curve(out))


# ------------------------------------------------------------------ two processes (torchrun, gloo)
def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "fourbit", "finetune", *argv]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=_DEADLINE_S, cwd=_REPO)


@pytest.mark.multiprocess
@pytest.mark.parametrize("task", ["dpo", "orpo"])
def test_ddp_and_fsdp_train_as_one_process_over_the_same_global_batches(folder, task, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # 1 process with accumulation 4 = 2 processes with accumulation 2: the same global batches of 8 pairs
    one = run_cli("finetune", *_args(folder, task, f"one-{task}", "--gradient-accumulation-steps", "4"))
    assert one.code == 0, one.err
    ddp = _torchrun(_args(folder, task, f"ddp-{task}", "--distributed", "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = _torchrun(_args(folder, task, f"fsdp-{task}", "--distributed", "fsdp"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    a, b, c = (_adapter(folder / f"{m}-{task}") for m in ("one", "ddp", "fsdp"))
    assert all(torch.equal(b[k], c[k]) for k in b)  # fsdp gathers the same bytes: bit for bit ddp
    # the order of the gradient additions differs between 1 and 2 processes: rounding, carried on by AdamW
    rel = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)
    assert rel <= 1e-5, rel
    rows = lambda m: [r for r in _curve(folder / f"{m}-{task}") if "loss" in r]  # noqa: E731
    for r1, r2 in zip(rows("one"), rows("ddp"), strict=True):
        assert r2["world_size"] == 2
        for key in ("loss", *_REWARDS):
            assert abs(r1[key] - r2[key]) <= 1e-5 * max(1.0, abs(r1[key])), (key, r1, r2)
    evals = [r for r in _curve(folder / f"ddp-{task}") if "eval_loss" in r]
    assert len(evals) == 2 and all("eval_rewards/margins" in r for r in evals)
