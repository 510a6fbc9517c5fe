"""What every benchmark prints about the machine it ran on, and how it measures peak memory.

Benchmarks run as scripts (``python benchmarks/bench_x.py``), so this folder is on ``sys.path`` and they import
this module as ``_machine``.
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

__all__ = ["SHOWN_FLAGS", "cpu_info", "cpu_line", "peak_rss_mb"]

#: The CPU flags that decide which kernels run (x86: AVX2/AVX-512/bf16/AMX; Arm: ASIMD/SVE/BF16).
SHOWN_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
               "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")


def cpu_info() -> dict:
    """The CPU model, the flags that decide the fast paths, all flags, the core count and what torch reports."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.split()
    except OSError:
        pass
    try:
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability())
    except ImportError:
        capability = "torch not installed"
    return {"model": model or platform.processor() or platform.machine(), "machine": platform.machine(),
            "logical_cpus": os.cpu_count(), "simd_flags": [f for f in SHOWN_FLAGS if f in flags], "flags": flags,
            "torch_cpu_capability": capability}


def cpu_line() -> str:
    """One line for a benchmark's footer: model, the deciding flags, torch's capability string."""
    info = cpu_info()
    return (f"{info['model']} ({info['logical_cpus']} logical CPUs); flags: {' '.join(info['simd_flags']) or 'none'}"
            f"; torch capability {info['torch_cpu_capability']}")


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a worker
    started from a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
