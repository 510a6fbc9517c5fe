"""Time a GGUF export (``fourbit.models.export.export_gguf``) per type, and the file sizes it gives.

By default a random llama of TinyLlama's layer shape but 4 layers (hidden 2048, MLP 5632, vocab 32000) is
quantized to NF4 in this process and exported; ``--model`` exports a real model folder, GGUF file or 4-bit
checkpoint instead (quantized to NF4 first unless ``--float``), ``--layers`` sets the random model's depth
(22 gives TinyLlama's 1.1B parameters); ``--hidden``, ``--intermediate``, ``--heads`` and ``--vocab`` give
other shapes (Llama-3.1-8B's layer: 4096, 14336, 32; a one-layer model of that width times one layer and the
embedding and head, from which a 32-layer export is extrapolated). Seconds are wall time of the export alone
(the model is already loaded), with the process's CPU seconds and the machine's load average beside them: on
a shared machine the wall times are upper bounds. ``--reference`` also times each type with
``FOURBIT_KERNELS=reference`` (numpy quantizers, PyTorch dequantization) in the same process, and checks that
both files are the same bytes.

    python benchmarks/bench_export.py                       # 4-layer random llama, every type
    python benchmarks/bench_export.py --types q4_k_m --layers 22
    python benchmarks/bench_export.py --layers 1 --hidden 4096 --intermediate 14336 --heads 32 \
        --types q4_0,q8_0,q4_k_m --reference                # one Llama-3.1-8B-shaped layer, both paths
    python benchmarks/bench_export.py --model path/to/model --types q8_0,q4_0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_line, peak_rss_mb  # noqa: E402
from _timing import load_average  # noqa: E402


def _random_llama(layers: int, hidden: int, vocab: int, intermediate: int | None = None, heads: int | None = None):
    import torch
    import transformers

    from fourbit.models import QuantConfig, quantize_model

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=heads or hidden // 64,
                                      num_key_value_heads=max(1, hidden // 512),
                                      vocab_size=vocab, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    return model


def _tokenizer():
    """The tests' byte-level tokenizer (259 ids; the export writes ``[PAD<id>]`` for the model's other ids)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _tiny_models import make_tokenizer

    return make_tokenizer()


def _time_exports(model, tokenizer, types: list[str], reference: bool) -> list[dict]:
    """Export ``model`` once per type (and once more with ``FOURBIT_KERNELS=reference`` when ``reference``),
    timing each; one row per type."""
    from fourbit.models.export import export_gguf

    kernels_before = os.environ.get("FOURBIT_KERNELS", "auto")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fourbit-bench-export-") as folder:
        for gguf_type in types:
            row = {"type": gguf_type}
            paths = {}
            for kernels in ("compiled", "reference") if reference else ("compiled",):
                os.environ["FOURBIT_KERNELS"] = "reference" if kernels == "reference" else "auto"
                c0, t0 = time.process_time(), time.perf_counter()
                result = export_gguf(model, tokenizer, Path(folder) / f"{kernels}-{gguf_type}.gguf",
                                     gguf_type=gguf_type)
                row[kernels] = {"seconds": round(time.perf_counter() - t0, 2),
                                "cpu_s": round(time.process_time() - c0, 1), "load": load_average()}
                row.update(MiB=round(result.bytes / 2**20, 1), tensor_types=result.tensor_types)
                paths[kernels] = Path(result.path)
            os.environ["FOURBIT_KERNELS"] = kernels_before
            if reference:
                row["same_bytes"] = paths["compiled"].read_bytes() == paths["reference"].read_bytes()
            for path in paths.values():
                path.unlink()
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, .gguf or 4-bit checkpoint (default: random)")
    parser.add_argument("--float", action="store_true", help="export --model unquantized (not through NF4)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default hidden * 11 / 4)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--types", default="f16,bf16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--reference", action="store_true", help="also time FOURBIT_KERNELS=reference")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from fourbit.models import QuantConfig, load_model

    if args.model:
        model, tokenizer = load_model(args.model, quant=None if args.float else QuantConfig(compute_dtype="fp32"))
    else:
        model = _random_llama(args.layers, args.hidden, args.vocab, args.intermediate, args.heads)
        tokenizer = _tokenizer()
    params = sum(p.numel() for p in model.parameters())
    rows = _time_exports(model, tokenizer, [t.strip() for t in args.types.split(",") if t.strip()], args.reference)
    report = {"cpu": cpu_line(), "load_average": load_average(), "model": args.model or
              f"random llama {args.layers}x{args.hidden} (MLP {args.intermediate or args.hidden * 11 // 4}, "
              f"vocab {args.vocab})", "stored_params": params, "peak_rss_mb": peak_rss_mb(),
              "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']} ({params / 1e6:,.0f}M stored parameters); {report['cpu']}; load {report['load_average']}")
    print(f"{'type':8} {'seconds':>8} {'CPU s':>7} {'MiB':>8}  tensors")
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items()))
        print(f"{r['type']:8} {r['compiled']['seconds']:8.2f} {r['compiled']['cpu_s']:7.1f} {r['MiB']:8.1f}  {types}")
        if "reference" in r:
            ref = r["reference"]
            print(f"{'':8} reference {ref['seconds']:.2f} s ({ref['cpu_s']:.1f} CPU s, load {ref['load']}): "
                  f"{ref['seconds'] / r['compiled']['seconds']:.1f}x the compiled path's wall time; "
                  f"same bytes: {r['same_bytes']}")
    print(f"peak RSS {report['peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
