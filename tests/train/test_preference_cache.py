"""DPO's reference log-probs are computed once per run (not again in a later epoch) and kept in the run
folder: the kept values equal a fresh reference pass (and the plain logits of the base), a run resumed after Ctrl-C reads them back without
any reference forward and finishes exactly like an uninterrupted run, and a file of other pairs or options,
or a damaged one, is not used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit.nn.fused import fused_kernels
from fourbit.nn.lora import lora_modules
from fourbit.train.config import TrainConfig
from fourbit.train.metrics import read_metrics
from fourbit.train.preference import (
    REFERENCE_FILE,
    read_reference_logps,
    reference_key,
    reference_logps,
    save_reference_logps,
)
from fourbit.train.trainer import TrainingInterrupted, add_lora, prepare_data, train


def _cfg(tmp_path: Path, out: str, **kw) -> TrainConfig:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join(
            json.dumps({"prompt": f"{i} plus 3 is", "chosen": f" {i + 3}.", "rejected": f" about {i + 4}"}) + "\n"
            for i in range(12)))
    base = dict(data=str(data), out=str(tmp_path / out), task="dpo", max_steps=4, batch_size=2,
                gradient_accumulation_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.1, compute_dtype="fp32",
                eval_steps=2, save_steps=1, progress=False, learning_rate=1e-2, eval_fraction=0.25, max_length=64,
                eval_batch_size=3)
    base.update(kw)
    return TrainConfig(**base)


class _Counted:
    """A tiny llama whose decoder counts its forwards with every LoRA layer switched off (reference forwards)."""

    def __init__(self) -> None:
        self.model, self.reference_forwards = make_llama(), 0
        self.model.get_decoder().register_forward_pre_hook(self._count)

    def _count(self, *_) -> None:
        layers = lora_modules(self.model).values()
        if layers and all(m.disabled for m in layers):
            self.reference_forwards += 1


def _run(cfg: TrainConfig, lines: list[str] | None = None) -> _Counted:
    counted = _Counted()
    log = (lambda *a: lines.append(" ".join(map(str, a)))) if lines is not None else (lambda *_: None)
    try:
        train(cfg, counted.model, make_tokenizer(), log=log)
    except TrainingInterrupted:
        counted.interrupted = True
    return counted


def _pairs(cfg: TrainConfig) -> list:
    train_ds, eval_ds = prepare_data(cfg, make_tokenizer())
    return train_ds.examples + eval_ds.examples


def _plain_logps(model: torch.nn.Module, pair, reply: str) -> float:
    """The summed log-probs of one reply from the model's full logits (no chunking, no adapter code)."""
    ids = pair.prompt_ids + getattr(pair, f"{reply}_ids")
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    n = len(pair.prompt_ids)
    return float(logp[n - 1:].gather(1, torch.tensor(ids[n:])[:, None]).sum())


def test_kept_reference_logps_equal_a_fresh_reference_pass(tmp_path) -> None:
    cfg = _cfg(tmp_path, "run", max_steps=7)  # 9 training pairs, 2 a step: into the second epoch
    counted = _run(cfg)
    pairs = _pairs(cfg)
    assert len(pairs) == 12 and max(r["epoch"] for r in read_metrics(Path(cfg.out) / "metrics.jsonl")
                                    if "epoch" in r) >= 1  # epochs count from 0
    assert counted.reference_forwards == -(-len(pairs) // cfg.eval_batch_size)  # once per pair, 3 a batch
    kept = load_file(str(Path(cfg.out) / REFERENCE_FILE))
    assert kept["chosen"].dtype == torch.float64 and kept["chosen"].shape == (len(pairs),)
    fresh_model = add_lora(make_llama(), cfg)  # a new model: the pass again, outside any run
    with fused_kernels(cfg.fused_kernels):
        reference_logps(fresh_model, pairs, cfg, make_tokenizer().pad_token_id)
    assert torch.equal(kept["chosen"], torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64))
    assert torch.equal(kept["rejected"], torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64))
    base = make_llama()  # the plain logits of the base, never given an adapter, give the same numbers
    for i, p in enumerate(pairs):
        assert abs(float(kept["chosen"][i]) - _plain_logps(base, p, "chosen")) < 1e-4
        assert abs(float(kept["rejected"][i]) - _plain_logps(base, p, "rejected")) < 1e-4
    assert len({float(v) for v in kept["chosen"]}) == len(pairs)  # real, distinct values


def test_resumed_run_reads_them_back_and_finishes_exactly(tmp_path, ctrl_c_after_step) -> None:
    whole = _run(_cfg(tmp_path, "whole"))
    assert whole.reference_forwards > 0
    cfg = _cfg(tmp_path, "part")
    ctrl_c_after_step(2)
    first = _run(cfg)
    assert getattr(first, "interrupted", False) and first.reference_forwards == whole.reference_forwards
    lines: list[str] = []
    resumed = _run(cfg.replace(resume=True), lines)
    assert resumed.reference_forwards == 0
    assert any(f"read from {Path(cfg.out) / REFERENCE_FILE}" in line for line in lines), lines
    rows = lambda out: [{k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
                        for r in read_metrics(Path(out) / "metrics.jsonl")]
    assert rows(tmp_path / "whole") == rows(cfg.out) and len(rows(cfg.out)) == 4 + 2  # 4 steps, 2 evaluations
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("whole", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_compute_dtype_on_resume_computes_them_again(tmp_path, ctrl_c_after_step) -> None:
    cfg = _cfg(tmp_path, "run")
    ctrl_c_after_step(1)
    _run(cfg)
    before = load_file(str(Path(cfg.out) / REFERENCE_FILE))
    resumed = _run(cfg.replace(resume=True, compute_dtype="bf16"))
    assert resumed.reference_forwards > 0  # bf16 gives other numbers: the fp32 ones are not used
    after = load_file(str(Path(cfg.out) / REFERENCE_FILE))
    assert not torch.equal(before["chosen"], after["chosen"])
    assert torch.allclose(before["chosen"], after["chosen"], rtol=0.05)


@pytest.mark.parametrize("change", ["key", "pairs", "truncated"])
def test_a_file_of_other_pairs_or_options_or_damaged_is_not_read(tmp_path, change) -> None:
    cfg = _cfg(tmp_path, "run")
    pairs = _pairs(cfg)
    for i, p in enumerate(pairs):
        p.ref_chosen, p.ref_rejected = -1.5 * i, -2.25 * i
    key = reference_key(pairs, cfg)
    path = save_reference_logps(tmp_path / REFERENCE_FILE, pairs, key)
    chosen, rejected = read_reference_logps(path, key, len(pairs))
    assert chosen == [-1.5 * i for i in range(len(pairs))] and rejected == [-2.25 * i for i in range(len(pairs))]
    if change == "key":  # the same pairs in another compute dtype; a speed option keeps the run's values
        assert reference_key(pairs, cfg.replace(loss_chunk_size=0, eval_batch_size=1, fused_kernels=False)) == key
        assert read_reference_logps(path, reference_key(pairs, cfg.replace(compute_dtype="bf16")), len(pairs)) is None
    elif change == "pairs":
        assert reference_key(pairs[1:], cfg) != key
        assert read_reference_logps(path, key, len(pairs) - 1) is None
    else:
        path.write_bytes(path.read_bytes()[:-8])
        assert read_reference_logps(path, key, len(pairs)) is None
