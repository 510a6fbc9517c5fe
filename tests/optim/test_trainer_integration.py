"""The trainer's optimizer names run fourbit.optim.AdamW end to end on a tiny llama with LoRA r=64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
trainer = pytest.importorskip("fourbit.train.trainer")
config_mod = pytest.importorskip("fourbit.train.config")
metrics_mod = pytest.importorskip("fourbit.train.metrics")


def _tokenizer():
    """Byte-level BPE without merges (vocab 256 bytes + 1 special), built in the test: nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=257, max_position_embeddings=128, pad_token_id=256,
    )
    return transformers.LlamaForCausalLM(cfg)


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


def test_trainer_resume_with_8bit_states_is_exact(tmp_path: Path) -> None:
    # uint8 codes and float32 absmax survive the trainer's safetensors checkpoint and load_state_dict.
    full = _config(tmp_path, "paged_adamw_8bit", "full")
    _run(full)
    part = _config(tmp_path, "paged_adamw_8bit", "part")
    _run(part, stop_after=2)
    res = _run(part.replace(resume=True))
    assert res.resumed_from == 2
    assert _curve(full.out) == _curve(part.out)
