"""Fine-tuning on several processes (gloo on CPU): a 2-process run equals a 1-process run over the same global
batches, only rank 0 prints and writes, a killed rank stops the others within seconds naming it, resume is
exact with the same process count and refused with another, and bad inputs fail with one line.

The 2-process runs are real processes (``python -m torch.distributed.run`` or two processes given the
``RANK``/``WORLD_SIZE`` environment directly), one thread each, on the tiny llama; each takes seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli import assert_clean_error, child_env, run_cli
from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit._errors import FieldError
from fourbit.train.distributed import fingerprint_model
from fourbit.train.metrics import read_metrics

_REPO = Path(__file__).resolve().parents[2]
_TIMEOUT = 180  # bound on every multi-process run (each takes seconds)
_LAUNCHER = Path(__file__).resolve().with_name("_pause_launcher.py")


def _args(folder: Path, out: str, *extra: str) -> list[str]:
    # batch 2 x accumulation x processes = a global batch of 8; dropout on, so its masks are checked too
    return [str(folder / "model"), "--data", str(folder / "data.jsonl"), "--out", str(folder / out),
            "--max-steps", "4", "--batch-size", "2", "--global-batch-size", "8", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-dropout", "0.1", "--compute-dtype", "fp32", "--eval-steps", "2",
            "--save-steps", "1", "--no-progress", "--learning-rate", "1e-3", "--eval-fraction", "0.1",
            "--max-length", "64", "--json", *extra]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "fourbit", "finetune", *argv]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=_TIMEOUT, cwd=_REPO)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(argvs: list[list[str]], pauses: list[tuple[str, Path] | None] | None = None) -> list[subprocess.Popen]:
    """One process per argv, given rank i of len(argvs) directly (no torchrun agent in between). A rank with a
    pause ``(WHERE:N, marker)`` runs through tests/train/_pause_launcher.py, which stops it there (see that
    script) and writes ``marker``."""
    port = str(_free_port())
    procs = []
    for rank, argv in enumerate(argvs):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(argvs)), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        pause = (pauses or [None] * len(argvs))[rank]
        entry = ["-m", "fourbit"] if pause is None else [str(_LAUNCHER), pause[0], str(pause[1]), "--"]
        procs.append(subprocess.Popen([sys.executable, *entry, "finetune", *argv], env=env, cwd=_REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    make_llama(0).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}."}) + "\n"
                                             for i in range(40)))
    return root


@pytest.fixture(scope="module")
def two_process_run(folder: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted 4-step run on 2 processes (torchrun, gloo)."""
    proc = _torchrun(*_args(folder, "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "two", proc


@pytest.mark.multiprocess
def test_two_processes_equal_one_process_over_the_same_global_batches(folder, two_process_run, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = run_cli("finetune", *_args(folder, "one"))  # 1 process, accumulation 4 instead of 2 x 2 processes
    assert one.code == 0, one.err
    two, proc = two_process_run
    # fp32; the only difference left is the order of the gradient additions ((g0+g1)+(g2+g3) on two ranks,
    # ((g0+g1)+g2)+g3 on one), a rounding difference that AdamW carries on: measured ~1e-6.
    assert _max_rel_diff(_adapter(folder / "one"), _adapter(two)) <= 1e-5
    curve = lambda out: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(out / "metrics.jsonl")]  # noqa: E731
    for (s1, l1, e1), (s2, l2, e2) in zip(curve(folder / "one"), curve(two), strict=True):
        assert s1 == s2 and (l1 is None) == (l2 is None) and (e1 is None) == (e2 is None)
        assert l1 is None or abs(l1 - l2) <= 1e-5 * abs(l1)
        assert e1 is None or abs(e1 - e2) <= 1e-5 * abs(e1)
    # metrics record the process count; the summary is printed once (rank 0) and reports it
    steps = [r for r in read_metrics(two / "metrics.jsonl") if "loss" in r]
    assert [r["world_size"] for r in steps] == [2] * 4 and all(r["tokens_per_s"] > 0 for r in steps)
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2 and summaries[0]["steps"] == 4
    assert proc.stderr.count("trainable params") == 1  # only rank 0 logs
    # one run folder, written once, in the single-process format
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [f"step-{i:06d}" for i in range(1, 5)]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folder left beside it
    state = json.loads((two / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["batch"] == 8  # 2 steps x 2 x 2 micro-batches
    assert json.loads((two / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.multiprocess
def test_resume_with_another_process_count_is_refused(folder, two_process_run, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    two, _ = two_process_run
    copy = tmp_path / "copy"
    shutil.copytree(two, copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    args = _args(folder, "x", "--resume")
    args[args.index("--out") + 1] = str(copy)
    res = run_cli("finetune", *args, "--max-steps", "6")
    message = assert_clean_error(res, "--resume", str(copy / "checkpoints" / "step-000004"))
    assert "2 process" in message and "has 1" in message
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before  # nothing touched


@pytest.mark.multiprocess
def test_a_killed_rank_stops_the_other_naming_it_and_resume_is_exact(folder, two_process_run, tmp_path) -> None:
    two, _ = two_process_run
    marker = tmp_path / "paused"
    argv = _args(folder, "killed")
    # rank 1 stops after step 2 (rank 0 writes the step-2 checkpoint and waits in step 3's all-reduce)
    procs = _spawn([argv, argv], [None, ("step:2", marker)])
    try:
        deadline = time.monotonic() + _TIMEOUT
        while not marker.exists():
            assert time.monotonic() < deadline and procs[1].poll() is None, procs[1].communicate()[1][-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert waited < 30, waited  # gloo sees the closed connection at once; the bound only guards a hang
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "lost rank 1" in lines[0] and "resume" in lines[0], lines[0]
    # resume on 2 processes continues from the last checkpoint exactly like the uninterrupted run
    proc = _torchrun(*_args(folder, "killed", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] in (2, 3) and summary["steps"] == 4
    a, b = _adapter(folder / "killed"), _adapter(two)
    assert all(torch.equal(a[k], b[k]) for k in b)  # exact: same ops, state broadcast from rank 0 bit for bit


@pytest.mark.multiprocess
def test_ranks_given_different_data_are_refused(folder, tmp_path) -> None:
    argv = _args(folder, "differ")
    other = list(argv)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": f"{i} minus 1 is {i - 1}."}) + "\n"
                                                 for i in range(40)))
    other[other.index("--data") + 1] = str(tmp_path / "data.jsonl")
    procs = _spawn([argv, other])
    outs = [p.communicate(timeout=_TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 1 and "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and "--data" in lines[0] and "rank 1" in lines[0], err[-3000:]
    assert not (folder / "differ").exists()


def test_model_fingerprint_tells_models_apart() -> None:
    """Ranks given different model folders are refused by the same check as different data (above), on this
    digest of every weight."""
    a, b, c = make_llama(0), make_llama(0), make_llama(1)
    assert fingerprint_model(a) == fingerprint_model(b) != fingerprint_model(c)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-3  # one weight of one layer
    assert fingerprint_model(a) != fingerprint_model(b)


def test_global_batch_the_process_count_does_not_divide(folder, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any rendezvous: no peer is needed
    args = _args(folder, "bad")
    args[args.index("--global-batch-size") + 1] = "6"
    message = assert_clean_error(run_cli("finetune", *args), "--global-batch-size")
    assert "2 process" in message and "--batch-size" in message
    assert not (folder / "bad").exists()


@pytest.mark.multiprocess
def test_fsdp_shards_the_4bit_base_and_trains_exactly_like_ddp(folder, two_process_run) -> None:
    two, _ = two_process_run
    proc = _torchrun(*_args(folder, "fsdp", "--distributed", "fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # gathering bytes is exact and the adapter is reduced as under ddp: the same adapter, bit for bit
    a, b = _adapter(folder / "fsdp"), _adapter(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    line = next(line for line in proc.stderr.splitlines() if line.startswith("fsdp:"))
    total = int(re.search(r"([\d,]+) bytes, are sharded", line).group(1).replace(",", ""))
    per_rank = [int(n.replace(",", "")) for n in re.findall(r"holds ([\d,]+)", line)]
    assert len(per_rank) == 2 and sum(per_rank) >= total and max(per_rank) <= total / 2 + 1024, line


def test_fsdp_refuses_a_policy_that_casts_packed_bytes_and_a_model_without_layers() -> None:
    from fourbit.models import QuantConfig, quantize_model
    from fourbit.nn.fsdp import shard_4bit_base

    model = make_llama(0)
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    packed_before = [p.clone() for p in model.parameters() if p.dtype == torch.uint8]
    with pytest.raises(FieldError, match="packed 4-bit bytes") as refused:
        shard_4bit_base(model, param_dtype=torch.bfloat16)  # checked before any process group is needed
    assert refused.value.field == "param_dtype"
    after = [p for p in model.parameters() if p.dtype == torch.uint8]
    assert packed_before and all(torch.equal(x, y) for x, y in zip(packed_before, after, strict=True))
    with pytest.raises(NotImplementedError, match="`distributed` ddp"):
        shard_4bit_base(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.multiprocess
def test_unreachable_rendezvous_fails_after_the_timeout(folder, monkeypatch) -> None:
    for k, v in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    message = assert_clean_error(run_cli("finetune", *_args(folder, "bad"), "--dist-timeout", "1"),
                                 "--dist-timeout", "127.0.0.1")
    assert "rank 1 of 2" in message and "within 1 s" in message
    assert not (folder / "bad").exists()


@pytest.mark.multiprocess
def test_ctrl_c_on_one_rank_stops_both_after_the_same_step(folder, two_process_run, tmp_path) -> None:
    two, _ = two_process_run
    marker = tmp_path / "paused"
    argv = _args(folder, "interrupted")
    # SIGINT reaches rank 0 only, while it pauses after step 2; the request rides on step 3's all-reduce
    procs = _spawn([argv, argv], [("step:2", marker), None])
    try:
        deadline = time.monotonic() + _TIMEOUT
        while not marker.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [130, 130], [err[-2000:] for _, err in outs]
    assert "interrupted at step 3" in outs[0][1] and "interrupted" not in outs[1][1]  # rank 0 alone prints
    out = folder / "interrupted"
    assert (out / "checkpoints" / "step-000003").is_dir() and not (out / "adapter_model.safetensors").exists()
    proc = _torchrun(*_args(folder, "interrupted", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _adapter(out), _adapter(two)
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gradient_checkpointing_with_kept_matmuls_trains_as_one_process(folder, monkeypatch, mode: str) -> None:
    """The selective checkpointing policy (kept LoRA outputs taken back in the recomputation) under DDP and FSDP
    gives the adapter one process gives without checkpointing."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = run_cli("finetune", *_args(folder, f"one-plain-{mode}", "--save-steps", "0"))
    assert one.code == 0, one.err
    proc = _torchrun(*_args(folder, f"two-ckpt-{mode}", "--save-steps", "0", "--gradient-checkpointing",
                            "--gradient-checkpointing-policy", "keep-matmuls", "--distributed", mode))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # fp32: recomputation repeats the same operations; the ranks add gradients in another order (~1e-6)
    assert _max_rel_diff(_adapter(folder / f"one-plain-{mode}"), _adapter(folder / f"two-ckpt-{mode}")) <= 1e-5
