"""``fourbit finetune`` and ``fourbit merge``: thin wrappers over :mod:`fourbit.train` and :mod:`fourbit.nn`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from fourbit._io import replace_dir

__all__ = ["add_parser", "cmd_finetune", "cmd_merge", "plain_for_saving"]


def plain_for_saving(model: Any) -> Any:
    """Drop the loading-time quantization markers (GGUF's hf_quantizer, quantization_config, fourbit's
    footprint) from a model whose weights are now plain tensors, so ``save_pretrained`` writes a normal
    16-bit folder. Returns the model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    for attr in ("quantization_config", "fourbit"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "fourbit_footprint"):
        del model.fourbit_footprint
    return model


def _print_config(config: Any, as_json: bool) -> None:
    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="resolved config", show_header=False, box=None)
    for k, v in config.to_dict().items():
        table.add_row(k, repr(v))
    Console(stderr=True).print(table)


def cmd_finetune(args: argparse.Namespace) -> int:
    """QLoRA/LoRA fine-tuning of MODEL (default: the bundled SmolLM2-135M-Instruct) on --data into --out.

    Options come from the dataclass defaults (QLoRA paper), then --config FILE.yaml, then flags.
    """
    from fourbit.train.config import config_from_args
    from fourbit.train.data import load_records
    from fourbit.train.loading import load_for_training
    from fourbit.train.trainer import prepare_data, train

    config = config_from_args(args, config_file=args.config, model=args.model_pos)
    if not config.data or not config.out:
        raise ValueError("finetune needs --data PATH and --out DIR")
    _print_config(config, args.json)
    labels: list[str] = []
    records = load_records(config.data)  # fail on a bad file before the slow model load
    if config.task == "classify":
        labels = sorted({str(r.get(config.label_column)) for r in records if config.label_column in r})
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not (config.resume or config.overwrite):
        raise ValueError(f"output folder {out} already holds files (another run?); pass --overwrite to replace "
                         "it or --resume to continue it")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    model, tokenizer = load_for_training(config, label_names=labels)
    data = prepare_data(config, tokenizer)
    result = train(config, model, tokenizer, data=data, log=log)
    summary = {
        "out": str(result.out), "steps": result.steps, "train_loss": result.train_loss, **result.eval,
        "n_train": result.n_train, "n_eval": result.n_eval, "n_truncated": result.n_truncated,
        "n_dropped": result.n_dropped, "tokens_per_s": result.tokens_per_s, "resumed_from": result.resumed_from,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"fine-tuned adapter in {result.out}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        Console().print(table)
    return 0


def _adapter_quant(adapter: Path) -> dict[str, Any]:
    """The base quantization the adapter was trained on (from its train_config.yaml), default NF4 + DQ."""
    import yaml

    path = adapter / "train_config.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    doc = doc or {}
    return {"quant": doc.get("quant", "nf4"), "double_quant": doc.get("double_quant", True),
            "model": doc.get("model")}


def _dequantize_rest(model: Any) -> None:
    """Replace every remaining 4-bit layer with a float32 ``nn.Linear`` holding its dequantized weight."""
    import torch
    from torch import nn

    from fourbit.nn.lora import is_linear_4bit

    for name, m in list(model.named_modules()):
        if not is_linear_4bit(m):
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.dequantize(torch.float32))
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base and write a 16-bit model folder (with tokenizer) to --out.

    The adapter is merged onto the weights it was trained against: for a QLoRA adapter that is the
    dequantized NF4 weight (quantization settings from the adapter's train_config.yaml, or --quant).
    Re-quantizing a merged model to 4 bits would round most of the adapter's update away.
    """
    import torch

    from fourbit.models import QuantConfig, load_model
    from fourbit.nn.adapters import load_adapter, read_adapter_config
    from fourbit.nn.lora import merge_and_unload

    adapter = Path(args.adapter)
    read_adapter_config(adapter)  # clear error before loading the model
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"output folder {out} already holds files; pass --overwrite to replace it")
    saved = _adapter_quant(adapter)
    quant = args.quant or saved["quant"]
    model_path = args.model_pos or saved["model"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    qc = None if quant == "none" else QuantConfig(quant_type=quant, double_quant=saved["double_quant"],
                                                  compute_dtype="fp32")
    model, tokenizer = load_model(model_path, quant=qc, torch_dtype=torch.float32)
    load_adapter(model, adapter)
    merge_and_unload(model, dtype=torch.float32)
    _dequantize_rest(model)  # 4-bit layers the adapter did not target
    model = model.to(dtype)
    plain_for_saving(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {"out": str(out), "base": str(model_path or "bundled SmolLM2-135M-Instruct"), "merged_on": quant,
            "dtype": args.dtype}
    print(json.dumps(info) if args.json else f"merged {adapter} into {info['base']} ({quant} base) -> {out} "
          f"({args.dtype})")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``finetune`` and ``merge``."""
    from fourbit.train.config import add_config_flags

    p = subparsers.add_parser("finetune", help="QLoRA/LoRA fine-tuning", description=cmd_finetune.__doc__)
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="model folder or .gguf (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML file overriding the defaults")
    p.add_argument("--json", action="store_true", help="print one JSON document with the results")
    add_config_flags(p)
    p.set_defaults(func=cmd_finetune)

    m = subparsers.add_parser("merge", help="merge an adapter into a 16-bit model folder",
                              description=cmd_merge.__doc__)
    m.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="base model (default: the one recorded with the adapter, else bundled SmolLM2)")
    m.add_argument("--adapter", required=True, metavar="DIR")
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--quant", choices=("nf4", "fp4", "none"), default=None,
                   help="base the adapter was trained on (default: from its train_config.yaml, else nf4)")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_merge)
