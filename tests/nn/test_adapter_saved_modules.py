"""An adapter's ``modules_to_save`` load into copies of the model's modules: unloading the adapter gives the
base model back exactly (a server loads and unloads adapters over one base), merging keeps the trained copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_models import make_llama

from fourbit._errors import InputFileError
from fourbit.nn.adapters import ADAPTER_WEIGHTS, load_adapter, save_adapter
from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules, merge_and_unload, unload_lora


def _trained_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter over the tiny llama that also trains its head (``modules_to_save=("lm_head",)``)."""
    model = make_llama(tie_word_embeddings=False).eval()
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",), modules_to_save=("lm_head",)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g))
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=g))
    save_adapter(model, folder)
    return {"lm_head": model.lm_head.weight.detach().clone()}


@pytest.mark.parametrize("tied", [False, True])
def test_unloading_an_adapter_with_modules_to_save_restores_the_base(tmp_path, tied):
    """Over a base whose head is its own, and one whose head is tied to the input embeddings."""
    trained = _trained_adapter(tmp_path / "a")
    base = make_llama(tie_word_embeddings=tied).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = base(ids).logits
        load_adapter(base, tmp_path / "a")
        assert torch.equal(base.lm_head.weight, trained["lm_head"])  # the adapter's head is used...
        assert torch.equal(base.model.embed_tokens.weight, before["model.embed_tokens.weight"])  # ...alone
        adapted = base(ids).logits
        unload_lora(base)
        assert set(base.state_dict()) == set(before)
        for key, value in base.state_dict().items():
            assert torch.equal(value, before[key]), key
        torch.testing.assert_close(base(ids).logits, want, rtol=0, atol=0)
        assert not torch.allclose(adapted, want)
        if tied:  # the head is the embedding again, as it was
            assert base.lm_head.weight is base.model.embed_tokens.weight
        load_adapter(base, tmp_path / "a")  # and again: the same adapted model
        torch.testing.assert_close(base(ids).logits, adapted, rtol=0, atol=0)


def test_merging_keeps_the_trained_copies(tmp_path):
    trained = _trained_adapter(tmp_path / "a")
    model = load_adapter(make_llama().eval(), tmp_path / "a")
    merge_and_unload(model)
    assert torch.equal(model.lm_head.weight, trained["lm_head"]) and not lora_modules(model)
    unload_lora(model)  # nothing left to unload: the merged head stays
    assert torch.equal(model.lm_head.weight, trained["lm_head"])


def test_a_failed_load_leaves_the_saved_modules_as_they_were(tmp_path):
    _trained_adapter(tmp_path / "a")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(259, 32)  # a head of another model
    save_file(tensors, tmp_path / "a" / ADAPTER_WEIGHTS)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    base = make_llama().eval()
    head = base.lm_head
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(InputFileError, match="lm_head.weight: file \\(259, 32\\)"):
        load_adapter(base, tmp_path / "a")
    assert base.lm_head is head and not lora_modules(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_a_head_tied_to_the_embeddings_is_trained_and_saved_on_its_own(tmp_path):
    """``modules_to_save=("lm_head",)`` over a tied base: as in peft, the head gets its own copy, so training it
    leaves the input embeddings alone and the adapter file holds it (it used to be dropped: the shared tensor was
    listed under the embeddings' name)."""
    model = make_llama(tie_word_embeddings=True).eval()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",), modules_to_save=("lm_head",)))
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    ids = torch.randint(0, 256, (2, 7))
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        model.lm_head.weight.sub_(model.lm_head.weight.grad)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    head = [k for k in saved if k.endswith("lm_head.weight")]
    assert len(head) == 1 and torch.equal(saved[head[0]], model.lm_head.weight)
    fresh = load_adapter(make_llama(tie_word_embeddings=True).eval(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    merge_and_unload(fresh)  # the merged model keeps its own head, and says so
    assert fresh.config.tie_word_embeddings is False and fresh.lm_head.weight is not fresh.model.embed_tokens.weight
