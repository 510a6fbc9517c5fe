"""The fast batch-1 decoder (fourbit/models/decode.py, kernels/csrc/decode.c) against transformers.

References: the model's own forward over the whole sequence (logits at every position) and transformers'
``generate`` through the same :func:`fourbit.generate.generate_ids` (tokens). Tolerance for logits: atol 1e-4 on
logits of magnitude ~1: the step sums each row in float32 in another order than PyTorch (measured differences
~1e-7 here, ~3e-5 on the 30-layer SmolLM2 with logits ~30); greedy and seeded sampled tokens must be equal.

These comparisons run the step's float 4-bit rows (the ``float_rows`` fixture): on a CPU with
AVX512_VNNI the step's 4-bit rows can take int8 activations (as llama.cpp's; by default for layers of 2,048
columns or more, ``cpu.set_decode_rows``), which moves
these logits of magnitude ~1 by up to ~7e-3 (measured on the five tiny models here) -- enough to flip a greedy near-tie of a random model
(the tied llama below differs from transformers at one of 24 greedy tokens). The int8 rows are checked here
against transformers with their own tolerance (``test_int8_rows_*``) and row by row against exact references in
tests/kernels/test_decode_int8.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from _tiny_models import make_llama, make_tokenizer

from fourbit._errors import FieldError
from fourbit.generate import generate, generate_ids
from fourbit.kernels import cpu
from fourbit.models import QuantConfig, quantize_model
from fourbit.models.decode import Decoder, decoder_for, unsupported_reason
from fourbit.nn.lora import LoRASpec, inject_lora

pytestmark = pytest.mark.usefixtures("float_rows")  # see the module docstring

_SMALL = dict(vocab_size=259, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
              max_position_embeddings=256, pad_token_id=256)
IDS = [5, 17, 99, 3, 200, 45, 7, 130, 64, 2, 250, 33]
STOP = 258  # <|im_end|> of the byte tokenizer: ends a generation on both paths if the random model picks it


def _quantized(model, compute="fp32"):
    quantize_model(model.eval(), QuantConfig(compute_dtype=compute))
    return model


def _arch(kind: str, seed: int = 0, **overrides):
    """A tiny random model of ``kind`` (llama / mistral / qwen2 / qwen3), eval mode."""
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    config = getattr(transformers, f"{names[kind]}Config")(**dict(_SMALL, intermediate_size=96, **overrides))
    torch.manual_seed(seed)
    return getattr(transformers, f"{names[kind]}ForCausalLM")(config).eval()


def _step_logits(model, ids: list[int], prompt: int = 3) -> torch.Tensor:
    """Logits [len(ids) - prompt + 1, vocab]: the prefill's last position, then one decoder step per token."""
    dec = Decoder(model, len(ids))
    rows = [dec.prefill(ids[:prompt])]
    rows += [dec.step(t, logits=True)[1] for t in ids[prompt:]]
    return torch.stack(rows)


def _reference_logits(model, ids: list[int], prompt: int = 3) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, prompt - 1:].float()


def _tokens(model, decoder: str, n: int = 24, seed: int | None = None, **kwargs) -> list[int]:
    if seed is not None:
        torch.manual_seed(seed)
    return generate_ids(model, IDS[:5], max_new_tokens=n, stops=[STOP], pad=STOP, decoder=decoder, **kwargs)


@pytest.fixture
def isa_restored():
    yield
    cpu.set_isa(2)


#: The int8 rows' tolerance on these logits of magnitude ~1: 3x the largest difference measured on the tiny
#: models of this file (6.8e-3; each row's error is bounded per layer in tests/kernels/test_decode_int8.py).
INT8_ATOL = 2e-2


@pytest.fixture
def int8_rows(float_rows):
    """The step's int8 rows (where the CPU has AVX512_VNNI); float_rows restores the choice before."""
    if cpu.set_decode_rows("int8") != "int8":
        pytest.skip("no AVX512_VNNI on this CPU (or no AVX-512 code in use): the step has no int8 rows here")


@pytest.mark.parametrize("intermediate, tied", [(96, False), (128, True)])
def test_4bit_llama_logits_and_greedy_tokens_match_transformers(intermediate, tied):
    # intermediate 96: down_proj rows are not whole 64-blocks (the general 4-bit path); 128: the vector path
    model = _quantized(make_llama(intermediate_size=intermediate, tie_word_embeddings=tied).eval())
    torch.testing.assert_close(_step_logits(model, IDS), _reference_logits(model, IDS), atol=1e-4, rtol=0)
    assert _tokens(model, "fast") == _tokens(model, "hf")


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_architectures(kind):
    model = _quantized(_arch(kind, **({"head_dim": 16} if kind == "qwen3" else {})))
    if kind == "qwen2":  # Q/K/V biases, zero at init: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    if kind == "qwen3":
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.data.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.data.uniform_(0.5, 1.5)
    assert unsupported_reason(model) is None
    torch.testing.assert_close(_step_logits(model, IDS), _reference_logits(model, IDS), atol=1e-4, rtol=0)
    assert _tokens(model, "fast") == _tokens(model, "hf")


def test_rope_scaling_comes_from_the_models_rotary_module():
    model = _quantized(make_llama(rope_scaling={"rope_type": "linear", "factor": 4.0}).eval())
    torch.testing.assert_close(_step_logits(model, IDS), _reference_logits(model, IDS), atol=1e-4, rtol=0)


def test_dense_layers_float32_and_bfloat16():
    model = make_llama(intermediate_size=128).eval()  # nn.Linear everywhere: the dense rows
    torch.testing.assert_close(_step_logits(model, IDS), _reference_logits(model, IDS), atol=1e-4, rtol=0)
    assert _tokens(model, "fast") == _tokens(model, "hf")
    # bf16 weights are read as bf16 and the steps computed in float32; the prompt's K/V come from the model's own
    # bf16 forward, so the reference (the same weights in float32) agrees to bf16 rounding (2^-8 relative)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    torch.testing.assert_close(_step_logits(bf16, IDS), _reference_logits(bf16.float(), IDS), atol=1e-2, rtol=0)


def test_plain_c_path_equals_each_vector_path(isa_restored):
    """Plain C, AVX2 (row4_avx2) and, where the CPU has it, AVX-512 (row4_avx512, its own input order)."""
    model = _quantized(make_llama(intermediate_size=128).eval())
    best = cpu.set_isa(2)
    assert cpu.set_isa(0) == 0
    plain = _step_logits(model, IDS)
    torch.testing.assert_close(plain, _reference_logits(model, IDS), atol=1e-4, rtol=0)
    for level in range(1, best + 1):
        assert cpu.set_isa(level) == level
        torch.testing.assert_close(_step_logits(model, IDS), plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_int8_rows_logits_and_greedy_tokens_against_transformers(kind, int8_rows):
    """The int8 rows: logits within INT8_ATOL of the model's forward, and the forward's greedy token at
    every position whose top-2 margin exceeds twice that (teacher-forced on transformers' greedy tokens)."""
    model = _quantized(make_llama(intermediate_size=128, tie_word_embeddings=True).eval() if kind == "llama"
                       else _arch(kind, head_dim=16))
    ids = IDS[:5] + _tokens(model, "hf", n=40)
    got, want = _step_logits(model, ids), _reference_logits(model, ids)
    torch.testing.assert_close(got, want, atol=INT8_ATOL, rtol=0)
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * INT8_ATOL
    assert clear.sum() >= clear.numel() // 4  # enough positions are checked: not a vacuous test
    assert torch.equal(got.argmax(1)[clear], want.argmax(1)[clear])
    assert not torch.equal(got, _float_step_logits(model, ids))  # the int8 rows did run


def _float_step_logits(model, ids: list[int]) -> torch.Tensor:
    assert cpu.set_decode_rows("float") == "float"
    try:
        return _step_logits(model, ids)
    finally:
        cpu.set_decode_rows("int8")


def test_results_do_not_depend_on_the_thread_count():
    model = _quantized(make_llama(intermediate_size=128).eval())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _step_logits(model, IDS)
        torch.set_num_threads(2)
        two = _step_logits(model, IDS)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each row is summed by one thread, in one order


def test_screened_greedy_head_is_the_exact_argmax_among_near_ties():
    """Head rows that the int8 copy cannot tell apart: the exact logits must decide."""
    model = make_llama(intermediate_size=128).eval()
    head = model.lm_head.weight.data
    base = head[7].clone()
    for r in range(40, 240):  # 200 rows within 1e-4 of one another: identical after int8 rounding
        head[r] = base + 1e-4 * torch.randn_like(base)
    head[7] *= 0.9
    for steps in range(1, 8):
        dec, exact = Decoder(model, 16), Decoder(model, 16, screen_head=False)
        for d in (dec, exact):
            d.prefill(IDS[:3])
        for t in IDS[3:3 + steps]:
            token, _ = dec.step(t)
            _, logits = exact.step(t, logits=True)
        assert token == int(logits.argmax())


def test_seeded_sampling_draws_the_same_tokens_as_transformers():
    model = _quantized(make_llama(intermediate_size=128).eval())
    kwargs = dict(do_sample=True, temperature=1.0, top_p=0.95)
    fast = _tokens(model, "fast", seed=11, **kwargs)
    assert fast == _tokens(model, "hf", seed=11, **kwargs)
    assert fast != _tokens(model, "fast", seed=12, **kwargs)  # the seed matters: it is sampling


def test_stops_at_a_stop_token_as_transformers_does():
    model = _quantized(make_llama(intermediate_size=128).eval())
    free = _tokens(model, "hf", n=12)
    stop = free[5]
    first = free.index(stop)
    fast = generate_ids(model, IDS[:5], max_new_tokens=12, stops=[stop], pad=STOP, decoder="fast")
    assert fast == generate_ids(model, IDS[:5], max_new_tokens=12, stops=[stop], pad=STOP, decoder="hf")
    assert fast == free[:first + 1]


def test_the_cache_grows_past_its_first_size():
    model = _quantized(make_llama(intermediate_size=128).eval())
    dec = Decoder(model, 4)
    rows = [dec.prefill(IDS[:3])] + [dec.step(t, logits=True)[1] for t in IDS[3:]]
    assert dec.max_len >= len(IDS)
    torch.testing.assert_close(torch.stack(rows), _reference_logits(model, IDS), atol=1e-4, rtol=0)


def test_decoder_is_rebuilt_when_the_weights_change():
    model = _quantized(make_llama(intermediate_size=128).eval())
    first = decoder_for(model, 32)
    assert decoder_for(model, 32) is first and first.current()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(3.0)  # in place: the version changes
    assert not first.current()
    assert decoder_for(model, 32) is not first
    assert _tokens(model, "fast") == _tokens(model, "hf")


def test_a_copied_model_gets_no_decoder_of_the_original():
    model = _quantized(make_llama(intermediate_size=128).eval())
    expected = _tokens(model, "fast")
    twin = copy.deepcopy(model)
    assert not isinstance(twin.__dict__.get("_fourbit_decoder"), Decoder)
    with torch.no_grad():
        twin.model.norm.weight.mul_(-1.0)
    assert _tokens(twin, "fast") == _tokens(twin, "hf") and _tokens(model, "fast") == expected


def test_unsupported_models_fall_back_or_are_refused_with_the_reason():
    model = _quantized(make_llama(intermediate_size=128).eval())
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight if hasattr(module.lora_B, "weight") else module.lora_B)
    model.eval()
    reason = unsupported_reason(model)
    assert reason and "q_proj" in reason and "LoRA" in reason
    assert _tokens(model, "auto", n=6) == _tokens(model, "hf", n=6)
    with pytest.raises(NotImplementedError, match="q_proj"):
        _tokens(model, "fast", n=2)
    with pytest.raises(FieldError, match="decoder"):
        _tokens(model, "turbo", n=2)
    assert "model_type 'gpt2'" in unsupported_reason(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=1, n_head=4, vocab_size=259)))


def test_sliding_window_is_respected_by_falling_back():
    model = _quantized(_arch("mistral", sliding_window=8))
    assert unsupported_reason(model, total_len=8) is None
    assert "sliding attention window of 8" in unsupported_reason(model, total_len=9)
    assert _tokens(model, "auto", n=10) == _tokens(model, "hf", n=10)


def test_generate_text_and_streaming_match_the_transformers_path():
    tokenizer = make_tokenizer()
    model = _quantized(make_llama(intermediate_size=128).eval())
    pieces = []
    fast = generate(model, tokenizer, "hello", max_new_tokens=16, stream=pieces.append, return_num_tokens=True)
    assert fast == generate(model, tokenizer, "hello", max_new_tokens=16, decoder="hf", return_num_tokens=True)
    assert "".join(pieces) == fast[0]
