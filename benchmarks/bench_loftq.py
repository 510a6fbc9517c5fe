"""LoftQ's starting point on the bundled SmolLM2-135M-Instruct (not a test): how far ``Q + s·B·A`` starts from
the float weight W, per layer, against plain NF4 (``Q`` alone, B = 0), for LoftQ with T = 1, 2 and 4 iterations.

    python benchmarks/bench_loftq.py                 # r = 16, NF4 + double quantization, every linear layer
    python benchmarks/bench_loftq.py --rank 64 --iters 1,5 --json
    python benchmarks/bench_loftq.py --decoder-layers 4       # the first four decoder layers only
    python benchmarks/bench_loftq.py --finetune --steps 30 --loftq-iter 4   # the three inits fine-tuned (issue 22)

The relative error ``||W - W0||_F / ||W||_F`` of each starting weight W0 is printed per projection type (median
and range over the 30 layers) and overall; ``--json`` prints every layer. The weights are the bundled GGUF's
(dequantized Q8_0/Q4_1 by transformers' GGUF loader: the float model a user would start from).

``--finetune`` (issue 22): the same model fine-tuned on the demo's dates task (words -> ISO 8601, 512 training
dates, 48 held-out ones, the quality part of ``bench_finetune.py``: chat format, r=16 alpha=32 dropout 0.05 on all
linear layers, batch 8, lr 1e-3 cosine, fp32 compute, ``--steps`` steps, seed 0) from three starting points,
each through ``load_for_training`` + ``train`` as ``fourbit finetune`` runs them:

* ``default``: NF4 + double quantization, peft's init (A Kaiming-uniform, B = 0): QLoRA;
* ``loftq``: the same NF4 + DQ base computed with LoftQ (``--init-lora-weights loftq --loftq-iter N``);
* ``16-bit``: LoRA on the float model (``--quant none``), the reference QLoRA is compared against.

For each: the starting weights' relative error ``||W - (Q + s·B·A)||_F / ||W||_F`` per targeted layer (median
and range; 0 for the float model), and before and after training the dates task's exact match (greedy answer
equal to the ISO date, teacher-forced, as the demo scores it), the held-out dates' eval loss (after), and the
perplexity of held-out plain text (``--ppl-docs`` pydoc help topics, each cut to ``--ppl-len`` tokens, text none
of the runs trains on: how far each model has moved from the float model's language modelling). The gap closed
is ``(loftq - default) / (16-bit - default)`` for each metric.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from _machine import cpu_line

from fourbit.models import load_model
from fourbit.nn.loftq import loftq_decompose
from fourbit.quant import dequantize_4bit, quantize_4bit


def layer_errors(weight: torch.Tensor, rank: int, iters: list[int]) -> dict[str, float]:
    """Relative Frobenius error of plain NF4 and of LoftQ at each iteration count, for one weight."""
    w = weight.detach().float()
    norm = w.norm()
    packed, state = quantize_4bit(w, "nf4", 64, True)
    out = {"nf4": float((w - dequantize_4bit(packed, state, torch.float32)).norm() / norm)}
    for t in iters:
        q_packed, q_state, big_l, big_r = loftq_decompose(w, rank, t)
        start = dequantize_4bit(q_packed, q_state, torch.float32) + big_l @ big_r
        out[f"loftq T={t}"] = float((w - start).norm() / norm)
    return out


# ------------------------------------------------------------------------------------------ --finetune
INITS = {"default": {"quant": "nf4"}, "loftq": {"quant": "nf4", "init_lora_weights": "loftq"},
         "16-bit": {"quant": "none"}}


def _float_weights() -> dict[str, torch.Tensor]:
    """W of every linear layer but the head, from the float model the runs start from."""
    model, _ = load_model(quant=None, torch_dtype=torch.float32)
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


@torch.no_grad()
def starting_errors(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """``||W - W0|| / ||W||`` per layer of ``reference``, W0 the weight ``model`` starts training from: the
    dequantized base plus the adapter's update (``s·B·A``) for a LoRA layer, the dequantized weight of a 4-bit
    layer that has no adapter yet (B = 0 adds nothing), the weight itself otherwise."""
    from fourbit.nn.linear4bit import frozen_weight
    from fourbit.nn.lora import LoRALinear, lora_modules

    wrapped = lora_modules(model)
    out = {}
    for name, w in reference.items():
        layer = wrapped.get(name) or model.get_submodule(name)
        if isinstance(layer, LoRALinear):
            start = frozen_weight(layer.base, torch.float32) + layer.delta_weight()
        else:
            start = frozen_weight(layer, torch.float32)
        out[name] = float((w - start).norm() / w.norm())
    return out


@torch.no_grad()
def text_perplexity(model: torch.nn.Module, tok, docs: list[str], max_len: int) -> float:
    """exp of the mean next-token loss over ``docs``, each cut to its first ``max_len`` tokens."""
    model.eval()
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([tok(doc, add_special_tokens=False)["input_ids"][:max_len]])
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total, count = total + float(loss), count + ids.shape[1] - 1
    return math.exp(total / count)


def _held_out_docs(n: int) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics) if len(topics[k]) > 2000][:n]


def _finetune_one(init: str, args, work: Path, reference: dict, docs: list[str]) -> dict:
    """One init: load, measure the start, train, measure again."""
    from fourbit.demo.finetune import greedy_exact_match
    from fourbit.train.config import TrainConfig
    from fourbit.train.loading import load_for_training
    from fourbit.train.tasks import date_examples
    from fourbit.train.trainer import train

    train_ex = date_examples(512, seed=0)
    held = date_examples(48, seed=1, exclude={e.answer for e in train_ex})
    cfg = TrainConfig(data=str(work / "data" / "train.jsonl"), eval_data=str(work / "data" / "eval.jsonl"),
                      out=str(work / init), overwrite=True, format="chat", max_length=96, max_steps=args.steps,
                      batch_size=8, gradient_accumulation_steps=1, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                      learning_rate=1e-3, lr_scheduler="cosine", warmup_ratio=0.1, compute_dtype="fp32",
                      eval_steps=0, save_steps=0, seed=0, progress=False, loftq_iter=args.loftq_iter,
                      **INITS[init])
    t0 = time.perf_counter()
    model, tok = load_for_training(cfg)
    row = {"init": init, "load_s": time.perf_counter() - t0}
    errors = starting_errors(model, reference)
    row["start_error_median"] = statistics.median(errors.values())
    row["exact_match_before"] = sum(greedy_exact_match(model, tok, held)) / len(held)
    row["text_ppl_before"] = text_perplexity(model, tok, docs, args.ppl_len)
    t0 = time.perf_counter()
    res = train(cfg, model, tok, log=lambda *_: None)
    row.update(train_s=time.perf_counter() - t0, steps=res.steps, tokens_per_s=res.tokens_per_s,
               train_loss=res.train_loss, eval_loss=res.eval.get("eval_loss"), eval_ppl=res.eval.get("eval_ppl"))
    row["exact_match_after"] = sum(greedy_exact_match(model, tok, held)) / len(held)
    row["text_ppl_after"] = text_perplexity(model, tok, docs, args.ppl_len)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return {"row": row, "errors": errors}


def run_finetune(args) -> dict:
    """The three inits, same data, seed and steps; the gap LoftQ closes per metric."""
    from fourbit.demo.finetune import _write_jsonl
    from fourbit.train.tasks import date_examples, to_chat_records

    work = Path(args.workdir)
    train_ex = date_examples(512, seed=0)
    held = date_examples(48, seed=1, exclude={e.answer for e in train_ex})
    _write_jsonl(work / "data" / "train.jsonl", to_chat_records(train_ex))
    _write_jsonl(work / "data" / "eval.jsonl", to_chat_records(held))
    reference, docs = _float_weights(), _held_out_docs(args.ppl_docs)
    runs = {init: _finetune_one(init, args, work, reference, docs) for init in INITS}
    rows = {k: v["row"] for k, v in runs.items()}
    gap = {}
    for metric in ("exact_match_after", "eval_loss", "text_ppl_after", "text_ppl_before", "start_error_median"):
        d, lq, full = (rows[k][metric] for k in INITS)
        gap[metric] = (lq - d) / (full - d) if full != d else None
    return {"cpu": cpu_line(), "threads": args.threads, "steps": args.steps, "loftq_iter": args.loftq_iter,
            "load_average": os.getloadavg(), "rows": list(rows.values()), "gap_closed": gap,
            "errors": {k: v["errors"] for k, v in runs.items() if k != "16-bit"}}


def _finetune_report(result: dict) -> str:
    cols = ("init", "start_error_median", "exact_match_before", "exact_match_after", "eval_loss", "eval_ppl",
            "text_ppl_before", "text_ppl_after", "train_s", "tokens_per_s")
    lines = [f"dates task, {result['steps']} steps per init, LoftQ T={result['loftq_iter']}",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    lines.append("share of the default -> 16-bit gap LoftQ closes: " + ", ".join(
        f"{k} {v:.2f}" if v is not None else f"{k} (no gap)" for k, v in result["gap_closed"].items()))
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for init, errors in result["errors"].items():
        for name, value in errors.items():
            by_kind[name.rsplit(".", 1)[-1]][init].append(value)
    lines.append("starting error per projection, median [min, max] over layers: " + "; ".join(
        f"{kind}: " + ", ".join(f"{i} {statistics.median(v):.4f} [{min(v):.4f}, {max(v):.4f}]" for i, v in e.items())
        for kind, e in by_kind.items()))
    lines.append(f"CPU: {result['cpu']}; threads {result['threads']}; load average at the end {result['load_average']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", default="1,2,4", help="comma-separated LoftQ iteration counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoder-layers", type=int, default=None, help="only the first N decoder layers (a quick look)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--finetune", action="store_true", help="fine-tune the three inits on the dates task")
    ap.add_argument("--steps", type=int, default=30, help="--finetune: optimizer steps per init")
    ap.add_argument("--loftq-iter", type=int, default=4, help="--finetune: LoftQ's T")
    ap.add_argument("--ppl-docs", type=int, default=16, help="--finetune: held-out text documents")
    ap.add_argument("--ppl-len", type=int, default=256, help="--finetune: tokens per held-out document")
    ap.add_argument("--workdir", default="/tmp/fourbit_bench_loftq")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.finetune:
        result = run_finetune(args)
        print(json.dumps(result, indent=1) if args.json else _finetune_report(result))
        return 0
    iters = [int(t) for t in args.iters.split(",")]
    model, _ = load_model(quant=None, torch_dtype=torch.float32)
    rows, t0 = {}, time.perf_counter()
    for name, module in model.named_modules():
        layer = next((int(p) for p in name.split(".") if p.isdigit()), 0)
        if args.decoder_layers is not None and layer >= args.decoder_layers:
            continue
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            rows[name] = layer_errors(module.weight, args.rank, iters)
    seconds = time.perf_counter() - t0
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, errors in rows.items():
        for method, value in errors.items():
            by_kind[name.rsplit(".", 1)[-1]][method].append(value)
            by_kind["all layers"][method].append(value)
    methods = list(next(iter(rows.values())))
    if args.json:
        print(json.dumps({"cpu": cpu_line(), "rank": args.rank, "seconds": seconds, "layers": rows}, indent=1))
        return 0
    print(f"relative error ||W - W0|| / ||W|| of the starting weight, r={args.rank}, {len(rows)} layers "
          f"(median [min, max])")
    print(f"{'layer':>12} " + " ".join(f"{m:>26}" for m in methods))
    for kind, errors in by_kind.items():
        cells = [f"{statistics.median(v):.4f} [{min(v):.4f}, {max(v):.4f}]" for v in errors.values()]
        print(f"{kind:>12} " + " ".join(f"{c:>26}" for c in cells))
    overall = by_kind["all layers"]
    for m in methods[1:]:
        ratio = statistics.median(a / b for a, b in zip(overall[m], overall["nf4"], strict=True))
        print(f"{m}: median error {ratio:.3f}x plain NF4's")
    print(f"{seconds:.1f} s for all LoftQ decompositions; CPU: {cpu_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
