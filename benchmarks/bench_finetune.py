"""Fine-tuning benchmark on the bundled SmolLM2-135M-Instruct (not a test).

Part ``quality``: QLoRA (NF4 + double quant base) vs LoRA (fp32 base) on the date -> ISO demo task, same data,
seed and steps: held-out eval loss and exact match.

Part ``speed`` (issue 11): ``fourbit finetune`` itself, the real CLI in a subprocess on its default path, against
transformers + bitsandbytes + peft, at batch B x T (default 4 x 256), in both compute dtypes (fp32, bf16) for
both sides, with and without gradient checkpointing: tokens/s (real, non-padding tokens; median over the steps
after one warm-up step), seconds per step, peak RSS and the first step's loss. Ratios are against the peer at its
own faster compute dtype (by tokens/s) with the same gradient-checkpointing setting. Target: tokens/s ratio
>= 1.5, peak-RSS ratio <= 0.8.

Part ``long``: batch 1 x 2048 (``--long-len``) with gradient checkpointing, both sides, at each side's faster
compute dtype (taken from the speed part of the same run; without it, bf16 on CPUs with native bf16 (AMX /
AVX512-BF16), else fp32), or ``--long-dtypes fp32|bf16|both``; fourbit under each checkpointing policy of
``--long-policies`` (default: ``auto``, its default, which recomputes rows this long in full, and
``keep-matmuls``). Target:
peak-RSS ratio <= 0.6.

Part ``dpo`` (issue 22): preference training at ``--batch`` pairs per step, prompt + reply cut to ``--seq-len``
tokens, in each compute dtype: ``fourbit finetune --task dpo`` (the CLI; tokens/s counts the chosen and the
rejected sequences; its reference pass, the base with the adapter off once per pair, is timed from its log and
also counted in "tokens/s with reference"), ``fourbit finetune`` supervised on the same texts (each pair's two
sequences as plain-text records, twice the batch, unpacked), and TRL's ``DPOTrainer`` on the bitsandbytes model
with peft LoRA given as ``peft_config`` (its reference is the same model with the adapter off, one extra
forward per step, TRL's default), each step timed by a callback. The pairs come from the same pydoc topics:
prompt = a document's first 1.9 x ``--seq-len`` characters (about 0.4 of the tokens), chosen = its next
1.4 x ``--seq-len`` characters, rejected = the next document's. Targets:
fourbit DPO >= 0.5x its supervised tokens/s; >= 1.5x TRL's tokens/s (reference pass included) at <= 0.8x its
peak RSS.

Part ``dora`` (issue 22): the speed part's workload and settings with LoRA and with DoRA on each side
(``fourbit finetune --use-dora``; bitsandbytes + peft ``LoraConfig(use_dora=True)``), in each compute dtype,
gradient checkpointing off (``--dora-gc``: on); ratios from the same run: DoRA / LoRA on each side and fourbit's
DoRA / peft's DoRA.

Workload: plain text, deterministic, no download: the help texts of ``pydoc_data.topics`` split into documents
of at most ~3,000 characters (one JSONL record ``{"text": ...}`` each, written to ``--workdir``), which
fourbit's packing (``packing: true``) bins into rows of ``--seq-len`` tokens.

fourbit side: ``python -m fourbit finetune <fp32 export> --data topics.jsonl --out DIR --overwrite --format text
--packing --max-length T --batch-size B --gradient-accumulation-steps 1 --max-steps steps+1 --lora-r 16
--lora-alpha 16 --eval-fraction 0 --save-steps 0 --eval-steps 0 --no-progress --compute-dtype
{fp32,bf16} [--gradient-checkpointing] --json``; everything else at its default (LoRA dropout 0.1, the QLoRA
paper's, on both sides unless ``--lora-dropout`` says otherwise; optimizer ``adamw``, fourbit's
32-bit AdamW, lr 2e-4, weight decay 0, max_grad_norm 0.3, chunked loss). ``--gradient-accumulation-steps 1`` so
that one optimizer step is one B x T batch, as on the peer side. tokens/s and the step time come from the run's
``metrics.jsonl`` (``tokens_per_s`` of each step, as the trainer measures it: collation, forward, backward,
clipping and the optimizer step). Peak RSS is that CLI process's ``ru_maxrss``, read by a small stdlib-only
worker process that starts it (one worker per configuration, so each number belongs to one configuration).

Peer side: transformers ``AutoModelForCausalLM`` (fp32), every linear but ``lm_head`` replaced by bitsandbytes
``Linear4bit`` (NF4, double quant, the given compute dtype), ``peft.prepare_model_for_kbit_training`` and peft LoRA
(r=16, alpha=16, the same dropout, all-linear), fed the same batches: the same argv parsed by fourbit's CLI parser into
the same ``TrainConfig``, tokenized and packed by ``fourbit.train.trainer.prepare_data`` + ``BatchPlan`` (same
seed, same order) + ``collate(packed=True)``, and the peer's own loss ``model(input_ids=, position_ids=,
labels=).loss`` (transformers' mean cross-entropy), ``loss.backward()``, clipping at the same max_grad_norm and
``torch.optim.AdamW`` with the same lr, betas, eps and weight decay (constant lr; fourbit warms up over its
default warmup_ratio, which does not change the speed), bf16 autocast for bf16. Step time is timed the same way
(collation to optimizer step). Peak RSS is the worker's own VmHWM.

Fairness: same batches and tokens, same LoRA config, same clipping and optimizer hyper-parameters, threads pinned
to ``--threads`` on both sides (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``NUMBA_NUM_THREADS`` for the CLI,
``torch.set_num_threads`` for the peer), each configuration in its own process, the peer compared at its faster
compute dtype.

    python benchmarks/bench_finetune.py                       # all parts, defaults below (slow: 16+ runs)
    python benchmarks/bench_finetune.py --part speed --steps 8 --batch 4 --seq-len 256 --json
    python benchmarks/bench_finetune.py --part long --steps 2 --long-dtypes both
    python benchmarks/bench_finetune.py --part dpo --steps 4 --batch 2 --seq-len 256
    python benchmarks/bench_finetune.py --part dora --steps 3 --batch 2 --seq-len 128 --compute-dtype fp32
    python benchmarks/bench_finetune.py --part speed --steps 1 --batch 1 --seq-len 64 --compute-dtype fp32  # smoke

Other processes on the machine share the cores: compare ratios measured in the same run, not absolute numbers
across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_info, cpu_line, peak_rss_mb  # noqa: E402

CACHE = Path(os.environ.get("FOURBIT_BENCH_CACHE", "/tmp/fourbit_bench_cache")) / "smollm2-fp32"
FOURBIT, PEER = "fourbit finetune", "bnb+peft"
DOC_CHARS = 3000  # documents of the workload: help topics split into paragraph groups of at most this many characters


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


# ------------------------------------------------------------------------------------------ workload

def _documents() -> list[str]:
    """The help topics of ``pydoc_data.topics`` (sorted by name), long ones split into groups of paragraphs of at
    most ``DOC_CHARS`` characters (a single longer paragraph stays whole)."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        cur = ""
        for para in topics[name].split("\n\n"):
            if not para.strip():
                continue
            if cur and len(cur) + 2 + len(para) > DOC_CHARS:
                docs.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para
        if cur.strip():
            docs.append(cur)
    return docs


def _write_data(workdir: Path) -> Path:
    path = workdir / "data" / "topics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"text": d}) + "\n" for d in _documents())
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def _finetune_argv(folder: Path, data: Path, out: Path, *, dtype: str, gc: bool, batch: int, seq_len: int,
                   steps: int, policy: str | None = None, dropout: str | None = None, dora: bool = False) -> list[str]:
    """The ``fourbit finetune`` arguments of one configuration (both sides parse them into a TrainConfig).
    ``dropout`` None leaves LoRA dropout at fourbit's default (the QLoRA paper's 0.1): the number users get;
    ``dora`` adds ``--use-dora``."""
    return ["finetune", str(folder), "--data", str(data), "--out", str(out), "--overwrite", "--format", "text",
            "--packing", "--max-length", str(seq_len), "--batch-size", str(batch),
            "--gradient-accumulation-steps", "1", "--max-steps", str(steps + 1), "--lora-r", "16",
            "--lora-alpha", "16", "--eval-fraction", "0", "--save-steps", "0",
            "--eval-steps", "0", "--no-progress", "--compute-dtype", dtype,
            "--gradient-checkpointing" if gc else "--no-gradient-checkpointing", "--json"] + (
                ["--gradient-checkpointing-policy", policy] if policy else []) + (
                ["--lora-dropout", dropout] if dropout is not None else []) + (["--use-dora"] if dora else [])


def _collect_worker(cmd: list[str], row: dict, threads: int) -> dict:
    """Run one benchmark worker process and add its JSON result (or its error) to ``row``."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(threads))
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip()[-600:]
    else:
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(row), file=sys.stderr)
    return row


def _thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, NUMBA_NUM_THREADS=n)


# ------------------------------------------------------------------------------------------ workers

def _fourbit_worker(args) -> dict:
    """Run the CLI as this (small, torch-free) process's only child; its peak RSS is RUSAGE_CHILDREN's maxrss."""
    folder, data = CACHE, Path(args.workdir) / "data" / "topics.jsonl"
    out = Path(args.workdir) / "runs" / (f"fourbit-{args.compute_dtype}-gc{int(args.gc)}-{args.batch}x{args.seq_len}"
                                         f"-{args.policy or 'default'}{'-dora' if args.dora else ''}")
    argv = _finetune_argv(folder, data, out, dtype=args.compute_dtype, gc=args.gc, batch=args.batch,
                          seq_len=args.seq_len, steps=args.steps, policy=args.policy, dropout=args.lora_dropout,
                          dora=args.dora)
    return _cli_run(argv, out, args.threads)


def _cli_run(argv: list[str], out: Path, threads: int) -> dict:
    """``python -m fourbit ARGV`` as this process's only child: tokens/s and step time from its metrics.jsonl
    (median over the steps after the first), its peak RSS, and (preference runs) the time of its reference
    pass, read from its log."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fourbit", *argv], capture_output=True, text=True,
                          env=_thread_env(threads))
    run_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        raise RuntimeError(f"fourbit finetune exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    from fourbit.train.metrics import read_metrics

    recs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("tokens_per_s") is not None]
    recs.sort(key=lambda r: r["step"])
    step_tokens = [r["tokens"] - (recs[i - 1]["tokens"] if i else 0) for i, r in enumerate(recs)]
    timed = [(n, r["tokens_per_s"]) for n, r in zip(step_tokens, recs, strict=True)][1:] or \
        [(step_tokens[0], recs[0]["tokens_per_s"])]
    return {"tokens_per_s": statistics.median(t for _, t in timed),
            "step_s": statistics.median(n / t for n, t in timed),
            "tokens_per_step": statistics.median(n for n, _ in timed), "peak_rss_mb": peak,
            "first_loss": recs[0]["loss"], "steps_timed": len(recs) - 1, "n_docs": summary.get("n_train"),
            "n_truncated": summary.get("n_truncated"), "run_s": run_s, **_reference_time(proc.stderr, recs)}


def _reference_time(log: str, recs: list[dict]) -> dict:
    """A preference run's reference pass (seconds, from its log line) and its tokens/s with that pass counted:
    all tokens over the time of all steps plus the pass."""
    import re

    found = re.search(r"reference log-probs of \d+ pairs .* in ([\d.]+) s", log)
    if not found:
        return {}
    ref_s = float(found.group(1))
    total_s = sum((r["tokens"] - (recs[i - 1]["tokens"] if i else 0)) / r["tokens_per_s"] for i, r in enumerate(recs))
    return {"reference_s": ref_s, "tokens_per_s_with_reference": recs[-1]["tokens"] / (total_s + ref_s)}


def _bnb_model(folder: Path, gc: bool, dtype: str, dropout: float, *, wrap: bool = True, dora: bool = False):
    """transformers + bitsandbytes Linear4bit (NF4, DQ, the given compute dtype) + peft LoRA, on CPU (``wrap``
    False: without the LoRA, for a trainer that adds it; ``dora``: peft's DoRA, ``LoraConfig(use_dora=True)``)."""
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
    if not wrap:
        return model
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout,
                                                      target_modules="all-linear", use_dora=dora))


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _peer_worker(args) -> dict:
    """The peer in this process, on the batches fourbit's data code makes from the same TrainConfig."""
    import contextlib

    import torch
    from transformers import AutoTokenizer

    from fourbit.cli import build_parser
    from fourbit.train.batching import BatchPlan, collate
    from fourbit.train.config import config_from_args
    from fourbit.train.trainer import prepare_data, seed_everything

    torch.set_num_threads(args.threads)
    folder, data = CACHE, Path(args.workdir) / "data" / "topics.jsonl"
    out = Path(args.workdir) / "runs" / "peer-unused"
    ns = build_parser().parse_args(_finetune_argv(folder, data, out, dtype=args.compute_dtype, gc=args.gc,
                                                  batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                                                  dropout=args.lora_dropout, dora=args.dora))
    config = config_from_args(ns, config_file=None, model=ns.model_pos)
    seed_everything(config.seed)
    t0 = time.perf_counter()
    model = _bnb_model(folder, config.gradient_checkpointing, config.compute_dtype, config.lora_dropout,
                       dora=config.use_dora)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:  # as fourbit.train.loading.load_for_training
        tok.pad_token = tok.eos_token
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_ds, _ = prepare_data(config, tok)
    stream = BatchPlan(train_ds.examples, config.batch_size, seed=config.seed, max_length=config.max_length,
                       packing=config.packing, group_by_length=config.group_by_length).iterate()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                            eps=config.adam_epsilon, weight_decay=config.weight_decay)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.compute_dtype == "bf16"
                else contextlib.nullcontext())
    walls, tokens, losses = [], [], []
    for _ in range(config.max_steps):
        t0 = time.perf_counter()
        _, _, rows = next(stream)
        b = collate(rows, pad_id, packed=True)
        with autocast:
            loss = model(input_ids=b.input_ids, position_ids=b.position_ids, labels=b.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)
        tokens.append(b.n_tokens)
        losses.append(float(loss))
    timed = list(zip(tokens, walls, strict=True))[1:] or [(tokens[0], walls[0])]
    return {"tokens_per_s": statistics.median(n / w for n, w in timed), "step_s": statistics.median(w for _, w in timed),
            "tokens_per_step": statistics.median(n for n, _ in timed), "peak_rss_mb": peak_rss_mb(),
            "first_loss": losses[0], "steps_timed": len(timed) if len(walls) > 1 else 0,
            "n_docs": len(train_ds), "n_truncated": train_ds.n_truncated, "load_s": load_s}


# ------------------------------------------------------------------------------------------ speed and long parts

def _run_config(args, impl: str, dtype: str, gc: bool, batch: int, seq_len: int, policy: str | None = None,
                dora: bool = False) -> dict:
    """One configuration in its own worker process (``policy``: fourbit's gradient-checkpointing policy, None
    for its default; ``dora``: DoRA instead of LoRA, on either side)."""
    cmd = [sys.executable, __file__, "--_worker", "fourbit" if impl == FOURBIT else "peer", "--compute-dtype", dtype,
           "--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(args.steps), "--threads",
           str(args.threads), "--workdir", str(args.workdir)] + (["--gc"] if gc else []) + (
               ["--policy", policy] if policy else []) + (
               ["--lora-dropout", args.lora_dropout] if args.lora_dropout is not None else []) + (
               ["--dora"] if dora else [])
    row = {"impl": impl if not policy else f"{impl} ({policy})", "dtype": dtype, "gc": gc,
           "batch x len": f"{batch}x{seq_len}"}
    return _collect_worker(cmd, row, args.threads)


def _faster(rows: list[dict], impl: str, gc: bool) -> dict | None:
    """The row of ``impl`` with the given gc setting at its faster compute dtype (highest tokens/s)."""
    return max((r for r in rows if r["impl"] == impl and r["gc"] == gc and "error" not in r),
               key=lambda r: r["tokens_per_s"], default=None)


def _ratio(ours: dict, peer: dict) -> dict:
    return {"fourbit dtype": ours["dtype"], "gc": ours["gc"], "batch x len": ours["batch x len"],
            "peer dtype (its faster)": peer["dtype"],
            "tokens/s fourbit/peer": ours["tokens_per_s"] / peer["tokens_per_s"],
            "peak RSS fourbit/peer": ours["peak_rss_mb"] / peer["peak_rss_mb"]}


def run_speed(args) -> tuple[list[dict], list[dict]]:
    dtypes = ("fp32", "bf16") if args.compute_dtype == "both" else (args.compute_dtype,)
    rows = [_run_config(args, impl, dtype, gc, args.batch, args.seq_len)
            for dtype in dtypes for gc in (False, True) for impl in (FOURBIT, PEER)]
    ratios = []
    for gc in (False, True):
        peer = _faster(rows, PEER, gc)
        ratios += [_ratio(r, peer) for r in rows
                   if peer and r["impl"] == FOURBIT and r["gc"] == gc and "error" not in r]
    return rows, ratios


def _native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["simd_flags"]))


def run_long(args, speed_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """batch 1 x --long-len with gradient checkpointing, each side at its faster dtype (or --long-dtypes)."""
    rows = []
    for impl in (FOURBIT, PEER):
        if args.long_dtypes == "both":
            dtypes = ("fp32", "bf16")
        elif args.long_dtypes in ("fp32", "bf16"):
            dtypes = (args.long_dtypes,)
        else:  # faster: from this run's speed part (gc on), else the CPU's native bf16
            best = _faster(speed_rows, impl, True)
            dtypes = (best["dtype"] if best else ("bf16" if _native_bf16() else "fp32"),)
        policies = args.long_policies.split(",") if impl == FOURBIT else [None]
        rows += [_run_config(args, impl, dtype, True, 1, args.long_len, policy) for dtype in dtypes
                 for policy in policies]
    peer = _faster(rows, PEER, True)
    ratios = [dict(_ratio(r, peer), fourbit=r["impl"]) for r in rows
              if peer and r["impl"].startswith(FOURBIT) and "error" not in r]
    return rows, ratios


# ------------------------------------------------------------------------------------------ DoRA part
def run_dora(args) -> tuple[list[dict], list[dict]]:
    """LoRA and DoRA, each on both sides (``fourbit finetune [--use-dora]``, bitsandbytes + peft
    ``LoraConfig(use_dora=...)``), the speed part's workload at ``--batch`` x ``--seq-len``, in each dtype,
    gradient checkpointing as ``--dora-gc`` says; ratios from the same run."""
    dtypes = ("fp32", "bf16") if args.compute_dtype == "both" else (args.compute_dtype,)
    rows = [{"method": "DoRA" if dora else "LoRA",
             **_run_config(args, impl, dtype, args.dora_gc, args.batch, args.seq_len, dora=dora)}
            for dtype in dtypes for dora in (False, True) for impl in (FOURBIT, PEER)]
    ok = {(r["impl"], r["dtype"], r["method"]): r for r in rows if "error" not in r}
    peer_best = max((r for r in ok.values() if r["impl"] == PEER and r["method"] == "DoRA"),
                    key=lambda r: r["tokens_per_s"], default=None)
    ratios = []
    for dtype in dtypes:
        pairs = {"fourbit DoRA / fourbit LoRA": ((FOURBIT, "DoRA"), (FOURBIT, "LoRA")),
                 "peft DoRA / peft LoRA": ((PEER, "DoRA"), (PEER, "LoRA")),
                 "fourbit DoRA / peft DoRA, same dtype": ((FOURBIT, "DoRA"), (PEER, "DoRA"))}
        for label, ((i1, m1), (i2, m2)) in pairs.items():
            a, b = ok.get((i1, dtype, m1)), ok.get((i2, dtype, m2))
            if a and b:
                ratios.append({"comparison": label, "dtype": dtype, "tokens/s ratio": a["tokens_per_s"] / b["tokens_per_s"],
                               "peak RSS ratio": a["peak_rss_mb"] / b["peak_rss_mb"]})
        mine = ok.get((FOURBIT, dtype, "DoRA"))
        if mine and peer_best and peer_best["dtype"] != dtype:
            ratios.append({"comparison": f"fourbit DoRA / peft DoRA at its faster dtype ({peer_best['dtype']})",
                           "dtype": dtype, "tokens/s ratio": mine["tokens_per_s"] / peer_best["tokens_per_s"],
                           "peak RSS ratio": mine["peak_rss_mb"] / peer_best["peak_rss_mb"]})
    return rows, ratios


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


# ------------------------------------------------------------------------------------------ preference (DPO) part
# Pairs from the same pydoc topics: the prompt is the start of a document, the chosen reply its continuation and
# the rejected reply the continuation of the next document. The supervised run trains on the same texts: each
# pair's two sequences (prompt + chosen, prompt + rejected) as plain-text records, unpacked, twice the batch.
PROMPT_CHARS, REPLY_CHARS = 1.9, 1.4  # per token of --seq-len (~4.5 characters a token: ~0.4 and ~0.3 of it)


def _pair_files(workdir: Path, n_pairs: int, seq_len: int) -> tuple[Path, Path]:
    folder = workdir / "data"
    return folder / f"pairs-{n_pairs}x{seq_len}.jsonl", folder / f"pair-texts-{n_pairs}x{seq_len}.jsonl"


def _write_pairs(workdir: Path, n_pairs: int, seq_len: int) -> tuple[Path, Path]:
    p_chars, r_chars = int(PROMPT_CHARS * seq_len), int(REPLY_CHARS * seq_len)
    docs = [d for d in _documents() if len(d) >= p_chars + r_chars]
    pairs = []
    for i in range(n_pairs):
        doc, other = docs[i % len(docs)], docs[(i + 1) % len(docs)]
        pairs.append({"prompt": doc[:p_chars], "chosen": doc[p_chars:p_chars + r_chars],
                      "rejected": other[p_chars:p_chars + r_chars]})
    pairs_path, texts_path = _pair_files(workdir, n_pairs, seq_len)
    pairs_path.parent.mkdir(parents=True, exist_ok=True)
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    texts_path.write_text("".join(json.dumps({"text": p["prompt"] + p[k]}) + "\n" for p in pairs
                                  for k in ("chosen", "rejected")), encoding="utf-8")
    return pairs_path, texts_path


def _pairs_argv(args, task: str, out: Path) -> list[str]:
    """``fourbit finetune`` on the pairs (``task`` dpo) or on their texts (``task`` causal, twice the batch)."""
    pairs, texts = _pair_files(Path(args.workdir), args.batch * (args.steps + 1), args.seq_len)
    data = pairs if task == "dpo" else texts
    batch = args.batch if task == "dpo" else 2 * args.batch
    return ["finetune", str(CACHE), "--task", task, "--data", str(data), "--out", str(out), "--overwrite",
            "--format", "text", "--max-length", str(args.seq_len), "--batch-size", str(batch),
            "--gradient-accumulation-steps", "1", "--max-steps", str(args.steps + 1), "--lora-r", "16",
            "--lora-alpha", "16", "--eval-fraction", "0", "--save-steps", "0", "--eval-steps", "0",
            "--no-progress", "--compute-dtype", args.compute_dtype, "--json"] + (
                ["--lora-dropout", args.lora_dropout] if args.lora_dropout is not None else [])


def _fourbit_pairs_worker(args, task: str) -> dict:
    out = Path(args.workdir) / "runs" / f"fourbit-{task}-pairs-{args.compute_dtype}"
    return _cli_run(_pairs_argv(args, task, out), out, args.threads)


def _peer_dpo_worker(args) -> dict:
    """TRL's DPOTrainer on the bitsandbytes 4-bit model, peft LoRA given as ``peft_config`` (so that TRL's
    reference is the same model with the adapter off, as fourbit's), the same pairs, batch, length and
    optimizer settings; each step timed by a callback, its tokens counted in the collator."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    dropout = 0.1 if args.lora_dropout is None else float(args.lora_dropout)
    model = _bnb_model(CACHE, False, args.compute_dtype, dropout, wrap=False)
    tok = AutoTokenizer.from_pretrained(CACHE)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    pairs, _ = _pair_files(Path(args.workdir), args.batch * (args.steps + 1), args.seq_len)
    rows = [json.loads(line) for line in pairs.open(encoding="utf-8")]
    config = DPOConfig(output_dir=str(Path(args.workdir) / "runs" / "peer-dpo"), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, max_steps=args.steps + 1, learning_rate=2e-4,
                       lr_scheduler_type="constant", max_grad_norm=0.3, beta=0.1, max_length=args.seq_len,
                       use_cpu=True, bf16=args.compute_dtype == "bf16", report_to=[], save_strategy="no",
                       logging_steps=1, seed=0, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout,
                                                target_modules="all-linear"))
    tokens, walls = [], []
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class _Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            walls.append(time.perf_counter() - self.t0)

    trainer.data_collator = counting
    trainer.add_callback(_Timer())
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timed = list(zip(tokens, walls, strict=False))[1:]
    return {"tokens_per_s": statistics.median(n / w for n, w in timed), "step_s": statistics.median(w for _, w in timed),
            "tokens_per_step": statistics.median(n for n, _ in timed), "peak_rss_mb": peak_rss_mb(),
            "first_loss": losses[0] if losses else None, "steps_timed": len(timed)}


def run_dpo(args) -> tuple[list[dict], list[dict]]:
    """fourbit DPO, fourbit supervised on the same texts, TRL + bitsandbytes + peft DPO, in each dtype."""
    _write_pairs(Path(args.workdir), args.batch * (args.steps + 1), args.seq_len)
    dtypes = ("fp32", "bf16") if args.compute_dtype == "both" else (args.compute_dtype,)
    rows = []
    for dtype in dtypes:
        for worker, impl in (("fourbit-dpo", f"{FOURBIT} dpo"), ("fourbit-sft", f"{FOURBIT} sft, same texts"),
                             ("peer-dpo", "trl+bnb+peft dpo")):
            rows.append(_run_worker(args, worker, impl, dtype))
    ratios = []
    peer = max((r for r in rows if r["impl"].startswith("trl") and "error" not in r),
               key=lambda r: r["tokens_per_s"], default=None)
    for dtype in dtypes:
        dpo = next((r for r in rows if r["impl"] == f"{FOURBIT} dpo" and r["dtype"] == dtype and "error" not in r), None)
        sft = next((r for r in rows if r["impl"].endswith("same texts") and r["dtype"] == dtype and "error" not in r),
                   None)
        if dpo is None:
            continue
        ratio = {"fourbit dtype": dtype, "dpo/sft tokens/s (step)": sft and dpo["tokens_per_s"] / sft["tokens_per_s"],
                 "dpo/sft tokens/s (with reference pass)": sft and dpo["tokens_per_s_with_reference"] / sft["tokens_per_s"]}
        if peer is not None:
            ratio.update({"peer dtype (its faster)": peer["dtype"],
                          "tokens/s fourbit/trl (with reference pass)": dpo["tokens_per_s_with_reference"]
                          / peer["tokens_per_s"],
                          "peak RSS fourbit/trl": dpo["peak_rss_mb"] / peer["peak_rss_mb"]})
        ratios.append(ratio)
    return rows, ratios


def _run_worker(args, worker: str, impl: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--_worker", worker, "--compute-dtype", dtype, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", str(args.threads), "--workdir",
           str(args.workdir)] + (["--lora-dropout", args.lora_dropout] if args.lora_dropout is not None else [])
    row = {"impl": impl, "dtype": dtype, "gc": False, "batch x len": f"{args.batch} pairs x {args.seq_len}"}
    return _collect_worker(cmd, row, args.threads)


SPEED_COLUMNS = (("impl", "impl"), ("dtype", "dtype"), ("gc", "gc"), ("batch x len", "batch x len"),
                 ("tokens_per_s", "tokens/s"), ("step_s", "step s"), ("peak_rss_mb", "peak RSS MB"),
                 ("first_loss", "first loss"), ("tokens_per_step", "tokens/step"), ("steps_timed", "timed steps"))


def _table(title: str, rows: list[dict], columns: tuple[tuple[str, str], ...] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    columns = columns or tuple((k, k) for k in dict.fromkeys(k for r in rows for k in r))
    for _, label in columns:
        table.add_column(label, justify="right")
    for r in rows:
        cells = []
        for k, _ in columns:
            v = r.get(k, "error" if "error" in r and k not in ("impl", "dtype", "gc", "batch x len") else "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        table.add_row(*cells)
    Console(width=200).print(table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "quality", "speed", "long", "dpo", "dora"), default="all")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per speed configuration (+1 warm-up)")
    ap.add_argument("--compute-dtype", choices=("fp32", "bf16", "both"), default="both",
                    help="compute dtypes of the speed part (both sides)")
    ap.add_argument("--long-len", type=int, default=2048, help="tokens of the long-context row (batch 1, gc on)")
    ap.add_argument("--long-dtypes", choices=("faster", "fp32", "bf16", "both"), default="faster",
                    help="long context: each side at its faster dtype (from the speed part of this run, else "
                         "bf16 on CPUs with native bf16), or the given dtype(s)")
    ap.add_argument("--long-policies", default="auto,keep-matmuls",
                    help="long context: fourbit's --gradient-checkpointing-policy values to run, comma-separated")
    ap.add_argument("--quality-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/fourbit_bench_finetune")
    ap.add_argument("--lora-dropout", default=None,
                    help="LoRA dropout on both sides (default: fourbit's default, 0.1, what users get; give 0 for "
                         "the no-dropout configuration, labelled as such)")
    ap.add_argument("--dora-gc", action="store_true", help="DoRA part: with gradient checkpointing (default off)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dora", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_worker", choices=("fourbit", "peer", "fourbit-dpo", "fourbit-sft", "peer-dpo"), default=None,
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:  # the fourbit worker stays torch-free: the CLI child's ru_maxrss must be the CLI's own
        workers = {"fourbit": _fourbit_worker, "peer": _peer_worker, "peer-dpo": _peer_dpo_worker,
                   "fourbit-dpo": lambda a: _fourbit_pairs_worker(a, "dpo"),
                   "fourbit-sft": lambda a: _fourbit_pairs_worker(a, "causal")}
        print(json.dumps(workers[args._worker](args)))
        return 0
    args.workdir = str(Path(args.workdir).resolve())
    result: dict = {"cpu": cpu_line(), "threads": args.threads, "load_average": os.getloadavg(),
                    "lora_dropout": "default" if args.lora_dropout is None else args.lora_dropout}
    if args.part in ("all", "quality"):
        import torch

        torch.set_num_threads(args.threads)
        result["quality"] = run_quality(args)
    if args.part in ("all", "speed", "long", "dpo", "dora"):
        _export_fp32()
        data = _write_data(Path(args.workdir))
        result["workload"] = {"data": str(data), "documents": sum(1 for _ in data.open(encoding="utf-8"))}
    if args.part in ("all", "speed"):
        result["speed"], result["ratios"] = run_speed(args)
    if args.part in ("all", "long"):
        result["long"], result["long_ratios"] = run_long(args, result.get("speed", []))
    if args.part in ("all", "dpo"):
        result["dpo"], result["dpo_ratios"] = run_dpo(args)
    if args.part in ("all", "dora"):
        result["dora"], result["dora_ratios"] = run_dora(args)
    result["load_average_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    _table("QLoRA vs LoRA on dates -> ISO (same data, seed, steps)", result.get("quality", []))
    dropout = "0.1 (default)" if args.lora_dropout is None else args.lora_dropout
    _table(f"fine-tuning speed, batch {args.batch}x{args.seq_len} packed pydoc topics, r=16 all-linear, LoRA "
           f"dropout {dropout}, {args.steps} timed steps (+1 warm-up)", result.get("speed", []), SPEED_COLUMNS)
    _table("ratios against the peer at its faster compute dtype, same gc (target: tokens/s >= 1.5, RSS <= 0.8)",
           result.get("ratios", []))
    _table(f"long context, batch 1x{args.long_len}, gradient checkpointing", result.get("long", []), SPEED_COLUMNS)
    _table("long context ratios against the peer at its faster dtype (target: RSS <= 0.6)",
           result.get("long_ratios", []))
    _table(f"preference training (DPO), {args.batch} pairs (2 x {args.batch} sequences) of at most {args.seq_len} "
           "tokens per step, r=16 all-linear", result.get("dpo", []), SPEED_COLUMNS + (
               ("reference_s", "reference pass s"), ("tokens_per_s_with_reference", "tokens/s with reference")))
    _table("DPO ratios (target: dpo/sft >= 0.5; fourbit/trl tokens/s >= 1.5 at RSS <= 0.8)", result.get("dpo_ratios", []))
    _table(f"DoRA against LoRA, batch {args.batch}x{args.seq_len} packed pydoc topics, r=16 all-linear, "
           f"{args.steps} timed steps (+1 warm-up)", result.get("dora", []),
           SPEED_COLUMNS[:1] + (("method", "method"),) + SPEED_COLUMNS[1:])
    _table("DoRA ratios (same run)", result.get("dora_ratios", []))
    for r in result.get("speed", []) + result.get("long", []) + result.get("dpo", []) + result.get("dora", []):
        if "error" in r:
            print(f"error in {r['impl']} {r['dtype']} gc={r['gc']} {r['batch x len']}: {r['error']}")
    if "workload" in result:
        print(f"workload: {result['workload']['documents']} documents in {result['workload']['data']}")
    print(f"CPU: {result['cpu']}")
    print(f"threads={args.threads}, load average at start {result['load_average']}, at end "
          f"{result['load_average_end']} (shared machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
