"""The training loop on a tiny llama: exact resume, eval has no side effects, accumulation, output folder."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit._errors import FieldError
from fourbit.train.config import TrainConfig
from fourbit.train.metrics import read_metrics
from fourbit.train.plan import plan_run
from fourbit.train.step import micro_seed
from fourbit.train.trainer import TrainingInterrupted, train


def _data(tmp_path: Path, n: int = 24) -> str:
    rows = [{"instruction": f"Add {i} and {i + 3}.", "output": str(2 * i + 3)} for i in range(n)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path: Path, out: str, **kw) -> TrainConfig:
    base = dict(data=_data(tmp_path), out=str(tmp_path / out), max_steps=4, batch_size=2,
                gradient_accumulation_steps=2, lora_r=4, lora_alpha=8, lora_dropout=0.1, compute_dtype="fp32",
                eval_steps=0, save_steps=2, progress=False, learning_rate=1e-3, eval_fraction=0.2,
                lr_scheduler="cosine", warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg: TrainConfig, **kw):
    return train(cfg, make_llama(), make_tokenizer(), log=lambda *_: None, **kw)


def _curve(out: str) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(Path(out) / "metrics.jsonl")
            if "loss" in r]


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path: Path, ctrl_c_after_step) -> None:
    full = _cfg(tmp_path, "full")
    _run(full)
    part = _cfg(tmp_path, "part")
    ctrl_c_after_step(2)  # interrupted right after the step-2 checkpoint
    with pytest.raises(TrainingInterrupted) as stopped:
        _run(part)
    assert stopped.value.step == 2 and stopped.value.checkpoint == Path(part.out) / "checkpoints" / "step-000002"
    assert not (Path(part.out) / "adapter_model.safetensors").exists()
    res = _run(part.replace(resume=True))
    assert res.resumed_from == 2
    # exact: same float ops in the same order on CPU, RNG/optimizer/data position restored bit for bit
    assert _curve(full.out) == _curve(part.out)
    a = load_file(str(Path(full.out) / "adapter_model.safetensors"))
    b = load_file(str(Path(part.out) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_between_steps_changes_nothing(tmp_path: Path) -> None:
    with_eval = _cfg(tmp_path, "with", eval_steps=1, save_steps=0)
    without = _cfg(tmp_path, "without", eval_steps=0, save_steps=0, eval_fraction=0.2)
    r1 = _run(with_eval)
    _run(without)
    assert _curve(with_eval.out) == _curve(without.out)
    evals = [r for r in read_metrics(Path(with_eval.out) / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    assert r1.eval["eval_ppl"] == pytest.approx(torch.tensor(r1.eval["eval_loss"]).exp().item(), rel=1e-6)


def test_gradient_accumulation_equals_big_batch(tmp_path: Path) -> None:
    acc = _cfg(tmp_path, "acc", batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.0, save_steps=0)
    big = _cfg(tmp_path, "big", batch_size=4, gradient_accumulation_steps=1, lora_dropout=0.0, save_steps=0)
    _run(acc)
    _run(big)
    ca, cb = _curve(acc.out), _curve(big.out)
    # same examples per step; only padding width differs (masked), so fp32 reduction-order noise
    for (s1, l1, g1, _), (s2, l2, g2, _) in zip(ca, cb, strict=True):
        assert s1 == s2
        assert l1 == pytest.approx(l2, rel=1e-5)
        assert g1 == pytest.approx(g2, rel=1e-4)


def test_outputs_and_refusals(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "run", max_steps=2, eval_steps=1)
    old_umask = os.umask(0o027)
    try:
        res = _run(cfg)
    finally:
        os.umask(old_umask)
    out = Path(cfg.out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "metrics.jsonl",
                 "loss_curve.png"):
        assert (out / name).is_file(), name
    for p in [out, *out.rglob("*")]:  # the umask decides, not the writer (no 0600 temp-file modes)
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~0o027, p
    assert res.steps == 2 and res.train_loss is not None and res.n_eval > 0
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FieldError, match="`overwrite`") as refused:
        _run(cfg)
    assert refused.value.field == "out"
    assert (out / "adapter_model.safetensors").read_bytes() == before  # nothing saved is lost
    _run(cfg.replace(overwrite=True))
    with pytest.raises(FieldError, match="no checkpoint"):
        _run(_cfg(tmp_path, "fresh", resume=True))


def test_gradient_checkpointing_same_loss(tmp_path: Path) -> None:
    plain = _cfg(tmp_path, "plain", lora_dropout=0.0, save_steps=0, max_steps=2)
    ckpt = _cfg(tmp_path, "ckpt", lora_dropout=0.0, save_steps=0, max_steps=2, gradient_checkpointing=True)
    _run(plain)
    _run(ckpt)
    for a, b in zip(_curve(plain.out), _curve(ckpt.out), strict=True):
        # recomputation repeats the same fp32 ops: identical up to reduction-order noise
        assert a[1] == pytest.approx(b[1], rel=1e-6) and a[2] == pytest.approx(b[2], rel=1e-5)


def test_bf16_autocast_and_packing_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "bf16", compute_dtype="bf16", packing=True, max_length=256, save_steps=0, max_steps=2,
               eval_steps=1)
    res = _run(cfg)
    curve = _curve(cfg.out)
    assert len(curve) == 2 and all(torch.isfinite(torch.tensor(c[1])) for c in curve)
    assert res.eval["eval_loss"] > 0


def test_checkpoints_record_the_process_count_and_resume_keeps_it(tmp_path: Path, ctrl_c_after_step) -> None:
    cfg = _cfg(tmp_path, "run")
    ctrl_c_after_step(2)
    with pytest.raises(TrainingInterrupted):
        _run(cfg)
    step2 = Path(cfg.out) / "checkpoints" / "step-000002"
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert state["world_size"] == 1
    assert [r["world_size"] for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if "loss" in r] == [1, 1]
    # a run on 2 processes may not continue a 1-process checkpoint: the global batch would change
    with pytest.raises(FieldError, match="1 process.*this run has 2") as refused:
        plan_run(cfg.replace(resume=True), log=lambda *_: None, world_size=2)
    assert refused.value.field == "resume" and str(step2) in str(refused.value)
    # a checkpoint written before the count was recorded is a 1-process one
    del state["world_size"]
    (step2 / "trainer_state.json").write_text(json.dumps(state))
    assert plan_run(cfg.replace(resume=True), log=lambda *_: None).resume.step == 2


def test_dropout_masks_depend_on_the_micro_batch_not_the_process(tmp_path: Path) -> None:
    """Seeding per (seed, step, micro-batch) makes each micro-batch's dropout independent of what ran before it
    in this process, which is what lets rank r of a distributed run compute micro-batch i as one process would."""
    seeds = {micro_seed(0, step, i) for step in range(50) for i in range(64)}
    assert len(seeds) == 50 * 64  # no two micro-batches of a run share masks
    assert micro_seed(0, 3, 1) != micro_seed(1, 3, 1)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_fused_training_path_gives_the_per_step_losses_of_the_plain_reference(
        tmp_path: Path, gradient_checkpointing: bool) -> None:
    """The default path (fused LoRA, fused output-head cross-entropy, keep-matmuls checkpointing) against the
    plain one (LoRA as separate PyTorch modules, full logits + F.cross_entropy), 4-bit base, fp32, dropout on."""
    fast = _cfg(tmp_path, "fast", save_steps=0, loss_chunk_size=7, gradient_checkpointing=gradient_checkpointing)
    plain = _cfg(tmp_path, "plain", save_steps=0, loss_chunk_size=0, fused_kernels=False)
    _run(fast)
    _run(plain)
    fast_curve, plain_curve = _curve(fast.out), _curve(plain.out)
    assert len(fast_curve) == 4
    for a, b in zip(fast_curve, plain_curve, strict=True):
        # the same float32 math in another order (addmm, chunked sums, a polynomial exp): the 1e-4
        assert a[1] == pytest.approx(b[1], rel=1e-4) and a[2] == pytest.approx(b[2], rel=1e-3)
    assert fast_curve[0][1] != fast_curve[-1][1]  # it trained


def test_fused_bf16_training_tracks_the_plain_bf16_path(tmp_path: Path) -> None:
    fast = _cfg(tmp_path, "fast", save_steps=0, compute_dtype="bf16", lora_dropout=0.0)
    plain = _cfg(tmp_path, "plain", save_steps=0, compute_dtype="bf16", lora_dropout=0.0, loss_chunk_size=0,
                 fused_kernels=False)
    _run(fast)
    _run(plain)
    for a, b in zip(_curve(fast.out), _curve(plain.out), strict=True):
        # both run every matmul in bf16 but round at different points (the update added inside addmm vs after
        # its own bf16 rounding; the loss gradient rounded to bf16 before the head's matmul). bf16 keeps 8
        # significant bits (2^-8 = 4e-3 relative per rounding); the loss averages many such roundings, which
        # kept it within 1e-4 in trials: 2e-3 leaves room for other shapes without hiding a real error
        assert a[1] == pytest.approx(b[1], rel=2e-3)


@pytest.mark.parametrize("on", [True, False])
def test_the_run_uses_the_fused_kernels_its_config_asks_for(tmp_path: Path, monkeypatch, on: bool) -> None:
    """``fused_kernels`` decides the path inside :func:`train` whatever the caller's context says: the trainer
    enters ``fused_kernels(config.fused_kernels)``, and the fused SwiGLU runs only when it is on."""
    from fourbit.nn import fused

    entered: list[bool] = []
    real_context, real_swiglu, calls = fused.fused_kernels, fused.swiglu, []

    def recording(value: bool = True):
        entered.append(value)
        return real_context(value)

    monkeypatch.setattr(fused, "fused_kernels", recording)
    monkeypatch.setattr(fused, "swiglu", lambda *a, **k: calls.append(1) or real_swiglu(*a, **k))
    with real_context(not on):  # the opposite outside: the config decides
        _run(_cfg(tmp_path, "run", max_steps=1, save_steps=0, fused_kernels=on))
    assert entered == [on]
    assert bool(calls) is on, len(calls)
