"""What the processor does natively, asked once on first use (never at import time).

``native_bf16`` answers "is bf16 arithmetic fast here?", the question behind ``compute_dtype="auto"``.
``torch.backends.cpu.get_cpu_capability()`` cannot answer it: it names the widest vector ISA torch's kernels
were built for ("AVX512"), which is the same on Xeons with and without AVX512-BF16/AMX. The CPU's own flags
can: Linux lists them in /proc/cpuinfo (``avx512_bf16``, ``amx_bf16``; ``bf16`` on Arm).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["BF16_FLAGS", "cpu_flags", "native_bf16"]

#: CPU flags (as /proc/cpuinfo spells them) that mean bf16 matmuls run in hardware.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16", "svebf16"})

_CPUINFO = Path("/proc/cpuinfo")


def _read_cpu_flags() -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty when
    the file is missing or unreadable (not Linux)."""
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (cached after the first call)."""
    return _read_cpu_flags()


def _torch_says_amx() -> bool:
    """torch's own AMX probe, where this torch has one (a private helper: absent in some versions)."""
    probe = getattr(getattr(torch._C, "_cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@lru_cache(maxsize=1)
def _cpu_native_bf16() -> bool:
    flags = cpu_flags()
    if flags:
        return bool(flags & BF16_FLAGS)
    return _torch_says_amx()


def native_bf16(device: torch.device | str | None = None) -> bool:
    """True when ``device`` computes in bf16 natively (fast), so bf16 is the better compute dtype there.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: the AVX512-BF16 or AMX-BF16 flag (Arm:
    BF16), read from /proc/cpuinfo, else torch's AMX probe when present. Other devices: False. The CPU answer
    is cached after the first call.

    Args:
        device: a torch.device or its name; default the CPU.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False
