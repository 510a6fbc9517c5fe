"""One optimizer step over a global batch, and the three rules that make a run exact.

An interrupted-and-resumed run reproduces the uninterrupted one bit for bit on CPU (tested with exact float
equality of the loss curve and the adapter), and a run on ``W`` processes computes what one process computes
over the same global batches, because of three rules, all kept in this module:

1. **Micro-batch seeds.** Micro-batch ``i`` of optimizer step ``s`` runs under the torch seed
   :func:`micro_seed` ``(seed, s, i)``, so its dropout masks depend on which micro-batch of the global batch is
   computed, never on which process computes it or on what ran before it in that process.
2. **Summed gradients.** The global batch of a step is ``gradient_accumulation_steps x W`` micro-batches. Each
   micro-batch's summed token loss is divided by the label-token count of the *whole global batch* before its
   backward, and the gradients are summed over the ranks (:func:`reduce_gradients`, one flat all-reduce), so
   accumulation over micro-batches and over processes equals one big batch.
3. **Float64 loss sums.** Token-loss sums are added up as Python floats (float64), and reduced over the ranks
   in float64 together with the Ctrl-C request, so every rank logs the same loss and stops after the same step.

What a checkpoint stores of the loop itself is a :class:`TrainState` (optimizer steps done, data position,
tokens seen); with the optimizer state and the RNG states (:mod:`fourbit.train.checkpoint`) it is all a resumed
run needs to continue exactly. The learning rate is a pure function of the step (:func:`lr_factor`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fourbit._errors import FieldError

from .batching import Batch, collate
from .config import TrainConfig
from .data import Encoded
from .distributed import World
from .loss import causal_lm_loss
from .pairs import PREFERENCE_TASKS, PairBatch, collate_pairs
from .schedule import lr_factor

__all__ = [
    "StepResult",
    "Stepper",
    "TrainState",
    "autocast",
    "computes_bf16",
    "diverged",
    "loss_sum",
    "micro_seed",
    "reduce_gradients",
    "to_device",
]

#: What :meth:`fourbit.train.batching.BatchPlan.iterate` yields: (epoch, batch index in the epoch, rows).
BatchStream = Iterator[tuple[int, int, list[list[Encoded]]]]


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint's ``trainer_state.json`` under these keys.

    Attributes:
        step: optimizer steps done.
        epoch, batch: the data position: the next micro-batch is batch ``batch`` of epoch ``epoch`` of the
            :class:`~fourbit.train.batching.BatchPlan`.
        tokens: tokens trained on so far (padding excluded), over all processes.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainState:
        """The state of a checkpoint's trainer state (its other keys, such as the scheduler record, are not
        part of it)."""
        return cls(int(saved["step"]), int(saved["epoch"]), int(saved["batch"]), int(saved.get("tokens", 0)))


@dataclass
class StepResult:
    """What one optimizer step measured (over all ranks)."""

    loss: float
    lr: float
    grad_norm: float
    n_tokens: int
    seconds: float
    stop: bool = False  # some rank asked to stop (Ctrl-C) before this step's all-reduce
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # preference: the rewards


def micro_seed(seed: int, step: int, index: int) -> int:
    """The torch seed of micro-batch ``index`` of the global batch of optimizer step ``step`` (rule 1)."""
    return (seed * 1_000_003 + step * 4_099 + index) % (2**63 - 1)


def reduce_gradients(params: list[torch.Tensor], extra: list[float], world: World) -> list[float]:
    """Sum the gradients of ``params`` over the ranks in one flat all-reduce (in their own dtype, as DDP's
    buckets do; rule 2), and the numbers ``extra`` (loss sum, stop request) in float64 (rule 3)."""
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


def computes_bf16(config: TrainConfig, model: nn.Module) -> bool:
    """Whether training runs under bf16 autocast: ``compute_dtype`` bf16, or auto on a device with native bf16."""
    if config.compute_dtype == "auto":
        from fourbit.models import QuantConfig

        device = next(model.parameters()).device
        return QuantConfig().resolved_compute_dtype(device) == torch.bfloat16
    return config.compute_dtype == "bf16"


def autocast(config: TrainConfig, model: nn.Module) -> AbstractContextManager[Any]:
    """bf16 autocast on the model's device when :func:`computes_bf16`, else nothing."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16) if computes_bf16(config, model) else nullcontext()


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its tensors on ``device``."""
    if batch.input_ids.device == device:
        return batch
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Batch(move(batch.input_ids), move(batch.labels), move(batch.attention_mask), move(batch.position_ids),
                 batch.n_tokens)


def loss_sum(model: nn.Module, batch: Batch, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed (not averaged) loss of ``batch``, and the logits for classification (None for causal LM)."""
    if config.task == "classify":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits.float(), batch.labels, reduction="sum"), logits
    return causal_lm_loss(model, batch, chunk_size=config.loss_chunk_size), None


def _reward_metrics(sums: list[float], n_pairs: int) -> dict[str, float]:
    """The mean rewards of a step's pairs (as TRL logs them) from their sums over the pairs."""
    chosen, rejected, correct = (v / n_pairs for v in sums)
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": correct}


def diverged(step: int, what: str, lr: float, last_checkpoint: Path | None) -> FieldError:
    """The error for a step whose loss, gradient or update is not finite."""
    kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
    return FieldError("learning_rate", f"training diverged at step {step}: {what} (learning rate {lr:g}); "
                                       f"stopped without saving this step{kept}: lower `learning_rate` and run again")


@dataclass
class Stepper:
    """What every optimizer step of a run works on: the model with its trainable parameters and optimizer, the
    options, the processes and the padding token."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    config: TrainConfig
    world: World
    pad_id: int

    def step(self, stream: BatchStream, state: TrainState, *, stop: bool = False,
             last_checkpoint: Path | None = None) -> StepResult:
        """One optimizer step over the next global batch of ``stream``: this rank's micro-batches forward and
        backward, the gradients and loss sums reduced over the ranks, gradient clipping, AdamW. Advances
        ``state`` by one step. ``stop`` (a Ctrl-C on this rank) rides on the loss all-reduce, so that every rank
        stops after the same step.

        Raises:
            FieldError: the loss, the gradient or the updated weights are not finite (``learning_rate``, naming
                ``last_checkpoint``); the weights of this step are not saved anywhere.
            PeerLost: another rank stopped.
        """
        t0 = time.perf_counter()
        micro = self._global_batch(stream, state)
        n_targets = max(1, sum(b.n_targets for b in micro))
        metrics: dict[str, float] = {}
        if self.config.task in PREFERENCE_TASKS:
            sums = reduce_gradients(self.params, [*self._backward_pairs(micro, state.step), float(stop)], self.world)
            loss, stops, metrics = sums[0], sums[-1], _reward_metrics(sums[1:4], n_targets)
        else:
            total, stops = reduce_gradients(self.params, [self._backward(micro, state.step, n_targets), float(stop)],
                                            self.world)
            loss = total / n_targets
        lr = self._set_learning_rate(state.step)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or float("inf")))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
            raise diverged(state.step + 1, what, lr, last_checkpoint)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise diverged(state.step + 1, "the update made the adapter weights non-finite", lr, last_checkpoint)
        n_tokens = sum(b.n_tokens for b in micro)
        state.step += 1
        state.tokens += n_tokens
        return StepResult(loss, lr, norm, n_tokens, time.perf_counter() - t0, stops > 0, metrics)

    def _global_batch(self, stream: BatchStream, state: TrainState) -> list[Batch]:
        """The ``gradient_accumulation_steps x world.size`` micro-batches of the step (every rank collates all
        of them: the label-token count of the whole global batch divides each loss); advances the data
        position of ``state``."""
        config, micro = self.config, []
        for _ in range(config.gradient_accumulation_steps * self.world.size):
            epoch, index, rows = next(stream)
            if config.task in PREFERENCE_TASKS:
                micro.append(collate_pairs(rows, self.pad_id))
            else:
                micro.append(collate(rows, self.pad_id, packed=config.packing, classify=config.task == "classify"))
            state.epoch, state.batch = epoch, index + 1
        return micro

    def _backward(self, micro: list[Batch], step: int, n_targets: int) -> float:
        """Forward and backward of this rank's micro-batches of the global batch ``micro``, each under its own
        seed (rule 1) and divided by the global label-token count (rule 2); returns their summed token loss
        as a float64 (rule 3)."""
        accumulation, total = self.config.gradient_accumulation_steps, 0.0
        device = next(self.model.parameters()).device
        first = self.world.rank * accumulation
        for i in range(first, first + accumulation):
            torch.manual_seed(micro_seed(self.config.seed, step, i))
            with autocast(self.config, self.model):
                loss, _ = loss_sum(self.model, to_device(micro[i], device), self.config)
            (loss / n_targets).backward()
            total += float(loss.detach())
        return total

    def _backward_pairs(self, micro: list[PairBatch], step: int) -> list[float]:
        """Forward and backward of this rank's micro-batches of pairs, each under its own seed (rule 1) and
        divided by the global batch's pair (and, for ORPO, chosen-token) count (rule 2); returns the sums of
        their losses and rewards, and the pairs whose chosen reward is higher, as float64 (rule 3)."""
        from .preference import pair_loss

        accumulation, sums = self.config.gradient_accumulation_steps, [0.0] * 4
        device = next(self.model.parameters()).device
        n_pairs = sum(b.n_pairs for b in micro)
        n_nll = sum(b.n_chosen_tokens for b in micro) if self.config.task == "orpo" else 0
        first = self.world.rank * accumulation
        for i in range(first, first + accumulation):
            torch.manual_seed(micro_seed(self.config.seed, step, i))
            with autocast(self.config, self.model):
                out = pair_loss(self.model, micro[i].to(device), self.config, n_pairs, n_nll)
            out.loss.backward()
            for k, value in enumerate((float(out.loss.detach()), out.chosen_rewards, out.rejected_rewards,
                                       out.correct)):
                sums[k] += value
        return sums

    def _set_learning_rate(self, step: int) -> float:
        """Set the learning rate of optimizer step ``step + 1`` (a pure function of the step) and return it."""
        config = self.config
        lr = config.learning_rate * lr_factor(step, schedule=config.lr_scheduler, warmup=config.warmup,
                                              total=config.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
