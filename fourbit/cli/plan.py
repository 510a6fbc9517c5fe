"""``fourbit plan MODEL [finetune flags]``: the peak memory quantize, finetune, merge and generate will need,
estimated from the model's config.json and the flags alone (:mod:`fourbit.models.memory_plan`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "cmd_plan"]


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def cmd_plan(args: argparse.Namespace) -> int:
    """Estimate the peak RSS of quantize, finetune (with the given finetune flags), merge and generate for MODEL,
    from its config.json and the flags alone: no weight is read."""
    from fourbit.models import QuantConfig
    from fourbit.models.memory_plan import model_counts
    from fourbit.train.config import config_from_args
    from fourbit.train.memory_check import available_memory_bytes, finetune_plan

    config = config_from_args(args, config_file=args.config, model=args.model)
    quant = (QuantConfig(include=()) if config.quant == "none"
             else QuantConfig(quant_type=config.quant, double_quant=config.double_quant))
    counts = model_counts(config.model, quant)
    plan = finetune_plan(config, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                         merge_bytes=4 if args.merge_dtype == "fp32" else 2)
    available = available_memory_bytes()
    if args.json:
        print(json.dumps({"model": str(config.model), "parameters": counts.total_params,
                          "quantized_parameters": counts.quantized_params,
                          "peak_bytes": {c: plan.peak(c) for c in plan.terms}, "terms": plan.terms,
                          "available_bytes": available}, indent=2))
        return 0
    print(f"{config.model}: {counts.total_params:,} parameters, {counts.quantized_params:,} in 4 bits")
    for command, terms in plan.terms.items():
        print(f"{command:>9}: {_gib(plan.peak(command))} peak RSS  ("
              + ", ".join(f"{k} {_gib(v)}" for k, v in terms.items() if v) + ")")
    if available is not None:
        print(f"available now: {_gib(available)}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``plan`` (it takes every ``finetune`` flag)."""
    from fourbit.train.config import add_config_flags

    p = subparsers.add_parser("plan", help="estimate the memory each command will need", description=cmd_plan.__doc__)
    p.add_argument("model", metavar="MODEL", help="model folder (float or 4-bit) holding config.json")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="finetune YAML file overriding the defaults")
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="generate: prompt length (default 512)")
    p.add_argument("--new-tokens", type=int, default=256, metavar="N", help="generate: new tokens (default 256)")
    p.add_argument("--merge-dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="merge: output dtype")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    add_config_flags(p, skip=("model",))
    p.set_defaults(func=cmd_plan)
