"""The decoding step's int8 4-bit rows (``row4_vnni`` in csrc/decode.c) against two independent references.

The int8 rows quantize the layer input x to int8 per group of 64 (d = max|x| / 127, q = round(x / d)) and each
4-bit weight's codebook level to w~ = round(127 * level); a row is sum over groups of s_block * (d_group / 127)
* sum(w~ q), in float32. References, in float64:

- the int8 arithmetic written out here (``_int8_emulation``): the integer sums are exact, so the kernel may
  differ only by its float32 sums of ~(cols / 64) scaled terms: rtol 1e-5 of the sum of their magnitudes;
- the dequantized float matvec W x (what the float rows compute): the int8 rows differ by at most, per block of
  scale s, |s| sum_j (|x_j| |level_j - w~_j / 127| + |w~_j| / 127 * d / 2) (weight and input rounding; the
  bound decode.c states), plus the same float32 slack.

Shapes: blocksizes 64 to 4096, an odd number of groups of 64 per row (the lone last group), rows longer than
one run of 256 groups, a zero group (d = 0), plain and double-quantized scales. Layers the int8 rows do not
take (blocksize 32, rows that are not whole blocks) must keep the float rows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fourbit
from fourbit.kernels import cpu
from fourbit.kernels.scales import dequantize_absmax

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler: the reference kernels are used")

_FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
_VNNI = " avx512_vnni " in _FLAGS and " avx512bw " in _FLAGS and " avx512vl " in _FLAGS
needs_vnni = pytest.mark.skipif(not _VNNI, reason="this CPU has no AVX512_VNNI: the int8 rows are not built for it")


@pytest.fixture
def int8_rows():
    """The AVX-512 code and the int8 rows for every layer (FOURBIT_DECODE_ROWS=int8); both restored afterwards."""
    best = cpu.set_isa(2)
    before = cpu.set_decode_rows(None)
    assert cpu.set_decode_rows("int8") == ("int8" if _VNNI and best == 2 else "float")
    yield
    cpu.set_decode_rows(before)
    cpu.set_isa(best)


def _layer(rows: int, cols: int, blocksize: int, nested: bool, quant_type: str = "nf4", seed: int = 0):
    """A random 4-bit weight [rows, cols]: (its DecodeLinear, the tensors it points to, the codebook, state)."""
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * torch.rand(rows, 1)
    packed, state = fourbit.quantize_4bit(w.reshape(-1), quant_type, blocksize, double_quant=nested)
    code = state.code.to(torch.float32).contiguous()
    c_scales, keep = cpu._scales(state.block_scales())
    packed = packed.reshape(-1).contiguous()
    linear = cpu.DecodeLinear(packed.data_ptr(), c_scales, code.data_ptr(), blocksize, None, 0, None, rows, cols)
    return linear, [packed, code, *keep], code, (packed, state)


def _input(cols: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(cols) * torch.linspace(0.1, 3.0, cols)  # groups of different ranges
    x[64:128] = 0.0 if cols >= 128 else x[64:128]          # a zero group: d = 0
    return x


def _levels_and_scales(rows: int, cols: int, blocksize: int, packed_state) -> tuple[np.ndarray, np.ndarray]:
    """Each weight's codebook index [rows, cols] (high nibble first) and each block's scale [rows, cols / bs]."""
    packed, state = packed_state
    b = packed.numpy()
    idx = np.empty(b.size * 2, dtype=np.int64)
    idx[0::2], idx[1::2] = b >> 4, b & 0x0F
    scales = dequantize_absmax(state.block_scales()).numpy().astype(np.float64)
    return idx[: rows * cols].reshape(rows, cols), scales.reshape(rows, cols // blocksize)


def _quantize_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x~ [cols] and d [cols / 64] as quantize_x computes them in float32 (round half to even)."""
    g = x.astype(np.float32).reshape(-1, 64)
    d = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    return np.rint(g * inv[:, None]).reshape(-1), d.astype(np.float64)


def _references(x: torch.Tensor, idx: np.ndarray, scales: np.ndarray, code: torch.Tensor, blocksize: int):
    """(int8 emulation, its float32 slack, dequantized float64 matvec, the int8 rounding bound) per row."""
    rows, cols = idx.shape
    level = code.numpy().astype(np.float64)[idx]
    wq = np.rint(code.numpy() * np.float32(127)).astype(np.float64)[idx]
    s = np.repeat(scales, blocksize, axis=1)                      # each weight's block scale
    xq, d = _quantize_x(x.numpy())
    xd = x.numpy().astype(np.float64)
    exact = (level * s) @ xd
    sums = (wq * xq).reshape(rows, cols // 64, 64).sum(axis=2)    # exact integer sums per group
    terms = sums * (s[:, ::64] * (d.astype(np.float32) / np.float32(127)))
    emulated, slack = terms.sum(axis=1), 1e-5 * np.abs(terms).sum(axis=1) + 1e-30
    dg = np.repeat(d, 64)
    bound = (np.abs(s) * (np.abs(xd) * np.abs(level - wq / 127) + np.abs(wq) / 127 * dg / 2)).sum(axis=1)
    return emulated, slack, exact, bound + slack + 1e-6 * (np.abs(level * s) @ np.abs(xd))


@needs_vnni
@pytest.mark.parametrize("rows, cols, blocksize", [(37, 576, 64), (5, 1536, 128), (8, 64, 64), (6, 192, 64),
                                                   (4, 768, 256), (3, 8192, 4096), (2, 64 * 301, 64),
                                                   (3, 64 * 600, 128)])
@pytest.mark.parametrize("nested", [True, False])
def test_int8_rows_match_the_int8_arithmetic_and_stay_within_the_rounding_bound(rows, cols, blocksize, nested,
                                                                               int8_rows):
    linear, keep, code, ps = _layer(rows, cols, blocksize, nested)
    x = _input(cols)
    got, path = cpu.decode_rows(linear, code, x)
    assert path == 2  # the int8 rows took this layer
    emulated, slack, exact, bound = _references(x, *_levels_and_scales(rows, cols, blocksize, ps), code, blocksize)
    got = got.numpy().astype(np.float64)
    assert np.all(np.abs(got - emulated) <= slack), np.abs(got - emulated) / slack
    assert np.all(np.abs(got - exact) <= bound), (np.abs(got - exact) / bound).max()


@needs_vnni
@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_other_codebooks_take_the_int8_rows_too(quant_type, int8_rows):
    linear, keep, code, ps = _layer(9, 320, 64, True, quant_type)
    x = _input(320)
    got, path = cpu.decode_rows(linear, code, x)
    assert path == 2
    emulated, slack, exact, bound = _references(x, *_levels_and_scales(9, 320, 64, ps), code, 64)
    assert np.all(np.abs(got.numpy() - emulated) <= slack)
    assert np.all(np.abs(got.numpy() - exact) <= bound)


@pytest.mark.parametrize("rows, cols, blocksize, path", [(7, 96, 32, 1), (5, 320, 32, 1), (4, 96, 64, 0)])
def test_layers_the_int8_rows_do_not_take_keep_the_float_rows(rows, cols, blocksize, path, int8_rows):
    linear, keep, code, ps = _layer(rows, cols, blocksize, True)
    x = _input(cols)
    got, taken = cpu.decode_rows(linear, code, x)
    assert taken == path
    exact = fourbit.dequantize_4bit(*ps).reshape(rows, cols).double() @ x.double()
    torch.testing.assert_close(got.double(), exact, atol=1e-5 * float(exact.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("rows, cols, blocksize", [(37, 576, 64), (3, 8192, 4096)])
def test_float_rows_on_request_are_float32_exact(rows, cols, blocksize, int8_rows):
    """``set_decode_rows("float")`` (or ``FOURBIT_DECODE_ROWS=float``) gives the float rows back."""
    assert cpu.set_decode_rows("float") == "float"
    linear, keep, code, ps = _layer(rows, cols, blocksize, True)
    x = _input(cols)
    got, path = cpu.decode_rows(linear, code, x)
    assert path == 1
    exact = fourbit.dequantize_4bit(*ps).reshape(rows, cols).double() @ x.double()
    torch.testing.assert_close(got.double(), exact, atol=1e-5 * float(exact.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("cols, int8", [(1984, False), (2048, True), (4096, True)])
def test_auto_takes_the_int8_rows_for_long_rows_only(cols, int8, int8_rows):
    """``"auto"`` (the default): the int8 rows for layers of at least 2,048 columns, the float rows below."""
    assert cpu.set_decode_rows("auto") == ("auto" if _VNNI else "float")
    linear, keep, code, ps = _layer(5, cols, 64, True)
    _, path = cpu.decode_rows(linear, code, _input(cols))
    assert path == (2 if int8 and _VNNI else 1)


@needs_vnni
def test_python_knows_where_auto_starts(int8_rows):
    """``cpu.INT8_AUTO_COLS`` (what benchmarks read) is the C library's ``FB_INT8_AUTO_COLS``."""
    assert cpu.set_decode_rows("auto") == "auto"
    for cols, want in ((cpu.INT8_AUTO_COLS - 64, 1), (cpu.INT8_AUTO_COLS, 2)):
        linear, keep, code, _ = _layer(3, cols, 64, True)
        assert cpu.decode_rows(linear, code, _input(cols))[1] == want


def test_unknown_decode_rows_mode_is_refused():
    with pytest.raises(ValueError, match="'fast'"):
        cpu.set_decode_rows("fast")


@pytest.mark.parametrize("setting, want", [("", "auto"), ("float", "float"), ("int8", "int8"), ("INT8", "int8"),
                                           ("auto", "auto"), ("fast", "auto")])
def test_decode_rows_environment_variable(setting, want):
    """``FOURBIT_DECODE_ROWS``: auto by default, float or int8 on request (int8 and auto where the CPU has
    AVX512_VNNI, else float); an unknown value is ignored with a warning."""
    import os

    code = "from fourbit.kernels import cpu; print(cpu.set_decode_rows(None))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FOURBIT_DECODE_ROWS": setting},
                          capture_output=True, text=True, timeout=600, check=True)
    assert done.stdout.split()[-1] == (want if _VNNI else "float")
    assert ("FOURBIT_DECODE_ROWS" in done.stderr) == (setting == "fast")
