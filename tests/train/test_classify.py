"""--task classify on a tiny llama: score head trained with the adapters, saved as modules_to_save."""

from __future__ import annotations

import json
from pathlib import Path

from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit.train.config import TrainConfig
from fourbit.train.loading import _classifier_from_causal
from fourbit.train.trainer import add_lora, evaluate, prepare_data, train


def test_classification_trains_head_and_reports_accuracy(tmp_path: Path) -> None:
    rows = [{"text": f"{'good' if i % 2 else 'bad'} item {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(40)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "out"), task="classify", quant="none", max_steps=12,
                      batch_size=8, gradient_accumulation_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      learning_rate=5e-3, compute_dtype="fp32", eval_steps=0, save_steps=0, progress=False,
                      eval_fraction=0.25, warmup_steps=1)
    tok = make_tokenizer()
    model = _classifier_from_causal(make_llama(), num_labels=2)
    model.config.pad_token_id = tok.pad_token_id
    train_ds, eval_ds = prepare_data(cfg, tok)
    assert train_ds.label_names == ["neg", "pos"]
    head_before = model.score.weight.detach().clone()
    add_lora(model, cfg)
    before = evaluate(model, eval_ds, cfg, tok.pad_token_id)
    res = train(cfg, model, tok, data=(train_ds, eval_ds), log=lambda *_: None)
    assert 0.0 <= res.eval["eval_accuracy"] <= 1.0
    assert res.eval["eval_loss"] < before["eval_loss"]  # 12 steps on a separable toy task must help
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in saved
    assert not saved["base_model.model.score.weight"].equal(head_before)
    cfg_json = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg_json["task_type"] == "SEQ_CLS" and cfg_json["modules_to_save"] == ["score"]
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == ["neg", "pos"]
