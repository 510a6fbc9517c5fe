"""Compiled CPU kernels (``csrc/``), built on first use into one shared library and called through ctypes.

The sources (``csrc/fourbit_cpu.h``, the shared header; ``csrc/quant4.c``, 4-bit quantization,
dequantization and the fused matmul; ``csrc/train_rows.c``, the softmax cross-entropy, SwiGLU and RMSNorm row
kernels; ``csrc/decode.c``, a Llama-family decoding step; ``csrc/fourbit_cpu.c``, the ABI version and
vector-code choice) are compiled together with the system
C compiler (``$CC``, default ``cc``) into ``$FOURBIT_CACHE/kernels`` (default ``~/.cache/fourbit``), under a
name keyed by the hash of every source, the flags, the machine type and :data:`ABI_VERSION`.

Before any kernel is called, the library's ``fb_abi_version()`` must equal :data:`ABI_VERSION`: a cached file
that reports another version, none, or does not load is rebuilt, and a fresh build that still disagrees is
refused, so no kernel is ever called with a signature it was not built for.

On x86-64 one build serves every CPU: the C code holds AVX-512, AVX2 and plain C versions of each kernel's
inner loop and picks one at run time (:func:`isa`; :func:`set_isa` lowers it, for tests and benchmarks). If
no compiler is found or the build fails, :func:`available` returns False and the dispatcher falls back to
the PyTorch reference, with one warning. Nothing happens at import time.

Each kernel here has the contract of its namesake in :mod:`fourbit.kernels.reference`; inputs a compiled
kernel does not take (float16 training rows, non-contiguous tensors, odd or over-4096 quantization blocks)
run that reference function, as each docstring says.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from fourbit.kernels import reference
from fourbit.kernels.scales import BlockScales, check_output_dtype

__all__ = ["ABI_VERSION", "ISA_NAMES", "MAX_QUANT_BLOCKSIZE", "available", "isa", "set_isa", "library_path",
           "quantize_4bit_blocks", "dequantize_4bit_blocks", "can_fuse", "fused_linear_4bit",
           "softmax_cross_entropy_", "swiglu", "swiglu_backward", "rms_norm", "rms_norm_backward", "dropout",
           "DecodeLinear", "DecodeLayer", "DecodeModel", "decode_work_floats", "decode_step", "set_decode_rows",
           "decode_rows", "GGML_BLOCKS",
           "quantize_ggml"]

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
#: Compiled into the one library; the header is part of the cache key too.
_SOURCES = ("fourbit_cpu.c", "quant4.c", "train_rows.c", "decode.c", "ggml_quants.c")
_HEADERS = ("fourbit_cpu.h",)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_X86 = ("x86_64", "amd64")

#: The library interface this module calls (signatures, ``fb_scales``, status codes): must equal
#: ``FB_ABI_VERSION`` in ``csrc/fourbit_cpu.h``; bump both together.
ABI_VERSION = 7

#: :func:`set_decode_rows`'s modes (``FOURBIT_DECODE_ROWS``) -> ``FB_ROWS_*`` of ``csrc/fourbit_cpu.h``.
DECODE_ROWS = {"float": 0, "int8": 1, "auto": 2}
#: ``"auto"`` takes the int8 rows for layers of at least this many columns (``FB_INT8_AUTO_COLS``).
INT8_AUTO_COLS = 2048

#: The largest block the compiled quantizer takes (``FB_MAX_QUANT_BLOCKSIZE``); larger ones run the reference.
MAX_QUANT_BLOCKSIZE = 4096

#: Status codes of the compiled kernels (``FB_OK``, ``FB_ERR_DTYPE``, ``FB_ERR_BLOCKSIZE``).
_OK, _ERR_DTYPE, _ERR_BLOCKSIZE = 0, 1, 2

#: Vector code paths of the compiled kernels (``isa()``): chosen at run time on x86-64.
ISA_NAMES = {0: "plain C", 1: "AVX2", 2: "AVX-512"}


def _flags() -> list[str]:
    """Compiler flags. On x86-64 one build serves every CPU (the C code picks AVX-512, AVX2 or plain C at run
    time); elsewhere the build targets the host."""
    base = ["-O3", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared", "-std=gnu11"]
    return base if platform.machine().lower() in _X86 else [*base, "-march=native"]


def _cpu_signature() -> str:
    """What the build depends on besides source and flags: the architecture, and on non-x86 hosts (built
    with -march=native) the CPU's flags."""
    machine = platform.machine()
    if machine.lower() in _X86:
        return machine
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return machine + flags


def library_path() -> Path:
    """Where the compiled library for these sources, flags, machine and ABI version lives (it may not be
    built yet)."""
    digest = hashlib.sha256()
    for name in (*_HEADERS, *_SOURCES):
        digest.update(name.encode() + b"\0" + (_CSRC / name).read_bytes() + b"\0")
    digest.update(" ".join(_flags()).encode() + _cpu_signature().encode() + f"abi{ABI_VERSION}".encode())
    cache = Path(os.environ.get("FOURBIT_CACHE", Path.home() / ".cache" / "fourbit"))
    return cache / "kernels" / f"fourbit_cpu-{digest.hexdigest()[:16]}.so"


def _compile(out: Path) -> None:
    """Compile every source into the shared library ``out``.

    Raises:
        RuntimeError: no compiler, or the compiler failed (its last output quoted).
    """
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    sources = [str(_CSRC / name) for name in _SOURCES]
    try:
        subprocess.run([compiler, *_flags(), *sources, "-o", str(out), "-lm"], check=True, capture_output=True,
                       text=True, timeout=300)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"compiling {', '.join(_SOURCES)} failed:\n{err.stderr[-2000:]}") from None


def _open_checked(path: Path) -> tuple[ctypes.CDLL | None, int | None]:
    """Load ``path`` and ask its ABI version: (the library, version) when it is :data:`ABI_VERSION`, else
    (None, the version it reports, or None when it reports none or does not load). Only ``fb_abi_version``
    is ever called on a library that fails the check."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None, None
    if not hasattr(lib, "fb_abi_version"):
        return None, None
    lib.fb_abi_version.argtypes = []
    lib.fb_abi_version.restype = ctypes.c_int
    version = int(lib.fb_abi_version())
    return (lib if version == ABI_VERSION else None), version


def _build(target: Path) -> ctypes.CDLL:
    """Compile into a fresh file beside ``target``, load and check it there, then move it into place.

    The fresh file is loaded under its own name: a stale library already loaded from ``target`` would be
    returned again by the dynamic loader, whatever the file now holds.

    Raises:
        RuntimeError: the build failed, or the fresh build reports another ABI version than this module's
            (the sources and cpu.py disagree: a rebuild cannot help).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        _compile(Path(tmp))
        lib, version = _open_checked(Path(tmp))
        if lib is None:
            raise RuntimeError(f"the freshly built kernels report ABI version {version}, but {__name__} "
                               f"expects {ABI_VERSION}: csrc/fourbit_cpu.h and cpu.py disagree")
        os.replace(tmp, target)
        return lib
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_or_build(path: Path) -> ctypes.CDLL:
    """The cached library at ``path`` if it passes the ABI check, else a fresh build put in its place."""
    if path.exists():
        lib, version = _open_checked(path)
        if lib is not None:
            return lib
        log.warning("fourbit: the cached CPU kernels %s are stale (ABI version %s, expected %s); rebuilding",
                    path, version, ABI_VERSION)
    return _build(path)


class _Scales(ctypes.Structure):
    """Mirror of ``fb_scales`` in the C source: plain absmax, or the double-quantized form."""

    _fields_ = [("absmax", ctypes.c_void_p), ("qabsmax", ctypes.c_void_p), ("code2", ctypes.c_void_p),
                ("absmax2", ctypes.c_void_p), ("blocksize2", ctypes.c_int64), ("offset", ctypes.c_float)]


class DecodeLinear(ctypes.Structure):
    """Mirror of ``fb_dlinear``: one 4-bit (``packed`` set) or dense linear layer of a decoder."""

    _fields_ = [("packed", ctypes.c_void_p), ("scales", _Scales), ("code", ctypes.c_void_p),
                ("blocksize", ctypes.c_int64), ("dense", ctypes.c_void_p), ("dense_dtype", ctypes.c_int64),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64)]


class DecodeLayer(ctypes.Structure):
    """Mirror of ``fb_dlayer``: one transformer block's norms, linear layers and KV cache."""

    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), *((n, DecodeLinear) for n in ("q", "k", "v", "o", "gate", "up", "down")),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class DecodeModel(ctypes.Structure):
    """Mirror of ``fb_dmodel``: the shapes and weights of a Llama-family decoder for ``fb_decode_step``."""

    _fields_ = [*((n, ctypes.c_int64) for n in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim",
                                                "intermediate", "vocab", "max_len", "embed_rows")),
                ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("embed", ctypes.c_void_p),
                ("embed_dtype", ctypes.c_int64), ("final_norm", ctypes.c_void_p), ("head", DecodeLinear),
                ("screen_q", ctypes.c_void_p), ("screen_scale", ctypes.c_void_p), ("screen_err", ctypes.c_void_p),
                ("code4", ctypes.c_void_p), ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p),
                ("layers", ctypes.POINTER(DecodeLayer))]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The loaded library, ABI-checked and declared; None (after one warning) when it cannot be had."""
    if os.environ.get("FOURBIT_KERNELS", "auto").lower() == "reference":
        return None
    try:
        lib = _load_or_build(library_path())
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
        log.warning("fourbit: compiled CPU kernels unavailable (%s); using the PyTorch reference kernels", err)
        return None
    _declare(lib)
    _cap_isa(lib, os.environ.get("FOURBIT_MAX_CPU_ISA", ""))
    _pick_decode_rows(lib, os.environ.get("FOURBIT_DECODE_ROWS", ""))
    return lib


def _pick_decode_rows(lib: ctypes.CDLL, name: str) -> None:
    """``FOURBIT_DECODE_ROWS``: which of the decoding step's 4-bit layers take the int8-activation rows where the
    CPU has AVX512_VNNI (``auto``, the default: layers of at least 2,048 columns; ``int8``: all; ``float``:
    none; see :func:`set_decode_rows`)."""
    _apply_choice(lib.fb_set_decode_rows, "FOURBIT_DECODE_ROWS", name, DECODE_ROWS)


def _cap_isa(lib: ctypes.CDLL, name: str) -> None:
    """Hold the kernels to at most the vector code ``name`` (``FOURBIT_MAX_CPU_ISA``: ``avx2`` or ``scalar``),
    as oneDNN's ``ONEDNN_MAX_CPU_ISA`` holds oneDNN: to measure an AVX2-only machine's path on a wider CPU."""
    _apply_choice(lib.fb_set_isa, "FOURBIT_MAX_CPU_ISA", name, {"scalar": 0, "avx2": 1, "avx512": 2})


def _apply_choice(setter: Callable[[int], object], variable: str, name: str, choices: dict[str, int]) -> None:
    """Pass the C ``setter`` the value of environment ``variable``'s choice ``name``: nothing when unset, a
    warning (and nothing) when it is not one of ``choices``."""
    if not name:
        return
    if name.lower() not in choices:
        log.warning("fourbit: %s=%r is not one of %s; ignored", variable, name, ", ".join(choices))
        return
    setter(choices[name.lower()])


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures of :data:`ABI_VERSION` (``csrc/fourbit_cpu.h``), for ctypes to convert the arguments."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    scales = ctypes.POINTER(_Scales)
    signatures = {
        "fb_quantize_4bit": [ptr, i32, i64, i64, ptr, ptr, ptr, ptr, i32],
        "fb_dequantize_4bit": [ptr, scales, ptr, i64, i64, ptr, i32, i32],
        "fb_gemv_4bit": [ptr, ptr, scales, ptr, i64, i64, i64, i64, ptr, i32],
        "fb_softmax_xent": [ptr, i32, i64, i64, ptr, ptr, i32, i32],
        "fb_swiglu": [ptr, ptr, ptr, ptr, ptr, i32, i64, i32],
        "fb_rmsnorm": [ptr, ptr, ptr, ptr, ptr, i32, i64, i64, ctypes.c_float, i32],
        "fb_dropout": [ptr, ptr, i32, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, i32],
        "fb_decode_step": [ctypes.POINTER(DecodeModel), i64, i64, ptr, ptr, ptr, i64, i32],
        "fb_quantize_ggml": [ptr, i32, i64, i64, ptr, ptr, ptr, i32],
        "fb_isa": [],
        "fb_set_isa": [i32],
        "fb_set_decode_rows": [i32],
        "fb_decode_rows": [ctypes.POINTER(DecodeLinear), ptr, ptr, ptr, ptr],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, i32
    lib.fb_decode_work_floats.argtypes, lib.fb_decode_work_floats.restype = [ctypes.POINTER(DecodeModel)], i64


def _call(kernel: str, *args, blocksize: int | None = None) -> None:
    """Run the C function ``kernel`` and turn a refusal into the caller's error.

    Raises:
        ValueError: the kernel refused the block size (``FB_ERR_BLOCKSIZE``: odd, below 2, over
            :data:`MAX_QUANT_BLOCKSIZE` for quantization, not dividing the row for the fused matmul, or a
            nested ``blocksize2`` below 1).
        TypeError: the kernel refused the dtype (``FB_ERR_DTYPE``).
    """
    status = getattr(_library(), kernel)(*args)
    if status == _OK:
        return
    if status == _ERR_BLOCKSIZE:
        raise ValueError(f"{kernel}: the compiled kernel refused blocksize={blocksize} (it takes an even blocksize "
                         f">= 2, at most {MAX_QUANT_BLOCKSIZE} to quantize, dividing in_features for the fused "
                         f"matmul, and a nested blocksize2 >= 1)")
    if status == _ERR_DTYPE:
        raise TypeError(f"{kernel}: the compiled kernel refused the dtype code it was given")
    raise RuntimeError(f"{kernel}: the compiled kernel returned an unknown status {status}")


def _scales(scales: BlockScales) -> tuple[_Scales, list[torch.Tensor]]:
    """The C view of the block scales, and the tensors that must stay alive during the call.

    Nested (double-quantized) scales are decoded inside the kernel, so no float32 copy of the absmax is made.
    ``BlockScales`` holds 1-D contiguous float32 tensors (uint8 nested codes), which the C code reads as is.
    """
    if scales.nested:
        keep = [scales.absmax, scales.code2, scales.absmax2]
        return _Scales(None, keep[0].data_ptr(), keep[1].data_ptr(), keep[2].data_ptr(), scales.blocksize2,
                       float(scales.offset)), keep
    keep = [scales.absmax]
    return _Scales(keep[0].data_ptr(), None, None, None, 1, 0.0), keep


def available() -> bool:
    """True when the compiled kernels could be built (or were already) and loaded."""
    return _library() is not None


def isa() -> int:
    """The vector code the compiled kernels run on this CPU: 0 plain C, 1 AVX2, 2 AVX-512 (see ISA_NAMES)."""
    return int(_library().fb_isa())


def set_isa(level: int) -> int:
    """Use at most the vector code ``level`` (0, 1, 2; never more than the CPU has) and return the level now
    in use. For tests and benchmarks, which run each path on one machine."""
    return int(_library().fb_set_isa(int(level)))


#: Below this many weight elements a kernel runs on one thread: waking a thread pool costs more than the
#: work, and on a machine where another process holds a core it can cost milliseconds.
_PARALLEL_MIN_ELEMENTS = 1 << 18


def _threads(elements: int) -> int:
    """Threads for a kernel over ``elements`` values: torch's thread count from
    :data:`_PARALLEL_MIN_ELEMENTS` up, else one."""
    return max(1, torch.get_num_threads()) if elements >= _PARALLEL_MIN_ELEMENTS else 1


@lru_cache(maxsize=8)
def _bounds_and_order(code_bytes: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    bounds, order = reference.sorted_bounds(code)
    return bounds.contiguous(), order.to(torch.uint8).contiguous()


def quantize_4bit_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Same contract and bytes as :func:`fourbit.kernels.reference.quantize_4bit_blocks`.

    Float64 inputs, and block sizes the kernel cannot pack in place (odd) or hold (over
    :data:`MAX_QUANT_BLOCKSIZE`), run the reference.
    """
    x = flat.reshape(-1).contiguous()
    if x.dtype not in _DTYPE_CODES or blocksize % 2 or blocksize > MAX_QUANT_BLOCKSIZE:
        return reference.quantize_4bit_blocks(flat, code, blocksize)
    n = x.numel()
    bounds, order = _bounds_and_order(code.float().cpu().contiguous().numpy().tobytes())
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    _call("fb_quantize_4bit", x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize, bounds.data_ptr(),
          order.data_ptr(), packed.data_ptr(), absmax.data_ptr(), _threads(n), blocksize=blocksize)
    return packed, absmax


def dequantize_4bit_blocks(packed: torch.Tensor, scales: BlockScales, code: torch.Tensor, blocksize: int, n: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """Same contract and bytes as :func:`fourbit.kernels.reference.dequantize_4bit_blocks`.

    float64 output: the float32 result widened (exact, as the reference does). An odd block size (whose
    blocks start mid-byte, which the vector code does not read) runs the reference.

    Raises:
        TypeError: an output dtype outside float32/float16/bfloat16/float64. ValueError: a block size below 2.
    """
    check_output_dtype(dtype)
    if dtype not in _DTYPE_CODES:
        return dequantize_4bit_blocks(packed, scales, code, blocksize, n, torch.float32).to(dtype)
    if blocksize % 2:
        return reference.dequantize_4bit_blocks(packed, scales, code, blocksize, n, dtype)
    p = packed.reshape(-1).contiguous()
    c_scales, keep = _scales(scales)
    c = code if code.dtype == torch.float32 and code.is_contiguous() else code.float().contiguous()
    out = torch.empty(n, dtype=dtype)
    _call("fb_dequantize_4bit", p.data_ptr(), ctypes.byref(c_scales), c.data_ptr(), n, blocksize,
          out.data_ptr(), _DTYPE_CODES[dtype], _threads(n), blocksize=blocksize)
    del keep
    return out


def can_fuse(dtype: torch.dtype, blocksize: int, in_features: int) -> bool:
    """The fused kernel reads float32/float16/bfloat16 inputs of whole blocks per row (no block spans rows)."""
    return dtype in _DTYPE_CODES and blocksize >= 2 and blocksize % 2 == 0 and in_features % blocksize == 0


def fused_linear_4bit(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, code: torch.Tensor,
                      blocksize: int, out_features: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W).T`` in one pass over the 4-bit weight, for inputs :func:`can_fuse` accepts.

    The kernel accumulates in float32 whatever ``x.dtype`` is, so it agrees with the float32 reference
    to rounding (not bit for bit: the summation order differs), and is at least as accurate for bf16 inputs.

    Args:
        x: [..., in_features] float32/float16/bfloat16, at most a few rows (any count works; the kernel reads
            the weight once per 8 rows).

    Returns:
        [..., out_features] tensor of ``x.dtype``.

    Raises:
        TypeError / ValueError: inputs :func:`can_fuse` refuses (the dispatcher never passes them).
    """
    if not can_fuse(x.dtype, blocksize, in_features):
        if x.dtype not in _DTYPE_CODES:
            raise TypeError(f"the fused CPU kernel takes float32, float16 or bfloat16 inputs, got {x.dtype}")
        raise ValueError(f"the fused CPU kernel needs an even blocksize and in_features ({in_features}) a multiple "
                         f"of the blocksize ({blocksize})")
    rows = x.numel() // in_features
    x32 = x.reshape(rows, in_features)
    if x32.dtype != torch.float32 or not x32.is_contiguous():
        x32 = x32.float().contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    c_scales, keep = _scales(scales)
    c = code if code.dtype == torch.float32 and code.is_contiguous() else code.float().contiguous()
    _call("fb_gemv_4bit", x32.data_ptr(), packed.reshape(-1).contiguous().data_ptr(), ctypes.byref(c_scales),
          c.data_ptr(), rows, out_features, in_features, blocksize, out.data_ptr(),
          _threads(out_features * in_features), blocksize=blocksize)
    del keep
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], out_features)


def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool) -> torch.Tensor:
    """Same contract as :func:`fourbit.kernels.reference.softmax_cross_entropy_` (not bit for bit: the sums
    run in another order and ``exp`` is a polynomial good to about 1e-7 relative, as ``expf``), in three
    passes per row. float16 or non-contiguous logits go to the reference."""
    if logits.dtype not in (torch.float32, torch.bfloat16) or not logits.is_contiguous() or logits.dim() != 2:
        return reference.softmax_cross_entropy_(logits, targets, write_grad)
    rows, vocab = logits.shape
    t = targets.to(torch.int64).contiguous()
    losses = torch.empty(rows, dtype=torch.float32)
    _call("fb_softmax_xent", logits.data_ptr(), _DTYPE_CODES[logits.dtype], rows, vocab, t.data_ptr(),
          losses.data_ptr(), int(bool(write_grad)), _threads(logits.numel()))
    return losses


def _swiglu_inputs(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.dtype in (torch.float32, torch.bfloat16)
            and all(t.dtype == first.dtype and t.shape == first.shape and t.is_contiguous() for t in tensors))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`fourbit.kernels.reference.swiglu` (``exp`` to ~1e-7 relative), in one pass.
    float16, mixed dtypes or non-contiguous inputs go to the reference."""
    if not _swiglu_inputs(gate, up):
        return reference.swiglu(gate, up)
    out = torch.empty_like(gate)
    _call("fb_swiglu", gate.data_ptr(), up.data_ptr(), None, out.data_ptr(), None, _DTYPE_CODES[gate.dtype],
          gate.numel(), _threads(gate.numel()))
    return out


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`fourbit.kernels.reference.swiglu_backward`, in one pass."""
    if not _swiglu_inputs(gate, up, grad):
        return reference.swiglu_backward(gate, up, grad)
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    _call("fb_swiglu", gate.data_ptr(), up.data_ptr(), grad.data_ptr(), d_gate.data_ptr(), d_up.data_ptr(),
          _DTYPE_CODES[gate.dtype], gate.numel(), _threads(gate.numel()))
    return d_gate, d_up


def _rms_inputs(x: torch.Tensor, weight: torch.Tensor, *more: torch.Tensor) -> bool:
    return (x.dim() >= 1 and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
            and weight.shape == x.shape[-1:] and x.is_contiguous() and weight.is_contiguous()
            and all(t.shape == x.shape and t.dtype == x.dtype and t.is_contiguous() for t in more))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`fourbit.kernels.reference.rms_norm`, one pass per row; other dtypes, a weight of
    another dtype or non-contiguous inputs go to the reference."""
    if not _rms_inputs(x, weight):
        return reference.rms_norm(x, weight, eps)
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    out = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
    _call("fb_rmsnorm", x.data_ptr(), weight.data_ptr(), None, rstd.data_ptr(), out.data_ptr(),
          _DTYPE_CODES[x.dtype], rows, cols, float(eps), _threads(x.numel()))
    return out, rstd


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`fourbit.kernels.reference.rms_norm_backward`, one pass per row."""
    if not _rms_inputs(x, weight, grad) or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        return reference.rms_norm_backward(x, weight, grad, rstd)
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    dx = torch.empty_like(x)
    _call("fb_rmsnorm", x.data_ptr(), weight.data_ptr(), grad.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
          _DTYPE_CODES[x.dtype], rows, cols, 0.0, _threads(x.numel()))
    return dx


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Same contract and bytes as :func:`fourbit.kernels.reference.dropout`, in one pass. float16, float64 or
    non-contiguous inputs go to the reference."""
    if x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return reference.dropout(x, p, seed)
    out = torch.empty_like(x)
    _call("fb_dropout", x.data_ptr(), out.data_ptr(), _DTYPE_CODES[x.dtype], x.numel(), seed & (2**64 - 1),
          reference.dropout_threshold(p), 1.0 / (1.0 - p), _threads(x.numel()))
    return out


def decode_work_floats(model: DecodeModel) -> int:
    """Float32 scratch elements :func:`decode_step` needs for ``model``."""
    return int(_library().fb_decode_work_floats(ctypes.byref(model)))


def decode_step(model: DecodeModel, token: int, pos: int, work: torch.Tensor, logits: torch.Tensor | None = None,
                want_token: bool = True, nthreads: int | None = None) -> int | None:
    """One decoding step of ``model`` (``csrc/decode.c``): token ``token`` at position ``pos`` (the caches hold
    positions below it), its K/V written into the caches. The float32 logits go into ``logits`` [vocab] when
    given; the greedy next token is returned when ``want_token`` (else None). The caller keeps every tensor
    ``model`` points to alive and the structure consistent (``fourbit.models.decode`` builds it).

    Raises:
        ValueError: ``pos``/``token`` out of range, or a ``work`` buffer smaller than :func:`decode_work_floats`.
    """
    nxt = ctypes.c_int64(-1)
    status = _library().fb_decode_step(ctypes.byref(model), int(token), int(pos),
                                       None if logits is None else logits.data_ptr(),
                                       ctypes.byref(nxt) if want_token else None, work.data_ptr(), work.numel(),
                                       int(nthreads or max(1, torch.get_num_threads())))
    if status != _OK:
        raise ValueError(f"fb_decode_step refused token {token} at position {pos} (out of range of the model's "
                         f"vocabulary or cache of {model.max_len}, or a scratch buffer of {work.numel()} floats)")
    return int(nxt.value) if want_token else None


def set_decode_rows(mode: str | None) -> str:
    """Choose the arithmetic of :func:`decode_step`'s 4-bit rows; returns the mode now in effect.

    ``"int8"``: every 4-bit layer with int8 activations (the layer input quantized to int8 per 64 values and
    the NF4 levels to int8, summed by AVX512_VNNI's ``vpdpbusd``, as llama.cpp's Q4 x Q8 dot products;
    ``csrc/decode.c``); ``"float"``: float32 rows; ``"auto"`` (the default): int8 for layers of at least
    2,048 columns, where they are faster (1.3x the whole step of a Llama-3.1-8B-shaped model), float below
    (no faster on SmolLM2-135M's 576 and 1,536); ``None`` changes nothing. The int8 rows run only where the
    CPU has AVX512_VNNI and the AVX-512 code is in use (:func:`set_isa`), for blocksizes 64, 128, .., 4096;
    elsewhere the mode in effect is ``"float"``."""
    if mode is not None and mode not in DECODE_ROWS:
        raise ValueError(f"decode rows {mode!r}: expected one of {', '.join(DECODE_ROWS)}")
    got = _library().fb_set_decode_rows(-1 if mode is None else DECODE_ROWS[mode])
    return {v: k for k, v in DECODE_ROWS.items()}[got]


def decode_rows(linear: DecodeLinear, code4: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One layer's rows against ``x`` (float32 [cols]) as :func:`decode_step` computes them, for tests: the
    float32 outputs [rows] and the row kernel taken (0 plain C or dense, 1 float 4-bit vector rows, 2 int8).
    ``code4`` is the codebook the step's vector rows take (``DecodeModel.code4``), or None."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty(linear.rows, dtype=torch.float32)
    path = ctypes.c_int(-1)
    _call("fb_decode_rows", ctypes.byref(linear), None if code4 is None else code4.data_ptr(), x.data_ptr(),
          out.data_ptr(), ctypes.byref(path))
    return out, int(path.value)


#: The GGML block types :func:`quantize_ggml` writes: name -> (values per block, bytes per block, C type code).
GGML_BLOCKS = {"Q8_0": (32, 34, 0), "Q4_0": (32, 18, 1), "Q4_K": (256, 144, 2), "Q6_K": (256, 210, 3),
               "Q5_0": (32, 22, 4)}


def quantize_ggml(values: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's ``type_name`` blocks (a key of :data:`GGML_BLOCKS`) of ``values`` [..., k], byte for byte
    what the reference gives: ``gguf.quants.quantize`` for Q8_0, ``fourbit.models.export.kquants`` for Q4_0,
    Q5_0, Q4_K and Q6_K (``csrc/ggml_quants.c`` says how the sums and roundings follow them).

    Args:
        values: float32 [..., k], k a multiple of the block (32, or 256 for Q4_K/Q6_K); finite (the caller
            checks: a NaN or Inf gives meaningless bytes, not an error).
        importance: None, or float32 [k], one weight per column (llama.cpp's ``quant_weights``, from an
            importance matrix): Q4_0, Q5_0, Q4_K and Q6_K then weigh each value's error as llama.cpp's
            ``quantize_row_*_impl`` do; Q8_0 ignores it.

    Returns:
        uint8 [..., k / block · bytes per block].

    Raises:
        ValueError: a row that does not split into whole blocks, an importance vector of another length than
            the rows, or an unknown ``type_name``.
    """
    if type_name not in GGML_BLOCKS:
        raise ValueError(f"quantize_ggml: no compiled kernel for {type_name!r}; it writes {', '.join(GGML_BLOCKS)}")
    block, size, code = GGML_BLOCKS[type_name]
    if values.dim() < 1 or values.shape[-1] % block:
        raise ValueError(f"quantize_ggml: rows of {values.shape[-1] if values.dim() else 0} values do not split "
                         f"into {type_name} blocks of {block}")
    cols = values.shape[-1]
    x = values if values.dtype == torch.float32 and values.is_contiguous() else values.float().contiguous()
    out = torch.empty(*x.shape[:-1], cols // block * size, dtype=torch.uint8)
    if x.numel() == 0:
        return out
    weights = row_ms = None
    if importance is not None:
        weights = importance.detach().to(torch.float32).contiguous().reshape(-1)
        if weights.numel() != cols:
            raise ValueError(f"quantize_ggml: an importance vector of {weights.numel()} values for rows of {cols}")
        row_ms = torch.empty(x.numel() // cols, dtype=torch.float32)
    _call("fb_quantize_ggml", x.data_ptr(), code, x.numel(), cols, None if weights is None else weights.data_ptr(),
          None if row_ms is None else row_ms.data_ptr(), out.data_ptr(), _threads(x.numel()), blocksize=block)
    return out
