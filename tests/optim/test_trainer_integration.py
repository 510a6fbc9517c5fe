"""The trainer's optimizer names run fourbit.optim.AdamW end to end on a tiny llama with LoRA r=64; the
optimizer seam (``build_optimizer``) maps every name to fourbit's AdamW and names the config's fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import make_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from fourbit._errors import FieldError
from fourbit.optim import OPTIMIZER_NAMES, OPTIMIZER_OPTIONS, AdamW
from fourbit.train import config as config_mod
from fourbit.train import metrics as metrics_mod
from fourbit.train import trainer
from fourbit.train.optimizers import build_optimizer


def _tokenizer():
    """Byte-level BPE without merges (vocab 256 bytes + 1 special), built in the test: nothing downloaded."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _llama():
    return make_llama(0, vocab_size=257, max_position_embeddings=128)


def _config(tmp_path: Path, optim: str, out: str, **kw):
    rows = [{"instruction": f"Add {i} and {i + 3}.", "output": str(2 * i + 3)} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # lora_r=64 on hidden 64: most adapter matrices have >= 4096 elements, so 8-bit states are exercised.
    base = dict(
        data=str(data), out=str(tmp_path / out), optim=optim, max_steps=4, batch_size=2,
        gradient_accumulation_steps=1, lora_r=64, lora_alpha=16, lora_dropout=0.0, compute_dtype="fp32",
        eval_steps=0, save_steps=2, progress=False, learning_rate=1e-3, eval_fraction=0.2, quant="none",
    )
    base.update(kw)
    return config_mod.TrainConfig(**base)


def _run(cfg, **kw):
    return trainer.train(cfg, _llama(), _tokenizer(), log=lambda *_: None, **kw)


def _curve(out: str) -> list[tuple]:
    rows = metrics_mod.read_metrics(Path(out) / "metrics.jsonl")
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _saved_optimizer_format(out: str) -> dict:
    ckpts = sorted((Path(out) / "checkpoints").glob("step-*"))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    return state["optimizer"]["fourbit"]


@pytest.mark.parametrize(
    ("plain", "paged", "bits"), [("adamw", "paged_adamw_32bit", 32), ("adamw_8bit", "paged_adamw_8bit", 8)]
)
def test_trainer_optimizer_names(tmp_path: Path, plain: str, paged: str, bits: int) -> None:
    a = _run(_config(tmp_path, plain, plain))
    b = _run(_config(tmp_path, paged, paged))
    assert a.steps == b.steps == 4
    # The checkpoint records the optimizer's state format: the name reached AdamW(bits=...).
    assert _saved_optimizer_format(a.out)["bits"] == bits
    assert _saved_optimizer_format(b.out)["bits"] == bits
    curve_a, curve_b = _curve(a.out), _curve(b.out)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in curve_a)
    # Paging moves states, never changes them: the loss curves are identical.
    assert curve_a == curve_b


def test_trainer_resume_with_8bit_states_is_exact(tmp_path: Path, ctrl_c_after_step) -> None:
    # uint8 codes and float32 absmax survive the trainer's safetensors checkpoint and load_state_dict.
    full = _config(tmp_path, "paged_adamw_8bit", "full")
    _run(full)
    part = _config(tmp_path, "paged_adamw_8bit", "part")
    ctrl_c_after_step(2)
    with pytest.raises(trainer.TrainingInterrupted):
        _run(part)
    res = _run(part.replace(resume=True))
    assert res.resumed_from == 2
    assert _curve(full.out) == _curve(part.out)


def test_every_optimizer_name_is_a_config_choice() -> None:
    # One list of names: the trainer's config accepts exactly the optimizers fourbit.optim defines.
    assert tuple(config_mod.OPTIMIZERS) == OPTIMIZER_NAMES


def test_build_optimizer_serves_every_name_with_fourbit_adamw() -> None:
    for name, options in OPTIMIZER_OPTIONS.items():
        p = torch.nn.Parameter(torch.zeros(8))
        opt = build_optimizer(name, [p, torch.nn.Parameter(torch.zeros(2), requires_grad=False)], lr=1e-3)
        assert isinstance(opt, AdamW)
        assert (opt.bits, opt.paged) == (options["bits"], options["paged"])
        assert opt.param_groups[0]["params"] == [p]


@pytest.mark.parametrize(
    ("name", "lr", "field"),
    [("sgd", 1e-3, "optim"), ("adamw", 0.0, "learning_rate"), ("adamw", -1.0, "learning_rate"),
     ("adamw", float("inf"), "learning_rate"), ("adamw_8bit", float("nan"), "learning_rate")],
)
def test_build_optimizer_names_the_config_field(name: str, lr: float, field: str) -> None:
    # The trainer's field names (`optim`, `learning_rate`), which the CLI maps to --optim / --learning-rate.
    with pytest.raises(FieldError) as info:
        build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], lr=lr)
    assert info.value.field == field
    assert "--" not in str(info.value)
