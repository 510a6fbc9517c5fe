"""The Triton kernels give the reference's bytes (quantize, dequantize, nested scales) and its matmul results.

The kernels run under Triton's interpreter on CPU tensors, so these tests need no GPU. TRITON_INTERPRET
must be set before Triton is first imported (Triton reads it when ``@triton.jit`` decorates a kernel, and
the kernels module is imported on the first call), so it is set here, at collection time, for the whole
session: harmless for the other tests, because the dispatcher only picks Triton for CUDA tensors. Shapes
are tiny because the interpreter runs each kernel program in NumPy.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: F401,E402 - the dev extra (Linux): a missing Triton fails, never skips

import fourbit  # noqa: E402
from fourbit.kernels import dispatch, reference  # noqa: E402
from fourbit.kernels import triton_kernels as tk  # noqa: E402
from fourbit.kernels.scales import SMALL_BATCH_ROWS, BlockScales  # noqa: E402
from fourbit.quant import get_code  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (n, blocksize): a single element; an odd n with a partial last block; n < blocksize; blocksize 4096 with a
# 3-element last block; blocks of 32 over several kernel programs (2048 values each). Every input starts with
# a run of zeros: a whole zero block when blocksize is 64 or 32.
CASES = [(1, 64), (129, 64), (100, 256), (4099, 4096), (5001, 32)]


def _input(n: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    x = (torch.randn(n) * 3).to(dtype)
    x[: min(n, max(blocksize, 64))] = 0
    x[-min(n, 5) :] *= 1000 if dtype != torch.float16 else 10  # large values near the end
    return x


def test_available_follows_the_environment(monkeypatch):
    assert tk.available()  # TRITON_INTERPRET=1 and triton imports
    monkeypatch.setenv("FOURBIT_KERNELS", "reference")
    assert not tk.available()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_and_dequantize_are_bit_identical_to_reference(quant_type, dtype):
    code = get_code(quant_type)
    for n, blocksize in CASES:
        x = _input(n, blocksize, dtype)
        packed, absmax = tk.quantize_4bit_blocks(x, code, blocksize)
        ref_packed, ref_absmax = reference.quantize_4bit_blocks(x, code, blocksize)
        assert torch.equal(packed, ref_packed), (n, blocksize)
        assert torch.equal(absmax, ref_absmax), (n, blocksize)
        for out_dtype in (*DTYPES, torch.float64):
            got = tk.dequantize_4bit_blocks(packed, BlockScales(absmax), code, blocksize, n, out_dtype)
            expected = reference.dequantize_4bit_blocks(ref_packed, BlockScales(ref_absmax), code, blocksize, n,
                                                        out_dtype)
            assert got.dtype == out_dtype and torch.equal(got, expected), (n, blocksize, out_dtype)


def test_bf16_output_rounds_to_nearest_even():
    # Dyadic code values times these scales give float32 values exactly halfway between two bf16 numbers
    # (ties to even go both up and down) and values just above halfway. Triton's interpreter truncates in
    # .to(bfloat16); the kernel rounds by hand, as torch and the GPU do.
    code = torch.arange(16, dtype=torch.float32) / 8 - 1
    absmax = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, 3 + 2.0**-7 + 2.0**-12])
    packed = (torch.arange(96) * 37 % 256).to(torch.uint8)
    scales = BlockScales(absmax)
    got = tk.dequantize_4bit_blocks(packed, scales, code, 64, 192, torch.bfloat16)
    expected = reference.dequantize_4bit_blocks(packed, scales, code, 64, 192, torch.bfloat16)
    exact = reference.dequantize_4bit_blocks(packed, scales, code, 64, 192, torch.float32)
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert not torch.equal(expected.float(), truncated)  # the inputs tell rounding from truncation
    assert torch.equal(got, expected)


def test_non_finite_values_mark_their_block():
    x = torch.randn(300)
    x[100] = float("nan")
    x[200] = float("inf")
    packed, absmax = tk.quantize_4bit_blocks(x, get_code("nf4"), 64)
    assert torch.isnan(absmax[[1, 3]]).all()
    ref_packed, ref_absmax = reference.quantize_4bit_blocks(x, get_code("nf4"), 64)
    keep = [0, 2, 4]
    assert torch.equal(absmax[keep], ref_absmax[keep])
    assert torch.equal(packed[:32], ref_packed[:32]) and torch.equal(packed[64:96], ref_packed[64:96])


@pytest.mark.parametrize("shape, blocksize", [((77, 320), 64), ((33, 71), 128)])
def test_nested_scales_are_decoded_inside_the_kernel_identically(shape, blocksize):
    w = torch.randn(*shape)
    w[0, :64] = 0  # a zero block: its double-quantized absmax is code2[q] * absmax2 + offset, not 0
    packed, state = fourbit.quantize_4bit(w, "nf4", blocksize, double_quant=True)
    assert state.nested
    n = w.numel()
    scales = state.block_scales()
    for dtype in (*DTYPES, torch.float64):
        expected = reference.dequantize_4bit_blocks(packed, scales, state.code, blocksize, n, dtype)
        got = tk.dequantize_4bit_blocks(packed, scales, state.code, blocksize, n, dtype)
        assert torch.equal(got, expected), dtype


def _tolerance(x: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    # Both sides multiply the same x.dtype values exactly in float32 and sum in float32 in different orders:
    # each sum is within K * 2^-24 * sum|x_k w_k| of the exact one, so they differ by at most twice that.
    # Both then round to x.dtype, which can split on either side of a rounding boundary: one ulp, at most
    # 2^-7 (bf16) or 2^-10 (fp16) relative.
    k = x.shape[-1]
    bound = (x.double().abs() @ weight.double().abs().T).max().item()
    rtol = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[x.dtype]
    return rtol, 2 * k * 2.0**-24 * bound


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, blocksize, split_k",
                         [((40, 256), 64, 1), ((19, 75), 128, 1), ((24, 192), 64, 3)])
def test_fused_matmul_matches_reference(shape, blocksize, split_k, dtype, nested, monkeypatch):
    # (40, 256): K a multiple of the block size (one scale per row per tile). (19, 75): odd K, blocks that
    # span rows and bytes that hold the end of one row and the start of the next. (24, 192) in 3 K ranges:
    # float32 partial sums added on the host. The chooser (by SM count on a GPU, 1 under the interpreter) is
    # replaced so that the interpreter runs the split path too.
    monkeypatch.setattr(tk, "_split_k", lambda out_features, k_tiles, device: min(split_k, k_tiles))
    out_features, in_features = shape
    w = torch.randn(out_features, in_features)
    packed, state = fourbit.quantize_4bit(w, "nf4", blocksize, double_quant=nested)
    scales = state.block_scales()
    assert scales.nested == nested
    weight = reference.dequantize_4bit_blocks(packed, scales, state.code, blocksize, w.numel(), dtype)
    for rows in (1, 5, SMALL_BATCH_ROWS):
        x = torch.randn(rows, in_features).to(dtype)
        expected = reference.linear_4bit(x, packed, scales, state.code, blocksize, out_features, in_features)
        got = tk.fused_linear_4bit(x, packed, scales, state.code, blocksize, out_features, in_features)
        assert got.shape == expected.shape and got.dtype == dtype
        rtol, atol = _tolerance(x, weight.view(out_features, in_features))
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_larger_batches_dequantize_then_matmul_exactly(monkeypatch):
    # The dispatcher sends more than SMALL_BATCH_ROWS rows to the Triton dequantization + F.linear.
    monkeypatch.setattr(dispatch, "backend_for", lambda t: tk)
    w = torch.randn(24, 128)
    packed, state = fourbit.quantize_4bit(w, "fp4", 64, double_quant=True)
    scales = state.block_scales()
    x = torch.randn(2, SMALL_BATCH_ROWS, 128).to(torch.bfloat16)  # 2 x SMALL_BATCH_ROWS: above the fused limit
    assert not dispatch.uses_fused_kernel(x, 64, 128)
    expected = reference.linear_4bit(x, packed, scales, state.code, 64, 24, 128)
    got = dispatch.linear_4bit(x, packed, scales, state.code, 64, 24, 128)
    assert got.shape == (2, SMALL_BATCH_ROWS, 24) and torch.equal(got, expected)


def test_fused_matmul_keeps_leading_dimensions_and_rejects_what_it_cannot_compute():
    w = torch.randn(16, 64)
    packed, absmax = reference.quantize_4bit_blocks(w.reshape(-1), get_code("nf4"), 64)
    scales = BlockScales(absmax)
    x = torch.randn(1, 1, 64)
    got = tk.fused_linear_4bit(x, packed, scales, get_code("nf4"), 64, 16, 64)
    expected = reference.linear_4bit(x, packed, scales, get_code("nf4"), 64, 16, 64)
    assert got.shape == (1, 1, 16)
    weight = reference.dequantize_4bit_blocks(packed, scales, get_code("nf4"), 64, 16 * 64, torch.float32)
    rtol, atol = _tolerance(x, weight.view(16, 64))
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="in_features"):
        tk.fused_linear_4bit(torch.randn(1, 63), packed, scales, get_code("nf4"), 64, 16, 64)
    with pytest.raises(ValueError, match="rows"):
        tk.fused_linear_4bit(torch.randn(SMALL_BATCH_ROWS + 1, 64), packed, scales, get_code("nf4"), 64, 16, 64)
    assert not tk.can_fuse(torch.float64, 64, 64)
    with pytest.raises(TypeError, match="float64"):
        tk.fused_linear_4bit(x.double(), packed, scales, get_code("nf4"), 64, 16, 64)



def test_linear4bit_through_the_dispatcher_matches_the_reference_backend(monkeypatch):
    # The dispatcher's calls (argument order, nested scales) reach the Triton module as they will for CUDA
    # tensors: quantization, the decode path (no autograd, fused kernel) and the training path (dequantize +
    # matmul, backward dequantizes again).
    from fourbit.nn import Linear4bit

    linear = torch.nn.Linear(96, 40)
    monkeypatch.setenv("FOURBIT_KERNELS", "reference")
    ref = Linear4bit.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=torch.float32)
    monkeypatch.delenv("FOURBIT_KERNELS")
    monkeypatch.setattr(dispatch, "backend_for", lambda t: tk)
    tri = Linear4bit.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=torch.float32)
    assert torch.equal(tri.weight, ref.weight) and tri.quant_state.equals(ref.quant_state)
    x = torch.randn(3, 96)
    with torch.no_grad():
        got = tri(x)
    monkeypatch.setenv("FOURBIT_KERNELS", "reference")
    with torch.no_grad():
        expected = ref(x)
    xr = x.clone().requires_grad_(True)
    ref_out = ref(xr)
    ref_out.square().sum().backward()
    monkeypatch.delenv("FOURBIT_KERNELS")
    rtol, atol = _tolerance(x, ref.dequantize(torch.float32))
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    xt = x.clone().requires_grad_(True)
    out = tri(xt)
    out.square().sum().backward()
    assert torch.equal(out, ref_out) and torch.equal(xt.grad, xr.grad)


_COMPILE_SCRIPT = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fourbit.kernels import triton_jit as J
from fourbit.kernels.triton_kernels import _LAUNCH

SCALES = {"absmax_ptr": "*u8", "qabsmax_ptr": "*u8", "code2_ptr": "*fp32", "absmax2_ptr": "*fp32",
          "offset_ptr": "*fp32"}

def ptx(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options={**_LAUNCH, "num_warps": 4})
    return kernel.asm["ptx"]

deq = ptx(J.dequantize_kernel, {"packed_ptr": "*u8", **SCALES, "code_ptr": "*fp32", "out_ptr": "*i16",
                                "n": "i32", "log2_bs2": "i32"},
          {"NESTED": True, "OUT_KIND": 2, "HALF": 32, "ROWS": 32})
quant = ptx(J.quantize_kernel, {"x_ptr": "*i16", "bounds_ptr": "*fp32", "order_ptr": "*i32",
                                "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i32", "nblocks": "i32",
                                "full_blocks": "i32"},
            {"IN_KIND": 2, "HALF": 32, "ROWS": 32})
lin = {"packed_ptr": "*u8", **SCALES, "code_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
       "stride_xm": "i32", "log2_bs": "i32", "log2_bs2": "i32", "k_split": "i32"}
tiles = {"BLOCK_N": 16, "BLOCK_K": 64, "DOT_BF16": True, "NESTED": True}
ptx(J.linear_kernel, {"x_ptr": "*i16", **lin, "out_ptr": "*i16"},
    {**tiles, "X_KIND": 2, "OUT_KIND": 2, "M_PAD": 16, "ROW_SCALE": True})
ptx(J.linear_kernel, {"x_ptr": "*fp32", **lin, "out_ptr": "*fp32"},
    {**tiles, "X_KIND": 0, "OUT_KIND": 0, "M_PAD": 1, "ROW_SCALE": False})
assert not re.search(r"\bfma\.", deq), "nested absmax fused into an FMA"
assert re.search(r"div\.rn\.f32", quant), "no IEEE division"
assert not re.search(r"div\.(full|approx)|\.ftz", quant), "approximate division"
print("ok")
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_kernels_compile_for_h100_with_separate_rounding_and_ieee_division(tmp_path):
    # No GPU needed: Triton compiles to PTX (and runs its bundled ptxas) for sm_90 on any machine. Checks
    # what the interpreter cannot: the GPU build keeps ``code2[q] * absmax2 + offset`` as two roundings (no
    # FMA) and divides with IEEE round-to-nearest, as the reference does. A subprocess, because this session
    # runs Triton in interpreter mode.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_split_k_is_chosen_from_the_sm_count_on_a_gpu_and_is_one_elsewhere(monkeypatch):
    # ~8 programs per SM: 4096 outputs in tiles of 16 give 256 programs; 132 SMs want 5 K ranges, each of at
    # least 4 K tiles, at most 16 ranges. Under the interpreter (or off CUDA): one range.
    assert tk._split_k(4096, 128, torch.device("cpu")) == 1
    monkeypatch.setattr(tk, "_interpreting", lambda: False)
    monkeypatch.setattr(tk, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert tk._split_k(4096, 128, cuda) == 5
    assert tk._split_k(4096, 8, cuda) == 2  # 8 tiles: at least 4 per range
    assert tk._split_k(64, 1024, cuda) == 16  # 4 programs would want 264 ranges: at most 16
    assert tk._split_k(1 << 20, 128, cuda) == 1  # enough programs from the outputs alone
    assert tk._split_k(4096, 3, cuda) == 1
