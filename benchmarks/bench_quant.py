"""Quantize / dequantize throughput on the CPU: fourbit's compiled kernels (each vector path this CPU has) and
its PyTorch reference, against bitsandbytes and torchao, NF4 + double quantization, block 64.

    python benchmarks/bench_quant.py [--repeats 5] [--threads 2] [--json]

Prints M params/s (median of repeats) for every implementation and the path it actually ran, and the ratio to
bitsandbytes measured in the same run. Read that ratio for what it is: bitsandbytes is a GPU library, and on
the CPU its quantize_4bit is a generic PyTorch fallback and its dequantize_4bit a C++ kernel only on CPUs that
torch reports as "AVX512" (and for block sizes below 2048); elsewhere it falls back to PyTorch too. Each row
names the path. Measured numbers belong in benchmarks/RESULTS.md, with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _machine import cpu_info  # noqa: E402
from _timing import load_average, measure  # noqa: E402

import fourbit  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}



def cpu_description() -> dict:
    """The CPU model, the flags that decide which kernels run, and what torch reports."""
    info = cpu_info()
    return {"model": info["model"], "machine": info["machine"], "cores": info["logical_cpus"],
            "flags": info["simd_flags"], "torch_cpu_capability": info["torch_cpu_capability"]}

def _fourbit(kernels: str, isa: int | None = None):
    def setup():
        os.environ["FOURBIT_KERNELS"] = kernels
        if isa is not None:
            from fourbit.kernels import cpu

            cpu.set_isa(isa)

    def quant(w):
        setup()
        return fourbit.quantize_4bit(w, "nf4", 64, True)

    def dequant(packed, state, dtype):
        setup()
        return fourbit.dequantize_4bit(packed, state, dtype)

    return quant, dequant


def _fourbit_peers() -> dict:
    """fourbit's compiled kernels on each vector path this CPU runs (best first), and the reference."""
    peers = {}
    from fourbit.kernels import cpu

    if cpu.available():
        best = cpu.isa()
        for level in sorted((lv for lv in cpu.ISA_NAMES if lv <= best), reverse=True)[:2]:
            label = f"fourbit (compiled C, {cpu.ISA_NAMES[level]} path)"
            peers[label] = (*_fourbit("auto", level), {"quantize": label, "dequantize": label})
        cpu.set_isa(best)
    label = "fourbit (PyTorch reference)"
    peers[label] = (*_fourbit("reference"), {"quantize": label, "dequantize": label})
    return peers


def _bnb():
    import bitsandbytes
    import bitsandbytes.functional as F

    def quant(w):
        return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequant(packed, state, dtype):
        return F.dequantize_4bit(packed, quant_state=state)

    # bitsandbytes 0.50 registers a CPU C++ dequantize_4bit kernel only where torch reports "AVX512" (used
    # for block sizes < 2048 and even last dimensions); quantize_4bit always runs its "default" backend.
    avx512 = str(torch.backends.cpu.get_cpu_capability()) == "AVX512"
    paths = {"quantize": "bitsandbytes (generic PyTorch fallback)",
             "dequantize": "bitsandbytes (CPU C++ kernel, AVX-512)" if avx512
             else "bitsandbytes (generic PyTorch fallback)"}
    return quant, dequant, paths, bitsandbytes.__version__


def _torchao():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:  # torchao < 0.15
        from torchao.dtypes.nf4tensor import to_nf4

    def quant(w):
        return to_nf4(w, block_size=64, scaler_block_size=256), None

    def dequant(packed, state, dtype):
        return packed.get_original_weight()

    label = "torchao NF4Tensor (PyTorch ops)"
    return quant, dequant, {"quantize": label, "dequantize": label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers = _fourbit_peers()
    notes = {}
    try:
        *bnb, version = _bnb()
        peers["bitsandbytes"] = tuple(bnb)
        notes["bitsandbytes"] = version
    except ImportError:
        notes["bitsandbytes"] = "not installed"
    try:
        peers["torchao"] = _torchao()
        import torchao

        notes["torchao"] = getattr(torchao, "__version__", "installed")
    except ImportError:
        notes["torchao"] = "not installed"
    except Exception as err:  # noqa: BLE001 - torchao is optional and may not match this torch
        notes["torchao"] = f"unusable with this torch ({type(err).__name__})"
    results = []
    load_before = load_average()
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            w = torch.randn(shape).to(dtype)
            n = w.numel()
            for name, (quant, dequant, paths) in peers.items():
                repeats = 1 if "reference" in name else args.repeats
                q = measure(lambda quant=quant, w=w: quant(w), repeats=repeats)
                packed, state = quant(w)
                d = measure(lambda f=dequant, p=packed, s=state, t=dtype: f(p, s, t), repeats=repeats)
                for op, t in (("quantize", q), ("dequantize", d)):
                    results.append({"shape": f"{shape[0]}x{shape[1]}", "dtype": dname, "op": op, "impl": name,
                                    "path": paths[op], "mparams_s": n / t["wall"] / 1e6, "cpu_s": t["cpu"]})
    os.environ.pop("FOURBIT_KERNELS", None)
    for r in results:
        peer = next((x for x in results if x["impl"] == "bitsandbytes" and x["shape"] == r["shape"]
                     and x["dtype"] == r["dtype"] and x["op"] == r["op"]), None)
        r["vs_bitsandbytes"] = r["mparams_s"] / peer["mparams_s"] if peer else None
    out = {"cpu": cpu_description(), "threads": args.threads, "torch": torch.__version__, "peers": notes,
           "load_average_before": load_before, "load_average_after": load_average(), "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cpu = out["cpu"]
    console.print(f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores), flags: "
                  f"{' '.join(cpu['flags']) or '-'}; torch {out['torch']} reports {cpu['torch_cpu_capability']}")
    console.print("peers: " + ", ".join(f"{k} {v}" for k, v in notes.items()))
    table = Table(title=f"NF4 + double quant, block 64: M params/s (median of {args.repeats}), "
                        f"{args.threads} threads")
    for col in ("shape", "dtype", "op", "implementation (path that ran)", "M params/s", "vs bitsandbytes CPU"):
        table.add_column(col, justify="right")
    for r in results:
        ratio = f"{r['vs_bitsandbytes']:.2f}x" if r["vs_bitsandbytes"] else "-"
        table.add_row(r["shape"], r["dtype"], r["op"], r["path"], f"{r['mparams_s']:.0f}", ratio)
    console.print(table)
    console.print("The bitsandbytes ratio compares against its CPU code (the path named in its row), not its GPU "
                  "kernels.")
    console.print(f"load average before/after: {out['load_average_before']} / {out['load_average_after']}")


if __name__ == "__main__":
    main()
