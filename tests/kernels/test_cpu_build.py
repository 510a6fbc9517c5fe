"""Building and loading the compiled CPU kernels: the ABI check, stale caches, and the checks the C side makes.

A cached library is called only after its ``fb_abi_version()`` equals ``cpu.ABI_VERSION``: a stale file (one
that does not load, has no version, or reports another) is rebuilt in place; a fresh build that still
disagrees is refused, and the dispatcher falls back to the reference. The C kernels refuse block sizes they
cannot compute with a status that cpu.py turns into a ValueError, before touching any memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fourbit.kernels import cpu, reference
from fourbit.kernels.scales import BlockScales
from fourbit.quant import get_code

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the reference kernels are used")


def _fake_library(path: Path, body: str) -> None:
    """A small shared library standing in for a stale build."""
    src = path.with_suffix(".c")
    src.write_text(body)
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(path)], check=True, capture_output=True)
    src.unlink()


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory) -> Path:
    """One real build of the current sources (by cpu._compile), copied by the tests that rebuild."""
    out = tmp_path_factory.mktemp("build") / "fourbit_cpu.so"
    cpu._compile(out)
    return out


@pytest.fixture
def private_cache(tmp_path, monkeypatch, fresh_build):
    """An empty FOURBIT_CACHE, a library loaded afresh from it, and a count of compilations (each one a copy
    of the module's real build). The library of the real cache is loaded again afterwards."""
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path))
    monkeypatch.delenv("FOURBIT_KERNELS", raising=False)
    compiled: list[Path] = []

    def compile_copy(out: Path) -> None:
        compiled.append(out)
        shutil.copyfile(fresh_build, out)

    monkeypatch.setattr(cpu, "_compile", compile_copy)
    cpu._library.cache_clear()
    yield compiled
    cpu._library.cache_clear()


def _abi_version_on_disk(path: Path) -> int:
    """The version the file at ``path`` reports, asked in a new process (this one may hold an older file
    loaded under that name)."""
    code = f"import ctypes; print(ctypes.CDLL({str(path)!r}).fb_abi_version())"
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def test_the_real_build_reports_the_abi_version_cpu_py_expects(fresh_build: Path) -> None:
    assert _abi_version_on_disk(fresh_build) == cpu.ABI_VERSION
    header = (Path(cpu.__file__).parent / "csrc" / "fourbit_cpu.h").read_text()
    assert f"#define FB_ABI_VERSION {cpu.ABI_VERSION}\n" in header
    assert f"#define FB_MAX_QUANT_BLOCKSIZE {cpu.MAX_QUANT_BLOCKSIZE}\n" in header


def test_an_empty_cache_is_built_once_then_loaded(private_cache: list) -> None:
    assert cpu.available() and len(private_cache) == 1
    path = cpu.library_path()
    assert path.exists() and _abi_version_on_disk(path) == cpu.ABI_VERSION
    cpu._library.cache_clear()
    assert cpu.available() and len(private_cache) == 1  # the cached file passed the check: no rebuild


@pytest.mark.parametrize("stale", ["not a library", "no version", "older version"])
def test_a_stale_cached_build_is_rebuilt_not_called(stale: str, private_cache: list, caplog) -> None:
    path = cpu.library_path()
    path.parent.mkdir(parents=True)
    if stale == "not a library":
        path.write_bytes(b"\x7fELF truncated")
    else:
        # a library of the old signature: fb_quantize_4bit returned void; calling it would be wrong
        version = "" if stale == "no version" else f"int fb_abi_version(void) {{ return {cpu.ABI_VERSION - 1}; }}"
        _fake_library(path, f"{version}\nvoid fb_quantize_4bit(void) {{}}\n")
    with caplog.at_level(logging.WARNING, logger="fourbit.kernels.cpu"):
        assert cpu.available()
    assert len(private_cache) == 1 and "stale" in caplog.text
    assert _abi_version_on_disk(path) == cpu.ABI_VERSION
    # the rebuilt library computes
    x = torch.randn(1000)
    got = cpu.quantize_4bit_blocks(x, get_code("nf4"), 64)
    want = reference.quantize_4bit_blocks(x, get_code("nf4"), 64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_build_whose_version_disagrees_with_cpu_py_is_refused(private_cache: list, monkeypatch, caplog) -> None:
    # cpu.py expecting another version than the sources declare: rebuilding cannot help, so nothing loads
    monkeypatch.setattr(cpu, "ABI_VERSION", cpu.ABI_VERSION + 1)
    with caplog.at_level(logging.WARNING, logger="fourbit.kernels.cpu"):
        assert not cpu.available()
    assert len(private_cache) == 1
    assert f"expects {cpu.ABI_VERSION}" in caplog.text and "disagree" in caplog.text
    assert not cpu.library_path().exists()  # the refused build is not cached
    assert list(cpu.library_path().parent.iterdir()) == []


def test_the_cache_key_covers_every_source_and_the_abi_version(monkeypatch) -> None:
    before = cpu.library_path()
    monkeypatch.setattr(cpu, "ABI_VERSION", cpu.ABI_VERSION + 1)
    assert cpu.library_path() != before
    monkeypatch.undo()
    assert set(cpu._SOURCES) | set(cpu._HEADERS) == {p.name for p in (Path(cpu.__file__).parent / "csrc").iterdir()}


# ------------------------------------------------------------------------------------ checks on the C side


def _quantize_status(blocksize: int) -> int:
    """Call the C quantizer directly (no Python check in front) on 8 values."""
    x = torch.randn(8)
    bounds, order = cpu._bounds_and_order(get_code("nf4").numpy().tobytes())
    packed, absmax = torch.zeros(4, dtype=torch.uint8), torch.zeros(8, dtype=torch.float32)
    return cpu._library().fb_quantize_4bit(x.data_ptr(), 0, 8, blocksize, bounds.data_ptr(), order.data_ptr(),
                                           packed.data_ptr(), absmax.data_ptr(), 1)


@pytest.mark.skipif(not cpu.available(), reason="no C compiler: the reference kernels are used")
def test_the_c_quantizer_checks_the_block_size_itself() -> None:
    assert _quantize_status(cpu.MAX_QUANT_BLOCKSIZE) == 0 and _quantize_status(2) == 0
    for bad in (cpu.MAX_QUANT_BLOCKSIZE + 2, 1 << 20, 33, 0, -64):
        assert _quantize_status(bad) == 2, bad  # FB_ERR_BLOCKSIZE, before any block buffer is filled


@pytest.mark.skipif(not cpu.available(), reason="no C compiler: the reference kernels are used")
def test_a_block_size_the_c_side_refuses_is_a_value_error(monkeypatch) -> None:
    # Past the Python check (lifted here), the C check still holds, and says so as a ValueError.
    monkeypatch.setattr(cpu, "MAX_QUANT_BLOCKSIZE", 1 << 20)
    with pytest.raises(ValueError, match=r"fb_quantize_4bit: .* refused blocksize=8192"):
        cpu.quantize_4bit_blocks(torch.randn(10_000), get_code("nf4"), 8192)
    packed = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"fb_dequantize_4bit: .* refused blocksize=0"):
        cpu.dequantize_4bit_blocks(packed, BlockScales(torch.ones(1)), get_code("nf4"), 0, 16, torch.float32)
    # nested scales with blocksize2 0 (BlockScales refuses them; the C side does too, not dividing by zero)
    q, code2, absmax2, out = torch.zeros(1, dtype=torch.uint8), torch.ones(256), torch.ones(1), torch.empty(16)
    nested = cpu._Scales(None, q.data_ptr(), code2.data_ptr(), absmax2.data_ptr(), 0, 0.0)
    with pytest.raises(ValueError, match="refused blocksize=16"):
        cpu._call("fb_dequantize_4bit", packed.data_ptr(), ctypes.byref(nested), get_code("nf4").data_ptr(), 16, 16,
                  out.data_ptr(), 0, 1, blocksize=16)


@pytest.mark.skipif(not cpu.available(), reason="no C compiler: the reference kernels are used")
def test_a_dtype_the_c_side_refuses_is_a_type_error() -> None:
    x = torch.randn(4, 8, dtype=torch.float16)  # the training rows take float32 and bf16 only
    status = cpu._library().fb_swiglu(x.data_ptr(), x.data_ptr(), None, x.data_ptr(), None, 1, x.numel(), 1)
    assert status == 1  # FB_ERR_DTYPE
    with pytest.raises(TypeError, match="fb_rmsnorm: the compiled kernel refused the dtype"):
        cpu._call("fb_rmsnorm", x.data_ptr(), x.data_ptr(), None, x.data_ptr(), x.data_ptr(), 1, 4, 8, 1e-6, 1)


@pytest.mark.skipif(not cpu.available(), reason="no C compiler: the reference kernels are used")
@pytest.mark.parametrize("blocksize", [6, 34, 66])
def test_odd_and_even_non_power_of_two_block_sizes_give_the_reference_bytes(blocksize: int, isa: int) -> None:
    # An odd block size starts blocks mid-byte, which the C code cannot pack or read in place: the reference
    # runs (bytes the compiled kernels once got wrong). Even sizes that are no power of two run in C.
    code = get_code("nf4")
    for bs in (blocksize, blocksize - 1):
        x = torch.randn(1001)
        p_c, a_c = cpu.quantize_4bit_blocks(x, code, bs)
        p_r, a_r = reference.quantize_4bit_blocks(x, code, bs)
        assert torch.equal(p_c, p_r) and torch.equal(a_c, a_r), bs
        got = cpu.dequantize_4bit_blocks(p_r, BlockScales(a_r), code, bs, 1001, torch.float32)
        assert torch.equal(got, reference.dequantize_4bit_blocks(p_r, BlockScales(a_r), code, bs, 1001,
                                                                 torch.float32)), bs


def test_nothing_but_the_version_is_called_on_a_library_that_fails_the_check(tmp_path) -> None:
    path = tmp_path / "stale.so"
    _fake_library(path, "int fb_abi_version(void) { return -7; }\n")
    lib, version = cpu._open_checked(path)
    assert lib is None and version == -7
    assert cpu._open_checked(tmp_path / "missing.so") == (None, None)
    assert ctypes.CDLL(str(path)).fb_abi_version() == -7  # the fake itself loads fine


@pytest.mark.multiprocess
@pytest.mark.parametrize(("setting", "expected"), [("scalar", 0), ("avx2", 1), ("bogus", None)])
def test_max_cpu_isa_holds_the_kernels_down(setting: str, expected: int | None) -> None:
    """``FOURBIT_MAX_CPU_ISA`` caps the vector code (never above what the CPU has); an unknown name is ignored."""
    import subprocess
    import sys

    from fourbit.kernels import cpu

    best = cpu.isa()
    code = "from fourbit.kernels import cpu; print(cpu.isa())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FOURBIT_MAX_CPU_ISA": setting},
                          capture_output=True, text=True, check=True)
    assert int(done.stdout.strip()) == (best if expected is None else min(expected, best))
    if expected is None:
        assert "FOURBIT_MAX_CPU_ISA" in done.stderr
