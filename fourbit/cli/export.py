"""``fourbit export``: a model (plus a merged adapter) as a llama.cpp GGUF file with an Ollama Modelfile, and
an adapter alone as a llama.cpp LoRA GGUF (:mod:`fourbit.models.export`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError

__all__ = ["add_parser", "cmd_export"]


def _check_flags(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """The two outputs, checked before any model is loaded."""
    from fourbit.models.export import check_gguf_output
    from fourbit.models.export.layout import check_type

    if not args.gguf and not args.lora_gguf:
        raise FieldError("gguf", "give `gguf` OUT.gguf (the model) or `lora_gguf` OUT.gguf (the adapter alone)")
    check_type(args.gguf_type)
    if args.lora_gguf and not args.adapter:
        raise FieldError("lora_gguf", "writes an adapter: give `adapter` DIR too")
    gguf = check_gguf_output(args.gguf, field="gguf") if args.gguf else None
    lora = check_gguf_output(args.lora_gguf, field="lora_gguf") if args.lora_gguf else None
    _check_imatrix_flags(args)
    if gguf is not None and lora is not None and gguf.resolve() == lora.resolve():
        raise FieldError("lora_gguf", f"{lora} is also the `gguf` output; give the adapter its own file")
    if args.model and Path(args.model).is_file():
        for field, out in (("gguf", gguf), ("lora_gguf", lora)):
            if out is not None and out.resolve() == Path(args.model).resolve():
                raise FieldError(field, f"{out} is the input model; writing there would replace it")
    return gguf, lora


def _check_imatrix_flags(args: argparse.Namespace) -> None:
    """--imatrix-text, --imatrix-tokens and --imatrix: a readable, non-empty input, for a 4-bit --type only."""
    from fourbit._errors import InputFileError
    from fourbit.models.export.layout import FOUR_BIT_TYPES

    text, matrix = getattr(args, "imatrix_text", None), getattr(args, "imatrix", None)
    tokens = getattr(args, "imatrix_tokens", None)
    if tokens is not None and not text:
        raise FieldError("imatrix_tokens", "caps the tokens of --imatrix-text: give `imatrix_text` FILE too")
    if tokens is not None and tokens < 1:
        raise FieldError("imatrix_tokens", f"must be a positive number of tokens, got {tokens}")
    if text and matrix:
        raise FieldError("imatrix", "give `imatrix` FILE.gguf or `imatrix_text` FILE.txt, not both")
    flag = "imatrix_text" if text else "imatrix" if matrix else None
    if flag is None:
        return
    if not args.gguf:
        raise FieldError(flag, "weighs the model file's quantization: give `gguf` OUT.gguf too")
    if args.gguf_type not in FOUR_BIT_TYPES:
        raise FieldError(flag, f"weighs the 4-bit types ({', '.join(FOUR_BIT_TYPES)}); --type {args.gguf_type} "
                               "does not use an importance matrix")
    path = Path(text or matrix).expanduser()
    if not path.is_file():
        raise InputFileError(path, f"no such file (`{flag}`)")
    if text:
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputFileError(path, f"cannot be read as UTF-8 text (`imatrix_text`): {err}") from None
        if not content.strip():
            raise InputFileError(path, "is empty (`imatrix_text` needs calibration text)")


def _importance(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[dict | None, str | None]:
    """The importance matrix the flags ask for, and a line saying where it came from (None, None without)."""
    from fourbit.models.export.imatrix import importance_matrix, read_imatrix

    if getattr(args, "imatrix", None):
        matrix = read_imatrix(Path(args.imatrix).expanduser())
        return matrix, f"importance matrix: {len(matrix)} tensors from {args.imatrix}"
    if not getattr(args, "imatrix_text", None):
        return None, None
    text = Path(args.imatrix_text).expanduser().read_text(encoding="utf-8")
    matrix, tokens = importance_matrix(model, tokenizer, text, max_tokens=args.imatrix_tokens)
    return matrix, f"importance matrix: {len(matrix)} tensors from {tokens:,} tokens of {args.imatrix_text}"


def _load(args: argparse.Namespace):
    """(model, tokenizer, source GGUF file or None): the base, with the adapter injected when given, quantized
    as the adapter was trained (``fourbit merge``'s rule)."""
    import torch

    from fourbit.models import QuantConfig, bundled_model_path, load_model
    from fourbit.nn.adapters import load_adapter

    model_arg = args.model
    qc = None
    if args.adapter:
        from fourbit.train.merge import merge_base

        base = merge_base(args.adapter, model=args.model, quant=args.quant, force=args.force)
        model_arg = base.model
        if base.quant != "none":
            qc = QuantConfig(quant_type=base.quant, double_quant=base.double_quant, compute_dtype="fp32")
    elif args.quant is not None:
        raise FieldError("quant", "sets the base an adapter was trained on: give `adapter` too")
    source = bundled_model_path() if model_arg is None else Path(model_arg).expanduser()
    model, tokenizer = load_model(model_arg, quant=qc, torch_dtype=torch.float32)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model, tokenizer, source if source.is_file() and source.suffix == ".gguf" else None


def _four_bit_kind(model: Any) -> str | None:
    """The 4-bit type of the model's quantized layers (``NF4``), or None when it has none."""
    from fourbit.nn.lora import LoRALinear, is_linear_4bit

    for module in model.modules():
        base = module.base if isinstance(module, LoRALinear) else module
        if is_linear_4bit(base):
            return str(base.quant_state.quant_type).upper()
    return None


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model to llama.cpp's GGUF format, with its tokenizer, chat template and an Ollama Modelfile.

    With --adapter the adapter is merged onto the weights it was trained against (for a QLoRA adapter the
    dequantized NF4 base, as `fourbit merge` does) while each tensor is written. --imatrix-text FILE runs that
    merged model over calibration text first and weighs the q4_0/q4_k_m rounding of each weight column by the
    mean square of its input (llama-imatrix's statistic; --imatrix FILE.gguf reads one llama-imatrix wrote), as
    llama-quantize --imatrix does. --type q4_0 or q4_k_m on a
    4-bit model quantizes the dequantized NF4 weights a second time (said in one line); f16, bf16 and q8_0 keep
    them as they are. --lora-gguf writes the adapter alone as a llama.cpp LoRA file (llama-cli --lora).
    """
    from fourbit.models.export import export_gguf, export_lora_gguf

    gguf, lora = _check_flags(args)
    t0 = time.perf_counter()
    model, tokenizer, source = _load(args)
    kind = _four_bit_kind(model)
    report: dict[str, Any] = {"source_4bit": kind}
    if gguf is not None:
        if kind and args.gguf_type in ("q4_0", "q4_k_m") and not args.json:
            print(f"note: the model is {kind}: {args.gguf_type} re-quantizes its dequantized {kind} weights "
                  "(4-bit twice); --type q8_0 or f16 keeps them as they are")
        importance, line = _importance(args, model, tokenizer)
        if line and not args.json:
            print(line)
        result = export_gguf(model, tokenizer, gguf, gguf_type=args.gguf_type, modelfile=not args.no_modelfile,
                             source_gguf=source, importance=importance)
        report.update({"gguf": str(result.path), "type": args.gguf_type, "bytes": result.bytes,
                       "imatrix": line.removeprefix("importance matrix: ") if line else None,
                       "tensor_types": result.tensor_types, "modelfile": str(result.modelfile or "") or None,
                       "requantized_4bit": result.requantized, "notes": list(result.notes)})
        if not args.json:
            types = ", ".join(f"{n} {t}" for t, n in sorted(result.tensor_types.items()))
            print(f"wrote {result.path} ({result.bytes / 2**20:,.1f} MiB; tensors: {types})")
            for note in result.notes:
                print(f"note: {note}")
            if result.modelfile is not None:
                print(f"wrote {result.modelfile} (ollama create NAME -f {result.modelfile})")
    if lora is not None:
        export_lora_gguf(model, lora)
        report["lora_gguf"] = str(lora)
        if not args.json:
            print(f"wrote {lora} (llama.cpp LoRA adapter: llama-cli -m BASE.gguf --lora {lora})")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(report))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``export``."""
    p = subparsers.add_parser("export", help="export to GGUF (llama.cpp, Ollama)", description=cmd_export.__doc__)
    p.add_argument("model", nargs="?", default=None,
                   help="model folder, 4-bit checkpoint or .gguf (default: the adapter's base, else bundled "
                        "SmolLM2)")
    p.add_argument("--gguf", default=None, metavar="OUT.gguf", help="the model file to write")
    p.add_argument("--lora-gguf", dest="lora_gguf", default=None, metavar="OUT.gguf",
                   help="write the --adapter alone as a llama.cpp LoRA GGUF")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a finetune run folder, one of its checkpoints, or a peft adapter folder, merged in")
    p.add_argument("--type", dest="gguf_type", default="f16", metavar="TYPE",
                   help="f16, bf16, q8_0, q4_0 or q4_k_m (llama-quantize's mix; default f16)")
    p.add_argument("--quant", default=None, help="the base the adapter was trained on: nf4, fp4 or none "
                                                 "(default: from the run's train_config.yaml, else nf4)")
    p.add_argument("--force", action="store_true", help="merge onto another MODEL/--quant than the run's")
    p.add_argument("--imatrix-text", dest="imatrix_text", default=None, metavar="FILE.txt",
                   help="q4_0/q4_k_m: calibration text (not your evaluation text) to compute an importance matrix "
                        "from, with the adapter merged; the 4-bit rounding then favours the columns it activates")
    p.add_argument("--imatrix-tokens", dest="imatrix_tokens", type=int, default=None, metavar="N",
                   help="use at most the first N tokens of --imatrix-text (default: all)")
    p.add_argument("--imatrix", default=None, metavar="FILE.gguf",
                   help="q4_0/q4_k_m: an importance matrix llama-imatrix wrote (GGUF format), instead of "
                        "--imatrix-text")
    p.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_export)
