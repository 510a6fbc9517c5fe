"""Merging a 4-bit model one layer at a time: the same files as merging the whole float model, one float tensor
alive at a time, and transformers' sharded layout when the weights pass the shard size."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit._io import SafetensorsStreamWriter
from fourbit.models import QuantConfig, load_model
from fourbit.nn.adapters import save_adapter
from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules
from fourbit.train import merge as merge_mod
from fourbit.train.merge import merge_adapter


def _base(tmp_path: Path, arch: str) -> Path:
    folder = tmp_path / f"base-{arch}"
    if arch == "llama":
        model = make_llama(0)
    else:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=259, n_positions=128, bos_token_id=256, eos_token_id=256,
            pad_token_id=256))
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _adapter(tmp_path: Path, base: Path, targets) -> Path:
    model, _ = load_model(base, quant=QuantConfig(compute_dtype="fp32"))
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    return tmp_path / "adapter"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize(("arch", "targets"), [("llama", "all-linear"), ("gpt2", ("c_attn",))])
def test_streamed_merge_writes_what_the_whole_model_merge_writes(tmp_path: Path, monkeypatch, arch,
                                                                   targets) -> None:
    base = _base(tmp_path, arch)
    adapter = _adapter(tmp_path, base, targets)
    merge_adapter(adapter, tmp_path / "streamed", model=base, quant="nf4", dtype="bf16")
    monkeypatch.setattr(merge_mod, "_streamable", lambda model: False)
    merge_adapter(adapter, tmp_path / "whole", model=base, quant="nf4", dtype="bf16")
    streamed, whole = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "whole")
    assert streamed.keys() == whole.keys()
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole").eval()
    assert a.dtype == b.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_shards_and_index_past_the_shard_size_and_one_tensor_alive_at_a_time(tmp_path: Path, monkeypatch) -> None:
    base = _base(tmp_path, "llama")
    adapter = _adapter(tmp_path, base, "all-linear")
    alive: list[weakref.ref] = []
    write = SafetensorsStreamWriter.write

    def checking_write(self, name, tensor):
        gc.collect()
        assert all(r() is None for r in alive), "an earlier merged tensor is still alive"
        write(self, name, tensor)
        alive.append(weakref.ref(tensor))

    monkeypatch.setattr(SafetensorsStreamWriter, "write", checking_write)
    merge_adapter(adapter, tmp_path / "merged", model=base, quant="nf4", dtype="fp32", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "merged" / f).stat().st_size <= 100_000 + 20_000 for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(tmp_path / "merged").values())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert set(index["weight_map"]) == set(model.state_dict()) - {"lm_head.weight"} or \
        set(index["weight_map"]) == set(model.state_dict())
    assert not list((tmp_path / "merged").glob("*.tmp*"))


def test_a_writer_refuses_a_tensor_out_of_order_and_leaves_no_file(tmp_path: Path) -> None:
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,)),
                                                                  ("b", torch.float32, (3,))])
    writer.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="expected b"):
        writer.write("b", torch.ones(4))
    with pytest.raises(ValueError, match="were not written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_the_second_shard_names_the_output_and_keeps_the_previous_merge(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import errno
    import os

    from _cli import assert_clean_error, run_cli

    base = _base(tmp_path, "llama")
    adapter = _adapter(tmp_path, base, "all-linear")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier merge")
    write_shards = merge_mod.write_merged_shards
    monkeypatch.setattr(merge_mod, "write_merged_shards", lambda m, f, d, _size=0: write_shards(m, f, d, 100_000))
    synced = []

    def full_on_second_shard(fd):
        synced.append(fd)
        if len(synced) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_on_second_shard)
    result = run_cli("merge", base, "--adapter", adapter, "--out", out, "--quant", "nf4", "--overwrite")
    message = assert_clean_error(result, "no space left")
    assert str(out) in message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"], "the earlier merge is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base-llama", "merged"], "no temporaries"
