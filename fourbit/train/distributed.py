"""Data parallelism over several processes (``torchrun``): the process group, and the few collectives the trainer
needs, each turning a lost peer into an error that names it.

One optimizer step of a run on ``W`` processes consumes the *global batch* of ``gradient_accumulation_steps x W``
micro-batches, in the order one process would read them (:class:`~fourbit.train.batching.BatchPlan`); rank ``r``
runs forward/backward on the contiguous slice ``[r*G, (r+1)*G)`` of it. Every rank collates the whole global
batch (cheap next to a forward pass), so every rank knows the global label-token count that divides the loss;
the gradients are then summed over the ranks in one flat ``all_reduce`` (not averaged), which is the same sum
one process accumulates over the same micro-batches. Dropout masks are a function of (seed, step, micro-batch
index), not of the process that draws them. So a run on ``W`` processes equals a run on one process with
``W`` times the accumulation, up to the order of the floating-point additions of the gradient sum (tested: max
relative difference of the adapter <= 1e-5 in fp32).

This is data parallelism as DDP does it, but with one explicit reduction per optimizer step instead of the
``DistributedDataParallel`` wrapper: the trainer's chunked loss calls the decoder directly (bypassing the
wrapper's ``forward``, which DDP's hooks rely on), gradient accumulation needs ``no_sync`` bookkeeping, DDP
averages where the exact loss needs a sum, and DDP with reentrant gradient checkpointing fails ("Expected to
mark a variable ready only once"). The LoRA gradients are small, so one bucket per step costs nothing.

Rank 0 alone reads and writes the run folder (checkpoints, metrics, adapter) and prints; it broadcasts the
adapter, optimizer and data position it resumed from, so the other machines need the same model folder and
data but no shared file system. A collective that fails (a peer killed, its machine gone) raises
:class:`PeerLost` naming the lost rank(s) instead of waiting; every wait is bounded by ``timeout_s``.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from fourbit._errors import FieldError

__all__ = ["DISTRIBUTED_MODES", "PeerLost", "World", "fingerprint_model", "fingerprint_examples", "init_world",
           "process_group_started", "world_size_from_env"]

_STARTED = False


def process_group_started() -> bool:
    """Whether this process has started a torch.distributed process group (once started, gloo's threads can
    abort the interpreter's teardown: the command line then leaves without it, see ``fourbit.cli.main``)."""
    return _STARTED

DISTRIBUTED_MODES = ("ddp", "fsdp")
T = TypeVar("T")


class PeerLost(ConnectionError):
    """Another rank of the run stopped (killed, crashed, its machine unreachable): this rank stops too."""


@dataclass
class World:
    """The processes of a run: this one's ``rank`` among ``size`` (1: a plain single-process run).

    Attributes:
        rank: this process's global rank (``RANK``).
        size: the number of processes (``WORLD_SIZE``).
        local_rank: its rank on this machine (``LOCAL_RANK``), the CUDA device it uses.
        backend: ``gloo`` (CPU) or ``nccl`` (CUDA); empty for a single process.
        mode: ``ddp`` (the whole base on every rank) or ``fsdp`` (the 4-bit base sharded layer by layer, see
            :mod:`fourbit.nn.fsdp`); empty for a single process.
        timeout_s: the longest wait for the rendezvous or for a peer in a collective.
        peers: ``(host, pid)`` of every rank, to name a lost one.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""
    mode: str = ""
    timeout_s: float = 300.0
    peers: list[tuple[str, int]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------------------------------ collectives
    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as err:  # gloo/nccl errors (DistBackendError, timeouts) are RuntimeErrors
            raise PeerLost(self._lost_message(what, err)) from None

    def _lost_message(self, what: str, err: BaseException) -> str:
        """Name the ranks that are gone: on this machine a peer's process no longer runs (or is a zombie)."""
        here = socket.gethostname()
        lost = [r for r, (host, pid) in enumerate(self.peers) if r != self.rank and host == here and not _alive(pid)]
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if lost:
            who = ", ".join(f"rank {r} (pid {self.peers[r][1]})" for r in lost)
            return f"lost {who} of {self.size} during {what}: it stopped or was killed; rank {self.rank} stops " \
                   f"too. Resume the run with `resume` once every rank runs again ({first})"
        remote = [r for r, (host, _) in enumerate(self.peers) if host != here]
        where = f"; ranks {remote} run on other machines" if remote else ""
        return (f"a peer rank stopped answering during {what} (waited at most {self.timeout_s:g} s, "
                f"`dist_timeout`){where}; rank {self.rank} stops too ({first})")

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "the gradient all-reduce") -> torch.Tensor:
        """Sum ``tensor`` over the ranks in place (a no-op for one process)."""
        if self.size > 1:
            import torch.distributed as dist

            buffer = tensor.to(self.device) if tensor.device != self.device else tensor
            self._run(what, lambda: dist.all_reduce(buffer, op=dist.ReduceOp.SUM))
            if buffer is not tensor:
                tensor.copy_(buffer)
        return tensor

    def all_gather_object(self, obj: Any, what: str = "a check of the ranks") -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._run(what, lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast_object(self, obj: Any, what: str = "the broadcast of the run state") -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._run(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def barrier(self, what: str = "a barrier") -> None:
        if self.size > 1:
            import torch.distributed as dist

            self._run(what, dist.barrier)

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank and fail on every rank if it failed on any, so that no rank waits for a
        peer that stopped on a bad input. This rank's own error is raised as is; a peer's as :class:`PeerLost`
        naming the rank."""
        mine: BaseException | None = None
        result: Any = None
        try:
            result = fn()
        except (ValueError, NotImplementedError, OSError) as err:
            if self.size == 1:
                raise
            mine = err
        failures = self.all_gather_object(None if mine is None else str(mine), what)
        if mine is not None:
            raise mine
        for r, message in enumerate(failures):
            if message is not None:
                raise PeerLost(f"rank {r} stopped during {what}: {message}")
        return result

    def check_same(self, values: dict[str, tuple[str, str]]) -> None:
        """Refuse ranks that disagree on any of ``values`` (``{field: (fingerprint or value, what it is)}``:
        the model, the data, each config field), in one collective.

        Raises:
            FieldError: naming the first field that differs and the first rank that differs from rank 0.
        """
        mine = {name: value for name, (value, _) in values.items()}
        every = self.all_gather_object(mine, "the check that every rank has the same model, data and options")
        for name, (_, what) in values.items():
            for r, theirs in enumerate(every):
                if theirs.get(name) != every[0].get(name):
                    raise FieldError(name, f"rank {r} has different {what} than rank 0 ({theirs.get(name)} != "
                                           f"{every[0].get(name)}); every rank needs the same model folder, data "
                                           "and options")

    def close(self) -> None:
        """Leave the process group (a no-op for one process)."""
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise FieldError("distributed", f"the environment variable {name}={text!r} is not an integer; launch "
                                        "with torchrun, which sets it") from None


def world_size_from_env() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 without it)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def init_world(mode: str | None = None, *, timeout_s: float = 300.0) -> World:
    """Join the process group that ``torchrun`` describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT``: gloo on CPU, nccl on CUDA. Without ``WORLD_SIZE`` (or with 1) this is a
    single-process run and nothing is initialised.

    Args:
        mode: ``"ddp"`` (default when ``WORLD_SIZE`` > 1) or ``"fsdp"``.
        timeout_s: the longest wait for the rendezvous, and later for a peer in a collective.

    Returns:
        The :class:`World`.

    Raises:
        FieldError: a mode that is not ``ddp``/``fsdp`` (``distributed``); a timeout that is not positive or a
            rendezvous not reached within it (``dist_timeout``).
    """
    if mode is not None and mode not in DISTRIBUTED_MODES:
        raise FieldError("distributed", f"must be one of {', '.join(DISTRIBUTED_MODES)}, not {mode!r}")
    if not timeout_s > 0:
        raise FieldError("dist_timeout", f"must be a positive number of seconds, not {timeout_s!r}")
    size = world_size_from_env()
    if size == 1:
        return World(timeout_s=timeout_s, peers=[(socket.gethostname(), os.getpid())])
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise FieldError("distributed", f"rank {rank} is process {local_rank} on its machine, which has "
                                            f"{torch.cuda.device_count()} GPU(s): start at most one process per "
                                            "GPU (torchrun --nproc-per-node), or hide the GPUs "
                                            "(CUDA_VISIBLE_DEVICES=) to train on the CPU with gloo")
        torch.cuda.set_device(local_rank)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        global _STARTED
        _STARTED = True
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:  # DistStoreError/DistNetworkError (RuntimeError), bad env (ValueError)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise FieldError("dist_timeout", f"rank {rank} of {size} could not join the rendezvous at {where} within "
                                         f"{timeout_s:g} s: start every rank with the same rendezvous endpoint, "
                                         f"check that it is reachable, or raise `dist_timeout` ({first})") from None
    world = World(rank, size, local_rank, backend, mode or "ddp", timeout_s)
    world.peers = [tuple(p) for p in world.all_gather_object((socket.gethostname(), os.getpid()), "the rendezvous")]
    return world


def fingerprint_model(model: torch.nn.Module) -> str:
    """A short digest of every parameter and buffer (names, shapes, dtypes and a byte checksum): equal models
    give equal digests on every machine; reads each tensor once, on its device."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), 1 << 22):  # bounded scratch memory for large tensors
            chunk = raw[start:start + (1 << 22)].to(torch.int64)
            weights = torch.arange(1, chunk.numel() + 1, device=chunk.device, dtype=torch.int64)
            h.update(f"{int(chunk.sum())}:{int((chunk * weights).sum())};".encode())
    return h.hexdigest()


def fingerprint_examples(examples: Sequence[Any]) -> str:
    """A digest of tokenized examples (their ``input_ids`` and ``labels``), in order."""
    h = hashlib.blake2b(digest_size=8)
    for ex in examples:
        h.update(repr((list(ex.input_ids), list(ex.labels))).encode())
    return h.hexdigest()
