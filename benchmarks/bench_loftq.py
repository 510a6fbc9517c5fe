"""LoftQ's starting point on the bundled SmolLM2-135M-Instruct (not a test): how far ``Q + s·B·A`` starts from
the float weight W, per layer, against plain NF4 (``Q`` alone, B = 0), for LoftQ with T = 1, 2 and 4 iterations.

    python benchmarks/bench_loftq.py                 # r = 16, NF4 + double quantization, every linear layer
    python benchmarks/bench_loftq.py --rank 64 --iters 1,5 --json
    python benchmarks/bench_loftq.py --decoder-layers 4       # the first four decoder layers only
    python benchmarks/bench_loftq.py --finetune --steps 30 --loftq-iter 4   # the three inits fine-tuned (issue 22)
    python benchmarks/bench_loftq.py --finetune --steps 24 --seeds 3        # ... at training seeds 0, 1, 2

The relative error ``||W - W0||_F / ||W||_F`` of each starting weight W0 is printed per projection type (median
and range over the 30 layers) and overall; ``--json`` prints every layer. The weights are the bundled GGUF's
(dequantized Q8_0/Q4_1 by transformers' GGUF loader: the float model a user would start from).

``--finetune`` (issue 22): the same model fine-tuned on the demo's dates task (words -> ISO 8601, 512 training
dates, 48 held-out ones, the quality part of ``bench_finetune.py``: chat format, r=16 alpha=32 dropout 0.05 on all
linear layers, batch 8, lr 1e-3 cosine, fp32 compute, ``--steps`` steps, seed 0 unless ``--seeds``) from three
starting points, each through ``load_for_training`` + ``train`` as ``fourbit finetune`` runs them:

* ``default``: NF4 + double quantization, peft's init (A Kaiming-uniform, B = 0): QLoRA;
* ``loftq``: the same NF4 + DQ base computed with LoftQ (``--init-lora-weights loftq --loftq-iter N``);
* ``16-bit``: LoRA on the float model (``--quant none``), the reference QLoRA is compared against.

For each: the starting weights' relative error ``||W - (Q + s·B·A)||_F / ||W||_F`` per targeted layer (median
and range; 0 for the float model), and before and after training the dates task's exact match (greedy answer
equal to the ISO date, teacher-forced, as the demo scores it), the held-out dates' eval loss (after), and the
perplexity of held-out plain text (``--ppl-docs`` pydoc help topics, each cut to ``--ppl-len`` tokens, text none
of the runs trains on: how far each model has moved from the float model's language modelling). The gap closed
is ``(loftq - default) / (16-bit - default)`` for each metric.

``--seeds N`` repeats the three inits for training seeds 0..N-1 (``TrainConfig.seed``: adapter init, dropout,
batch order) and draws a new sample of 512 training dates per seed (seed 0 keeps the dates above; seed s > 0
draws with data seed 1000 + s); the 48 held-out dates stay the same for every seed and are excluded from every
training sample. LoftQ's starting model (deterministic: its SVD is seeded apart from the run, and ``train``
reseeds) is computed once and copied for the later seeds, so their ``load_s`` is the copy's. It prints every
run, then mean ± sample std over the seeds per init and metric, and the gap closed on the means and per seed.
``--inits loftq`` runs a subset (to time one init before a long run).
"""

from __future__ import annotations

import argparse
import copy
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


def _date_splits(seeds: int) -> tuple[list, dict[int, list]]:
    """The 48 held-out dates (fixed: seed 1, disjoint from seed 0's training sample, as the single-seed run
    drew them) and, per training seed s, 512 training dates drawn with data seed ``_data_seed(s)`` and the
    held-out answers excluded, so every training sample is disjoint from the held-out set."""
    from fourbit.train.tasks import date_examples

    held = date_examples(48, seed=1, exclude={e.answer for e in date_examples(512, seed=0)})
    held_answers = {e.answer for e in held}
    return held, {s: date_examples(512, seed=_data_seed(s), exclude=held_answers) for s in range(seeds)}


def _data_seed(seed: int) -> int:
    """Training seed 0 keeps the single-seed run's training dates (data seed 0); later seeds draw new ones
    (data seed 1000 + s, away from the held-out split's seed 1)."""
    return 0 if seed == 0 else 1000 + seed


def _finetune_one(init: str, seed: int, args, work: Path, shared: dict) -> dict:
    """One init at one training seed: load, measure the start, train, measure again."""
    from fourbit.demo.finetune import greedy_exact_match
    from fourbit.train.config import TrainConfig
    from fourbit.train.loading import load_for_training
    from fourbit.train.trainer import train

    held, reference, docs = shared["held"], shared["reference"], shared["docs"]
    cfg = TrainConfig(data=str(work / "data" / "train.jsonl"), eval_data=str(work / "data" / "eval.jsonl"),
                      out=str(work / init), overwrite=True, format="chat", max_length=96, max_steps=args.steps,
                      batch_size=8, gradient_accumulation_steps=1, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                      learning_rate=1e-3, lr_scheduler="cosine", warmup_ratio=0.1, compute_dtype="fp32",
                      eval_steps=0, save_steps=0, seed=seed, progress=False, loftq_iter=args.loftq_iter,
                      **INITS[init])
    t0 = time.perf_counter()
    if init == "loftq" and "loftq" in shared:  # LoftQ's start does not depend on the seed (train() reseeds)
        model, tok = copy.deepcopy(shared["loftq"])
    else:
        model, tok = load_for_training(cfg)
        if init == "loftq" and args.seeds > 1:
            shared["loftq"] = copy.deepcopy((model, tok))
    row = {"seed": seed, "init": init, "load_s": time.perf_counter() - t0}
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
    row["load_average"] = os.getloadavg()[0]
    print(json.dumps(row), file=sys.stderr, flush=True)
    return {"row": row, "errors": errors}


GAP_METRICS = ("exact_match_after", "eval_loss", "text_ppl_after", "text_ppl_before", "start_error_median")


def gap_closed(values: dict[str, float]) -> float | None:
    """``(loftq - default) / (16-bit - default)``: the share of the default -> 16-bit gap LoftQ closes."""
    if any(values.get(k) is None for k in INITS):
        return None
    d, lq, full = (values[k] for k in INITS)
    return (lq - d) / (full - d) if full != d else None


def run_finetune(args) -> dict:
    """The three inits at each training seed 0..seeds-1, same held-out set and steps; the gap LoftQ closes per
    metric, per seed and on the means over seeds."""
    from fourbit.demo.finetune import _write_jsonl
    from fourbit.train.tasks import to_chat_records

    held, train_sets = _date_splits(args.seeds)
    shared = {"held": held, "reference": _float_weights(), "docs": _held_out_docs(args.ppl_docs)}
    rows, errors, load_averages = [], {}, [os.getloadavg()]
    for seed, train_ex in train_sets.items():
        work = Path(args.workdir) / (f"seed{seed}" if args.seeds > 1 else "")
        _write_jsonl(work / "data" / "train.jsonl", to_chat_records(train_ex))
        _write_jsonl(work / "data" / "eval.jsonl", to_chat_records(held))
        for init in args.inits.split(","):
            run = _finetune_one(init, seed, args, work, shared)
            rows.append(run["row"])
            if seed == 0 and init != "16-bit":
                errors[init] = run["errors"]
        load_averages.append(os.getloadavg())
    return {"cpu": cpu_line(), "threads": args.threads, "steps": args.steps, "loftq_iter": args.loftq_iter,
            "seeds": args.seeds, "data_seeds": [_data_seed(s) for s in range(args.seeds)],
            "load_averages": load_averages, "rows": rows, **summarize(rows), "errors": errors}


def summarize(rows: list[dict]) -> dict:
    """Mean and sample std over seeds per init and metric; the gap closed per seed and on the means."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["init"]): r for r in rows}
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    metrics = [m for m in rows[0] if m not in ("seed", "init") and isinstance(rows[0][m], (int, float))]
    summary = {}
    for init in inits:
        summary[init] = {}
        for m in metrics:
            vals = [by[s, init][m] for s in seeds if by[s, init][m] is not None]
            summary[init][m] = {"mean": statistics.fmean(vals) if vals else None,
                                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    per_seed = {s: {m: gap_closed({i: by[s, i][m] for i in inits}) for m in GAP_METRICS} for s in seeds}
    on_means = {m: gap_closed({i: summary[i][m]["mean"] for i in inits}) for m in GAP_METRICS}
    return {"summary": summary, "gap_closed_per_seed": per_seed, "gap_closed": on_means}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _finetune_report(result: dict) -> str:
    cols = ("seed", "init", "start_error_median", "exact_match_before", "exact_match_after", "eval_loss",
            "eval_ppl", "text_ppl_before", "text_ppl_after", "train_s", "tokens_per_s")
    lines = [f"dates task, {result['steps']} steps per init, LoftQ T={result['loftq_iter']}, training seeds "
             f"0..{result['seeds'] - 1} (data seeds {result['data_seeds']}), 48 held-out dates (fixed)",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in result["rows"]]
    summary_cols = cols[2:]
    lines += ["", f"mean ± std over {result['seeds']} seed(s)", "| init | " + " | ".join(summary_cols) + " |",
              "|" + "---|" * (len(summary_cols) + 1)]
    for init, stats in result["summary"].items():
        lines.append(f"| {init} | " + " | ".join(
            f"{_fmt(stats[c]['mean'])} ± {_fmt(stats[c]['std'])}" if stats[c]["mean"] is not None else "-"
            for c in summary_cols) + " |")
    gaps = [("means", result["gap_closed"])] + [(f"seed {s}", g) for s, g in result["gap_closed_per_seed"].items()]
    lines += ["", "share of the default -> 16-bit gap LoftQ closes:"] + [f"  {label}: " + ", ".join(
        f"{k} {v:.2f}" if v is not None else f"{k} (no gap)" for k, v in g.items()) for label, g in gaps]
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for init, errors in result["errors"].items():
        for name, value in errors.items():
            by_kind[name.rsplit(".", 1)[-1]][init].append(value)
    lines.append("starting error per projection, median [min, max] over layers: " + "; ".join(
        f"{kind}: " + ", ".join(f"{i} {statistics.median(v):.4f} [{min(v):.4f}, {max(v):.4f}]" for i, v in e.items())
        for kind, e in by_kind.items()))
    lines.append(f"CPU: {result['cpu']}; threads {result['threads']}; load averages (1/5/15 min) at the start and "
                 f"after each seed {result['load_averages']}")
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
    ap.add_argument("--seeds", type=int, default=1, help="--finetune: training seeds 0..N-1 (each a new sample "
                    "of training dates after seed 0; the held-out dates stay fixed)")
    ap.add_argument("--inits", default=",".join(INITS), help="--finetune: comma-separated inits to run (a subset "
                    "times one; the gap needs all three)")
    ap.add_argument("--ppl-docs", type=int, default=16, help="--finetune: held-out text documents")
    ap.add_argument("--ppl-len", type=int, default=256, help="--finetune: tokens per held-out document")
    ap.add_argument("--workdir", default="/tmp/fourbit_bench_loftq")
    args = ap.parse_args()
    unknown = sorted(set(args.inits.split(",")) - set(INITS))
    if unknown or args.seeds < 1:
        ap.error(f"--inits: unknown {unknown}; choose from {list(INITS)}" if unknown else "--seeds: must be >= 1")
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
