"""Held-out perplexity of each GGUF export type against the float model it was exported from (issue 21 item 2).

The bundled SmolLM2-135M-Instruct is loaded from its GGUF file to float32 (the reference: "the merged float
model"), exported by ``export_gguf`` once per type, read back by transformers' GGUF loader (an independent
dequantizer), and both are scored on the same text with ``fourbit.generate.perplexity``: by default the first
12,000 characters of ``reference_text`` in 4 windows of 512 tokens, the measurement of the slow test
``tests/test_export.py::test_bundled_smollm2_perplexity``. ``--model`` scores another model folder or GGUF file.

    python benchmarks/bench_export_quality.py                   # q8_0, q4_0, q4_k_m
    python benchmarks/bench_export_quality.py --types q4_0 --windows 8 --chars 24000
    python benchmarks/bench_export_quality.py --offset 12000      # other text than the slow test's
    python benchmarks/bench_export_quality.py --nf4               # the NF4 model's export against itself
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_line  # noqa: E402
from _timing import load_average  # noqa: E402


def _score(model, tokenizer, text: str, windows: int) -> float:
    import torch

    from fourbit.generate import perplexity

    with torch.no_grad():
        return perplexity(model, tokenizer, text, window=512, max_windows=windows)


def _export_and_score(model, tokenizer, source, gguf_type: str, text: str, windows: int, folder: Path) -> dict:
    """Export ``model`` as ``gguf_type``, read it back with transformers and score it: one result row."""
    import torch
    import transformers

    from fourbit.models.export import export_gguf

    t0 = time.perf_counter()
    result = export_gguf(model, tokenizer, folder / f"m-{gguf_type}.gguf", gguf_type=gguf_type, modelfile=False,
                         source_gguf=source)
    seconds = time.perf_counter() - t0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=result.path.name,
                                                               dtype=torch.float32).eval()
    ppl = _score(loaded, tokenizer, text, windows)
    result.path.unlink()
    return {"type": gguf_type, "perplexity": round(ppl, 3), "MiB": round(result.bytes / 2**20, 1),
            "export_s": round(seconds, 1), "tensor_types": result.tensor_types}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the bundled SmolLM2)")
    parser.add_argument("--types", default="q8_0,q4_0,q4_k_m")
    parser.add_argument("--chars", type=int, default=12_000, help="characters of reference_text scored")
    parser.add_argument("--offset", type=int, default=0, help="characters of reference_text skipped first")
    parser.add_argument("--nf4", action="store_true",
                        help="quantize the model to NF4 first: the reference is the dequantized NF4 model, and the "
                             "4-bit types quantize it a second time (a QLoRA base's export)")
    parser.add_argument("--windows", type=int, default=4, help="windows of 512 tokens scored")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from fourbit.generate import reference_text
    from fourbit.models import QuantConfig, bundled_model_path, load_model

    source = Path(args.model) if args.model else bundled_model_path()
    quant = QuantConfig(compute_dtype="fp32") if args.nf4 else None
    model, tokenizer = load_model(str(source), quant=quant, torch_dtype=torch.float32)
    model.eval()
    text = reference_text(args.offset + args.chars)[args.offset:]
    reference = _score(model, tokenizer, text, args.windows)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fourbit-bench-quality-") as folder:
        for gguf_type in [t.strip() for t in args.types.split(",") if t.strip()]:
            row = _export_and_score(model, tokenizer, source if source.suffix == ".gguf" else None, gguf_type,
                                    text, args.windows, Path(folder))
            row["vs_float"] = round(row["perplexity"] / reference - 1, 4)
            rows.append(row)
    report = {"cpu": cpu_line(), "load_average": load_average(), "model": str(source), "chars": args.chars,
              "offset": args.offset, "nf4": args.nf4,
              "windows": args.windows, "float_perplexity": round(reference, 3), "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']}; {report['cpu']}; load {report['load_average']}")
    print(f"{'NF4' if args.nf4 else 'float'} model: perplexity {reference:.3f} ({args.windows} windows of 512 tokens, {args.chars} chars "
          f"from {args.offset})")
    print(f"{'type':8} {'perplexity':>10} {'vs float':>9} {'MiB':>7} {'export s':>9}  tensors")
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items()))
        print(f"{r['type']:8} {r['perplexity']:10.3f} {100 * r['vs_float']:+8.1f}% {r['MiB']:7.1f} "
              f"{r['export_s']:9.1f}  {types}")


if __name__ == "__main__":
    main()
