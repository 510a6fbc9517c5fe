"""The training loop: LoRA/QLoRA on a causal LM (or a sequence classifier), with exact resume.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. The loss is the sum of token losses over
all micro-batches of the step divided by their total label-token count (so accumulation equals one big
batch), clipped at ``max_grad_norm``, then AdamW. Everything random is a function of ``seed`` (LoRA init,
dropout via the torch RNG, data order via :class:`BatchPlan`), and a checkpoint stores the RNG, optimizer,
scheduler step and data position, so an interrupted-and-resumed run reproduces the uninterrupted one
exactly on CPU (tested with exact float equality of the loss curve and the adapter).

A run reads top to bottom in :func:`train`: plan the output (:mod:`fourbit.train.plan`), data, seed, LoRA,
optimizer, run folder, resume, the steps (:func:`_optimizer_step`), evaluation and checkpoints, the adapter.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fourbit._errors import FieldError
from fourbit._io import atomic_write_text
from fourbit.nn.lora import (
    LoRASpec,
    find_target_modules,
    inject_lora,
    lora_modules,
    lora_spec,
    mark_only_lora_trainable,
    trainable_parameters_report,
)

from .batching import Batch, BatchPlan, collate
from .checkpoint import apply_checkpoint, pause_point, save_checkpoint
from .config import TrainConfig, save_config
from .data import EncodedDataset, encode_records, load_records, split_records
from .distributed import World, fingerprint_examples, fingerprint_model
from .loss import causal_lm_loss
from .metrics import MetricsLog, plot_loss_curve
from .optimizers import build_optimizer
from .plan import RunFolder, RunPlan, plan_run
from .prepare import prepare_model_for_training
from .schedule import lr_factor

__all__ = [
    "TrainResult",
    "TrainingInterrupted",
    "add_lora",
    "evaluate",
    "plan_run",
    "prepare_data",
    "seed_everything",
    "train",
]


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
    world_size: int = 1


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's RNGs (all randomness in fourbit's training goes through these)."""
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(
    config: TrainConfig,
    tokenizer: Any,
    *,
    records: list | None = None,
    eval_records: list | None = None,
) -> tuple[EncodedDataset, EncodedDataset | None]:
    """Load, split and tokenize ``config.data`` (and ``config.eval_data``).

    Args:
        records, eval_records: the records of ``config.data`` / ``config.eval_data`` when the caller has
            already read them (:func:`load_records`), so the files are not read again.

    Raises:
        FieldError: no ``data``.
        ValueError: see :func:`load_records` and :func:`encode_records`.
    """
    if not config.data:
        raise FieldError("data", "is required: the training file or saved dataset folder")
    if records is None:
        records = load_records(config.data)
    if config.eval_data:
        train_rows = records
        eval_rows = eval_records if eval_records is not None else load_records(config.eval_data)
    else:
        train_rows, eval_rows = split_records(records, config.eval_fraction, config.seed)
    classify = config.task == "classify"
    kw = dict(format=config.format, max_length=config.max_length, train_on_inputs=config.train_on_inputs,
              text_column=config.text_column, label_column=config.label_column if classify else None,
              split_long_text=config.packing and not classify)
    train_ds = encode_records(train_rows, tokenizer, source=str(config.data), **kw)
    eval_ds = None
    if eval_rows:
        eval_ds = encode_records(eval_rows, tokenizer, source=str(config.eval_data or config.data),
                                 label_names=train_ds.label_names or None, **kw)
    return train_ds, eval_ds


def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Prepare ``model`` for training and inject LoRA as ``config`` says (classification also trains
    the ``score`` head, saved as peft's ``modules_to_save``).

    Raises:
        FieldError: ``target_modules`` selects no linear layer of the model (checked before it is changed).
    """
    saved = ("score",) if config.task == "classify" else ()
    if not lora_modules(model):
        try:
            find_target_modules(model, config.target_module_list, saved)
        except ValueError as err:
            raise FieldError("target_modules", f"{err}; name linear layers of the model (e.g. q_proj,v_proj) "
                                               "or use all-linear") from None
    prepare_model_for_training(model, gradient_checkpointing=config.gradient_checkpointing,
                               activation_dtype=torch.bfloat16 if _computes_bf16(config, model) else None,
                               checkpoint_policy=config.gradient_checkpointing_policy)
    if lora_modules(model):  # adapters already there (e.g. loaded): train them as they are
        spec = lora_spec(model)
        mark_only_lora_trainable(model, spec.modules_to_save if spec else saved)
    else:
        inject_lora(model, LoRASpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                    target_modules=config.target_module_list, use_rslora=config.use_rslora,
                                    modules_to_save=saved))
    return model


def _computes_bf16(config: TrainConfig, model: nn.Module) -> bool:
    """Whether training runs under bf16 autocast: ``compute_dtype`` bf16, or auto on a device with native bf16."""
    if config.compute_dtype == "auto":
        from fourbit.models import QuantConfig

        device = next(model.parameters()).device
        return QuantConfig().resolved_compute_dtype(device) == torch.bfloat16
    return config.compute_dtype == "bf16"


def _autocast(config: TrainConfig, model: nn.Module):
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16) if _computes_bf16(config, model) else nullcontext()


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
def evaluate(model: nn.Module, data: EncodedDataset, config: TrainConfig, pad_id: int,
             world: World | None = None) -> dict[str, float]:
    """Mean loss per label token and perplexity (accuracy for classification) over ``data``.

    Runs in eval mode under ``no_grad`` and restores the training mode and the torch RNG state, so an
    evaluation between steps does not change the training that follows (tested). On several processes
    (``world``) rank ``r`` evaluates batches ``r, r+W, ...`` and the sums are reduced over the ranks.
    """
    world = world or World()
    was_training = model.training
    rng = torch.get_rng_state()
    model.eval()
    device = next(model.parameters()).device
    plan = BatchPlan(data.examples, config.eval_batch_size, shuffle=False)
    total = correct = 0.0
    count = 0
    try:
        # Under fsdp every rank runs every layer together (the layers' bytes are gathered collectively), so each
        # evaluates every batch; under ddp each evaluates its share and the sums are reduced.
        split = world.size if world.mode != "fsdp" else 1
        for i, rows in enumerate(plan.batches(0)):
            if i % split != world.rank % split:
                continue
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
    if split > 1:
        sums = world.all_reduce_sum(torch.tensor([total, count, correct], dtype=torch.float64),
                                    "the evaluation").tolist()
        total, count, correct = sums[0], int(sums[1]), sums[2]
    mean = total / max(count, 1)
    out = {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}
    if config.task == "classify":
        out["eval_accuracy"] = correct / max(count, 1)
    return out


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped at a step boundary on Ctrl-C (SIGINT) after writing a checkpoint.

    Attributes:
        step: the last finished optimizer step.
        checkpoint: the checkpoint folder written for it; ``resume`` continues from there.
    """

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} written: run again with "
                         "`resume` to continue")
        self.step = step
        self.checkpoint = checkpoint


class _Interrupts:
    """Turns the first SIGINT during the loop into a request to stop at the next step boundary; a second one
    raises ``KeyboardInterrupt`` at once. Only the main thread can install signal handlers; elsewhere this
    does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class _Step:
    """What one optimizer step measured (over all ranks)."""

    loss: float
    lr: float
    grad_norm: float
    n_tokens: int
    seconds: float
    stop: bool = False


def _micro_seed(seed: int, step: int, index: int) -> int:
    """The torch seed of micro-batch ``index`` of optimizer step ``step``: dropout masks depend on which
    micro-batch of the global batch is computed, never on which process computes it."""
    return (seed * 1_000_003 + step * 4_099 + index) % (2**63 - 1)


def _reduce_gradients(params: list[torch.Tensor], extra: list[float], world: World) -> list[float]:
    """Sum the gradients of ``params`` over the ranks in one flat all-reduce (in their own dtype, as DDP's
    buckets do), and the numbers ``extra`` (loss sum, stop request) in float64."""
    if world.size == 1:
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dtype = grads[0].dtype if all(g.dtype == grads[0].dtype for g in grads) else torch.float32
    flat = world.all_reduce_sum(torch.cat([g.reshape(-1).to(dtype) for g in grads]))
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return world.all_reduce_sum(torch.tensor(extra, dtype=torch.float64), "the loss all-reduce").tolist()


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                    stream: Any, state: dict[str, Any], config: TrainConfig, pad_id: int, device: torch.device,
                    last_checkpoint: Path | None, world: World, stop: bool = False) -> _Step:
    """One optimizer step over the global batch of ``gradient_accumulation_steps x world.size`` micro-batches:
    this rank's slice of them forward and backward, the gradients summed over the ranks, the summed token loss
    over the global label-token count, gradient clipping, AdamW. Advances the data position in ``state``.
    ``stop`` (a Ctrl-C on this rank) is reduced with the gradients so that every rank stops after the same step.

    Raises:
        FieldError: the loss, the gradient or the updated weights are not finite (``learning_rate``); the
            weights of this step are not saved anywhere.
        PeerLost: another rank stopped.
    """
    t0 = time.perf_counter()
    micro = []
    for _ in range(config.gradient_accumulation_steps * world.size):
        epoch, index, rows = next(stream)
        micro.append(collate(rows, pad_id, packed=config.packing, classify=config.task == "classify"))
        state["epoch"], state["batch"] = epoch, index + 1
    n_targets = max(1, sum(b.n_targets for b in micro))
    total = 0.0
    first = world.rank * config.gradient_accumulation_steps
    for i in range(first, first + config.gradient_accumulation_steps):
        torch.manual_seed(_micro_seed(config.seed, state["step"], i))
        b = _to(micro[i], device)
        with _autocast(config, model):
            loss, _ = _loss_sum(model, b, config)
        (loss / n_targets).backward()
        total += float(loss.detach())
    total, stops = _reduce_gradients(params, [total, float(stop)], world)
    step = state["step"] + 1
    lr = config.learning_rate * lr_factor(state["step"], schedule=config.lr_scheduler, warmup=config.warmup,
                                          total=config.max_steps)
    for g in optimizer.param_groups:
        g["lr"] = lr
    norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
    loss_value = total / n_targets
    if not (math.isfinite(loss_value) and math.isfinite(norm)):
        what = f"the loss is {loss_value}" if not math.isfinite(loss_value) else f"the gradient norm is {norm}"
        raise _diverged(step, what, lr, last_checkpoint)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise _diverged(step, "the update made the adapter weights non-finite", lr, last_checkpoint)
    return _Step(loss_value, lr, norm, sum(b.n_tokens for b in micro), time.perf_counter() - t0, stops > 0)


def _diverged(step: int, what: str, lr: float, last_checkpoint: Path | None) -> FieldError:
    kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
    return FieldError("learning_rate", f"training diverged at step {step}: {what} (learning rate {lr:g}); "
                                       f"stopped without saving this step{kept}: lower `learning_rate` and run again")


def _save(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
          config: TrainConfig, world: World) -> Path:
    """Write the checkpoint of the current step and make the run folder ``out`` (at the first checkpoint).
    Only rank 0 writes; every rank returns the folder's path."""
    name = f"step-{state['step']:06d}"
    if not world.is_main:
        run.commit()
        return run.path / "checkpoints" / name
    # The schedule is a pure function of the step; it is recorded for readers of the checkpoint.
    sched = {"schedule": config.lr_scheduler, "step": state["step"], "warmup": config.warmup,
             "total": config.max_steps, "base_lr": config.learning_rate}
    save_checkpoint(run.path / "checkpoints" / name, model, optimizer,
                    {**state, "world_size": world.size, "scheduler": sched},
                    base_model_name_or_path=config.model, config=_saved_config(config))
    run.commit()
    return run.path / "checkpoints" / name


def _saved_config(config: TrainConfig) -> TrainConfig:
    """The configuration written beside the run: ``resume``/``overwrite`` describe one invocation, not the run."""
    return config.replace(resume=False, overwrite=False)


def _write_run_files(folder: Path, config: TrainConfig, train_ds: EncodedDataset) -> None:
    save_config(_saved_config(config), folder)
    if train_ds.label_names:
        atomic_write_text(folder / "labels.json", json.dumps(train_ds.label_names) + "\n")


def train(
    config: TrainConfig,
    model: nn.Module,
    tokenizer: Any,
    *,
    data: tuple[EncodedDataset, EncodedDataset | None] | None = None,
    plan: RunPlan | None = None,
    stop_after: int | None = None,
    log: Any = None,
    world: World | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (modified in place) and write adapter, config, metrics and plot to ``config.out``.

    The steps, in order: check the output folder and what to resume (:func:`plan_run`); load the data;
    seed; inject LoRA (checking the targets); build the optimizer; only then open the run folder (a new run
    is built beside ``out`` and replaces an older run at its first checkpoint); restore the checkpoint;
    run the optimizer steps with evaluation, metrics and checkpoints; write the adapter and the loss curve.

    Ctrl-C (SIGINT) stops at the next step boundary: a checkpoint is written and :class:`TrainingInterrupted`
    is raised (a second Ctrl-C stops at once). A loss, gradient or update that is not finite stops the run
    before anything of that step is saved.

    On several processes (``world``, see :mod:`fourbit.train.distributed`) every rank calls this with the same
    arguments: each step's global batch is ``gradient_accumulation_steps x world.size`` micro-batches, rank 0
    alone plans, prints and writes, and the ranks are checked to hold the same model, data and options.

    Args:
        config: the resolved configuration (``out`` required).
        model: a transformers model, 4-bit or not, with or without LoRA layers already.
        tokenizer: its tokenizer.
        data: pre-tokenized (train, eval) data; default :func:`prepare_data`.
        plan: the result of :func:`plan_run` when the caller checked early (default: checked here).
        stop_after: stop after this optimizer step as an interruption would, with a checkpoint (for tests).
        log: callable for status lines (default: print).
        world: the processes of the run (default: this one process).

    Returns:
        A :class:`TrainResult`.

    Raises:
        FieldError: see :func:`plan_run`; LoRA targets that match nothing; a run that diverges; ranks given
            different models, data or options.
        InputFileError: bad data, a damaged checkpoint file.
        TrainingInterrupted: Ctrl-C; a checkpoint of the last finished step was written.
        PeerLost: another rank stopped (named).
        OSError: the disk filled up while writing (naming the file); nothing is left half-written.
    """
    from tqdm.auto import tqdm

    from fourbit.nn.adapters import save_adapter

    world = world or World()
    log = (log or print) if world.is_main else (lambda *_: None)

    def setup() -> tuple[RunPlan, EncodedDataset, EncodedDataset | None, list[torch.Tensor], Any]:
        # 1. where to write, what to resume (rank 0 decides; refusals come here)
        run_plan = plan or (plan_run(config, log=log, world_size=world.size) if world.is_main
                            else RunPlan(Path(config.out)))
        train_ds, eval_ds = data if data is not None else prepare_data(config, tokenizer)
        if world.size > 1:
            data_digest = fingerprint_examples(train_ds.examples) + fingerprint_examples(eval_ds.examples
                                                                                          if eval_ds else [])
            world.check_same({"model": (fingerprint_model(model), "model weights"),
                              "data": (data_digest, "training data"),
                              **{name: (repr(value), f"`{name}`") for name, value in config.to_dict().items()
                                 if name not in ("progress", "out")}})
        seed_everything(config.seed)  # 2. everything random follows from the seed
        add_lora(model, config)  # 3. LoRA (the targets are checked before the model changes)
        if world.mode == "fsdp":  # the frozen base sharded over the ranks, the adapter whole on each
            from fourbit.nn.fsdp import shard_4bit_base

            shard = shard_4bit_base(model)
            every = world.all_gather_object(shard.local, "the sharding of the base")
            log(f"fsdp: the frozen weights of the base's {shard.layers} layers, {shard.total:,} bytes, are sharded: "
                + ", ".join(f"rank {r} holds {b:,}" for r, b in enumerate(every)) + " bytes")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(config.optim, params, lr=config.learning_rate, weight_decay=config.weight_decay,
                              betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
        return run_plan, train_ds, eval_ds, params, opt

    plan, train_ds, eval_ds, params, optimizer = world.agree(setup, "the setup of the run")
    if train_ds.n_split:
        log(f"split {train_ds.n_split} documents longer than max_length={config.max_length} into pieces")
    if train_ds.n_truncated or train_ds.n_dropped:
        log(f"truncated {train_ds.n_truncated} examples to max_length={config.max_length}; "
            f"dropped {train_ds.n_dropped} left without response tokens")
    log(trainable_parameters_report(model))
    pad_id = _pad_id(model, tokenizer, config)
    device = next(model.parameters()).device

    # 4. Only now is anything written: a new run into a temporary folder that becomes `out` at its first
    # checkpoint; a resumed run into `out`, once its checkpoint has been loaded into the model. Rank 0 only.
    with RunFolder(plan.out, fresh=plan.resume is None, write=world.is_main) as run, _Interrupts() as interrupts:
        state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0}
        metrics = MetricsLog(run.path / "metrics.jsonl") if world.is_main else None
        last_checkpoint = None

        def restore() -> dict[str, Any]:
            resumed = dict(state)
            if not world.is_main:
                return resumed
            if plan.resume is not None:
                resumed = apply_checkpoint(plan.resume, model, optimizer)
                for key in ("scheduler", "world_size"):
                    resumed.pop(key, None)
                metrics.truncate_after(resumed["step"])
            _write_run_files(run.path, config, train_ds)
            return resumed

        state = world.agree(restore, "the restore of the checkpoint")
        if world.size > 1:  # rank 0's adapter, optimizer state and data position on every rank
            state = _broadcast_run_state(world, state, params, optimizer, plan)
        if plan.resume is not None:
            last_checkpoint = plan.resume.folder
        if plan.resume is not None:
            log(f"resumed from {plan.resume.folder} (step {state['step']})")

        plan_batches = BatchPlan(train_ds.examples, config.batch_size, seed=config.seed,
                                 max_length=config.max_length, packing=config.packing,
                                 group_by_length=config.group_by_length)
        stream = plan_batches.iterate(state["epoch"], state["batch"])
        model.train()
        last_eval: dict[str, float] = {}
        loss_value: float | None = None
        t_start, tokens_run = time.perf_counter(), 0
        bar = tqdm(total=config.max_steps, initial=state["step"], disable=not (config.progress and world.is_main),
                   desc="finetune", unit="step", dynamic_ncols=True)
        try:  # 5. the optimizer steps, with metrics, evaluation, checkpoints and the stop on Ctrl-C
            while state["step"] < config.max_steps:
                step = _optimizer_step(model, optimizer, params, stream, state, config, pad_id, device,
                                       last_checkpoint, world, interrupts.requested)
                state["step"] += 1
                state["tokens"] += step.n_tokens
                tokens_run += step.n_tokens
                loss_value = step.loss
                tokens_per_s = step.n_tokens / max(step.seconds, 1e-9)
                if metrics is not None and state["step"] % config.logging_steps == 0:
                    metrics.write({"step": state["step"], "loss": step.loss, "lr": step.lr,
                                   "grad_norm": step.grad_norm, "epoch": state["epoch"], "tokens": state["tokens"],
                                   "tokens_per_s": tokens_per_s, "world_size": world.size})
                bar.update(1)
                bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                done = state["step"] == config.max_steps
                if eval_ds is not None and ((config.eval_steps and state["step"] % config.eval_steps == 0) or done):
                    last_eval = evaluate(model, eval_ds, config, pad_id, world)
                    if metrics is not None:
                        metrics.write({"step": state["step"], **last_eval})
                        bar.write(f"step {state['step']}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
                pause_point("step", state["step"], stop=lambda: interrupts.requested)
                if config.save_steps and state["step"] % config.save_steps == 0:
                    last_checkpoint = _save(run, model, optimizer, state, config, world)
                    if metrics is not None:
                        metrics.path = run.path / "metrics.jsonl"  # the run folder is `out` from now on
                # One process stops as soon as it is asked; several stop together, after the step whose
                # all-reduce first carried a request.
                requested = interrupts.requested if world.size == 1 else step.stop
                stopping = requested or (stop_after is not None and state["step"] >= stop_after)
                if stopping and not done:
                    if last_checkpoint is None or last_checkpoint.name != f"step-{state['step']:06d}":
                        last_checkpoint = _save(run, model, optimizer, state, config, world)
                    world.barrier("the checkpoint")
                    if requested:
                        raise TrainingInterrupted(state["step"], last_checkpoint)
                    return _result(run.out, state, loss_value, last_eval, train_ds, eval_ds, tokens_run,
                                   t_start, plan, world)
        finally:
            bar.close()
        # 6. the finished run: adapter and loss curve beside the checkpoints
        if world.is_main:
            save_adapter(model, run.path, base_model_name_or_path=config.model)
            plot_loss_curve(run.path / "metrics.jsonl", run.path / "loss_curve.png")
        run.commit()
    world.barrier("the end of the run")
    return _result(run.out, state, loss_value, last_eval, train_ds, eval_ds, tokens_run, t_start, plan, world)


def _broadcast_run_state(world: World, state: dict[str, Any], params: list[torch.Tensor],
                         optimizer: torch.optim.Optimizer, plan: RunPlan) -> dict[str, Any]:
    """Give every rank rank 0's trainable weights, optimizer state and data position (its restored checkpoint,
    or its fresh initialisation), so the replicas start identical and only rank 0 reads files."""
    payload = None
    if world.is_main:
        payload = {"state": state, "params": [p.detach().cpu() for p in params],
                   "optimizer": optimizer.state_dict()}
    payload = world.broadcast_object(payload, "the broadcast of the checkpoint")
    if not world.is_main:
        with torch.no_grad():
            for p, value in zip(params, payload["params"], strict=True):
                p.copy_(value)
        optimizer.load_state_dict(payload["optimizer"])
    return dict(payload["state"])


def _pad_id(model: nn.Module, tokenizer: Any, config: TrainConfig) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if config.task == "classify" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    return pad_id


def _result(out: Path, state: dict[str, Any], loss: float | None, last_eval: dict[str, float],
            train_ds: EncodedDataset, eval_ds: EncodedDataset | None, tokens_run: int, t_start: float,
            plan: RunPlan, world: World) -> TrainResult:
    return TrainResult(out, state["step"], loss, last_eval, len(train_ds), len(eval_ds) if eval_ds else 0,
                       train_ds.n_truncated, train_ds.n_dropped,
                       tokens_run / max(time.perf_counter() - t_start, 1e-9),
                       plan.resume.step if plan.resume is not None else None, world.size)
