"""4-bit models: in-place quantization, footprint, checkpoints that round-trip with transformers + bitsandbytes."""

import json
import os

import pytest
import torch
from torch import nn

from fourbit.models import QuantConfig, load_model, model_footprint, quantize_model, save_quantized
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
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_quantized(model, out)

    import safetensors.torch

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, out, overwrite=True)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before, "the old checkpoint is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["q"], "no temporary folder is left behind"


def test_save_refuses_an_unquantized_model(tmp_path, make_llama):
    with pytest.raises(ValueError, match="no 4-bit layers"):
        save_quantized(make_llama(), tmp_path / "x")


def test_missing_and_truncated_checkpoints_are_reported(tmp_path, make_llama):
    model = make_llama()
    quantize_model(model)
    save_quantized(model, tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(tmp_path / "q")
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path / "q")


def test_bad_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


def test_gguf_of_an_unsupported_architecture_is_reported(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_architecture()
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="cannot load GGUF"):
        load_model(path)


def test_quant_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--quant-type"):
        QuantConfig(quant_type="nf8")
    with pytest.raises(ValueError, match="--blocksize"):
        QuantConfig(blocksize=96)
    with pytest.raises(ValueError, match="--compute-dtype"):
        QuantConfig(compute_dtype="int8")


def test_footprint_of_a_loaded_model_matches_quantization(tiny_llama):
    fp = quantize_model(tiny_llama)
    again = model_footprint(tiny_llama)
    assert again.quantized_bytes == fp.quantized_bytes and again.bits_per_param == fp.bits_per_param


@pytest.mark.slow
def test_bundled_model_quantizes_to_4_127_bits_and_generates():
    from fourbit.generate import generate

    model, tokenizer = load_model()
    fp = model.fourbit_footprint
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
