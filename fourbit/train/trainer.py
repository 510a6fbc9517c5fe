"""The training loop: LoRA/QLoRA on a causal LM (or a sequence classifier), with exact resume.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. The loss is the sum of token losses over
all micro-batches of the step divided by their total label-token count (so accumulation equals one big
batch), clipped at ``max_grad_norm``, then AdamW. Everything random is a function of ``seed`` (LoRA init,
dropout via the torch RNG, data order via :class:`BatchPlan`), and a checkpoint stores the RNG, optimizer,
scheduler step and data position, so an interrupted-and-resumed run reproduces the uninterrupted one
exactly on CPU (tested with exact float equality of the loss curve).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fourbit.nn.lora import (
    LoRASpec,
    inject_lora,
    lora_modules,
    lora_spec,
    mark_only_lora_trainable,
    trainable_parameters_report,
)

from .batching import Batch, BatchPlan, collate
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, save_config
from .data import EncodedDataset, encode_records, load_records, split_records
from .loss import causal_lm_loss
from .metrics import MetricsLog, plot_loss_curve
from .optimizers import build_optimizer
from .prepare import prepare_model_for_training
from .schedule import lr_factor

__all__ = ["TrainResult", "add_lora", "evaluate", "prepare_data", "seed_everything", "train"]

_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "metrics.jsonl",
            "loss_curve.png", "labels.json", "checkpoints")


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    steps: int
    train_loss: float | None
    eval: dict[str, float] = field(default_factory=dict)
    n_train: int = 0
    n_eval: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    tokens_per_s: float = 0.0
    resumed_from: int | None = None


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's RNGs (all randomness in fourbit's training goes through these)."""
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(config: TrainConfig, tokenizer: Any) -> tuple[EncodedDataset, EncodedDataset | None]:
    """Load, split and tokenize ``config.data`` (and ``config.eval_data``).

    Raises:
        ValueError: see :func:`load_records` and :func:`encode_records`.
    """
    if not config.data:
        raise ValueError("--data is required")
    records = load_records(config.data)
    if config.eval_data:
        train_rows, eval_rows = records, load_records(config.eval_data)
    else:
        train_rows, eval_rows = split_records(records, config.eval_fraction, config.seed)
    classify = config.task == "classify"
    kw = dict(format=config.format, max_length=config.max_length, train_on_inputs=config.train_on_inputs,
              text_column=config.text_column, label_column=config.label_column if classify else None)
    train_ds = encode_records(train_rows, tokenizer, source=str(config.data), **kw)
    eval_ds = None
    if eval_rows:
        eval_ds = encode_records(eval_rows, tokenizer, source=str(config.eval_data or config.data),
                                 label_names=train_ds.label_names or None, **kw)
    return train_ds, eval_ds


def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Prepare ``model`` for training and inject LoRA as ``config`` says (classification also trains
    the ``score`` head, saved as peft's ``modules_to_save``)."""
    prepare_model_for_training(model, gradient_checkpointing=config.gradient_checkpointing)
    saved = ("score",) if config.task == "classify" else ()
    if lora_modules(model):  # adapters already there (e.g. loaded): train them as they are
        spec = lora_spec(model)
        mark_only_lora_trainable(model, spec.modules_to_save if spec else saved)
    else:
        inject_lora(model, LoRASpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                    target_modules=config.target_module_list, use_rslora=config.use_rslora,
                                    modules_to_save=saved))
    return model


def _autocast(config: TrainConfig, model: nn.Module):
    device = next(model.parameters()).device
    if config.compute_dtype == "auto":
        from fourbit.models import QuantConfig

        use_bf16 = QuantConfig().resolved_compute_dtype(device) == torch.bfloat16
    else:
        use_bf16 = config.compute_dtype == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def _to(batch: Batch, device: torch.device) -> Batch:
    if batch.input_ids.device == device:
        return batch
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Batch(move(batch.input_ids), move(batch.labels), move(batch.attention_mask), move(batch.position_ids),
                 batch.n_tokens)


def _loss_sum(model: nn.Module, batch: Batch, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed loss, logits for classification / None)."""
    if config.task == "classify":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits.float(), batch.labels, reduction="sum"), logits
    return causal_lm_loss(model, batch, chunk_size=config.loss_chunk_size), None


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedDataset, config: TrainConfig, pad_id: int) -> dict[str, float]:
    """Mean loss per label token and perplexity (accuracy for classification) over ``data``.

    Runs in eval mode under ``no_grad`` and restores the training mode and the torch RNG state, so an
    evaluation between steps does not change the training that follows (tested).
    """
    was_training = model.training
    rng = torch.get_rng_state()
    model.eval()
    device = next(model.parameters()).device
    plan = BatchPlan(data.examples, config.eval_batch_size, shuffle=False)
    total = correct = 0.0
    count = 0
    try:
        for rows in plan.batches(0):
            batch = _to(collate(rows, pad_id, packed=False, classify=config.task == "classify"), device)
            with _autocast(config, model):
                loss, logits = _loss_sum(model, batch, config)
            total += float(loss)
            count += batch.n_targets
            if logits is not None:
                correct += float((logits.argmax(-1) == batch.labels).sum())
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    mean = total / max(count, 1)
    out = {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}
    if config.task == "classify":
        out["eval_accuracy"] = correct / max(count, 1)
    return out


def _check_out(out: Path, config: TrainConfig) -> Path | None:
    """Refuse to clobber another run; return the checkpoint to resume from (if resuming)."""
    if config.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: {out} holds no checkpoint to resume from")
        return ckpt
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise ValueError(f"output folder {out} already holds files (another run?); pass --overwrite to "
                             "replace it or --resume to continue it")
        for name in _OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def train(
    config: TrainConfig,
    model: nn.Module,
    tokenizer: Any,
    *,
    data: tuple[EncodedDataset, EncodedDataset | None] | None = None,
    stop_after: int | None = None,
    log: Any = None,
) -> TrainResult:
    """Fine-tune ``model`` (modified in place) and write adapter, config, metrics and plot to ``config.out``.

    Args:
        config: the resolved configuration (``out`` required).
        model: a transformers model, 4-bit or not, with or without LoRA layers already.
        tokenizer: its tokenizer.
        data: pre-tokenized (train, eval) data; default :func:`prepare_data`.
        stop_after: stop after this optimizer step without finishing (simulates an interruption in tests).
        log: callable for status lines (default: print).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: bad data, an output folder holding another run, nothing to resume.
    """
    from tqdm.auto import tqdm

    from fourbit.nn.adapters import save_adapter

    log = log or print
    if not config.out:
        raise ValueError("--out is required")
    out = Path(config.out)
    resume_from = _check_out(out, config)
    train_ds, eval_ds = data if data is not None else prepare_data(config, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    if train_ds.label_names:
        (out / "labels.json").write_text(json.dumps(train_ds.label_names) + "\n", encoding="utf-8")
    if train_ds.n_truncated or train_ds.n_dropped:
        log(f"truncated {train_ds.n_truncated} examples to max_length={config.max_length}; "
            f"dropped {train_ds.n_dropped} left without response tokens")

    seed_everything(config.seed)
    add_lora(model, config)
    log(trainable_parameters_report(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optim, params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if config.task == "classify" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    metrics = MetricsLog(out / "metrics.jsonl")
    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        state.pop("scheduler", None)
        metrics.truncate_after(state["step"])
        log(f"resumed from {resume_from} (step {state['step']})")
    elif metrics.path.exists():
        metrics.path.unlink()

    plan = BatchPlan(train_ds.examples, config.batch_size, seed=config.seed, max_length=config.max_length,
                     packing=config.packing, group_by_length=config.group_by_length)
    stream = plan.iterate(state["epoch"], state["batch"])
    device = next(model.parameters()).device
    classify = config.task == "classify"
    model.train()
    last_eval: dict[str, float] = {}
    loss_value: float | None = None
    t_start, tokens_run = time.perf_counter(), 0
    bar = tqdm(total=config.max_steps, initial=state["step"], disable=not config.progress, desc="finetune",
               unit="step", dynamic_ncols=True)
    while state["step"] < config.max_steps:
        t0 = time.perf_counter()
        micro = []
        for _ in range(config.gradient_accumulation_steps):
            epoch, index, rows = next(stream)
            micro.append(collate(rows, pad_id, packed=config.packing, classify=classify))
            state["epoch"], state["batch"] = epoch, index + 1
        n_targets = max(1, sum(b.n_targets for b in micro))
        total = 0.0
        for b in micro:
            b = _to(b, device)
            with _autocast(config, model):
                loss, _ = _loss_sum(model, b, config)
            (loss / n_targets).backward()
            total += float(loss.detach())
        lr = config.learning_rate * lr_factor(state["step"], schedule=config.lr_scheduler, warmup=config.warmup,
                                              total=config.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        n_tok = sum(b.n_tokens for b in micro)
        state["tokens"] += n_tok
        tokens_run += n_tok
        dt = time.perf_counter() - t0
        loss_value = total / n_targets
        record = {"step": state["step"], "loss": loss_value, "lr": lr, "grad_norm": float(norm),
                  "epoch": state["epoch"], "tokens": state["tokens"], "tokens_per_s": n_tok / max(dt, 1e-9)}
        if state["step"] % config.logging_steps == 0:
            metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        done = state["step"] == config.max_steps
        if eval_ds is not None and ((config.eval_steps and state["step"] % config.eval_steps == 0) or done):
            last_eval = evaluate(model, eval_ds, config, pad_id)
            metrics.write({"step": state["step"], **last_eval})
            bar.write(f"step {state['step']}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
        if config.save_steps and state["step"] % config.save_steps == 0:
            # The schedule is a pure function of the step; it is recorded for readers of the checkpoint.
            sched = {"schedule": config.lr_scheduler, "step": state["step"], "warmup": config.warmup,
                     "total": config.max_steps, "base_lr": config.learning_rate}
            save_checkpoint(out / "checkpoints" / f"step-{state['step']:06d}", model, optimizer,
                            {**state, "scheduler": sched}, base_model_name_or_path=config.model)
        if stop_after is not None and state["step"] >= stop_after and not done:
            bar.close()
            return TrainResult(out, state["step"], loss_value, last_eval, len(train_ds),
                               len(eval_ds) if eval_ds else 0, train_ds.n_truncated, train_ds.n_dropped,
                               tokens_run / max(time.perf_counter() - t_start, 1e-9), _step_of(resume_from))
    bar.close()
    save_adapter(model, out, base_model_name_or_path=config.model)
    plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    return TrainResult(out, state["step"], loss_value, last_eval, len(train_ds), len(eval_ds) if eval_ds else 0,
                       train_ds.n_truncated, train_ds.n_dropped,
                       tokens_run / max(time.perf_counter() - t_start, 1e-9), _step_of(resume_from))


def _step_of(ckpt: Path | None) -> int | None:
    return None if ckpt is None else int(ckpt.name.split("-")[1])
