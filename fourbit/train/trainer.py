"""The training loop: LoRA/QLoRA on a causal LM (or a sequence classifier), with exact resume.

One optimizer step = ``gradient_accumulation_steps`` micro-batches (per process). The loss is the sum of token
losses over all micro-batches of the step divided by their total label-token count (so accumulation equals one
big batch), clipped at ``max_grad_norm``, then AdamW: :class:`fourbit.train.step.Stepper`, where the rules that
make a run exact (micro-batch seeds, summed gradients, float64 loss sums) are kept together. Everything random
is a function of ``seed`` (LoRA init, dropout via the torch RNG, data order via :class:`BatchPlan`), and a
checkpoint stores the RNG, optimizer, scheduler step and data position (:class:`TrainState`), so an
interrupted-and-resumed run reproduces the uninterrupted one exactly on CPU (tested with exact float equality
of the loss curve and the adapter).

A run reads top to bottom in :func:`train`: :func:`_set_up` (plan the output, data, seed, LoRA, optimizer),
the run folder, :func:`_start` (resume), :func:`_run_steps` (each step, its metrics, evaluation and
checkpoint, the stop on Ctrl-C), :func:`_finish` (the adapter and loss curve).
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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

from .batching import BatchPlan, collate
from .checkpoint import apply_checkpoint, save_checkpoint
from .config import TrainConfig, save_config
from .data import EncodedDataset, encode_records, load_records, split_records
from .distributed import World, fingerprint_examples, fingerprint_model
from .metrics import MetricsLog, plot_loss_curve
from .optimizers import build_optimizer
from .pairs import PREFERENCE_TASKS, encode_pairs
from .plan import RunFolder, RunPlan, plan_run
from .prepare import prepare_model_for_training
from .step import BatchStream, Stepper, StepResult, TrainState, autocast, computes_bf16, loss_sum, to_device

__all__ = [
    "TrainResult",
    "TrainState",
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
    if config.task in PREFERENCE_TASKS:
        kw = dict(format=config.format, max_length=config.max_length)
        train_ds = encode_pairs(train_rows, tokenizer, source=str(config.data), **kw)
        eval_ds = encode_pairs(eval_rows, tokenizer, source=str(config.eval_data or config.data), **kw) \
            if eval_rows else None
        return train_ds, eval_ds
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


def lora_spec_of(config: TrainConfig, modules_to_save: tuple[str, ...] = ()) -> LoRASpec:
    """The :class:`fourbit.nn.lora.LoRASpec` ``config`` asks for."""
    return LoRASpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    target_modules=config.target_module_list, use_rslora=config.use_rslora,
                    modules_to_save=modules_to_save, use_dora=config.use_dora)


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
            message = err.message if isinstance(err, FieldError) else str(err)
            raise FieldError("target_modules", f"{message}; name linear layers of the model (e.g. "
                                               "q_proj,v_proj) or use all-linear") from None
    prepare_model_for_training(model, gradient_checkpointing=config.gradient_checkpointing,
                               activation_dtype=torch.bfloat16 if computes_bf16(config, model) else None,
                               checkpoint_policy=config.gradient_checkpointing_policy)
    if lora_modules(model):  # adapters already there (e.g. loaded): train them as they are
        spec = lora_spec(model)
        mark_only_lora_trainable(model, spec.modules_to_save if spec else saved)
    else:
        inject_lora(model, lora_spec_of(config, saved))
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedDataset, config: TrainConfig, pad_id: int,
             world: World | None = None) -> dict[str, float]:
    """Mean loss per label token and perplexity (accuracy for classification) over ``data``; for preference
    pairs the preference loss and rewards (:func:`fourbit.train.preference.evaluate_pairs`).

    Runs in eval mode under ``no_grad`` and restores the training mode and the torch RNG state, so an
    evaluation between steps does not change the training that follows (tested). On several processes
    (``world``) rank ``r`` evaluates batches ``r, r+W, ...`` and the sums are reduced over the ranks.
    """
    if config.task in PREFERENCE_TASKS:
        from .preference import evaluate_pairs

        return evaluate_pairs(model, data.examples, config, pad_id, world)
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
            batch = to_device(collate(rows, pad_id, packed=False, classify=config.task == "classify"), device)
            with autocast(config, model):
                loss, logits = loss_sum(model, batch, config)
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
    """Turns the first SIGINT into a request to stop at the next step boundary; a second one raises
    ``KeyboardInterrupt`` at once. The previous handler is back when the block ends. A previous handler with a
    true ``requested`` attribute (a caller's, which recorded a Ctrl-C instead of raising) hands that request on.
    Only the main thread can install signal handlers; elsewhere this does nothing (``requested`` stays false)."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
            self.requested = self.requested or getattr(self._previous, "requested", False) is True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python; the default one is the nearest.
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            self._installed = False


@dataclass
class _Setup:
    """What the setup of a run decided and built; the same on every rank."""

    plan: RunPlan
    train_ds: EncodedDataset
    eval_ds: EncodedDataset | None
    stepper: Stepper


@dataclass
class _Loop:
    """The optimizer steps of one run: where they write, where they are, and what they measured so far."""

    setup: _Setup
    folder: RunFolder
    state: TrainState
    stream: BatchStream
    metrics: MetricsLog | None  # rank 0 only
    last_checkpoint: Path | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    loss: float | None = None
    tokens_run: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def config(self) -> TrainConfig:
        return self.setup.stepper.config

    @property
    def world(self) -> World:
        return self.setup.stepper.world


def train(
    config: TrainConfig,
    model: nn.Module,
    tokenizer: Any,
    *,
    data: tuple[EncodedDataset, EncodedDataset | None] | None = None,
    plan: RunPlan | None = None,
    log: Any = None,
    world: World | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (modified in place) and write adapter, config, metrics and plot to ``config.out``.

    The steps, in order: check the output folder and what to resume (:func:`plan_run`); load the data;
    seed; inject LoRA (checking the targets); build the optimizer (:func:`_set_up`); only then open the run
    folder (a new run is built beside ``out`` and replaces an older run at its first checkpoint) and restore
    the checkpoint (:func:`_start`); run the optimizer steps with evaluation, metrics and checkpoints
    (:func:`_run_steps`); write the adapter and the loss curve (:func:`_finish`). The model runs under
    :func:`fourbit.nn.fused.fused_kernels` ``(config.fused_kernels)``.

    Ctrl-C (SIGINT) from the start of the call stops at the next step boundary, the last step included: a
    checkpoint is written and :class:`TrainingInterrupted` is raised (a second Ctrl-C stops at once). A loss,
    gradient or update that is not finite stops the run before anything of that step is saved.

    On several processes (``world``, see :mod:`fourbit.train.distributed`) every rank calls this with the same
    arguments: each step's global batch is ``gradient_accumulation_steps x world.size`` micro-batches, rank 0
    alone plans, prints and writes, and the ranks are checked to hold the same model, data and options.

    Args:
        config: the resolved configuration (``out`` required).
        model: a transformers model, 4-bit or not, with or without LoRA layers already.
        tokenizer: its tokenizer.
        data: pre-tokenized (train, eval) data; default :func:`prepare_data`.
        plan: the result of :func:`plan_run` when the caller checked early (default: checked here).
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
    from fourbit.nn.fused import fused_kernels

    world = world or World()
    log = (log or print) if world.is_main else _silent
    with _Interrupts() as interrupts, fused_kernels(config.fused_kernels):
        setup = world.agree(lambda: _set_up(config, model, tokenizer, world, log, data=data, plan=plan),
                            "the setup of the run")
        _report_setup(setup, log)
        # Only now is anything written: a new run into a temporary folder that becomes `out` at its first
        # checkpoint; a resumed run into `out`, once its checkpoint has been loaded into the model. Rank 0 only.
        with RunFolder(setup.plan.out, fresh=setup.plan.resume is None, write=world.is_main) as folder:
            loop = _start(setup, folder, log)
            _run_steps(loop, interrupts)
            _finish(loop)
        world.barrier("the end of the run")
    return _result(loop)


def _silent(*_: Any) -> None:
    """The log of the ranks other than 0."""


def _set_up(config: TrainConfig, model: nn.Module, tokenizer: Any, world: World, log: Any, *,
            data: tuple[EncodedDataset, EncodedDataset | None] | None, plan: RunPlan | None) -> _Setup:
    """Plan the output (rank 0 decides; refusals come here), load the data, check that the ranks agree, seed,
    inject LoRA (the targets are checked before the model changes), shard the base under fsdp, build the
    optimizer. Writes nothing."""
    run_plan = plan or (plan_run(config, log=log, world_size=world.size) if world.is_main
                        else RunPlan(Path(config.out)))
    train_ds, eval_ds = data if data is not None else prepare_data(config, tokenizer)
    if world.size > 1:
        _check_ranks_agree(world, model, config, train_ds, eval_ds)
    seed_everything(config.seed)  # everything random follows from the seed
    add_lora(model, config)
    if world.mode == "fsdp":  # the frozen base sharded over the ranks, the adapter whole on each
        _shard_base(model, world, log)
    pad_id = _pad_id(model, tokenizer, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optim, params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    stepper = Stepper(model, optimizer, params, config, world, pad_id)
    return _Setup(run_plan, train_ds, eval_ds, stepper)


def _check_ranks_agree(world: World, model: nn.Module, config: TrainConfig, train_ds: EncodedDataset,
                       eval_ds: EncodedDataset | None) -> None:
    data_digest = fingerprint_examples(train_ds.examples) + fingerprint_examples(eval_ds.examples if eval_ds else [])
    world.check_same({"model": (fingerprint_model(model), "model weights"),
                      "data": (data_digest, "training data"),
                      **{name: (repr(value), f"`{name}`") for name, value in config.to_dict().items()
                         if name not in ("progress", "out")}})


def _shard_base(model: nn.Module, world: World, log: Any) -> None:
    from fourbit.nn.fsdp import shard_4bit_base

    shard = shard_4bit_base(model)
    every = world.all_gather_object(shard.local, "the sharding of the base")
    log(f"fsdp: the frozen weights of the base's {shard.layers} layers, {shard.total:,} bytes, are sharded: "
        + ", ".join(f"rank {r} holds {b:,}" for r, b in enumerate(every)) + " bytes")


def _report_setup(setup: _Setup, log: Any) -> None:
    config, train_ds = setup.stepper.config, setup.train_ds
    if train_ds.n_split:
        log(f"split {train_ds.n_split} documents longer than max_length={config.max_length} into pieces")
    if train_ds.n_truncated or train_ds.n_dropped:
        log(f"truncated {train_ds.n_truncated} examples to max_length={config.max_length}; "
            f"dropped {train_ds.n_dropped} left without response tokens")
    log(trainable_parameters_report(setup.stepper.model))


def _start(setup: _Setup, folder: RunFolder, log: Any) -> _Loop:
    """Restore the checkpoint to resume (rank 0 reads it and gives every rank its state), write the run's
    config, and place the data stream at the saved position."""
    stepper, resume = setup.stepper, setup.plan.resume
    config, world = stepper.config, stepper.world
    metrics = MetricsLog(folder.path / "metrics.jsonl") if world.is_main else None
    if config.task == "dpo":
        _reference_pass(setup, folder, log)
    state = world.agree(lambda: _restore(setup, folder, metrics), "the restore of the checkpoint")
    if world.size > 1:  # rank 0's adapter, optimizer state and data position on every rank
        state = _broadcast_run_state(world, state, stepper)
    if resume is not None:
        log(f"resumed from {resume.folder} (step {state.step})")
    batches = BatchPlan(setup.train_ds.examples, config.batch_size, seed=config.seed, max_length=config.max_length,
                        packing=config.packing, group_by_length=config.group_by_length)
    stepper.model.train()
    return _Loop(setup, folder, state, batches.iterate(state.epoch, state.batch), metrics,
                 last_checkpoint=resume.folder if resume is not None else None)


def _reference_pass(setup: _Setup, folder: RunFolder, log: Any) -> None:
    """DPO: every pair's reference log-probs (the base with the adapter switched off), computed once per run
    and kept in the run folder (:data:`~fourbit.train.preference.REFERENCE_FILE`, written atomically by rank 0):
    a resumed run, after a Ctrl-C or a kill -9, reads them back instead of running the pass again, and a later
    epoch reuses them from memory. Rank 0 reads the file and gives every rank its values; a file of other
    pairs, base or compute dtype is computed again and replaced."""
    from .preference import (
        REFERENCE_FILE,
        read_reference_logps,
        reference_key,
        reference_logps,
        save_reference_logps,
    )

    stepper, world = setup.stepper, setup.stepper.world
    pairs = setup.train_ds.examples + (setup.eval_ds.examples if setup.eval_ds else [])
    key, path = reference_key(pairs, stepper.config), folder.path / REFERENCE_FILE
    kept = world.agree(lambda: read_reference_logps(path, key, len(pairs)) if world.is_main else None,
                       "the read of the reference log-probs")
    kept = world.broadcast_object(kept, "the broadcast of the reference log-probs")
    if kept is not None:
        for p, chosen, rejected in zip(pairs, *kept, strict=True):
            p.ref_chosen, p.ref_rejected = chosen, rejected
        log(f"reference log-probs of {len(pairs)} pairs read from {path} (computed once, by this run's start)")
        return
    t0 = time.perf_counter()
    reference_logps(stepper.model, pairs, stepper.config, stepper.pad_id)
    log(f"reference log-probs of {len(pairs)} pairs (the base, adapter off) in {time.perf_counter() - t0:.1f} s")
    world.agree(lambda: save_reference_logps(path, pairs, key) if world.is_main else None,
                "the write of the reference log-probs")


def _restore(setup: _Setup, folder: RunFolder, metrics: MetricsLog | None) -> TrainState:
    """Rank 0: load the checkpoint to resume into the model and optimizer (and the RNG states), drop the
    metrics of later steps, and write the run's config (and labels)."""
    stepper, resume = setup.stepper, setup.plan.resume
    if not stepper.world.is_main:
        return TrainState()
    state = TrainState()
    if resume is not None:
        state = TrainState.from_dict(apply_checkpoint(resume, stepper.model, stepper.optimizer))
        metrics.truncate_after(state.step)
    save_config(_saved_config(stepper.config), folder.path)
    if setup.train_ds.label_names:
        atomic_write_text(folder.path / "labels.json", json.dumps(setup.train_ds.label_names) + "\n")
    return state


def _broadcast_run_state(world: World, state: TrainState, stepper: Stepper) -> TrainState:
    """Give every rank rank 0's trainable weights, optimizer state and data position (its restored checkpoint,
    or its fresh initialisation), so the replicas start identical and only rank 0 reads files."""
    payload = None
    if world.is_main:
        payload = {"state": state.to_dict(), "params": [p.detach().cpu() for p in stepper.params],
                   "optimizer": stepper.optimizer.state_dict()}
    payload = world.broadcast_object(payload, "the broadcast of the checkpoint")
    if not world.is_main:
        with torch.no_grad():
            for p, value in zip(stepper.params, payload["params"], strict=True):
                p.copy_(value)
        stepper.optimizer.load_state_dict(payload["optimizer"])
    return TrainState.from_dict(payload["state"])


def _run_steps(loop: _Loop, interrupts: _Interrupts) -> None:
    """The optimizer steps up to ``max_steps``, each followed by its metrics, evaluation and checkpoint.

    Raises:
        TrainingInterrupted: a Ctrl-C was seen at a step boundary (a checkpoint of that step is written).
    """
    from tqdm.auto import tqdm

    config, world = loop.config, loop.world
    bar = tqdm(total=config.max_steps, initial=loop.state.step, disable=not (config.progress and world.is_main),
               desc="finetune", unit="step", dynamic_ncols=True)
    try:
        while loop.state.step < config.max_steps:
            result = loop.setup.stepper.step(loop.stream, loop.state, stop=interrupts.requested,
                                             last_checkpoint=loop.last_checkpoint)
            _record(loop, result, bar)
            _evaluate_if_due(loop, bar)
            _checkpoint_if_due(loop)
            # One process stops as soon as it is asked; several stop together, after the step whose all-reduce
            # first carried a request.
            if interrupts.requested if world.size == 1 else result.stop:
                _stop(loop)
    finally:
        bar.close()


def _record(loop: _Loop, result: StepResult, bar: Any) -> None:
    """Log a finished step: metrics (every ``logging_steps``), the progress bar, the loss and tokens."""
    state, config = loop.state, loop.config
    loop.loss = result.loss
    loop.tokens_run += result.n_tokens
    tokens_per_s = result.n_tokens / max(result.seconds, 1e-9)
    if loop.metrics is not None and state.step % config.logging_steps == 0:
        loop.metrics.write({"step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                            "epoch": state.epoch, "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                            "world_size": loop.world.size, **result.metrics})
    bar.update(1)
    bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:.0f}")


def _evaluate_if_due(loop: _Loop, bar: Any) -> None:
    """Evaluate every ``eval_steps`` and after the last step (when there is evaluation data)."""
    step, config, setup = loop.state.step, loop.config, loop.setup
    due = (config.eval_steps and step % config.eval_steps == 0) or step == config.max_steps
    if setup.eval_ds is None or not due:
        return
    loop.last_eval = evaluate(setup.stepper.model, setup.eval_ds, config, setup.stepper.pad_id, loop.world)
    if loop.metrics is not None:
        loop.metrics.write({"step": step, **loop.last_eval})
        bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in loop.last_eval.items()))


def _checkpoint_if_due(loop: _Loop) -> None:
    if loop.config.save_steps and loop.state.step % loop.config.save_steps == 0:
        _save(loop)


def _stop(loop: _Loop) -> None:
    """Stop on Ctrl-C: make sure the finished step has a checkpoint, then raise :class:`TrainingInterrupted`."""
    if loop.last_checkpoint is None or loop.last_checkpoint.name != _checkpoint_name(loop.state):
        _save(loop)
    loop.world.barrier("the checkpoint")
    raise TrainingInterrupted(loop.state.step, loop.last_checkpoint)


def _checkpoint_name(state: TrainState) -> str:
    return f"step-{state.step:06d}"


def _save(loop: _Loop) -> None:
    """Write the checkpoint of the current step and make the run folder ``out`` (at the first checkpoint).
    Only rank 0 writes; every rank records the folder as the last checkpoint."""
    config, world, folder, stepper = loop.config, loop.world, loop.folder, loop.setup.stepper
    path = folder.path / "checkpoints" / _checkpoint_name(loop.state)
    if world.is_main:
        # The schedule is a pure function of the step; it is recorded for readers of the checkpoint.
        sched = {"schedule": config.lr_scheduler, "step": loop.state.step, "warmup": config.warmup,
                 "total": config.max_steps, "base_lr": config.learning_rate}
        save_checkpoint(path, stepper.model, stepper.optimizer,
                        {**loop.state.to_dict(), "world_size": world.size, "scheduler": sched},
                        base_model_name_or_path=config.model, config=_saved_config(config))
    folder.commit()
    loop.last_checkpoint = folder.path / "checkpoints" / path.name
    if loop.metrics is not None:
        loop.metrics.path = folder.path / "metrics.jsonl"  # the run folder is `out` from now on


def _finish(loop: _Loop) -> None:
    """The finished run: the adapter and the loss curve beside the checkpoints; the run folder becomes ``out``."""
    from fourbit.nn.adapters import save_adapter

    if loop.world.is_main:
        save_adapter(loop.setup.stepper.model, loop.folder.path, base_model_name_or_path=loop.config.model)
        plot_loss_curve(loop.folder.path / "metrics.jsonl", loop.folder.path / "loss_curve.png")
    loop.folder.commit()


def _saved_config(config: TrainConfig) -> TrainConfig:
    """The configuration written beside the run: ``resume``/``overwrite`` describe one invocation, not the run."""
    return config.replace(resume=False, overwrite=False)


def _pad_id(model: nn.Module, tokenizer: Any, config: TrainConfig) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if config.task == "classify" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    return pad_id


def _result(loop: _Loop) -> TrainResult:
    setup = loop.setup
    resume = setup.plan.resume
    return TrainResult(loop.folder.out, loop.state.step, loop.loss, loop.last_eval, len(setup.train_ds),
                       len(setup.eval_ds) if setup.eval_ds else 0, setup.train_ds.n_truncated,
                       setup.train_ds.n_dropped, loop.tokens_run / max(time.perf_counter() - loop.t_start, 1e-9),
                       resume.step if resume is not None else None, loop.world.size)
