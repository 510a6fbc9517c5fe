"""``fourbit quantize | generate | info | eval-quant | demo``: the 4-bit core on the command line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant-type", choices=("nf4", "fp4", "int4"), default="nf4", help="4-bit data type (default nf4)")
    p.add_argument("--blocksize", type=int, default=64, help="absmax block size, power of two in 32..4096 (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep absmax constants in float32 (4.5 bits/param)")
    p.add_argument("--compute-dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="matmul dtype of the 4-bit layers (default auto: bf16 on GPUs and CPUs with native bf16, "
                        "else fp32)")


def _quant_config(args: argparse.Namespace):
    from fourbit.models import QuantConfig

    return QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                       compute_dtype=args.compute_dtype)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _footprint_table(fp, title: str):
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
    return table


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a model to 4 bits and save it as a bitsandbytes-format checkpoint folder."""
    from rich.console import Console

    from fourbit.models import load_model, quantize_model, save_quantized

    config = _quant_config(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, quant=None)
    fp = quantize_model(model, config, progress=not args.json, measure_error=True)
    seconds = time.perf_counter() - t0
    save_quantized(model, out, tokenizer, overwrite=args.overwrite)
    if args.json:
        _print_json({"out": str(out), "seconds": seconds, "config": vars(config), **fp.as_dict()})
        return 0
    console = Console()
    console.print(_footprint_table(fp, f"{args.model or 'bundled SmolLM2-135M-Instruct'} -> {config.quant_type}"))
    console.print(f"saved to {out} ({seconds:.1f} s to load and quantize)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate an answer to PROMPT with a 4-bit model (chat template when the tokenizer has one)."""
    from fourbit.generate import generate
    from fourbit.models import load_model

    model, tokenizer = load_model(args.model, quant=None if args.no_quant else _quant_config(args))
    if tokenizer is None:
        raise ValueError(f"{args.model} holds no tokenizer files; cannot generate text")
    if args.adapter:
        from fourbit.nn.adapters import load_adapter

        model = load_adapter(model, args.adapter)
        model.eval()
    t0 = time.perf_counter()
    text, n_tokens = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                              stream=not args.json, do_sample=args.sample, system=args.system,
                              return_num_tokens=True)
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({"prompt": args.prompt, "text": text, "tokens": n_tokens, "seconds": seconds})
    else:
        print(f"\n[{n_tokens} tokens in {seconds:.1f} s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s]")
    return 0


def checkpoint_info(folder: str | Path) -> dict:
    """What a checkpoint folder holds: architecture, quantization settings, layers, sizes."""
    from safetensors import safe_open

    from fourbit.models import CHECKPOINT_FILE, FOURBIT_META_FILE, is_quantized_checkpoint

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a model or checkpoint folder")
    config = json.loads(config_file.read_text())
    info: dict[str, Any] = {
        "folder": str(folder),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "quantized": is_quantized_checkpoint(folder),
        "quantization_config": config.get("quantization_config"),
    }
    files = sorted(folder.glob("*.safetensors"))
    info["files"] = {f.name: f.stat().st_size for f in files}
    layers = 0
    params = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if ".weight.quant_state.bitsandbytes__" in key:
                    layers += 1
                    meta = json.loads(bytes(handle.get_tensor(key).numpy()).decode())
                    shape = meta.get("shape") or []
                    n = 1
                    for s in shape:
                        n *= s
                    params += n
    info["quantized_layers"] = layers
    info["quantized_params"] = params
    meta_file = folder / FOURBIT_META_FILE
    if meta_file.is_file():
        info["fourbit"] = json.loads(meta_file.read_text())
    if not files:
        info["warning"] = f"no {CHECKPOINT_FILE} in the folder"
    return info


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a model or 4-bit checkpoint folder."""
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
        ("architecture", info["architecture"]),
        ("4-bit", "yes" if info["quantized"] else "no"),
        ("quant type", qc.get("bnb_4bit_quant_type") or qc.get("quant_type") or "-"),
        ("double quant", str(qc.get("bnb_4bit_use_double_quant", qc.get("double_quant", "-")))),
        ("compute dtype", str(qc.get("bnb_4bit_compute_dtype") or qc.get("compute_dtype") or "-")),
        ("4-bit layers", str(info["quantized_layers"])),
        ("4-bit parameters", f"{info['quantized_params']:,}"),
    ]
    fp = (info.get("fourbit") or {}).get("footprint")
    if fp:
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

    from fourbit.generate import perplexity, reference_text
    from fourbit.models import QuantConfig, load_model, quantize_model

    types = [t for t in args.types.split(",") if t]
    base, tokenizer = load_model(args.model, quant=None)
    text = reference_text(args.chars)
    rows = []
    for name in ["unquantized", *types]:
        model = base if name == "unquantized" else copy.deepcopy(base)
        fp = None
        if name != "unquantized":
            fp = quantize_model(model, QuantConfig(quant_type=name, blocksize=args.blocksize,
                                                   double_quant=not args.no_double_quant,
                                                   compute_dtype=args.compute_dtype), measure_error=True)
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


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole story on the bundled model: quantize, fine-tune briefly, answer over a document."""
    from fourbit.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register quantize, generate, info, eval-quant and demo."""
    p = subparsers.add_parser("quantize", help="quantize a model to 4 bits and save it", description=cmd_quantize.__doc__)
    p.add_argument("model", nargs="?", default=None, help="model folder, .gguf file or hub id (default: bundled SmolLM2)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    _quant_args(p)
    p.set_defaults(func=cmd_quantize)

    g = subparsers.add_parser("generate", help="generate text with a 4-bit model", description=cmd_generate.__doc__)
    g.add_argument("model", nargs="?", default=None,
                   help="model folder, 4-bit checkpoint, .gguf or hub id (default: bundled SmolLM2)")
    g.add_argument("prompt", help="the user message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply")
    g.add_argument("--system", help="system message")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--no-quant", action="store_true", help="run the model unquantized")
    g.add_argument("--json", action="store_true", help="print one JSON document instead of streaming")
    _quant_args(g)
    g.set_defaults(func=cmd_generate)

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

    d = subparsers.add_parser("demo", help="quantize, fine-tune and answer over a document (a few minutes)",
                              description=cmd_demo.__doc__)
    d.add_argument("--out", default="demo_out", help="working folder (default demo_out)")
    d.add_argument("--quick", action="store_true", help="fewer training steps (for smoke tests)")
    d.set_defaults(func=cmd_demo)
