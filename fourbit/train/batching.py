"""Batches: packing, length grouping, a deterministic per-epoch order, and collation into tensors.

The order of epoch ``e`` is a pure function of ``(seed, e)``, so the data position of a run is two integers
(epoch, batch index) that a checkpoint stores and a resumed run continues from exactly.

Packing concatenates examples into rows of ``max_length`` tokens. Each example's ``position_ids`` restart at
0; transformers (>= 4.54) reads the restarts (with ``attention_mask=None``) as packed-sequence boundaries and
builds a block-diagonal causal mask, so no token attends across examples (tested: packed loss == unpacked).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Encoded

__all__ = ["Batch", "BatchPlan", "collate", "pack_examples"]


@dataclass
class Batch:
    """Tensors for one micro-batch, all ``[B, T]`` (``labels`` is ``[B]`` for classification)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    n_tokens: int  # real (non-pad) input tokens

    @property
    def n_targets(self) -> int:
        """Label tokens that carry loss (after the causal shift), or rows for classification."""
        if self.labels.ndim == 1:
            return int(self.labels.numel())
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def pack_examples(examples: Sequence[Encoded], max_length: int) -> list[list[Encoded]]:
    """Greedily group examples, in order, into bins of at most ``max_length`` tokens."""
    bins: list[list[Encoded]] = []
    cur: list[Encoded] = []
    used = 0
    for ex in examples:
        if cur and used + len(ex) > max_length:
            bins.append(cur)
            cur, used = [], 0
        cur.append(ex)
        used += len(ex)
    if cur:
        bins.append(cur)
    return bins


def collate(rows: Sequence[Sequence[Encoded]], pad_id: int, *, packed: bool, classify: bool = False) -> Batch:
    """Right-pad rows (each a list of examples: one, or several when packed) into a :class:`Batch`.

    Unpacked rows get a 2-D ``attention_mask``; packed rows get ``position_ids`` restarting at each example
    and no mask (see module docstring). Padding carries ``IGNORE_INDEX`` labels.
    """
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    n_tokens = 0
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex)
            ids[b, t:t + n] = torch.tensor(ex.input_ids)
            if not classify:
                labels[b, t:t + n] = torch.tensor(ex.labels)
                # An example's first token is never a target; in a packed row it would otherwise be
                # predicted from the previous example's last token.
                labels[b, t] = IGNORE_INDEX
            pos[b, t:t + n] = torch.arange(n)
            mask[b, t:t + n] = 1
            t += n
        n_tokens += t
        # Padding after a packed row forms its own "sequence" (positions restart) so that it attends to nothing real.
        pos[b, t:] = torch.arange(width - t)
    if classify:
        labels = torch.tensor([row[0].labels[0] for row in rows], dtype=torch.long)
    if packed:
        return Batch(ids, labels, None, pos, n_tokens)
    return Batch(ids, labels, mask, None, n_tokens)


class BatchPlan:
    """The batches of every epoch, deterministic in ``(seed, epoch)``.

    Args:
        examples: tokenized examples.
        batch_size: rows per micro-batch.
        seed: base seed of the per-epoch shuffles.
        max_length: row length for packing.
        packing: pack examples into rows (packing is done once, on a seeded order).
        group_by_length: batch examples of similar length (megabatches of ``50 × batch_size`` sorted by
            length), which cuts padding without packing.
        shuffle: shuffle each epoch (False for evaluation).
    """

    def __init__(
        self,
        examples: Sequence[Encoded],
        batch_size: int,
        *,
        seed: int = 0,
        max_length: int = 512,
        packing: bool = False,
        group_by_length: bool = False,
        shuffle: bool = True,
    ) -> None:
        if not examples:
            raise ValueError("no examples to batch: every example was skipped or dropped")
        self.batch_size = batch_size
        self.seed = seed
        self.packing = packing
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        if packing:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(examples), generator=g).tolist() if shuffle else range(len(examples))
            self.rows: list[list[Encoded]] = pack_examples([examples[i] for i in order], max_length)
        else:
            self.rows = [[e] for e in examples]

    def batches(self, epoch: int) -> list[list[list[Encoded]]]:
        """The micro-batches of ``epoch`` (each a list of rows)."""
        n = len(self.rows)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.group_by_length:
            mega = 50 * self.batch_size
            grouped: list[int] = []
            for s in range(0, n, mega):
                chunk = order[s:s + mega]
                grouped += sorted(chunk, key=lambda i: -sum(len(e) for e in self.rows[i]))
            order = grouped
        batches = [[self.rows[i] for i in order[s:s + self.batch_size]] for s in range(0, n, self.batch_size)]
        if self.group_by_length and self.shuffle:
            # Sorting made the batches length-monotone; shuffle their order so lengths do not trend.
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, list[list[Encoded]]]]:
        """Endless ``(epoch, index, batch)`` from batch ``start`` of ``epoch`` on, wrapping into new epochs."""
        while True:
            bs = self.batches(epoch)
            for i in range(start, len(bs)):
                yield epoch, i, bs[i]
            epoch, start = epoch + 1, 0
