"""Quantize / dequantize throughput: fourbit (compiled CPU kernels and PyTorch reference) vs bitsandbytes
(and torchao's NF4 tensor when it is installed), NF4 + double quantization, block 64.

    python benchmarks/bench_quant.py [--repeats 5] [--threads 2] [--json]

Prints M params/s (median of repeats) and the ratio fourbit / peer measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import load_average, measure  # noqa: E402

import fourbit  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _fourbit(kernels: str):
    def quant(w):
        os.environ["FOURBIT_KERNELS"] = kernels
        return fourbit.quantize_4bit(w, "nf4", 64, True)

    def dequant(packed, state, dtype):
        os.environ["FOURBIT_KERNELS"] = kernels
        return fourbit.dequantize_4bit(packed, state, dtype)

    return quant, dequant


def _bnb():
    import bitsandbytes.functional as F

    def quant(w):
        return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequant(packed, state, dtype):
        return F.dequantize_4bit(packed, quant_state=state)

    return quant, dequant


def _torchao():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:  # torchao < 0.15
        from torchao.dtypes.nf4tensor import to_nf4

    def quant(w):
        return to_nf4(w, block_size=64, scaler_block_size=256), None

    def dequant(packed, state, dtype):
        return packed.get_original_weight()

    return quant, dequant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers = {"fourbit": _fourbit("auto"), "fourbit-reference": _fourbit("reference")}
    try:
        peers["bitsandbytes"] = _bnb()
    except ImportError:
        pass
    try:
        peers["torchao"] = _torchao()
    except Exception:  # noqa: BLE001 - torchao is optional and may not match this torch
        pass
    results = []
    load_before = load_average()
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            w = torch.randn(shape).to(dtype)
            n = w.numel()
            for name, (quant, dequant) in peers.items():
                repeats = 1 if name == "fourbit-reference" else args.repeats
                q = measure(lambda quant=quant, w=w: quant(w), repeats=repeats)
                packed, state = quant(w)
                d = measure(lambda f=dequant, p=packed, s=state, t=dtype: f(p, s, t), repeats=repeats)
                results.append({"shape": f"{shape[0]}x{shape[1]}", "dtype": dname, "impl": name,
                                "quant_mparams_s": n / q["wall"] / 1e6, "dequant_mparams_s": n / d["wall"] / 1e6,
                                "quant_cpu_s": q["cpu"], "dequant_cpu_s": d["cpu"]})
    os.environ.pop("FOURBIT_KERNELS", None)
    out = {"threads": args.threads, "load_average_before": load_before, "load_average_after": load_average(),
           "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"NF4 + double quant, block 64: M params/s (median of {args.repeats}), {args.threads} threads")
    for col in ("shape", "dtype", "impl", "quantize", "vs bnb", "dequantize", "vs bnb"):
        table.add_column(col, justify="right")
    for r in results:
        ref = next((x for x in results if x["impl"] == "bitsandbytes" and x["shape"] == r["shape"]
                    and x["dtype"] == r["dtype"]), None)
        qr = f"{r['quant_mparams_s'] / ref['quant_mparams_s']:.2f}x" if ref else "-"
        dr = f"{r['dequant_mparams_s'] / ref['dequant_mparams_s']:.2f}x" if ref else "-"
        table.add_row(r["shape"], r["dtype"], r["impl"], f"{r['quant_mparams_s']:.0f}", qr,
                      f"{r['dequant_mparams_s']:.0f}", dr)
    console = Console()
    console.print(table)
    console.print(f"load average before/after: {out['load_average_before']} / {out['load_average_after']}")


if __name__ == "__main__":
    main()
