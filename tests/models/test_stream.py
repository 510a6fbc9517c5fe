"""Streaming quantization (fourbit.models.stream): a float folder is read one tensor at a time into a meta-device
skeleton and each layer quantized as soon as it is complete.

The reference is the path it replaces, run independently: transformers' ``from_pretrained`` of the whole float
model in the same dtype, then ``quantize_model``. Every tensor of the result (packed 4-bit codes, absmax and
its 8-bit codes, nested constants, float leftovers, buffers such as rotary tables) must be equal (torch.equal:
the same arithmetic on the same values), and so must the logits, for every architecture
tests/test_architectures.py covers.
"""

from __future__ import annotations

import gc
import logging
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from test_architectures import ARCHITECTURES, make_model

from fourbit.models import QuantConfig, fourbit_info, load_model, quantize_model
from fourbit.models import stream as stream_module
from fourbit.nn.experts import Experts4bit
from fourbit.nn.linear4bit import Linear4bit

QC = QuantConfig(compute_dtype="fp32")


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))


def _save(model: torch.nn.Module, folder: Path, dtype: torch.dtype, shard: str = "200KB") -> Path:
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


def _reference(folder: Path, config: QuantConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The whole float model loaded by transformers, then quantized in place (the non-streaming path)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(model, config)
    return model


def _assert_identical(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    differ = [k for k in theirs if mine[k].dtype != theirs[k].dtype or not torch.equal(mine[k], theirs[k])]
    assert differ == [], f"tensors that differ from from_pretrained + quantize_model: {differ[:5]}"
    buffers, ref_buffers = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    assert [k for k in ref_buffers if not torch.equal(buffers[k], ref_buffers[k])] == []
    assert ours.config.to_dict() == ref.config.to_dict()
    with torch.no_grad():
        assert torch.equal(ours(_ids()).logits, ref(_ids()).logits)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.disable(logging.WARNING)  # "weights not initialised" notes from the reference loads
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_streaming_gives_the_bytes_of_loading_then_quantizing(arch, tmp_path):
    """bf16 and sharded (MoE checkpoints are saved per expert and fused on load by transformers' converters)."""
    folder = _save(make_model(arch), tmp_path / arch, torch.bfloat16)
    ours, _ = load_model(folder, quant=QC)
    assert fourbit_info(ours).footprint.quantized_layers > 0
    assert next(ours.get_input_embeddings().parameters()).dtype == torch.bfloat16, "leftovers keep bf16"
    _assert_identical(ours, _reference(folder, QC, torch.bfloat16))


@pytest.mark.parametrize("saved, asked", [(torch.float16, None), (torch.float32, None),
                                          (torch.bfloat16, torch.float32)])
def test_float_leftovers_keep_the_checkpoint_dtype_unless_asked(tmp_path, saved, asked, make_llama):
    folder = _save(make_llama(), tmp_path / "m", saved)
    ours, _ = load_model(folder, quant=QC, torch_dtype=asked)
    expected = asked or saved
    assert ours.model.embed_tokens.weight.dtype == expected and ours.lm_head.weight.dtype == expected
    assert ours.model.norm.weight.dtype == expected
    _assert_identical(ours, _reference(folder, QC, expected))


@pytest.mark.parametrize("skip", [("lm_head",), ()])
def test_tied_embeddings_stay_tied_or_give_a_quantized_head(tmp_path, skip, make_llama):
    """The checkpoint holds the embedding once; the head is tied to it, or quantized from it when selected."""
    folder = _save(make_llama(tie_word_embeddings=True), tmp_path / "tied", torch.bfloat16)
    assert "lm_head.weight" not in stream_module.CheckpointTensors(folder, sorted(folder.glob("*.safetensors"))).entries
    config = QuantConfig(compute_dtype="fp32", skip_modules=skip)
    ours, _ = load_model(folder, quant=config)
    if skip:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    else:
        assert isinstance(ours.lm_head, Linear4bit)
    _assert_identical(ours, _reference(folder, config, torch.bfloat16))


def test_a_base_model_checkpoint_loads_under_the_causal_lm_prefix(tmp_path):
    """A GPT2Model folder (keys without transformers' ``transformer.`` prefix) into GPT2LMHeadModel."""
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=259, n_positions=256)
    torch.manual_seed(0)
    folder = _save(transformers.GPT2Model(config), tmp_path / "base", torch.bfloat16)
    keys = stream_module.CheckpointTensors(folder, sorted(folder.glob("*.safetensors"))).entries
    assert not [k for k in keys if k.startswith("transformer.")]
    ours, _ = load_model(folder, quant=QC)
    assert type(ours).__name__ == "GPT2LMHeadModel"
    _assert_identical(ours, _reference(folder, QC, torch.bfloat16))


def _quantized_modules(model: torch.nn.Module) -> dict[str, int]:
    """Name -> float bytes (bf16) of each 4-bit module's weights."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            out[name] = 2 * m.in_features * m.out_features
        elif isinstance(m, Experts4bit):
            out[name] = 2 * m.quantized_params()
    return out


@pytest.mark.parametrize("arch", ["llama", "olmoe"])
def test_no_more_than_one_layer_of_float_weights_is_ever_alive(arch, tmp_path, monkeypatch):
    """Every tensor read is tracked through a weak reference to its storage (a Parameter made from it shares
    the storage, so the reference dies only when nothing holds the float values any more). Before each read,
    the float weights of quantized layers still alive must fit in one layer: the layer being assembled (for
    MoE, one layer's experts, which transformers fuses into one tensor). Six layers: the attention weights of
    all layers together outweigh one layer's experts, so a loader that read everything first would fail."""
    small = make_model(arch)
    torch.manual_seed(0)
    model = type(small)(type(small.config)(**{**small.config.to_dict(), "num_hidden_layers": 6})).eval()
    folder = _save(model, tmp_path / arch, torch.bfloat16)
    reads: list[tuple[str, weakref.ref, int]] = []
    alive_at_read: list[list[str]] = []
    real_read = stream_module.CheckpointTensors.read

    def tracking_read(self, name, dtype=None):
        gc.collect()
        alive_at_read.append([n for n, ref, _ in reads if ref() is not None])
        tensor = real_read(self, name, dtype)
        reads.append((name, weakref.ref(tensor.untyped_storage()), tensor.nbytes))
        return tensor

    monkeypatch.setattr(stream_module.CheckpointTensors, "read", tracking_read)
    ours, _ = load_model(folder, quant=QC)
    gc.collect()
    layers = _quantized_modules(ours)
    quantizable = {n: size for n, _, size in reads if any(n.startswith(q + ".") for q in layers)}
    assert len(reads) == len(stream_module.CheckpointTensors(folder, sorted(folder.glob("*.safetensors"))).entries), \
        "every checkpoint tensor is read by the streaming reader, once"
    peak = max(sum(quantizable.get(n, 0) for n in alive) for alive in alive_at_read)
    assert peak <= max(layers.values()), f"{peak} bytes of float weights alive, one layer is {max(layers.values())}"
    assert sum(quantizable.values()) > 2 * max(layers.values()), "the model is several layers large"
    assert [n for n, ref, _ in reads if n in quantizable and ref() is not None] == [], "no float copy is kept"


def test_the_reader_maps_no_file(tmp_path, make_llama):
    """Pages of a memory-mapped file count in the process's RSS until it is unmapped: the reader uses pread."""
    folder = _save(make_llama(), tmp_path / "m", torch.bfloat16, shard="50KB")
    model, _ = load_model(folder, quant=QC)
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert not [f for f in folder.glob("*.safetensors") if str(f) in maps]
    assert model is not None


def test_a_large_tensor_is_read_whole_across_read_chunks(tmp_path, monkeypatch):
    """preadv returns at most ~2 GiB per call; the reader loops. A small chunk exercises the loop."""
    from safetensors.torch import save_file

    tensor = torch.randn(333, 77, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": tensor, "b": torch.arange(5)}, tmp_path / "model.safetensors")
    monkeypatch.setattr(stream_module, "_READ_CHUNK", 1000)
    reader = stream_module.CheckpointTensors(tmp_path, [tmp_path / "model.safetensors"])
    assert torch.equal(reader.read("w"), tensor) and torch.equal(reader.read("b"), torch.arange(5))
    assert torch.equal(reader.read("w", torch.float32), tensor.float())
    assert reader.dtype() == torch.bfloat16
