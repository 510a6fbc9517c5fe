"""Linear4bit: forward/backward against F.linear on the dequantized weight, what autograd saves, formats."""

import warnings

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import Linear4bit
from fourbit.nn import linear4bit as l4


def _layer(compute_dtype="fp32", bias=True, out_features=64, in_features=96):
    return Linear4bit.from_linear(nn.Linear(in_features, out_features, bias=bias), compute_dtype=compute_dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear_on_the_dequantized_weight(bias):
    layer = _layer(bias=bias)
    x = torch.randn(4, 7, 96)  # 28 rows: the dequantize + matmul path, which must agree exactly
    expected = torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias)
    assert torch.equal(layer(x), expected)


def test_small_batches_use_the_fused_kernel_and_agree():
    # Up to SMALL_BATCH_ROWS rows without grad use the fused 4-bit kernel: float32 sums in another order (rtol 1e-4).
    layer = _layer()
    x = torch.randn(3, 96)
    expected = torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compute_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_output_keeps_the_input_dtype(compute_dtype, input_dtype):
    layer = _layer(compute_dtype)
    y = layer(torch.randn(20, 96, dtype=input_dtype))
    assert y.dtype == input_dtype and y.shape == (20, 64)


def test_backward_gives_input_gradient_only():
    layer = _layer()
    x = torch.randn(16, 96, requires_grad=True)
    grad_out = torch.randn(16, 64)
    layer(x).backward(grad_out)
    assert torch.equal(x.grad, grad_out @ layer.dequantize(torch.float32))
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert layer.bias.grad is None


def test_autograd_saves_nothing_larger_than_the_packed_weight():
    layer = _layer(out_features=256, in_features=512)
    packed_bytes = layer.weight.numel() * layer.weight.element_size()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(32, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    # W is read from the module again in backward: nothing of it is saved (x is not saved either: no grad of W)
    assert max(saved, default=0) <= packed_bytes, f"saved {max(saved)} bytes; the packed weight is {packed_bytes}"
    y.sum().backward()
    assert x.grad is not None


def test_backward_reads_the_weight_the_module_holds_then():
    # FSDP2 frees a layer's gathered weight after forward and gathers it again before backward, maybe into other
    # tensor objects: backward must use whatever the module holds then, not a tensor kept from forward.
    layer, other = _layer(), _layer()
    x = torch.randn(16, 96, requires_grad=True)
    g = torch.randn(16, 64)
    y = layer(x)
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)  # same bytes, new object
    (grad_same,) = torch.autograd.grad(y, x, g, retain_graph=True)
    assert torch.equal(grad_same, g @ layer.dequantize(torch.float32))
    layer.load_state_dict(other.state_dict())  # other bytes: backward follows them
    (grad_other,) = torch.autograd.grad(y, x, g)
    assert torch.equal(grad_other, g @ other.dequantize(torch.float32))


def test_evaluation_between_training_steps_changes_nothing():
    # bitsandbytes on the CPU repacks weights after a no-grad forward and later loses the input gradient.
    layer = _layer()
    x = torch.randn(12, 96, requires_grad=True)
    y1 = layer(x)
    (g1,) = torch.autograd.grad(y1.sum(), x)
    with torch.no_grad():
        layer(torch.randn(2, 96))  # fused path
        layer(torch.randn(20, 96))
    y2 = layer(x)
    (g2,) = torch.autograd.grad(y2.sum(), x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_state_dict_uses_bitsandbytes_keys_and_round_trips():
    layer = _layer(compute_dtype="bf16")
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    fresh = Linear4bit(96, 64, compute_dtype="bf16")
    fresh.load_state_dict(sd)
    x = torch.randn(10, 96)
    assert torch.equal(fresh(x), layer(x))


def test_loads_into_and_from_bitsandbytes_modules():
    import bitsandbytes as bnb
    # in_features 128, a multiple of the block size: bitsandbytes' AVX-512/AMX path repacks the weight per row
    # of blocks and raises on other widths, and its AVX-512 dequantize is wrong where blocks cross a row.
    layer = _layer(in_features=128)
    sd = layer.state_dict()
    theirs = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                               compress_statistics=True)
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
    theirs.bias = nn.Parameter(sd["bias"])
    # More rows than the fused kernel takes: both libraries dequantize and call F.linear, so the results are equal
    x = torch.randn(l4.SMALL_BATCH_ROWS + 4, 128)
    with torch.no_grad():
        assert torch.equal(theirs(x), layer(x))
    back = Linear4bit(128, 64, compute_dtype="fp32")
    back.load_state_dict(theirs.state_dict())
    assert torch.equal(back(x), layer(x))


def test_wrong_input_width_and_bad_compute_dtype():
    layer = _layer()
    with pytest.raises(ValueError, match="last dimension 96"):
        layer(torch.randn(2, 95))
    with pytest.raises(ValueError, match="compute_dtype"):
        l4.parse_dtype("int8")


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))


def test_quantized_bytes_count_codes_and_constants():
    layer = _layer(out_features=256, in_features=256)
    n = 256 * 256
    assert layer.quantized_bytes() == n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4
    assert fourbit.quant.QuantState is type(layer.quant_state)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_compute_dtype_follows_the_hardware_answer(monkeypatch, native, expected):
    seen = []
    monkeypatch.setattr(l4, "native_bf16", lambda device: seen.append(device) or native)
    assert l4.resolve_compute_dtype("auto", "cpu") == expected
    assert l4.resolve_compute_dtype("AUTO", torch.device("cpu")) == expected
    assert seen == ["cpu", torch.device("cpu")]
    # Anything else is parsed as given, whatever the hardware.
    assert l4.resolve_compute_dtype("fp16", "cpu") == torch.float16
    assert l4.resolve_compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype"):
        l4.resolve_compute_dtype("fp8", "cpu")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_to_float_is_the_dequantized_layer(bias, dtype):
    layer = _layer(compute_dtype="bf16", bias=bias)
    linear = layer.to_float(dtype)
    assert type(linear) is nn.Linear and (linear.in_features, linear.out_features) == (96, 64)
    assert linear.weight.dtype == dtype and torch.equal(linear.weight, layer.dequantize(dtype))
    x = torch.randn(20, 96, dtype=torch.float32)
    layer.compute_dtype = torch.float32
    if dtype == torch.float32:
        assert torch.equal(linear(x), layer(x))  # 20 rows: dequantize + F.linear on both sides
    if bias:
        assert torch.equal(linear.bias, layer.bias.to(dtype))
        with torch.no_grad():
            linear.bias.add_(1)  # a copy: the 4-bit layer keeps its bias
        assert not torch.equal(linear.bias, layer.bias.to(dtype))
    else:
        assert linear.bias is None


def test_to_float_defaults_to_float32():
    assert _layer().to_float().weight.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_runs_and_says_when_built_that_it_is_slow(monkeypatch, native):
    monkeypatch.setattr(l4, "native_bf16", lambda device=None: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = _layer(compute_dtype="bf16")
        x = torch.randn(20, 96)  # more rows than the fused path takes: the bf16 matmul runs
        first, second = layer(x), layer(x)  # forward never warns: the dtype was decided when the layer was built
    slow = [w for w in caught if "is slow" in str(w.message)]
    assert torch.equal(first, second) and first.dtype == torch.float32
    assert len(slow) == (0 if native else 1)
    if not native:
        assert "AVX512-BF16" in str(slow[0].message) and slow[0].category is RuntimeWarning
    assert not l4.warn_if_slow(torch.float32, "cpu")


def test_model_dtype_conversion_moves_but_never_rounds_the_constants():
    layer = Linear4bit.from_linear(nn.Linear(96, 64), compute_dtype="fp32", double_quant=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    layer.half()
    after = layer.state_dict()
    assert after["weight.absmax"].dtype == torch.float32
    assert all(torch.equal(before[k], after[k]) for k in before if k != "bias")


def test_loads_onto_a_meta_skeleton_with_assign():
    source = _layer(bias=True)
    skeleton = Linear4bit(96, 64, bias=True, compute_dtype="fp32", quant_type="fp4", device="meta")
    skeleton.load_state_dict(source.state_dict(), assign=True)
    assert not skeleton.weight.is_meta and not any(b.is_meta for b in skeleton.buffers())
    assert skeleton.quant_state.equals(source.quant_state) and torch.equal(skeleton.bias, source.bias)
    x = torch.randn(20, 96)
    assert torch.equal(skeleton(x), source(x))
    assert {k: v.dtype for k, v in skeleton.state_dict().items()} == {k: v.dtype for k, v in source.state_dict().items()}
