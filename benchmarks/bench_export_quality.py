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
    python benchmarks/bench_export_quality.py --llama-quantize --types q4_0,q4_k_m   # beside llama.cpp's quantizer
    python benchmarks/bench_export_quality.py --llama-quantize --types q4_0,q4_k_m --imatrix-chars 40000

``--llama-quantize`` adds a peer row per type: the same model exported by fourbit at f16 (the least rounded
source llama.cpp's quantizer takes from fourbit's writer), quantized by llama.cpp's own quantizer
(``llama_model_quantize`` through llama-cpp-python, no importance matrix, as ``llama-quantize`` runs by default),
and scored exactly as fourbit's file (transformers' GGUF loader, the same text and windows), with each file's
tensor types read back by the ``gguf`` package's reader and the tensors whose types differ listed.
``--imatrix-chars N`` adds rows quantized with an importance matrix (llama-imatrix's statistic, the mean squared
input of each linear layer, computed by ``fourbit.models.export.importance_matrix`` on N characters of other text
than the scored one): fourbit's export with ``importance=`` (what ``fourbit export --imatrix-text`` does) and,
with ``--llama-quantize``, llama.cpp's quantizer given the same matrix.
llama-cpp-python is this benchmark's opponent only, never a dependency of fourbit.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_line  # noqa: E402
from _timing import load_average  # noqa: E402

#: fourbit's ``--type`` -> llama.cpp's ``llama_ftype`` enum name in llama_cpp.
LLAMA_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
#: transformers' module path inside a decoder layer -> llama.cpp's tensor name inside ``blk.N``.
GGUF_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
#: Where ``--imatrix-chars`` takes its calibration text in ``reference_text`` (past every scored slice used here).
IMATRIX_OFFSET = 100_000
LLAMA_MISSING = ("bench_export_quality.py: --llama-quantize needs llama-cpp-python, which is not importable "
                 "(pip install llama-cpp-python: the bench extra)")
#: llama.cpp's log lines while it quantizes (kept from the last call), and the ctypes callback that collects them
#: (held here so it is not garbage collected while llama.cpp holds its address).
_LLAMA_LOG: list[str] = []
_LLAMA_LOG_CALLBACK = None


def _score(model, tokenizer, text: str, windows: int) -> float:
    import torch

    from fourbit.generate import perplexity

    with torch.no_grad():
        return perplexity(model, tokenizer, text, window=512, max_windows=windows)


def _tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name of a GGUF file, as the ``gguf`` package's reader sees it."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _count(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in types.values():
        counts[name] = counts.get(name, 0) + 1
    return counts


def _score_file(path: Path, tokenizer, text: str, windows: int) -> float:
    """Read ``path`` back with transformers' GGUF loader (an independent dequantizer) and score it."""
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    return _score(loaded, tokenizer, text, windows)


def _export_and_score(model, tokenizer, source, gguf_type: str, text: str, windows: int, folder: Path,
                      per_tensor: bool = False, importance: dict | None = None) -> dict:
    """Export ``model`` as ``gguf_type`` (weighted by ``importance`` where given), read it back with transformers
    and score it: one result row."""
    from fourbit.models.export import export_gguf

    t0 = time.perf_counter()
    result = export_gguf(model, tokenizer, folder / f"m-{gguf_type}.gguf", gguf_type=gguf_type, modelfile=False,
                         source_gguf=source, importance=importance)
    seconds = time.perf_counter() - t0
    ppl = _score_file(result.path, tokenizer, text, windows)
    row = {"type": gguf_type, "imatrix": importance is not None, "perplexity": round(ppl, 3), "MiB": round(result.bytes / 2**20, 1),
           "export_s": round(seconds, 1), "tensor_types": result.tensor_types}
    if per_tensor:
        row["per_tensor"] = _tensor_types(result.path)
    result.path.unlink()
    return row


def _llama_cpp():
    """llama-cpp-python's low-level module, or None where it is not importable (it is no fourbit dependency)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _importance(model, tokenizer, text: str) -> dict:
    """llama-imatrix's importance matrix on ``text``, computed by fourbit's library (``importance_matrix``, windows
    of 512 tokens): GGUF tensor name -> the mean of each input column's squared activation."""
    from fourbit.models.export import importance_matrix

    return importance_matrix(model, tokenizer, text)[0]


def _imatrix_array(llama_cpp, imatrix: dict):
    """``imatrix`` as llama.cpp's NULL-terminated ``llama_model_imatrix_data`` array, and the buffers it points to."""
    import numpy as np

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []
    for i, (name, values) in enumerate(imatrix.items()):
        entry = entries[i]  # shares the array's memory
        data = np.ascontiguousarray(values, dtype=np.float32)
        keep += [data, name.encode()]
        entry.name, entry.size = keep[-1], data.size
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), (entries, keep)


def _llama_quantize(llama_cpp, src: Path, dst: Path, gguf_type: str, imatrix: dict | None = None) -> tuple[int, float]:
    """Quantize ``src`` to ``dst`` with llama.cpp's own quantizer: (return code, seconds); its log in _LLAMA_LOG."""
    global _LLAMA_LOG_CALLBACK
    if _LLAMA_LOG_CALLBACK is None:
        _LLAMA_LOG_CALLBACK = llama_cpp.llama_log_callback(
            lambda level, text, user_data: _LLAMA_LOG.append(text.decode("utf-8", "replace")))
    llama_cpp.llama_log_set(_LLAMA_LOG_CALLBACK, ctypes.c_void_p(0))
    _LLAMA_LOG.clear()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[gguf_type])
    params.nthread = int(os.environ.get("OMP_NUM_THREADS") or 2)  # 1 where the machine is shared
    if imatrix:
        params.imatrix, _buffers = _imatrix_array(llama_cpp, imatrix)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    return int(rc), time.perf_counter() - t0


def _llama_cpp_rows(llama_cpp, model, tokenizer, source, types: list[str], text: str, windows: int,
                    folder: Path, imatrix: dict | None = None) -> dict:
    """fourbit's f16 export of ``model`` quantized by llama.cpp once per type (and once more with ``imatrix``
    where given), each scored as fourbit's own file."""
    from fourbit.models.export import export_gguf

    src = export_gguf(model, tokenizer, folder / "m-f16-source.gguf", gguf_type="f16", modelfile=False,
                      source_gguf=source).path
    out = {"version": getattr(llama_cpp, "__version__", "?"), "source": "fourbit f16 export",
           "source_perplexity": round(_score_file(src, tokenizer, text, windows), 3), "results": []}
    weighted = [(t, imatrix) for t in types if t in ("q4_0", "q4_k_m")] if imatrix else []
    for gguf_type, matrix in [(t, None) for t in types] + weighted:
        dst = folder / f"llama-{gguf_type}.gguf"
        rc, seconds = _llama_quantize(llama_cpp, src, dst, gguf_type, matrix)
        row = {"type": gguf_type, "imatrix": matrix is not None, "rc": rc, "quantize_s": round(seconds, 1),
               "fallbacks": sum("falling back" in line for line in _LLAMA_LOG)}
        if rc != 0 or not dst.exists():
            row["error"] = "".join(_LLAMA_LOG[-5:]).strip() or f"llama_model_quantize returned {rc}"
        else:
            row.update(perplexity=round(_score_file(dst, tokenizer, text, windows), 3),
                       MiB=round(dst.stat().st_size / 2**20, 1), per_tensor=_tensor_types(dst))
            dst.unlink()
        out["results"].append(row)
    src.unlink()
    return out


def _compare(llama: dict, rows: list[dict], reference: float) -> None:
    """Add vs_float, the type counts and the tensors whose type differs from fourbit's file to each llama.cpp row."""
    llama["source_vs_float"] = round(llama["source_perplexity"] / reference - 1, 4)
    fourbit = {(r["type"], r["imatrix"]): r for r in rows}
    for row in llama["results"]:
        if "perplexity" not in row:
            continue
        row["vs_float"] = round(row["perplexity"] / reference - 1, 4)
        mine, theirs = fourbit[row["type"], False]["per_tensor"], row.pop("per_tensor")
        row["tensor_types"] = _count(theirs)
        row["differs_from_fourbit"] = {n: [mine.get(n), theirs.get(n)] for n in sorted(set(mine) | set(theirs))
                                       if mine.get(n) != theirs.get(n)}
    for row in rows:
        row.pop("per_tensor", None)


def _print_report(report: dict) -> None:
    rows, reference = report["results"], report["float_perplexity"]
    print(f"{report['model']}; {report['cpu']}; load {report['load_average']}")
    print(f"{'NF4' if report['nf4'] else 'float'} model: perplexity {reference:.3f} ({report['windows']} windows of "
          f"512 tokens, {report['chars']} chars from {report['offset']})")
    print(f"{'type':8} {'perplexity':>10} {'vs float':>9} {'MiB':>7} {'export s':>9}  tensors")
    if "imatrix_chars" in report:
        print(f"(+im: weighted by an importance matrix from {report['imatrix_chars']} characters of reference_text "
              f"from {IMATRIX_OFFSET}, the mean squared input of each linear layer, as llama-imatrix computes it)")
    for r in rows:
        label = r["type"] + ("+im" if r["imatrix"] else "")
        print(f"{label:8} {r['perplexity']:10.3f} {100 * r['vs_float']:+8.1f}% {r['MiB']:7.1f} "
              f"{r['export_s']:9.1f}  {_types_line(r['tensor_types'])}")
    if "llama_cpp" in report:
        _print_llama(report["llama_cpp"], rows)
        print(f"load average after: {report['load_average_after']}")


def _types_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))


def _print_llama(llama: dict, rows: list[dict]) -> None:
    """The llama.cpp rows beside fourbit's for the same type, and where the two files' tensor types differ."""
    fourbit = {(r["type"], r["imatrix"]): r for r in rows}
    print(f"\nllama.cpp's quantizer (llama-cpp-python {llama['version']}, llama_model_quantize) on "
          f"{llama['source']}: source perplexity {llama['source_perplexity']:.3f} "
          f"({100 * llama['source_vs_float']:+.1f}% vs the model)")
    print(f"{'type':8} {'llama.cpp':>10} {'vs float':>9} {'fourbit':>10} {'vs float':>9} {'MiB':>7} "
          f"{'quant s':>8}  tensors (llama.cpp's file)")
    if "imatrix_chars" in llama:
        print(f"(+im: with an importance matrix from {llama['imatrix_chars']} characters of reference_text from "
              f"{IMATRIX_OFFSET}, the mean squared input of each linear layer, as llama-imatrix computes it)")
    for r in llama["results"]:
        mine, label = fourbit[r["type"], r["imatrix"]], r["type"] + ("+im" if r["imatrix"] else "")
        if "error" in r:
            print(f"{label:8} llama.cpp failed (return code {r['rc']}): {r['error']}")
            continue
        print(f"{label:8} {r['perplexity']:10.3f} {100 * r['vs_float']:+8.1f}% {mine['perplexity']:10.3f} "
              f"{100 * mine['vs_float']:+8.1f}% {r['MiB']:7.1f} {r['quantize_s']:8.1f}  "
              f"{_types_line(r['tensor_types'])} ({r['fallbacks']} fallbacks)")
        differs = r["differs_from_fourbit"]
        same = "the same as in fourbit's file" if not differs else f"differ from fourbit's at {len(differs)} tensors"
        print(f"{'':8} tensor types {same}"
              + "".join(f"; {n}: fourbit {a}, llama.cpp {b}" for n, (a, b) in list(differs.items())[:8])
              + (f"; ... {len(differs) - 8} more" if len(differs) > 8 else ""))


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
    parser.add_argument("--llama-quantize", action="store_true",
                        help="also quantize fourbit's f16 export with llama.cpp's own quantizer (llama-cpp-python) "
                             "for each type and score it the same way")
    parser.add_argument("--imatrix-chars", type=int, default=0,
                        help=f"also quantize each 4-bit type with an importance matrix from this many characters of "
                             f"reference_text from character {IMATRIX_OFFSET} (not the scored text); with "
                             f"--llama-quantize, llama.cpp's quantizer too")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    llama_cpp = _llama_cpp() if args.llama_quantize else None
    if args.llama_quantize and llama_cpp is None:
        sys.exit(LLAMA_MISSING)
    if args.imatrix_chars and args.offset + args.chars > IMATRIX_OFFSET:
        sys.exit(f"bench_export_quality.py: --imatrix-chars needs scored text ending before character "
                 f"{IMATRIX_OFFSET} (--offset + --chars)")
    if args.imatrix_chars and llama_cpp is not None and not hasattr(llama_cpp, "llama_model_imatrix_data"):
        sys.exit(f"bench_export_quality.py: --imatrix-chars needs a llama-cpp-python with llama_model_imatrix_data "
                 f"(0.3.36 has it); this is {getattr(llama_cpp, '__version__', '?')}")
    if args.llama_quantize and set(types) - set(LLAMA_FTYPES):
        sys.exit(f"bench_export_quality.py: --llama-quantize: --types {','.join(sorted(set(types) - set(LLAMA_FTYPES)))}"
                 f" not one of {', '.join(LLAMA_FTYPES)}")

    import torch

    from fourbit.generate import reference_text
    from fourbit.models import QuantConfig, bundled_model_path, load_model

    source = Path(args.model) if args.model else bundled_model_path()
    gguf_source = source if source.suffix == ".gguf" else None
    quant = QuantConfig(compute_dtype="fp32") if args.nf4 else None
    model, tokenizer = load_model(str(source), quant=quant, torch_dtype=torch.float32)
    model.eval()
    text = reference_text(args.offset + args.chars)[args.offset:]
    reference = _score(model, tokenizer, text, args.windows)
    rows = []
    report = {"cpu": cpu_line(), "load_average": load_average(), "model": str(source), "chars": args.chars,
              "offset": args.offset, "nf4": args.nf4, "windows": args.windows,
              "float_perplexity": round(reference, 3), "results": rows}
    imatrix = _importance(model, tokenizer, reference_text(IMATRIX_OFFSET + args.imatrix_chars)[
        IMATRIX_OFFSET:]) if args.imatrix_chars else None
    if imatrix:
        report["imatrix_chars"] = args.imatrix_chars
    weighted = [t for t in types if t in ("q4_0", "q4_k_m")] if imatrix else []
    with tempfile.TemporaryDirectory(prefix="fourbit-bench-quality-") as folder:
        for gguf_type, matrix in [(t, None) for t in types] + [(t, imatrix) for t in weighted]:
            row = _export_and_score(model, tokenizer, gguf_source, gguf_type, text, args.windows, Path(folder),
                                    per_tensor=args.llama_quantize, importance=matrix)
            row["vs_float"] = round(row["perplexity"] / reference - 1, 4)
            rows.append(row)
        if llama_cpp is not None:
            report["llama_cpp"] = _llama_cpp_rows(llama_cpp, model, tokenizer, gguf_source, types, text,
                                                  args.windows, Path(folder), imatrix)
            if imatrix:
                report["llama_cpp"]["imatrix_chars"] = args.imatrix_chars
            _compare(report["llama_cpp"], rows, reference)
    report["load_average_after"] = load_average()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    _print_report(report)


if __name__ == "__main__":
    main()
