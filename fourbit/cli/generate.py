"""``fourbit generate``: answer a prompt with a 4-bit model (optionally with a LoRA adapter)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

__all__ = ["add_parser", "cmd_generate"]


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate an answer to PROMPT with a 4-bit model (chat template when the tokenizer has one)."""
    from fourbit._errors import FieldError
    from fourbit.cli.quant import quant_config_from_args
    from fourbit.generate import generate
    from fourbit.models import load_model

    quant = None if args.no_quant else quant_config_from_args(args)
    if args.adapter:
        from fourbit.nn.adapters import read_adapter_config

        read_adapter_config(args.adapter)  # a clear error before the slow model load
    model, tokenizer = load_model(args.model, quant=quant)
    if tokenizer is None:
        raise FieldError("model", f"{args.model} holds no tokenizer files; cannot generate text")
    if args.adapter:
        from fourbit.nn.adapters import load_adapter

        model = load_adapter(model, args.adapter)
        model.eval()
    t0 = time.perf_counter()
    text, n_tokens = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                              stream=not args.json, do_sample=args.sample, system=args.system,
                              return_num_tokens=True, decoder=args.decoder)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": n_tokens, "seconds": seconds}, indent=2))
    else:
        print(f"\n[{n_tokens} tokens in {seconds:.1f} s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s]")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``generate``."""
    from fourbit.cli.quant import add_quant_flags

    g = subparsers.add_parser("generate", help="generate text with a 4-bit model", description=cmd_generate.__doc__)
    g.add_argument("model", nargs="?", default=None,
                   help="model folder, 4-bit checkpoint, .gguf or hub id (default: bundled SmolLM2)")
    g.add_argument("prompt", help="the user message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply")
    g.add_argument("--system", help="system message")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--no-quant", action="store_true", help="run the model unquantized")
    g.add_argument("--decoder", choices=("auto", "fast", "hf"), default="auto",
                   help="auto: fourbit's fast CPU decoder for Llama-family models (llama, mistral, qwen2, qwen3), "
                        "transformers' generate otherwise; fast: refuse other models; hf: always transformers")
    g.add_argument("--json", action="store_true", help="print one JSON document instead of streaming")
    add_quant_flags(g)
    g.set_defaults(func=cmd_generate)
