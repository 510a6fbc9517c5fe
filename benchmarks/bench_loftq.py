"""LoftQ's starting point on the bundled SmolLM2-135M-Instruct (not a test): how far ``Q + s·B·A`` starts from
the float weight W, per layer, against plain NF4 (``Q`` alone, B = 0), for LoftQ with T = 1, 2 and 4 iterations.

    python benchmarks/bench_loftq.py                 # r = 16, NF4 + double quantization, every linear layer
    python benchmarks/bench_loftq.py --rank 64 --iters 1,5 --json
    python benchmarks/bench_loftq.py --decoder-layers 4       # the first four decoder layers only

The relative error ``||W - W0||_F / ||W||_F`` of each starting weight W0 is printed per projection type (median
and range over the 30 layers) and overall; ``--json`` prints every layer. The weights are the bundled GGUF's
(dequantized Q8_0/Q4_1 by transformers' GGUF loader: the float model a user would start from).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from _machine import cpu_line

from fourbit.models import load_model
from fourbit.nn.loftq import loftq_decompose
from fourbit.quant import dequantize_4bit, quantize_4bit


def layer_errors(weight: torch.Tensor, rank: int, iters: list[int]) -> dict[str, float]:
    """Relative Frobenius error of plain NF4 and of LoftQ at each iteration count, for one weight."""
    w = weight.detach().float()
    norm = w.norm()
    packed, state = quantize_4bit(w, "nf4", 64, True)
    out = {"nf4": float((w - dequantize_4bit(packed, state, torch.float32)).norm() / norm)}
    for t in iters:
        q_packed, q_state, big_l, big_r = loftq_decompose(w, rank, t)
        start = dequantize_4bit(q_packed, q_state, torch.float32) + big_l @ big_r
        out[f"loftq T={t}"] = float((w - start).norm() / norm)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", default="1,2,4", help="comma-separated LoftQ iteration counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoder-layers", type=int, default=None, help="only the first N decoder layers (a quick look)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    iters = [int(t) for t in args.iters.split(",")]
    model, _ = load_model(quant=None, torch_dtype=torch.float32)
    rows, t0 = {}, time.perf_counter()
    for name, module in model.named_modules():
        layer = next((int(p) for p in name.split(".") if p.isdigit()), 0)
        if args.decoder_layers is not None and layer >= args.decoder_layers:
            continue
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            rows[name] = layer_errors(module.weight, args.rank, iters)
    seconds = time.perf_counter() - t0
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, errors in rows.items():
        for method, value in errors.items():
            by_kind[name.rsplit(".", 1)[-1]][method].append(value)
            by_kind["all layers"][method].append(value)
    methods = list(next(iter(rows.values())))
    if args.json:
        print(json.dumps({"cpu": cpu_line(), "rank": args.rank, "seconds": seconds, "layers": rows}, indent=1))
        return 0
    print(f"relative error ||W - W0|| / ||W|| of the starting weight, r={args.rank}, {len(rows)} layers "
          f"(median [min, max])")
    print(f"{'layer':>12} " + " ".join(f"{m:>26}" for m in methods))
    for kind, errors in by_kind.items():
        cells = [f"{statistics.median(v):.4f} [{min(v):.4f}, {max(v):.4f}]" for v in errors.values()]
        print(f"{kind:>12} " + " ".join(f"{c:>26}" for c in cells))
    overall = by_kind["all layers"]
    for m in methods[1:]:
        ratio = statistics.median(a / b for a, b in zip(overall[m], overall["nf4"], strict=True))
        print(f"{m}: median error {ratio:.3f}x plain NF4's")
    print(f"{seconds:.1f} s for all LoftQ decompositions; CPU: {cpu_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
