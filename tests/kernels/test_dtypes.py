"""Every input dtype through every path: computed right (against float64) or refused by name, never wrong.

Paths: the three backends (PyTorch reference, compiled CPU, Triton under its interpreter) x dequantization,
the fused small-batch matmul, dequantize + matmul for larger batches, and Linear4bit's forward (both paths)
and backward. The reference is ``F.linear`` in float64 on the dequantized weight (float32 codes x absmax,
exact in float64). Tolerances, per output dtype, bound |got - ref| by ``tol * (|x| @ |W|^T)`` (the size of
the terms summed), which covers the float32 sums in another order (K * 2^-24 ~ 2^-17 for K = 128), and the
rounding of the weight and of the output to the input dtype (2^-11 for fp16, 2^-8 for bf16 per rounding):

    float32 2^-16, float16 2^-9, bfloat16 2^-6, float64 computed in float64 2^-40.

The bug these tests were written for (a double-quantized layer given float64 rows reading the 8-bit absmax
codes as if they were scales) was off by a relative 1957.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported (see tests/kernels/test_triton.py)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fourbit  # noqa: E402
from fourbit.kernels import cpu, dispatch, reference  # noqa: E402
from fourbit.kernels.scales import SMALL_BATCH_ROWS  # noqa: E402
from fourbit.nn import Linear4bit  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REFUSED = [torch.int32, torch.int64, torch.uint8, torch.complex64, torch.float8_e4m3fn, torch.bool]
TOL = {torch.float32: 2.0**-16, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6, torch.float64: 2.0**-40}

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _backend(name: str):
    if name == "reference":
        return reference
    if name == "cpu":
        return cpu
    from fourbit.kernels import triton_kernels

    return triton_kernels


BACKENDS = [
    pytest.param("reference"),
    pytest.param("cpu", marks=pytest.mark.skipif(not cpu.available(), reason="no C compiler")),
    pytest.param("triton", marks=pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")),
]

OUT_FEATURES, IN_FEATURES, BLOCKSIZE = 24, 128, 64


@pytest.fixture
def use_backend(monkeypatch):
    """Route every dispatcher call (quantize, dequantize, matmul) to one backend module."""

    def use(name: str):
        module = _backend(name)
        monkeypatch.setattr(dispatch, "backend_for", lambda t: module)
        return module

    return use


@pytest.fixture
def fused_calls(monkeypatch):
    """Spy on the fused matmul of every backend: the list of backends whose fused kernel ran."""
    calls = []
    names = ["reference", "cpu"] + (["triton"] if _HAS_TRITON else [])
    for name in names:
        module = _backend(name)
        real = module.fused_linear_4bit

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "fused_linear_4bit", spy)
    return calls


def _assert_right(got, x, weight64, dtype, tol=None, bias=None):
    """``got`` equals F.linear in float64 within ``tol * (|x| @ |W|^T)`` and has ``dtype``."""
    x64 = x.detach().double()
    ref = torch.nn.functional.linear(x64, weight64, None if bias is None else bias.double())
    bound = (tol or TOL[dtype]) * (x64.abs() @ weight64.abs().T + (0 if bias is None else bias.double().abs()))
    assert got.dtype == dtype and got.shape == ref.shape
    excess = (got.double() - ref).abs() - bound
    assert float(excess.max()) <= 0, f"off by up to {float((got.double() - ref).abs().max()):.3g}"


def _quantized(double_quant: bool):
    w = torch.randn(OUT_FEATURES, IN_FEATURES)
    packed, state = fourbit.quantize_4bit(w, "nf4", BLOCKSIZE, double_quant=double_quant)
    weight64 = fourbit.dequantize_4bit(packed, state, torch.float32).double()
    return packed, state, weight64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_gives_the_float32_values_in_every_output_dtype(backend, double_quant, dtype, use_backend):
    use_backend(backend)
    packed, state, weight64 = _quantized(double_quant)
    got = fourbit.dequantize_4bit(packed, state, dtype)
    # Exact tier: the float32 values rounded once to dtype (widened exactly for float64).
    assert got.dtype == dtype and torch.equal(got, weight64.float().to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1])
def test_kernel_matmul_every_dtype_and_batch(backend, double_quant, dtype, rows, use_backend, fused_calls):
    module = use_backend(backend)
    packed, state, weight64 = _quantized(double_quant)
    x = torch.randn(rows, IN_FEATURES).to(dtype)
    fused = dispatch.uses_fused_kernel(x, BLOCKSIZE, IN_FEATURES)
    assert fused == (rows <= SMALL_BATCH_ROWS and module.can_fuse(dtype, BLOCKSIZE, IN_FEATURES))
    got = dispatch.linear_4bit(x, packed, state.block_scales(), state.code, BLOCKSIZE, OUT_FEATURES, IN_FEATURES)
    assert fused_calls == ([backend] if fused else [])
    _assert_right(got, x, weight64, dtype)


def test_the_fast_backends_fuse_the_kernel_dtypes_and_not_float64():
    for module in [cpu] + ([_backend("triton")] if _HAS_TRITON else []):
        assert all(module.can_fuse(d, BLOCKSIZE, IN_FEATURES) for d in DTYPES[:3])
        assert not module.can_fuse(torch.float64, BLOCKSIZE, IN_FEATURES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 20])
def test_linear4bit_forward_without_grad(backend, double_quant, dtype, rows, use_backend, fused_calls):
    use_backend(backend)
    layer = Linear4bit.from_linear(nn.Linear(IN_FEATURES, OUT_FEATURES), blocksize=BLOCKSIZE,
                                   double_quant=double_quant, compute_dtype=torch.float32)
    weight64 = layer.dequantize(torch.float64)
    x = torch.randn(rows, IN_FEATURES).to(dtype)
    with torch.no_grad():
        got = layer(x)
    claims_fused = dispatch.uses_fused_kernel(x, BLOCKSIZE, IN_FEATURES)
    assert fused_calls == ([backend] if claims_fused else [])
    if claims_fused and dtype == torch.float64:
        tol = TOL[torch.float64]  # only the reference fuses float64, and computes it in float64
    else:
        tol = max(TOL[dtype], TOL[torch.float32])  # the fused kernel's float32 sums, or the fp32 compute dtype
    _assert_right(got, x, weight64, dtype, tol=tol, bias=layer.bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_and_backward_with_grad(backend, dtype, compute_dtype, use_backend, fused_calls):
    use_backend(backend)
    layer = Linear4bit.from_linear(nn.Linear(IN_FEATURES, OUT_FEATURES), blocksize=BLOCKSIZE,
                                   double_quant=True, compute_dtype=compute_dtype)
    weight64 = layer.dequantize(torch.float64)
    x = torch.randn(3, IN_FEATURES).to(dtype).requires_grad_(True)
    y = layer(x)
    assert fused_calls == []  # autograd needs the dequantize + matmul path
    tol = max(TOL[dtype], TOL[compute_dtype])
    _assert_right(y.detach(), x, weight64, dtype, tol=tol, bias=layer.bias)
    grad_out = torch.randn(3, OUT_FEATURES).to(dtype)
    y.backward(grad_out)
    assert x.grad.dtype == dtype
    ref = grad_out.double() @ weight64
    bound = tol * (grad_out.double().abs() @ weight64.abs())
    assert float(((x.grad.double() - ref).abs() - bound).max()) <= 0


@pytest.mark.parametrize("dtype", REFUSED)
def test_other_dtypes_are_refused_by_name(dtype):
    layer = Linear4bit.from_linear(nn.Linear(IN_FEATURES, OUT_FEATURES), blocksize=BLOCKSIZE)
    x = torch.zeros(2, IN_FEATURES).to(dtype)
    name = str(dtype)
    with pytest.raises(TypeError, match=name):
        layer(x)
    packed, state = layer.weight, layer.quant_state
    with pytest.raises(TypeError, match=name):
        dispatch.linear_4bit(x, packed, state.block_scales(), state.code, BLOCKSIZE, OUT_FEATURES, IN_FEATURES)
    with pytest.raises(TypeError, match=name):
        fourbit.dequantize_4bit(packed, state, dtype)
    with pytest.raises(TypeError, match=name):
        layer.to_float(dtype)
