"""The README's first command: the whole QLoRA story on the bundled SmolLM2-135M-Instruct in a few minutes.

1. quantize the model to NF4 with double quantization and show its footprint and quality;
2. generate an answer with the 4-bit model;
3. QLoRA-fine-tune it briefly on a task it cannot do yet, and show exact-match accuracy before and after;
4. index a document the project ships and answer a question over it, with sources.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["run_demo"]


def _section(console, title: str) -> None:
    console.rule(f"[bold]{title}")


def run_demo(out_dir: Path, *, quick: bool = False) -> dict:
    """Run the demo, writing its artefacts (adapter, loss plot, index, summary.json) under ``out_dir``.

    Args:
        quick: a handful of training steps instead of a couple of minutes (smoke tests).

    Returns:
        A summary dict (also written to ``out_dir / "summary.json"``).
    """
    import torch
    from rich.console import Console

    from fourbit.cli.quant import footprint_table
    from fourbit.generate import generate, perplexity, reference_text
    from fourbit.models import QuantConfig, load_model, quantize_model

    console = Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    t_start = time.perf_counter()

    _section(console, "1. Quantize SmolLM2-135M-Instruct to NF4 + double quantization")
    model, tokenizer = load_model(quant=None)
    text = reference_text(12_000)
    ppl_before = perplexity(model, tokenizer, text, window=512, max_windows=2)
    fp = quantize_model(model, QuantConfig(), progress=True, measure_error=True)
    ppl_after = perplexity(model, tokenizer, text, window=512, max_windows=2)
    console.print(footprint_table(fp, "footprint"))
    console.print(f"perplexity on Python's docs: {ppl_before:.2f} unquantized -> {ppl_after:.2f} NF4")
    summary["footprint"] = fp.as_dict()
    summary["perplexity"] = {"unquantized": ppl_before, "nf4": ppl_after}

    _section(console, "2. Generate with the 4-bit model")
    question = "In one sentence, what is quantization of a neural network?"
    console.print(f"[bold]user:[/bold] {question}\n[bold]assistant:[/bold] ", end="")
    t0 = time.perf_counter()
    answer, n_tokens = generate(model, tokenizer, question, max_new_tokens=48, stream=True, return_num_tokens=True)
    seconds = time.perf_counter() - t0
    console.print(f"\n[dim]{n_tokens} tokens in {seconds:.1f} s ({n_tokens / seconds:.1f} tokens/s)[/dim]")
    summary["generation"] = {"answer": answer, "tokens_per_second": n_tokens / seconds}

    _section(console, "3. QLoRA fine-tuning through the frozen 4-bit model")
    from fourbit.demo.finetune import run_finetune_demo

    summary["finetune"] = run_finetune_demo(model, tokenizer, out_dir / "finetune",
                                            max_steps=8 if quick else None)

    _section(console, "4. Questions over a document with the 4-bit model")
    from fourbit.demo.rag import run_rag_demo
    from fourbit.nn.lora import unload_lora

    # The date adapter (saved under finetune/) knows one task; questions go to the base 4-bit model.
    unload_lora(model)
    model.eval()
    with torch.inference_mode():
        summary["rag"] = run_rag_demo(model, tokenizer, out_dir / "rag")

    summary["seconds"] = time.perf_counter() - t_start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    console.rule(f"demo finished in {summary['seconds']:.0f} s; artefacts in {out_dir}")
    return summary
