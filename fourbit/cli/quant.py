"""``fourbit quantize | info | eval-quant``: the quantization commands.

Each command maps its flags to the Python API (:mod:`fourbit.models`) and prints what the API returns; the
library returns data, and the tables are drawn here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "add_quant_flags", "cmd_eval_quant", "cmd_info", "cmd_quantize", "footprint_table",
           "quant_config_from_args"]


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    """--quant-type, --blocksize, --no-double-quant, --compute-dtype (checked by ``QuantConfig``)."""
    p.add_argument("--quant-type", default="nf4", metavar="TYPE", help="4-bit data type: nf4, fp4 or int4 (default nf4)")
    p.add_argument("--blocksize", type=int, default=64, help="absmax block size, power of two in 32..4096 (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep absmax constants in float32 (4.5 bits/param)")
    p.add_argument("--compute-dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="matmul dtype of the 4-bit layers (default auto: bf16 on GPUs and CPUs with native bf16, "
                        "else fp32)")
    p.add_argument("--skip-modules", default="lm_head", metavar="NAMES",
                   help="comma-separated module names (or name suffixes) kept in full precision, without the "
                        "warning fourbit gives when more than 5%% of the weights stay unquantized (default lm_head)")


def quant_config_from_args(args: argparse.Namespace):
    """The ``QuantConfig`` the quantization flags describe."""
    from fourbit.models import QuantConfig

    skip = tuple(n.strip() for n in getattr(args, "skip_modules", "lm_head").split(",") if n.strip())
    return QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                       compute_dtype=args.compute_dtype, skip_modules=skip)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def footprint_table(fp, title: str):
    """A rich table of a ``fourbit.models.Footprint``."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("4-bit layers", f"{fp.quantized_layers}")
    table.add_row("4-bit parameters", f"{fp.quantized_params:,}")
    table.add_row("4-bit weights + constants", _mb(fp.quantized_bytes))
    table.add_row("bits per 4-bit parameter", f"{fp.bits_per_param:.3f}")
    table.add_row("model before", _mb(fp.model_bytes_before))
    table.add_row("model after", _mb(fp.model_bytes_after))
    if fp.model_bytes_before:
        table.add_row("ratio after/before", f"{fp.model_bytes_after / fp.model_bytes_before:.3f}")
    if fp.mean_relative_error is not None:
        table.add_row("mean relative weight error", f"{fp.mean_relative_error:.4f}")
    if fp.skipped:
        table.add_row("kept in full precision", ", ".join(fp.skipped))
    table.add_row("weight matrices in 4 bits", f"{100 * fp.quantized_fraction:.1f}% (outside embeddings and head)")
    for kind, entry in fp.full_precision.items():
        table.add_row(f"full precision: {kind}", f"{entry['matrices']} matrices, {entry['params']:,} params")
    return table


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a model to 4 bits and save it as a bitsandbytes-format checkpoint folder."""
    from fourbit._errors import FieldError, InputFileError
    from fourbit._io import check_output_dir
    from fourbit.models import bundled_model_path, fourbit_info, load_model, save_quantized
    from fourbit.models.quantize import UnquantizedWeightsWarning

    config = quant_config_from_args(args)
    source = Path(args.model).expanduser() if args.model else bundled_model_path()
    inputs = [source] if source.exists() else []
    out = check_output_dir(args.out, overwrite=args.overwrite, field="out_dir", inputs=inputs)
    t0 = time.perf_counter()
    try:  # a float folder is quantized while it is read (fourbit.models.stream); other sources after loading
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnquantizedWeightsWarning)
            model, tokenizer = load_model(args.model, quant=config, progress=not args.json, measure_error=True)
    except (InputFileError, FieldError):
        raise
    except ValueError as err:  # NaN/Inf weights: name the model it came from as well as the module
        raise InputFileError(source if inputs else str(args.model), str(err)) from None
    fp = fourbit_info(model).footprint
    for w in caught:  # one plain line each, with the flag the user can pass
        if issubclass(w.category, UnquantizedWeightsWarning):
            print(f"warning: {str(w.message).replace('`skip_modules`', '--skip-modules')}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    seconds = time.perf_counter() - t0
    save_quantized(model, out, tokenizer, overwrite=args.overwrite)
    if args.json:
        _print_json({"out": str(out), "seconds": seconds, "config": vars(config), **fp.as_dict()})
        return 0
    from rich.console import Console

    console = Console()
    console.print(footprint_table(fp, f"{args.model or 'bundled SmolLM2-135M-Instruct'} -> {config.quant_type}"))
    console.print(f"saved to {out} ({seconds:.1f} s to load and quantize)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a model or 4-bit checkpoint folder (its settings and quant states are checked first)."""
    from fourbit.models import checkpoint_info

    info = checkpoint_info(args.dir)
    if args.json:
        _print_json(info)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(args.dir))
    table.add_column("field")
    table.add_column("value")
    qc = info["quantization_config"] or {}
    rows = [
        ("architecture", str(info["architecture"])),
        ("4-bit", "yes" if info["quantized"] else "no"),
        ("quant type", ", ".join(info["quant_types"]) or "-"),
        ("double quant", str(qc.get("bnb_4bit_use_double_quant", qc.get("double_quant", "-")))),
        ("compute dtype", str(qc.get("bnb_4bit_compute_dtype") or qc.get("compute_dtype") or "-")),
        ("4-bit layers", str(info["quantized_layers"])),
        ("4-bit parameters", f"{info['quantized_params']:,}"),
    ]
    fp = (info.get("fourbit") or {}).get("footprint") if isinstance(info.get("fourbit"), dict) else None
    if isinstance(fp, dict) and isinstance(fp.get("bits_per_param"), int | float):
        rows.append(("bits per 4-bit parameter", f"{fp['bits_per_param']:.3f}"))
    for name, size in info["files"].items():
        rows.append((name, _mb(size)))
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    return 0


def cmd_eval_quant(args: argparse.Namespace) -> int:
    """Perplexity of the model unquantized and in each 4-bit type, on a fixed slice of Python's docs."""
    import copy

    import torch

    from fourbit._errors import FieldError
    from fourbit.generate import perplexity, reference_text
    from fourbit.models import QuantConfig, load_model, quantize_model

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    configs = {}
    for name in types:
        try:
            configs[name] = QuantConfig(quant_type=name, blocksize=args.blocksize,
                                        double_quant=not args.no_double_quant, compute_dtype=args.compute_dtype)
        except FieldError as err:
            raise FieldError("types" if err.field == "quant_type" else err.field, err.message) from None
    if not types:
        raise FieldError("types", "is empty: give comma-separated 4-bit types such as nf4,fp4,int4")
    base, tokenizer = load_model(args.model, quant=None)
    if tokenizer is None:
        raise FieldError("model", f"{args.model} holds no tokenizer files; perplexity needs the tokenizer")
    text = reference_text(args.chars)
    rows = []
    for name in ["unquantized", *types]:
        model = base if name == "unquantized" else copy.deepcopy(base)
        fp = quantize_model(model, configs[name], measure_error=True) if name != "unquantized" else None
        t0 = time.perf_counter()
        ppl = perplexity(model, tokenizer, text, window=args.window, max_windows=args.max_windows,
                         progress=not args.json)
        rows.append({
            "model": name, "perplexity": ppl, "seconds": time.perf_counter() - t0,
            "bits_per_param": fp.bits_per_param if fp else 32.0 if next(base.parameters()).dtype == torch.float32 else 16.0,
            "mean_relative_error": fp.mean_relative_error if fp else 0.0,
        })
        if model is not base:
            del model
    if args.json:
        _print_json({"text_chars": len(text), "window": args.window, "results": rows})
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"perplexity on {len(text):,} characters of pydoc_data.topics (lower is better)")
    for col in ("model", "bits/param", "weight rel. error", "perplexity", "vs unquantized"):
        table.add_column(col, justify="right")
    ref = rows[0]["perplexity"]
    for r in rows:
        table.add_row(r["model"], f"{r['bits_per_param']:.3f}", f"{r['mean_relative_error']:.4f}",
                      f"{r['perplexity']:.3f}", f"{r['perplexity'] / ref:.3f}x")
    Console().print(table)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register quantize, info and eval-quant (and, until fourbit.cli registers them itself, the commands of
    the modules split out of this one: generate, demo)."""
    p = subparsers.add_parser("quantize", help="quantize a model to 4 bits and save it", description=cmd_quantize.__doc__)
    p.add_argument("model", nargs="?", default=None, help="model folder, .gguf file or hub id (default: bundled SmolLM2)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    add_quant_flags(p)
    p.set_defaults(func=cmd_quantize)

    i = subparsers.add_parser("info", help="describe a model or 4-bit checkpoint folder", description=cmd_info.__doc__)
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    e = subparsers.add_parser("eval-quant", help="perplexity: unquantized vs NF4 vs FP4 vs INT4",
                              description=cmd_eval_quant.__doc__)
    e.add_argument("model", nargs="?", default=None)
    e.add_argument("--types", default="nf4,fp4,int4", help="comma-separated 4-bit types (default nf4,fp4,int4)")
    e.add_argument("--chars", type=int, default=60_000, help="characters of reference text (default 60000)")
    e.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--blocksize", type=int, default=64)
    e.add_argument("--no-double-quant", action="store_true")
    e.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), default="fp32")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval_quant)
