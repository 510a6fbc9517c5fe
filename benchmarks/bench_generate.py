"""4-bit generation speed on the bundled SmolLM2-135M-Instruct: fourbit NF4 vs the unquantized model vs
transformers + bitsandbytes NF4, 64 greedy tokens, same prompt, on the CPU.

    python benchmarks/bench_generate.py [--tokens 64] [--repeats 3] [--threads 2] [--json]

Prints the CPU (model, the flags that pick kernels) and, per row, the path each library takes: fourbit's
fused 4-bit matmul (compiled C, the vector path this CPU runs) for decoding steps; bitsandbytes' CPU
``gemv_4bit`` kernel only for one-row bf16 inputs on CPUs with AVX512-BF16, dequantize + matmul otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import load_average, measure  # noqa: E402
from bench_quant import cpu_description  # noqa: E402

PROMPT = "Write a short paragraph about the history of the printing press."


def _tokens_per_second(model, tokenizer, tokens: int, repeats: int) -> dict:
    from fourbit.generate import build_prompt

    inputs = tokenizer(build_prompt(tokenizer, PROMPT), return_tensors="pt", add_special_tokens=False)

    def run():
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.eos_token_id)

    t = measure(run, repeats=repeats, warmup=1)
    return {"tokens_per_s": tokens / t["wall"], "cpu_s_per_token": t["cpu"] / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fourbit.models import QuantConfig, load_model, quantize_model

    base, tokenizer = load_model(quant=None)
    rows = {}
    load_before = load_average()
    rows["unquantized fp32"] = _tokens_per_second(base, tokenizer, args.tokens, args.repeats)
    print(f"unquantized fp32: {rows['unquantized fp32']}", flush=True)
    for compute in ("bf16", "fp32"):
        model = copy.deepcopy(base)
        quantize_model(model, QuantConfig(compute_dtype=compute))
        rows[f"fourbit nf4 ({compute} compute)"] = _tokens_per_second(model, tokenizer, args.tokens, args.repeats)
        print(f"fourbit {compute}: {rows[f'fourbit nf4 ({compute} compute)']}", flush=True)
        del model
    try:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            # A model read from GGUF carries a "gguf quantizer" that refuses to save; its weights are plain.
            base.hf_quantizer = None
            base.config.__dict__.pop("quantization_config", None)
            base.save_pretrained(tmp)
            for compute, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=dtype)
                theirs = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=cfg).eval()
                rows[f"bitsandbytes nf4 ({compute} compute)"] = _tokens_per_second(theirs, tokenizer, args.tokens,
                                                                                  args.repeats)
                del theirs
    except ImportError:
        pass
    from fourbit.kernels import cpu

    fused = (f"compiled C, {cpu.ISA_NAMES[cpu.isa()]} path" if cpu.available() else "PyTorch reference")
    out = {"cpu": cpu_description(), "fourbit_decode_path": fused, "threads": args.threads, "tokens": args.tokens,
           "load_average_before": load_before, "load_average_after": load_average(), "results": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    best_bnb = max((v["tokens_per_s"] for k, v in rows.items() if k.startswith("bitsandbytes")), default=None)
    table = Table(title=f"{args.tokens} greedy tokens, SmolLM2-135M-Instruct, {args.threads} threads "
                        f"(median of {args.repeats})")
    for col in ("model", "tokens/s", "CPU s/token", "vs best bitsandbytes"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        ratio = f"{r['tokens_per_s'] / best_bnb:.2f}x" if best_bnb else "-"
        table.add_row(name, f"{r['tokens_per_s']:.1f}", f"{r['cpu_s_per_token']:.3f}", ratio)
    console = Console()
    desc = out["cpu"]
    console.print(f"CPU: {desc['model']}, flags: {' '.join(desc['flags']) or '-'}; fourbit's fused 4-bit matmul: "
                  f"{fused}")
    console.print(table)
    console.print(f"load average before/after: {out['load_average_before']} / {out['load_average_after']}")


if __name__ == "__main__":
    main()
