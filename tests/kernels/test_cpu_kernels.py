"""The compiled CPU kernels give the same bytes as the PyTorch reference (the definition)."""

from pathlib import Path

import pytest
import torch

from fourbit.kernels import cpu, reference
from fourbit.kernels.scales import SMALL_BATCH_ROWS, BlockScales
from fourbit.quant import get_code

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler: the reference kernels are used")


def test_the_best_vector_path_of_this_cpu_is_chosen():
    import platform

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu.isa() in cpu.ISA_NAMES
    if platform.machine() == "x86_64" and " avx512bw " in flags and " avx512vl " in flags:
        assert cpu.isa() == 2
    elif platform.machine() == "x86_64" and " avx2 " in flags and " fma " in flags:
        assert cpu.isa() == 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_and_dequantize_are_bit_identical_to_reference(quant_type, dtype, isa):
    code = get_code(quant_type)
    for n in (1, 2, 3, 63, 65, 1001, 4096 * 2 + 17):
        for blocksize in (32, 64, 256, 4096):
            x = (torch.randn(n) * 2).to(dtype)
            x[: min(n, blocksize // 2)] = 0  # a zero run (and a zero block when blocksize is small)
            p_c, a_c = cpu.quantize_4bit_blocks(x, code, blocksize)
            p_r, a_r = reference.quantize_4bit_blocks(x, code, blocksize)
            assert torch.equal(p_c, p_r) and torch.equal(a_c, a_r)
            for out in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                got = cpu.dequantize_4bit_blocks(p_c, BlockScales(a_c), code, blocksize, n, out)
                assert got.dtype == out
                assert torch.equal(got, reference.dequantize_4bit_blocks(p_r, BlockScales(a_r), code, blocksize, n,
                                                                         out))


def test_dequantize_of_nested_scales_and_large_outputs_is_bit_identical_on_every_path(isa):
    # Nested scales decoded in the kernel; an output over 8 MiB (advised to huge pages, several threads);
    # odd n and blocksizes 32 (a block shorter than one AVX-512 step) and 4096 leave partial vectors and blocks.
    import fourbit

    for n, blocksize, out in ((2_200_001, 64, torch.float32), (10_001, 32, torch.bfloat16),
                              (20_003, 4096, torch.float16), (40_000, 256, torch.bfloat16)):
        x = torch.randn(n)
        packed, state = fourbit.quantize_4bit(x, "nf4", blocksize, double_quant=True)
        scales = state.block_scales()
        got = cpu.dequantize_4bit_blocks(packed, scales, state.code, blocksize, n, out)
        assert torch.equal(got, reference.dequantize_4bit_blocks(packed, scales, state.code, blocksize, n, out))


def test_subnormal_and_huge_products_round_like_the_reference(isa):
    # bf16/fp16 rounding of subnormal float32 products (vcvtneps2bf16 would flush them) and of values near
    # the float32 maximum, on every path.
    code = get_code("nf4")
    absmax = torch.tensor([1e-39, 3e-38, 1.0, 3.0e38], dtype=torch.float32)
    packed = (torch.arange(128) * 73 % 256).to(torch.uint8)
    for out in (torch.float32, torch.float16, torch.bfloat16):
        got = cpu.dequantize_4bit_blocks(packed, BlockScales(absmax), code, 64, 256, out)
        assert torch.equal(got, reference.dequantize_4bit_blocks(packed, BlockScales(absmax), code, 64, 256, out))


def test_non_finite_values_mark_their_block():
    x = torch.randn(256)
    x[100] = float("nan")
    _, absmax = cpu.quantize_4bit_blocks(x, get_code("nf4"), 64)
    assert torch.isnan(absmax[1]) and torch.isfinite(absmax[[0, 2, 3]]).all()


@pytest.mark.parametrize("rows", [1, 2, 5, SMALL_BATCH_ROWS, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_gemv_matches_dequantize_then_matmul(rows, dtype):
    # The fused kernel sums in float32 in another order than BLAS: for K=384 random inputs the float32
    # difference is ~1e-5 relative; in bf16/fp16 the output rounding (2^-8 / 2^-11) dominates. More than 8
    # rows (the dispatcher sends none, the kernel takes any): each weight row is decoded once per 8 rows.
    code = get_code("nf4")
    w = torch.randn(96, 384)
    packed, absmax = reference.quantize_4bit_blocks(w.reshape(-1), code, 64)
    x = torch.randn(rows, 384).to(dtype)
    assert cpu.can_fuse(dtype, 64, 384)
    got = cpu.fused_linear_4bit(x, packed, BlockScales(absmax), code, 64, 96, 384)
    expected = reference.linear_4bit(x.float(), packed, BlockScales(absmax), code, 64, 96, 384)
    assert got.dtype == dtype and got.shape == (rows, 96)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_fused_gemv_on_every_path(isa):
    code = get_code("fp4")
    w = torch.randn(40, 256)
    import fourbit

    _, state = fourbit.quantize_4bit(w, "fp4", 64, double_quant=True)
    packed, absmax = reference.quantize_4bit_blocks(w.reshape(-1), code, 64)
    for scales in (BlockScales(absmax), state.block_scales()):
        x = torch.randn(11, 256)
        got = cpu.fused_linear_4bit(x, packed, scales, code, 64, 40, 256)
        expected = reference.linear_4bit(x, packed, scales, code, 64, 40, 256)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fused_gemv_refuses_what_it_cannot_compute():
    code = get_code("nf4")
    packed, absmax = reference.quantize_4bit_blocks(torch.randn(8 * 96), code, 64)
    assert not cpu.can_fuse(torch.float64, 64, 96) and not cpu.can_fuse(torch.float32, 64, 96)
    with pytest.raises(TypeError, match="float64"):
        cpu.fused_linear_4bit(torch.randn(1, 96, dtype=torch.float64), packed, BlockScales(absmax), code, 64, 8, 96)
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        cpu.fused_linear_4bit(torch.randn(1, 96), packed, BlockScales(absmax), code, 64, 8, 96)


def test_nested_scales_are_dequantized_inside_the_kernel_identically():
    import fourbit
    from fourbit.kernels.scales import dequantize_absmax

    w = torch.randn(77, 320)
    packed, state = fourbit.quantize_4bit(w, "nf4", 64, double_quant=True)
    scales = state.block_scales()
    assert scales.nested
    expected = reference.dequantize_4bit_blocks(packed, BlockScales(dequantize_absmax(scales)), state.code, 64,
                                                w.numel(), torch.float32)
    assert torch.equal(cpu.dequantize_4bit_blocks(packed, scales, state.code, 64, w.numel(), torch.float32),
                       expected)
    x = torch.randn(2, 320)
    torch.testing.assert_close(cpu.fused_linear_4bit(x, packed, scales, state.code, 64, 77, 320),
                               x @ expected.view(77, 320).T, rtol=1e-4, atol=1e-4)
