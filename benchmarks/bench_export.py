"""Time a GGUF export (``fourbit.models.export.export_gguf``) per type, and the file sizes it gives.

By default a random llama of TinyLlama's layer shape but 4 layers (hidden 2048, MLP 5632, vocab 32000) is
quantized to NF4 in this process and exported; ``--model`` exports a real model folder, GGUF file or 4-bit
checkpoint instead (quantized to NF4 first unless ``--float``), ``--layers`` sets the random model's depth
(22 gives TinyLlama's 1.1B parameters). Seconds are wall time of the export alone (the model is already
loaded), with the machine's load average beside them: on a shared machine they are upper bounds.

    python benchmarks/bench_export.py                       # 4-layer random llama, every type
    python benchmarks/bench_export.py --types q4_k_m --layers 22
    python benchmarks/bench_export.py --model path/to/model --types q8_0,q4_0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_line, peak_rss_mb  # noqa: E402
from _timing import load_average  # noqa: E402


def _random_llama(layers: int, hidden: int, vocab: int):
    import torch
    import transformers

    from fourbit.models import QuantConfig, quantize_model

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder, .gguf or 4-bit checkpoint (default: random)")
    parser.add_argument("--float", action="store_true", help="export --model unquantized (not through NF4)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--types", default="f16,bf16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from fourbit.models import QuantConfig, load_model
    from fourbit.models.export import export_gguf

    if args.model:
        model, tokenizer = load_model(args.model, quant=None if args.float else QuantConfig(compute_dtype="fp32"))
    else:
        model, tokenizer = _random_llama(args.layers, args.hidden, args.vocab), _tokenizer()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory(prefix="fourbit-bench-export-") as folder:
        for gguf_type in [t.strip() for t in args.types.split(",") if t.strip()]:
            t0 = time.perf_counter()
            result = export_gguf(model, tokenizer, Path(folder) / f"model-{gguf_type}.gguf", gguf_type=gguf_type)
            seconds = time.perf_counter() - t0
            rows.append({"type": gguf_type, "seconds": round(seconds, 2), "MiB": round(result.bytes / 2**20, 1),
                         "tensor_types": result.tensor_types})
            Path(result.path).unlink()
    report = {"cpu": cpu_line(), "load_average": load_average(), "model": args.model or
              f"random llama {args.layers}x{args.hidden}", "stored_params": params, "peak_rss_mb": peak_rss_mb(),
              "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']} ({params / 1e6:,.0f}M stored parameters); {report['cpu']}; load {report['load_average']}")
    print(f"{'type':8} {'seconds':>8} {'MiB':>8}  tensors")
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items()))
        print(f"{r['type']:8} {r['seconds']:8.2f} {r['MiB']:8.1f}  {types}")
    print(f"peak RSS {report['peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
