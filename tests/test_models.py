"""4-bit models: in-place quantization, footprint, checkpoints that round-trip with transformers + bitsandbytes."""

import copy
import errno
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fourbit._errors import FieldError, InputFileError
from fourbit.models import (
    FourbitInfo,
    QuantConfig,
    fourbit_info,
    load_model,
    model_footprint,
    quantize_model,
    save_quantized,
)
from fourbit.nn import Linear4bit


def _ids():
    return torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))


def test_quantize_model_swaps_every_linear_but_lm_head(tiny_llama):
    expected_params = sum(m.weight.numel() for n, m in tiny_llama.named_modules()
                          if isinstance(m, nn.Linear) and n != "lm_head")
    fp = quantize_model(tiny_llama, QuantConfig(compute_dtype="fp32"))
    names = {n for n, m in tiny_llama.named_modules() if isinstance(m, Linear4bit)}
    linears = {n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {"lm_head"} and len(names) == 2 * 7
    assert fp.quantized_layers == 14 and fp.skipped == ["lm_head"]
    assert fp.quantized_params == expected_params == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64)
    assert fp.model_bytes_after < fp.model_bytes_before


def test_include_and_skip_select_layers(tiny_llama):
    quantize_model(tiny_llama, QuantConfig(include=("q_proj", "v_proj"), skip_modules=("lm_head", "layers.1.self_attn.v_proj")))
    quantized = sorted(n for n, m in tiny_llama.named_modules() if isinstance(m, Linear4bit))
    assert quantized == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                         "model.layers.1.self_attn.q_proj"]


def test_bits_per_parameter_is_4_5_without_double_quant(make_llama):
    model = make_llama()
    fp = quantize_model(model, QuantConfig(double_quant=False))
    # every tiny weight is a multiple of 64 elements: codes 4 bits + one float32 absmax per 64 = 4.5 exactly
    assert fp.bits_per_param == 4.5


def test_nan_weight_error_names_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        quantize_model(tiny_llama)


def test_quantized_logits_stay_close_to_the_original(tiny_llama):
    ids = _ids()
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        quantize_model(tiny_llama, QuantConfig(compute_dtype="fp32"))
        q = tiny_llama(ids).logits
    # NF4 on random N(0, 0.02) weights: ~10% relative weight error, so logits move by well under 30%.
    assert float((q - ref).norm() / ref.norm()) < 0.3


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_round_trip_is_exact(tmp_path, tie, tiny_tokenizer, make_llama):
    model = make_llama(tie_word_embeddings=tie)
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    save_quantized(model, tmp_path / "q", tiny_tokenizer)
    loaded, tok = load_model(tmp_path / "q", quant=QuantConfig(compute_dtype="fp32"))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok is not None and tok("abc")["input_ids"] == tiny_tokenizer("abc")["input_ids"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True


def _assert_same_logits_as_bitsandbytes(ours, theirs):
    """Exact in train mode, close in eval mode.

    In train mode (the tiny llama has no dropout) bitsandbytes dequantizes to float32 and calls F.linear, as
    fourbit does: the logits are equal. In eval mode without grad, on CPUs with AVX512-BF16, bitsandbytes
    repacks the weight for a bf16 kernel (``packing_format_for_cpu``), so the logits move by bf16 rounding
    (2^-8 relative per operand, over two layers): within 2^-6 of the largest logit. Train mode goes first
    because the repacking, once done, stays."""
    ids = _ids()
    with torch.no_grad():
        expected = ours(ids).logits.float()
        theirs.train()
        assert torch.equal(theirs(ids).logits.float(), expected)
        theirs.eval()
        got = theirs(ids).logits.float()
    assert float((got - expected).abs().max()) <= 2**-6 * float(expected.abs().max())


def test_fourbit_checkpoint_loads_in_transformers_with_bitsandbytes(tmp_path, make_llama):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    # in_features a multiple of the block size: bitsandbytes' AVX-512/AMX path refuses other shapes.
    model = make_llama(intermediate_size=128)
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    save_quantized(model, tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(theirs.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    _assert_same_logits_as_bitsandbytes(model, theirs)


def test_bitsandbytes_checkpoint_loads_in_fourbit(tmp_path, make_llama):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_llama(intermediate_size=128).save_pretrained(tmp_path / "base")  # see the test above
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config)
    theirs.save_pretrained(tmp_path / "bnb")
    ours, _ = load_model(tmp_path / "bnb", quant=QuantConfig(compute_dtype="fp32"))
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 14
    _assert_same_logits_as_bitsandbytes(ours, theirs)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch, make_llama):
    model = make_llama()
    quantize_model(model)
    out = tmp_path / "q"
    save_quantized(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FieldError, match="`overwrite`") as refused:
        save_quantized(model, out)
    assert refused.value.field == "out_dir"

    def disk_full(fd):  # file systems with delayed allocation report a full disk at fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as failed:
        save_quantized(model, out, overwrite=True)
    assert failed.value.errno == errno.ENOSPC
    assert failed.value.filename == str(out / "model.safetensors"), "the error names the file the user asked for"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old checkpoint is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["q"], "no temporary folder is left behind"


def test_save_refuses_an_unquantized_model(tmp_path, make_llama):
    with pytest.raises(FieldError, match="no 4-bit layers"):
        save_quantized(make_llama(), tmp_path / "x")


def test_missing_and_truncated_checkpoints_are_reported(tmp_path, make_llama):
    model = make_llama()
    quantize_model(model)
    save_quantized(model, tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="truncated") as truncated:
        load_model(tmp_path / "q")
    assert truncated.value.path == str(weights)
    os.remove(weights)
    with pytest.raises(InputFileError, match="missing") as missing:
        load_model(tmp_path / "q")
    assert missing.value.path == str(weights)


def test_bad_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputFileError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


def test_gguf_of_an_unsupported_architecture_is_reported(tmp_path):
    import gguf
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_architecture()
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputFileError, match="cannot load GGUF") as refused:
        load_model(path)
    assert refused.value.path == str(path)


@pytest.mark.parametrize("kwargs, field", [
    ({"quant_type": "nf8"}, "quant_type"),
    ({"blocksize": 96}, "blocksize"),
    ({"blocksize": 16}, "blocksize"),
    ({"compute_dtype": "int8"}, "compute_dtype"),
])
def test_quant_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(FieldError) as refused:
        QuantConfig(**kwargs)
    assert refused.value.field == field and f"`{field}`" in str(refused.value)
    assert "--" not in str(refused.value), "library errors speak the library's names, not flags"


def test_quant_config_uses_the_codebooks_type_list():
    from fourbit.quant import QUANT_TYPES

    assert [QuantConfig(quant_type=t).quant_type for t in QUANT_TYPES] == list(QUANT_TYPES)


def test_footprint_of_a_loaded_model_matches_quantization(tiny_llama):
    fp = quantize_model(tiny_llama)
    again = model_footprint(tiny_llama)
    assert again.quantized_bytes == fp.quantized_bytes and again.bits_per_param == fp.bits_per_param


@pytest.mark.slow
def test_bundled_model_quantizes_to_4_127_bits_and_generates():
    from fourbit.generate import generate

    model, tokenizer = load_model()
    fp = fourbit_info(model).footprint
    assert round(fp.bits_per_param, 3) == 4.127
    assert fp.model_bytes_after < 0.35 * fp.model_bytes_before
    text = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in text


def test_quantization_releases_each_full_precision_weight(tiny_llama):
    # Layer by layer: once a layer is swapped, nothing keeps its float weight alive, so peak memory is the
    # unquantized model plus one layer, and the final model holds no float copy of a quantized weight.
    import gc
    import weakref

    refs = {n: weakref.ref(m.weight) for n, m in tiny_llama.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head"}
    alive_when_swapping = []
    original = Linear4bit.from_linear.__func__

    def spy(cls, linear, **kwargs):
        gc.collect()
        alive_when_swapping.append(sum(r() is not None for r in refs.values()))
        return original(cls, linear, **kwargs)

    Linear4bit.from_linear = classmethod(spy)
    try:
        quantize_model(tiny_llama)
    finally:
        Linear4bit.from_linear = classmethod(original)
    gc.collect()
    assert alive_when_swapping == list(range(len(refs), 0, -1))
    assert all(r() is None for r in refs.values())


def test_fourbit_info_is_the_one_home_of_what_fourbit_did(tiny_llama, tmp_path, tiny_tokenizer):
    assert fourbit_info(tiny_llama) == FourbitInfo()
    config = QuantConfig(compute_dtype="fp32")
    fp = quantize_model(tiny_llama, config)
    info = fourbit_info(tiny_llama)
    assert info.quant_config is config and info.footprint is fp and info.lora_spec is None
    assert not [k for k in vars(tiny_llama) if k.startswith("fourbit_") and k != "fourbit_info"], \
        "no other fourbit attribute is hung on the model"
    assert not [k for k in tiny_llama.state_dict() if "fourbit" in k]
    clone = copy.deepcopy(tiny_llama)
    assert fourbit_info(clone).quant_config == config and fourbit_info(clone) is not info
    save_quantized(tiny_llama, tmp_path / "q", tiny_tokenizer)
    loaded, _ = load_model(tmp_path / "q", quant=config)
    assert fourbit_info(loaded).footprint.quantized_bytes == fp.quantized_bytes


def _nf5_checkpoint(tmp_path, make_llama, where):
    """A saved checkpoint whose config (``where="config"``) or quant states (``"tensors"``) say 'nf5'."""
    from safetensors.torch import load_file, save_file

    model = make_llama()
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    out = save_quantized(model, tmp_path / "q")
    if where == "config":
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"]["bnb_4bit_quant_type"] = "nf5"
        (out / "config.json").write_text(json.dumps(config))
    else:
        tensors = load_file(out / "model.safetensors")
        key = next(k for k in tensors if k.endswith("quant_state.bitsandbytes__nf4"))
        tensors[key.replace("__nf4", "__nf5")] = tensors.pop(key)
        save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize("where, file, names", [
    ("config", "config.json", "bnb_4bit_quant_type"),
    ("tensors", "model.safetensors", "bitsandbytes__nf5"),
])
def test_a_checkpoint_of_an_unknown_quant_type_is_refused(tmp_path, make_llama, where, file, names):
    out = _nf5_checkpoint(tmp_path, make_llama, where)
    with pytest.raises(InputFileError, match="nf5") as refused:
        load_model(out)
    assert refused.value.path == str(out / file) and names in str(refused.value)


def _tiny_gpt2(seed: int = 0, model_class=None):
    """A 2-layer GPT-2 (Conv1D layers, weights stored [in, out]); every in_features is a multiple of 64."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=259, n_positions=256,
                                     bos_token_id=256, eos_token_id=256, pad_token_id=256)
    return (model_class or transformers.GPT2LMHeadModel)(config).eval()


def test_conv1d_is_quantized_transposed_like_bitsandbytes():

    from fourbit.quant import quantize_4bit

    model = _tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn  # weight [64, 192]: in 64, out 192
    expected, _ = quantize_4bit(c_attn.weight.detach().t().contiguous())
    fp = quantize_model(model, QuantConfig(compute_dtype="fp32"))
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, Linear4bit) and (q.in_features, q.out_features) == (64, 192)
    assert q.layout == "conv1d"
    assert torch.equal(q.weight, expected), "the bytes of quantize_4bit(W.T), as transformers' bnb path makes them"
    assert fp.quantized_layers == 8 and fp.full_precision == {}


def test_fourbit_gpt2_checkpoint_loads_in_transformers_with_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model = _tiny_gpt2()
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    save_quantized(model, tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(theirs.transformer.h[0].attn.c_attn).__module__.startswith("bitsandbytes")
    ids = _ids()
    with torch.no_grad():  # eval mode on both sides (GPT-2 has dropout); bf16 repacking as described above
        expected, got = model(ids).logits, theirs.eval()(ids).logits.float()
    assert float((got - expected).abs().max()) <= 2**-6 * float(expected.abs().max())


def test_bitsandbytes_gpt2_checkpoint_loads_in_fourbit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_gpt2().save_pretrained(tmp_path / "base")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config)
    theirs.save_pretrained(tmp_path / "bnb")
    ours, _ = load_model(tmp_path / "bnb", quant=QuantConfig(compute_dtype="fp32"))
    layers = [m for m in ours.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 8 and all(m.layout == "conv1d" for m in layers)
    # the same 4-bit weights: fourbit quantizing the float GPT-2 gives bitsandbytes' bytes
    mine = _tiny_gpt2()
    quantize_model(mine, QuantConfig(compute_dtype="fp32"))
    assert all(torch.equal(a, b) for (k, a), b in zip(ours.state_dict().items(), mine.state_dict().values(),
                                                       strict=True) if k.endswith("c_attn.weight"))
    ids = _ids()
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs.eval()(ids).logits.float()
    assert float((got - expected).abs().max()) <= 2**-6 * float(expected.abs().max())


def test_gpt2_and_moe_checkpoints_round_trip_exactly(tmp_path):
    from test_architectures import make_model

    from fourbit.nn.experts import Experts4bit

    for arch in ("gpt2", "olmoe"):
        model = make_model(arch)
        quantize_model(model, QuantConfig(compute_dtype="fp32"))
        save_quantized(model, tmp_path / arch)
        loaded, _ = load_model(tmp_path / arch, quant=QuantConfig(compute_dtype="fp32"))
        theirs, ours = loaded.state_dict(), model.state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
        assert sum(isinstance(m, Experts4bit) for m in loaded.modules()) == (2 if arch == "olmoe" else 0)
        from fourbit.models import checkpoint_info

        assert checkpoint_info(tmp_path / arch)["quantized_params"] == fourbit_info(model).footprint.quantized_params
        ids = _ids()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_loading_a_checkpoint_builds_no_float_weight(tmp_path, make_llama, monkeypatch):
    """The skeleton's parameters live on the meta device until the checkpoint's tensors are assigned to them
    (not copied into them): no float weight of a quantized layer is ever materialised. The peak memory this
    gives is measured by benchmarks/bench_load.py."""
    model = make_llama(intermediate_size=128)
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    save_quantized(model, tmp_path / "q")
    seen = []
    real_load = nn.Module.load_state_dict

    def spy(self, state_dict, strict=True, assign=False):
        if self.__class__.__name__ == "LlamaForCausalLM":
            shells = tuple(n + "." for n, m in self.named_modules() if isinstance(m, Linear4bit))
            seen.append((assign, sorted({p.device.type for n, p in self.named_parameters()
                                         if not n.startswith(shells)})))
            float_weights = [n for n, m in self.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
            seen.append(float_weights)
        return real_load(self, state_dict, strict=strict, assign=assign)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    loaded, _ = load_model(tmp_path / "q", quant=QuantConfig(compute_dtype="fp32"))
    (assign, devices), float_weights = seen
    assert assign and devices == ["meta"], "embeddings, norms, lm_head: on the meta device until assigned"
    assert float_weights == [], "the quantized layers are 4-bit shells before any tensor is read"
    assert not [n for n, t in loaded.state_dict().items() if t.is_meta]
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_a_quantized_model_keeps_no_mapping_of_its_float_weight_files(tiny_llama_dir):
    """transformers memory-maps the safetensors file and keeps unconverted tensors as views of it; after
    quantization fourbit copies the float leftovers, so the file (and its resident pages) is released."""
    import gc

    from fourbit.models import QuantConfig, load_model

    model, _ = load_model(tiny_llama_dir, quant=QuantConfig(compute_dtype="fp32"))
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(tiny_llama_dir / "model.safetensors") not in maps
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()
