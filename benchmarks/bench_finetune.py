"""Fine-tuning benchmark on the bundled SmolLM2-135M-Instruct (not a test).

Part 1 (quality): QLoRA (NF4 + double quant base) vs LoRA (fp32 base) on the date -> ISO demo task, same
data, seed and steps: held-out eval loss and exact match.
Part 2 (speed/memory): fourbit QLoRA vs transformers + bitsandbytes + peft QLoRA, batch B x T tokens, LoRA
r=16 on all linear layers, with and without gradient checkpointing, in each compute dtype: tokens/s (median
over steps after one warm-up step), CPU seconds per step and peak RSS. Each speed configuration runs in its own
process so that peak RSS is its own.

Both sides compute the same loss: the mean cross-entropy over every position from the full logits (the
peer's ``labels=`` path). fourbit's trainer computes it in chunks of the sequence, so it never holds the full
[tokens, vocab] logits; that saving is reported as its own row ("fourbit, chunked loss"), not folded into the
headline ratio.

    python benchmarks/bench_finetune.py                       # both parts, defaults below
    python benchmarks/bench_finetune.py --part speed --steps 8 --batch 4 --seq-len 256 --json

Threads are pinned (--threads, default 2). Other processes on the machine share the cores: compare ratios
measured in the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_line, peak_rss_mb  # noqa: E402

CACHE = Path(os.environ.get("FOURBIT_BENCH_CACHE", "/tmp/fourbit_bench_cache")) / "smollm2-fp32"


def _export_fp32() -> Path:
    """Load the bundled GGUF once and keep an fp32 HF folder, so that workers start fast."""
    if (CACHE / "config.json").is_file():
        return CACHE
    import torch

    from fourbit.models import load_model
    from fourbit.train.merge import plain_for_saving

    model, tok = load_model(quant=None, torch_dtype=torch.float32)
    plain_for_saving(model)
    tmp = CACHE.parent / f".tmp-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, CACHE)
    return CACHE



# ------------------------------------------------------------------------------------------ speed worker

def _fourbit_model(folder: Path, gc: bool, dtype: str):
    import torch

    from fourbit.models import QuantConfig, load_model
    from fourbit.nn.lora import LoRASpec, inject_lora
    from fourbit.train.prepare import prepare_model_for_training

    model, tok = load_model(folder, quant=QuantConfig(compute_dtype=dtype), torch_dtype=torch.float32)
    prepare_model_for_training(model, gradient_checkpointing=gc)
    inject_lora(model, LoRASpec(r=16, alpha=16, dropout=0.0))
    return model


def _bnb_model(folder: Path, gc: bool, dtype: str):
    """transformers + bitsandbytes Linear4bit (NF4, DQ, the given compute dtype) + peft LoRA, on CPU."""
    import bitsandbytes as bnb
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=_torch_dtype(dtype), quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to("cpu")
            if m.bias is not None:
                q.bias = torch.nn.Parameter(m.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    if gc:  # peft only enables it for models transformers itself loaded in k-bit; the layers were swapped here
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules="all-linear"))


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _speed_worker(impl: str, gc: bool, batch: int, seq_len: int, steps: int, dtype: str) -> dict:
    import contextlib

    import torch

    folder = _export_fp32()
    t_load = time.perf_counter()
    fourbit_side = impl.startswith("fourbit")
    model = _fourbit_model(folder, gc, dtype) if fourbit_side else _bnb_model(folder, gc, dtype)
    load_s = time.perf_counter() - t_load
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (batch, seq_len), generator=g)
    walls, cpus, losses = [], [], []
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())
    for _ in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            if impl == "fourbit, chunked loss":
                from fourbit.train.batching import Batch
                from fourbit.train.loss import causal_lm_loss

                b = Batch(ids, ids, torch.ones_like(ids), None, ids.numel())
                loss = causal_lm_loss(model, b, chunk_size=1024) / b.n_targets
            else:  # the same loss on both sides: full logits, mean cross-entropy (transformers' labels= path)
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        losses.append(float(loss))
    wall = statistics.median(walls[1:])
    return {"impl": impl, "compute_dtype": dtype, "gradient_checkpointing": gc, "batch": batch, "seq_len": seq_len, "steps": steps,
            "tokens_per_s": batch * seq_len / wall, "step_wall_s": wall, "step_cpu_s": statistics.median(cpus[1:]),
            "peak_rss_mb": peak_rss_mb(), "load_s": load_s, "first_loss": losses[0]}


IMPLS = ("fourbit", "fourbit, chunked loss", "bnb+peft")


def run_speed(args) -> list[dict]:
    _export_fp32()
    rows = []
    dtypes = ("fp32", "bf16") if args.compute_dtype == "both" else (args.compute_dtype,)
    for dtype in dtypes:
        for gc in (False, True):
            for impl in IMPLS:
                cmd = [sys.executable, __file__, "--_worker", impl, "--batch", str(args.batch), "--seq-len",
                       str(args.seq_len), "--steps", str(args.steps), "--threads", str(args.threads),
                       "--compute-dtype", dtype]
                if gc:
                    cmd.append("--gc")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append({"impl": impl, "compute_dtype": dtype, "gradient_checkpointing": gc,
                                 "error": proc.stderr.strip()[-400:]})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------ quality part
def run_quality(args) -> list[dict]:
    import copy

    import torch

    from fourbit.demo.finetune import _write_jsonl, greedy_exact_match
    from fourbit.models import QuantConfig, load_model, quantize_model
    from fourbit.train.config import TrainConfig
    from fourbit.train.tasks import date_examples, to_chat_records
    from fourbit.train.trainer import train

    folder = _export_fp32()
    work = Path(args.workdir)
    train_ex = date_examples(512, seed=0)
    held = date_examples(48, seed=1, exclude={e.answer for e in train_ex})
    _write_jsonl(work / "data" / "train.jsonl", to_chat_records(train_ex))
    _write_jsonl(work / "data" / "eval.jsonl", to_chat_records(held))
    base, tok = load_model(folder, quant=None, torch_dtype=torch.float32)
    rows = []
    for name in ("qlora-nf4-dq", "lora-fp32"):
        model = copy.deepcopy(base)
        if name.startswith("qlora"):
            quantize_model(model, QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="fp32"))
        em_before = sum(greedy_exact_match(model, tok, held)) / len(held)
        cfg = TrainConfig(data=str(work / "data" / "train.jsonl"), eval_data=str(work / "data" / "eval.jsonl"),
                          out=str(work / name), overwrite=True, format="chat", max_length=96,
                          max_steps=args.quality_steps, batch_size=8, gradient_accumulation_steps=1, lora_r=16,
                          lora_alpha=32, lora_dropout=0.05, learning_rate=1e-3, lr_scheduler="cosine",
                          warmup_ratio=0.1, compute_dtype="fp32", eval_steps=0, save_steps=0, seed=0,
                          progress=False, quant="nf4" if name.startswith("qlora") else "none")
        t0 = time.perf_counter()
        res = train(cfg, model, tok, log=lambda *_: None)
        em_after = sum(greedy_exact_match(model, tok, held)) / len(held)
        rows.append({"setup": name, "steps": res.steps, "eval_loss": res.eval.get("eval_loss"),
                     "exact_match_before": em_before, "exact_match_after": em_after,
                     "train_s": time.perf_counter() - t0, "tokens_per_s": res.tokens_per_s})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        table.add_row(*[f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys])
    Console(width=200).print(table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "quality", "speed"), default="all")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per speed configuration (+1 warm-up)")
    ap.add_argument("--compute-dtype", choices=("fp32", "bf16", "both"), default="both")
    ap.add_argument("--quality-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/fourbit_bench_finetune")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args._worker:
        print(json.dumps(_speed_worker(args._worker, args.gc, args.batch, args.seq_len, args.steps,
                                       args.compute_dtype)))
        return 0
    result: dict = {"cpu": cpu_line(), "threads": args.threads, "load_average": os.getloadavg()}
    if args.part in ("all", "quality"):
        result["quality"] = run_quality(args)
    if args.part in ("all", "speed"):
        result["speed"] = run_speed(args)
        by = {(r["impl"], r["compute_dtype"], r["gradient_checkpointing"]): r
              for r in result["speed"] if "error" not in r}
        peer_best = {gc: max((r for (impl, _, g), r in by.items() if impl == "bnb+peft" and g == gc),
                             key=lambda r: r["tokens_per_s"], default=None) for gc in (False, True)}
        for (impl, dtype, gc), ours in by.items():
            peer = peer_best[gc]
            if impl.startswith("fourbit") and peer:
                result.setdefault("ratios", []).append(
                    {"fourbit": impl, "compute_dtype": dtype, "gradient_checkpointing": gc,
                     "peer (its faster dtype)": peer["compute_dtype"],
                     "tokens_per_s fourbit/peer": ours["tokens_per_s"] / peer["tokens_per_s"],
                     "peak_rss fourbit/peer": ours["peak_rss_mb"] / peer["peak_rss_mb"]})
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _table("QLoRA vs LoRA on dates -> ISO (same data, seed, steps)", result.get("quality", []))
        _table(f"fine-tuning speed, batch {args.batch}x{args.seq_len}, r=16 all-linear", result.get("speed", []))
        _table("ratios against the peer at its faster compute dtype (same run)", result.get("ratios", []))
        print(f"CPU: {result['cpu']}")
        print(f"threads={args.threads}, load average at start {result['load_average']} (shared machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
