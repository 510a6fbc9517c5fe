"""Adapters in peft's format: peft loads ours with the same logits, we load peft's; bad adapters fail clearly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import make_llama

from fourbit._errors import InputFileError
from fourbit.nn.adapters import ADAPTER_WEIGHTS, load_adapter, read_adapter_config, save_adapter
from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules


def _peft():
    """peft is a test oracle (the dev extra): imported only by the tests that compare against it."""
    import peft

    return peft


def _tiny(seed: int = 0, cls=None, **kw):
    return make_llama(seed, vocab_size=256, model_class=cls, **{"max_position_embeddings": 128, "pad_token_id": 0,
                                                               **kw}).eval()


def _train_like(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
def test_peft_loads_fourbit_adapter(tmp_path: Path, targets) -> None:
    peft = _peft()
    base = _tiny()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRASpec(r=8, alpha=16, dropout=0.0, target_modules=targets))
    _train_like(ours)
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        # same fp32 math: reduction-order noise only
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    peft_layers = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(peft_layers) == len(lora_modules(ours))


def test_fourbit_loads_peft_adapter(tmp_path: Path) -> None:
    peft = _peft()
    base = _tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                             "down_proj"], lora_dropout=0.0, use_rslora=True))
    _train_like(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert sorted(lora_modules(ours)) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj"))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_classifier_head_saved_as_modules_to_save(tmp_path: Path, arch: str) -> None:
    peft = _peft()
    if arch == "llama":
        base = _tiny(cls=transformers.LlamaForSequenceClassification, num_labels=3)
    else:  # GPT-2's Conv1D layers under LoRA, five labels as in the review example
        base = _gpt2(cls=transformers.GPT2ForSequenceClassification, num_labels=5)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRASpec(r=4, alpha=8, dropout=0.0, modules_to_save=("score",)))
    assert "score" not in {n.rsplit(".", 1)[-1] for n in lora_modules(ours)}
    assert ours.score.weight.requires_grad
    _train_like(ours)
    save_adapter(ours, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "c")).eval()
    back = load_adapter(copy.deepcopy(base), tmp_path / "c")
    ids = torch.randint(1, 256, (2, 7))
    with torch.no_grad():
        ref = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=0)


def test_mismatched_adapters_fail_and_leave_model_untouched(tmp_path: Path) -> None:
    ours = _tiny()
    inject_lora(ours, LoRASpec(r=4, alpha=8, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path / "a")
    wide = _tiny(hidden_size=128)  # q_proj is 128x128 here: shapes do not fit
    with pytest.raises(InputFileError, match="does not fit") as refused:
        load_adapter(wide, tmp_path / "a")
    assert refused.value.path == str(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert "'model.layers.0.self_attn.q_proj'" in str(refused.value), "names the module"
    assert "(4, 64)" in str(refused.value) and "(4, 128)" in str(refused.value), "and both shapes"
    assert not lora_modules(wide)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["w_nope"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="target modules"):
        load_adapter(_tiny(), tmp_path / "a")
    with pytest.raises(ValueError, match="not an adapter folder"):
        load_adapter(_tiny(), tmp_path)
    cfg["target_modules"], cfg["use_dora"] = ["q_proj"], True  # a DoRA config without magnitude vectors
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputFileError, match="missing model.layers.0.self_attn.q_proj.lora_magnitude_vector"):
        load_adapter(_tiny(), tmp_path / "a")
    cfg["use_dora"], cfg["bias"] = False, "all"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="bias"):
        load_adapter(_tiny(), tmp_path / "a")


def test_truncated_adapter_weights_are_named_and_leave_the_model_untouched(tmp_path: Path) -> None:
    ours = _tiny()
    inject_lora(ours, LoRASpec(r=4, alpha=8, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path / "a")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    fresh = _tiny()
    with pytest.raises(InputFileError, match="truncated") as refused:
        load_adapter(fresh, tmp_path / "a")
    assert refused.value.path == str(weights)
    assert not lora_modules(fresh)


@pytest.mark.parametrize("text, names", [
    ("{not json", "adapter_config.json:1"),
    ("[]", "expected a JSON object"),
    ('{"r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}', "r: the LoRA rank"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": []}', "target_modules"),
    ('{"peft_type": "IA3", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}', "is not LORA"),
])
def test_bad_adapter_configs_are_named(tmp_path: Path, text: str, names: str) -> None:
    ours = _tiny()
    inject_lora(ours, LoRASpec(r=4, alpha=8, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(text)
    with pytest.raises(InputFileError) as refused:
        read_adapter_config(tmp_path / "a")
    assert refused.value.path == str(tmp_path / "a" / "adapter_config.json") and names in str(refused.value)


def test_resume_path_names_a_truncated_adapter(tmp_path: Path) -> None:
    """``load_adapter_weights`` (what a resumed run calls) reads through the checked safetensors reader."""
    from fourbit.nn.adapters import load_adapter_weights

    ours = _tiny()
    inject_lora(ours, LoRASpec(r=4, alpha=8, target_modules=("q_proj",)))
    save_adapter(ours, tmp_path / "a")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InputFileError, match="truncated") as refused:
        load_adapter_weights(ours, tmp_path / "a")
    assert refused.value.path == str(weights)


def test_an_adapter_failing_after_injection_leaves_the_model_as_given(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ours = _tiny()
    inject_lora(ours, LoRASpec(r=4, alpha=8, target_modules=("q_proj",)))
    folder = save_adapter(ours, tmp_path / "a")
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)  # not a target
    save_file(tensors, folder / ADAPTER_WEIGHTS)
    fresh = _tiny()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(InputFileError, match="unexpected"):
        load_adapter(fresh, folder)
    assert not lora_modules(fresh)
    after = fresh.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def _gpt2(seed: int = 0, cls=None, **kw):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    return (cls or transformers.GPT2LMHeadModel)(config).eval()


def test_gpt2_conv1d_adapters_move_both_ways_with_peft(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores [in, out]: peft wraps it with fan_in_fan_out=True; the A/B tensors keep the
    usual layout, so adapters move both ways, and the merge adds the update transposed."""
    peft = _peft()
    base = _gpt2()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("c_attn", "c_fc")))
    assert all(m.fan_in_fan_out for m in lora_modules(ours).values())
    _train_like(ours)
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # peft -> fourbit
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_proj"],
                                                                  lora_dropout=0.0, fan_in_fan_out=True))
    _train_like(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    back = load_adapter(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, pm.eval()(ids).logits, rtol=1e-5, atol=1e-5)
        # merging: in place on the Conv1D, and peft's merged model
        merged_peft = pm.merge_and_unload()
        for m in lora_modules(back).values():
            m.merge()
        torch.testing.assert_close(back(ids).logits, merged_peft(ids).logits, rtol=1e-5, atol=1e-5)


def test_adapter_over_a_4bit_gpt2_loads_in_peft_on_the_float_model(tmp_path: Path) -> None:
    """The 4-bit layer made from a Conv1D stores [out, in] like bitsandbytes' does, so the adapter says
    fan_in_fan_out=False; peft on the float GPT-2 corrects that per layer (as it does for every Conv1D)."""
    import warnings

    from fourbit.models import QuantConfig, quantize_model
    from fourbit.nn.lora import merge_and_unload

    peft = _peft()
    ours = _gpt2()
    quantize_model(ours, QuantConfig(compute_dtype="fp32"))
    inject_lora(ours, LoRASpec(r=4, alpha=8, dropout=0.0))
    assert not any(m.fan_in_fan_out for m in lora_modules(ours).values())
    _train_like(ours)
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    float_base = copy.deepcopy(ours)
    merge_and_unload(float_base, dtype=torch.float32)  # 4-bit layers left: dequantize them to Conv1D
    from test_architectures import dequantized_copy

    float_base = dequantized_copy(float_base)
    for name, m in float_base.named_modules():
        if name.endswith(("c_attn", "c_proj", "c_fc")):
            assert type(m).__name__ == "Conv1D"
    ids = torch.randint(0, 256, (2, 9))
    plain = dequantized_copy(_quantized_gpt2_base())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path / "a")).eval()
    with torch.no_grad():
        ref = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(float_base(ids).logits, ref, rtol=1e-5, atol=1e-5)


def _quantized_gpt2_base():
    from fourbit.models import QuantConfig, quantize_model

    model = _gpt2()
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    return model
