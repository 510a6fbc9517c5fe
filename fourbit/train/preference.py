"""Preference losses: DPO (Rafailov et al. 2023) and ORPO (Hong et al. 2024), as plain functions of log-probs.

Each pair is a prompt with a ``chosen`` and a ``rejected`` reply. The log-probability of a reply,
``log π(y|x)``, is the sum over its tokens of ``log softmax(logits)[token]`` (DPO), or the mean over them
(ORPO's odds ratio). The functions below take those numbers per pair and return per-pair losses and rewards;
they equal TRL's ``DPOTrainer`` and ``ORPOTrainer`` (tested within 1e-5 in fp32 against TRL itself):

* DPO, Eq. 7: with ``Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))``,
  ``sigmoid``: ``-log σ(βΔ)``; ``hinge``: ``relu(1 - βΔ)`` (SLiC); ``ipo`` (Azar et al. 2023, Eq. 17):
  ``(Δ̄ - 1/(2β))²`` where Δ̄ uses log-ratios divided by each reply's token count (TRL's normalisation, confirmed
  with the IPO authors); ``robust`` (Chowdhury et al. 2024): ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``
  with ``ε = label_smoothing``. The implicit rewards are ``β (log π(y) - log π_ref(y))``.
* ORPO, Eq. 4-7: the odds ``odds(y) = p / (1 - p)`` of a reply's mean per-token probability ``p``;
  ``L = L_NLL(chosen) - λ · log σ(log odds(y_w) - log odds(y_l))``, where TRL calls λ ``beta`` and takes the NLL
  over every token of the prompt and chosen reply. The rewards are ``λ · mean log p``.

The reference log-probs of DPO come from the same 4-bit model with its adapter switched off
(:func:`fourbit.nn.lora.adapters_disabled`), once per pair (:func:`reference_logps`), and are kept in the run
folder (:data:`REFERENCE_FILE`, :func:`save_reference_logps`), so that a resumed run reads them back
(:func:`read_reference_logps`) instead of running the reference pass again; see :mod:`fourbit.train.pairs`
for the data.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fourbit.nn.lora import adapters_disabled

from .config import TrainConfig
from .data import IGNORE_INDEX
from .distributed import World, fingerprint_examples
from .loss import decoder_hidden_states, token_cross_entropy
from .pairs import DPO_LOSS_TYPES, PREFERENCE_TASKS, Pair, PairBatch, collate_pairs

__all__ = ["DPO_LOSS_TYPES", "PREFERENCE_TASKS", "REFERENCE_FILE", "PairLoss", "dpo_loss", "evaluate_pairs", "log1mexp",
           "orpo_loss", "pair_logps", "pair_loss", "read_reference_logps", "reference_key", "reference_logps",
           "save_reference_logps"]

#: The reference log-probs of a DPO run's pairs, in its run folder: float64 ``chosen`` and ``rejected`` ``[N]``
#: in the order of the training pairs then the evaluation pairs, and the :func:`reference_key` they belong to.
REFERENCE_FILE = "reference_logps.safetensors"
#: The options that change what the reference log-probs are: the base and its quantization (fixed on resume) and
#: the compute dtype (which may change on resume). The speed options (``eval_batch_size``, ``loss_chunk_size``,
#: ``fused_kernels``) change them by rounding only: a resumed run keeps the values its start computed.
_REFERENCE_FIELDS = ("model", "quant", "double_quant", "compute_dtype")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's per-pair loss and the implicit rewards.

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed log-probs of the replies under the policy.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference (adapter off).
        beta: β, the strength of the KL penalty (IPO's τ).
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: ε, the assumed rate of flipped labels (``robust`` only).
        chosen_lengths, rejected_lengths: ``[B]`` reply token counts (``ipo`` only).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``, the rewards detached.

    Raises:
        ValueError: an unknown ``loss_type``; ``ipo`` without the lengths.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs `chosen_lengths` and `rejected_lengths` (reply token counts)")
        mean_delta = (chosen_ratio / chosen_lengths.clamp(min=1.0) - rejected_ratio / rejected_lengths.clamp(min=1.0))
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"`loss_type`: must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (branching at ``-log 2``, Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair (to be *subtracted* from the chosen NLL) and the rewards.

    Args:
        chosen_mean_logps, rejected_mean_logps: ``[B]`` mean per-token log-probs of the replies.
        beta: λ, the weight of the odds-ratio term (TRL's ``beta``).

    Returns:
        ``(ratio_terms [B] = λ · log σ(log odds ratio), chosen_rewards [B], rejected_rewards [B],
        log_odds [B])``; the full loss is ``nll - ratio_terms.mean()``.
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    terms = beta * F.logsigmoid(log_odds)
    return terms, beta * chosen.detach(), beta * rejected.detach(), log_odds.detach()


def pair_logps(model: nn.Module, pairs: PairBatch, *, chunk_size: int = 1024, nll: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed reply log-probs of every sequence of ``pairs`` (chosen rows, then rejected), their token counts,
    and with ``nll`` the summed NLL over every predicted token of the chosen sequences, prompt included
    (ORPO's NLL term, as TRL takes it). Token log-probs come from the decoder's hidden states through the head
    (:func:`fourbit.train.loss.token_cross_entropy`), for the needed positions only.

    Returns:
        ``(logps [2B], counts [2B], nll_sum or None)``, float32.
    """
    batch, n = pairs.batch, pairs.n_pairs
    targets = batch.input_ids[:, 1:]
    reply = batch.labels[:, 1:] != IGNORE_INDEX
    need = reply.clone()
    if nll:
        need[:n] |= batch.attention_mask[:n, 1:].bool()
    hidden = decoder_hidden_states(model, batch)[:, :-1][need]
    ce = token_cross_entropy(hidden, model.get_output_embeddings(), targets[need], chunk_size)
    logp = torch.zeros(need.shape, dtype=ce.dtype, device=ce.device).masked_scatter(need, -ce)
    sums = (logp * reply).sum(dim=1)
    nll_sum = -(logp[:n] * batch.attention_mask[:n, 1:]).sum() if nll else None
    return sums, reply.sum(dim=1).to(sums.dtype), nll_sum


@dataclass
class PairLoss:
    """One micro-batch's share of a step's preference loss (already divided by the step's pair and token
    counts, so the shares add up to the step's loss) and its reward sums (detached floats)."""

    loss: torch.Tensor
    chosen_rewards: float
    rejected_rewards: float
    correct: float  # pairs whose chosen reward is above the rejected one


def pair_loss(model: nn.Module, pairs: PairBatch, config: TrainConfig, n_pairs: int, n_nll_tokens: int) -> PairLoss:
    """The DPO or ORPO loss (``config.task``) of a micro-batch, as a share of a global batch of ``n_pairs``
    pairs (and ``n_nll_tokens`` chosen tokens, ORPO). DPO reads the cached reference log-probs ``pairs.ref``.

    Raises:
        RuntimeError: DPO without reference log-probs (:func:`reference_logps` was not run).
    """
    orpo = config.task == "orpo"
    logps, counts, nll_sum = pair_logps(model, pairs, chunk_size=config.loss_chunk_size, nll=orpo)
    n = pairs.n_pairs
    if orpo:
        means = logps / counts.clamp(min=1.0)
        terms, chosen_r, rejected_r, _ = orpo_loss(means[:n], means[n:], beta=config.beta)
        loss = nll_sum / max(n_nll_tokens, 1) - terms.sum() / n_pairs
    else:
        if pairs.ref is None:
            raise RuntimeError("DPO needs the reference log-probs of the pairs; run reference_logps first")
        ref = pairs.ref.to(logps.dtype)
        losses, chosen_r, rejected_r = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=config.beta,
                                                loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                                                chosen_lengths=counts[:n], rejected_lengths=counts[n:])
        loss = losses.sum() / n_pairs
    return PairLoss(loss, float(chosen_r.sum()), float(rejected_r.sum()), float((chosen_r > rejected_r).sum()))


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: Sequence[Pair], config: TrainConfig, pad_id: int) -> None:
    """Fill in every pair's ``ref_chosen``/``ref_rejected``: the summed reply log-probs of the same model with
    its adapter switched off (:func:`fourbit.nn.lora.adapters_disabled`), in eval mode, ``eval_batch_size``
    pairs at a time in their order. Computed once per pair: DPO's reference model is never held in memory.
    The training mode and the torch RNG state are restored."""
    from .step import autocast, to_device

    was_training, rng = model.training, torch.get_rng_state()
    device = next(model.parameters()).device
    model.eval()
    try:
        with adapters_disabled(model):
            for s in range(0, len(pairs), config.eval_batch_size):
                chunk = pairs[s:s + config.eval_batch_size]
                batch = collate_pairs([[p] for p in chunk], pad_id)
                with autocast(config, model):
                    logps, _, _ = pair_logps(model, PairBatch(to_device(batch.batch, device), len(chunk), None),
                                             chunk_size=config.loss_chunk_size)
                values = logps.double().cpu().tolist()
                for p, chosen, rejected in zip(chunk, values[:len(chunk)], values[len(chunk):], strict=True):
                    p.ref_chosen, p.ref_rejected = chosen, rejected
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: Sequence[Pair], config: TrainConfig, pad_id: int,
                   world: World | None = None) -> dict[str, float]:
    """The preference loss of ``pairs`` (as one batch would give it) and their mean rewards, margin and
    accuracy, as ``eval_*``. Runs in eval mode and restores the training mode and the torch RNG state; on
    several processes rank ``r`` takes batches ``r, r+W, ...`` (every batch under fsdp) and the sums are
    reduced."""
    from .step import autocast, to_device

    world = world or World()
    was_training, rng = model.training, torch.get_rng_state()
    device = next(model.parameters()).device
    batches = [[[p] for p in pairs[s:s + config.eval_batch_size]] for s in range(0, len(pairs), config.eval_batch_size)]
    n_nll = sum(collate_pairs(rows, pad_id).n_chosen_tokens for rows in batches) if config.task == "orpo" else 0
    split = world.size if world.mode != "fsdp" else 1
    sums = [0.0] * 4
    model.eval()
    try:
        for i, rows in enumerate(batches):
            if i % split != world.rank % split:
                continue
            batch = collate_pairs(rows, pad_id)
            with autocast(config, model):
                out = pair_loss(model, PairBatch(to_device(batch.batch, device), batch.n_pairs, batch.ref), config,
                                len(pairs), n_nll)
            for k, value in enumerate((float(out.loss), out.chosen_rewards, out.rejected_rewards, out.correct)):
                sums[k] += value
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    if split > 1:
        sums = world.all_reduce_sum(torch.tensor(sums, dtype=torch.float64), "the evaluation").tolist()
    chosen, rejected, correct = (v / len(pairs) for v in sums[1:])
    return {"eval_loss": sums[0], "eval_rewards/chosen": chosen, "eval_rewards/rejected": rejected,
            "eval_rewards/margins": chosen - rejected, "eval_rewards/accuracies": correct}


def reference_key(pairs: Sequence[Pair], config: TrainConfig) -> str:
    """What the reference log-probs of ``pairs`` depend on: the pairs' tokens, in order, the base model's path
    and quantization, and the compute dtype."""
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint_examples(pairs).encode())
    h.update(repr([(name, getattr(config, name)) for name in _REFERENCE_FIELDS]).encode())
    return h.hexdigest()


def save_reference_logps(path: str | Path, pairs: Sequence[Pair], key: str) -> Path:
    """Write the reference log-probs of ``pairs`` (filled in by :func:`reference_logps`) to ``path``
    atomically, with ``key`` (:func:`reference_key`)."""
    from fourbit._io import save_safetensors

    tensors = {"chosen": torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64),
               "rejected": torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64)}
    return save_safetensors(tensors, path, {"key": key, "pairs": str(len(pairs))})


def read_reference_logps(path: str | Path, key: str, n_pairs: int) -> tuple[list[float], list[float]] | None:
    """The ``(chosen, rejected)`` reference log-probs kept at ``path`` for ``n_pairs`` pairs with ``key``, or
    None where there is no such file, or it belongs to other pairs or options, or it is damaged (the caller
    computes them again)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            chosen, rejected = f.get_tensor("chosen"), f.get_tensor("rejected")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if chosen.dtype != torch.float64 or chosen.shape != (n_pairs,) or rejected.shape != (n_pairs,):
        return None
    return chosen.tolist(), rejected.tolist()
