"""Where optimizer states live and when they move: the paging policy of :class:`fourbit.optim.AdamW`.

The whole policy is in :class:`StatePager`:

- ``paged=False``: every state tensor lives on its parameter's device; nothing is copied.
- ``paged=True``: states are *placed* once, when they are created (or loaded), in parameter order:
  a parameter's states are **resident** on its device while the running total of resident state bytes stays
  within ``device_budget_bytes``; all later ones are **paged**: they live in host memory (pinned when CUDA is
  available, so copies can be asynchronous). ``device_budget_bytes=None`` means a budget of 0: everything
  is paged. Placement is greedy and never revisited, so it is deterministic and independent of step timing.
- During ``step()`` the optimizer walks its parameters in order through :meth:`StatePager.stream`. For a
  paged parameter the pager hands out a working copy of its states on the parameter's device, and, before
  the update of parameter i runs, it has already started the copy of parameter i+1's states on a side CUDA
  stream (prefetch), so the host-to-device copy overlaps the math. After the update the working copy is
  written back to host memory (on the side stream, after the update finished) and dropped, so at most two
  parameters' paged states are on the device at any time.
- Without CUDA (or for parameters on the CPU) the same code path runs: the "device copy" is a plain
  ``clone`` and the write-back a ``copy_``, so paged and unpaged training give bit-identical results.

The pager tracks how many state bytes are on the device (resident + working copies) and the peak of that,
so tests and benchmarks can check that a budget is honoured.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from fourbit._errors import FieldError

__all__ = ["StatePager", "PagingStats"]


def _nbytes(states: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in states.values())


@dataclass
class PagingStats:
    """Counters of one pager.

    Attributes:
        resident_bytes: state bytes kept on the device permanently.
        paged_bytes: state bytes living in host memory.
        peak_device_bytes: the largest ``resident_bytes`` + working copies seen during a step.
        copies_in: number of host-to-device state copies made so far.
    """

    resident_bytes: int = 0
    paged_bytes: int = 0
    peak_device_bytes: int = 0
    copies_in: int = 0
    _live: int = field(default=0, repr=False)


class StatePager:
    """Places optimizer states (resident on device or paged to host) and streams paged ones through steps.

    Args:
        paged: whether paging is on at all (False: every state is resident, no copies).
        device_budget_bytes: with ``paged=True``, how many bytes of states may stay resident on the
            device (greedy in parameter order); None means 0 (page everything).

    Raises:
        FieldError: (a ValueError) for a negative budget, or a budget with ``paged=False``.
        TypeError: for a budget that is not an int.
    """

    def __init__(self, paged: bool, device_budget_bytes: int | None = None) -> None:
        if device_budget_bytes is not None:
            if not paged:
                raise FieldError(
                    "device_budget_bytes", "needs `paged=True` (without paging every state is resident)"
                )
            if isinstance(device_budget_bytes, bool) or not isinstance(device_budget_bytes, int):
                raise TypeError(f"`device_budget_bytes` must be an int or None, got {device_budget_bytes!r}")
            if device_budget_bytes < 0:
                raise FieldError("device_budget_bytes", f"must be >= 0, got {device_budget_bytes}")
        self.paged = bool(paged)
        self.budget = 0 if device_budget_bytes is None else device_budget_bytes
        self.stats = PagingStats()
        self._resident: dict[int, bool] = {}  # id(param) -> resident?
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    # ---- placement -------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget all placements (before states are re-created, e.g. by ``load_state_dict``)."""
        self._resident.clear()
        self.stats = PagingStats()

    def place(self, param: torch.Tensor, nbytes: int) -> torch.device:
        """Decide where a new parameter's states live and return that device.

        Args:
            param: the parameter (its device is the compute device).
            nbytes: the size of all its state tensors.

        Returns:
            ``param.device`` when resident, else the CPU (host memory).
        """
        resident = (not self.paged) or (self.stats.resident_bytes + nbytes <= self.budget)
        self._resident[id(param)] = resident
        if resident:
            self.stats.resident_bytes += nbytes
            self.stats._live += nbytes
            self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.stats._live)
            return param.device
        self.stats.paged_bytes += nbytes
        return torch.device("cpu")

    def is_resident(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s states stay on its device (False: paged to host). KeyError if not placed."""
        return self._resident[id(param)]

    def empty(self, like: torch.Tensor, dtype: torch.dtype, device: torch.device, shape=None) -> torch.Tensor:
        """A zero state tensor on ``device``; host tensors are pinned when it helps (CUDA parameter)."""
        shape = like.shape if shape is None else shape
        pin = device.type == "cpu" and like.device.type == "cuda"
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

    # ---- streaming through a step -----------------------------------------------------------------------

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device=device)
        return self._side_streams[device]

    def _fetch(self, param: torch.Tensor, states: dict[str, torch.Tensor]):
        """Start copying ``states`` to ``param.device``; returns (working copies, CUDA event or None)."""
        self.stats.copies_in += 1
        self.stats._live += _nbytes(states)
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.stats._live)
        if param.device.type != "cuda":
            return {k: v.clone() for k, v in states.items()}, None
        side = self._side_stream(param.device)
        with torch.cuda.stream(side):
            work = {k: v.to(param.device, non_blocking=True) for k, v in states.items()}
            event = torch.cuda.Event()
            event.record(side)
        return work, event

    def _write_back(self, param: torch.Tensor, host: dict[str, torch.Tensor], work: dict[str, torch.Tensor]):
        if param.device.type != "cuda":
            for k, v in work.items():
                host[k].copy_(v)
        else:
            side = self._side_stream(param.device)
            side.wait_stream(torch.cuda.current_stream(param.device))
            with torch.cuda.stream(side):
                for k, v in work.items():
                    host[k].copy_(v, non_blocking=True)
                    v.record_stream(side)  # keep the memory until the copy has run
        self.stats._live -= _nbytes(work)

    def stream(
        self, items: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield, for each ``(param, states)`` in order, the states to update in place on ``param.device``.

        Resident states are yielded as they are. Paged states are yielded as working copies that were
        prefetched while the previous parameter was updated, and written back to host memory when the
        consumer asks for the next item (or the iteration ends). The consumer must update the yielded
        tensors in place and must not keep references to them.

        Args:
            items: ``(param, states)`` pairs; ``states`` maps names to the tensors stored in the optimizer.

        Yields:
            One dict of tensors per item, on ``param.device``.
        """

        paged = [self.paged and not self._resident.get(id(p), True) for p, _ in items]
        order = [i for i, is_paged in enumerate(paged) if is_paged]
        following = dict(zip(order, order[1:], strict=False))  # paged item -> the next paged item (prefetch target)
        pending = self._fetch(*items[order[0]]) if order else None
        try:
            for i, (param, states) in enumerate(items):
                if not paged[i]:
                    yield states
                    continue
                assert pending is not None
                work, event = pending
                pending = None
                if event is not None:
                    current = torch.cuda.current_stream(param.device)
                    current.wait_event(event)
                    for v in work.values():
                        v.record_stream(current)
                # Prefetch the next paged parameter before this one's math runs, so the copies overlap.
                if i in following:
                    pending = self._fetch(*items[following[i]])
                try:
                    yield work
                finally:
                    self._write_back(param, states, work)
                del work
        finally:
            if pending is not None:  # consumer stopped early: drop the unused prefetch
                self.stats._live -= _nbytes(pending[0])
            for s in self._side_streams.values():
                s.synchronize()  # host copies are final before anyone reads them (state_dict, next step)
