"""AdamW with 32-bit or blockwise 8-bit states, optionally paged to host memory: one class, options as arguments.

``AdamW(params, bits=32)`` computes exactly what ``torch.optim.AdamW`` computes (same operations, same
state names ``step``/``exp_avg``/``exp_avg_sq``, so their state dicts are interchangeable). ``bits=8`` keeps
both moments of every parameter with at least ``min_8bit_size`` (4096) elements as blockwise 8-bit codes
(Dettmers et al. 2022): the first moment in the signed dynamic map, the second in the unsigned one, one
float32 absmax per ``block_size`` (256) elements, i.e. 2 + 8 / 256 bytes per parameter instead of 8.
Smaller tensors (biases, norms) keep float32 states, as bitsandbytes does. ``paged=True`` moves states to
host memory and streams them through each step (see :mod:`fourbit.optim.paging`). The 8-bit update runs
as one fused CPU kernel when numba is installed (optional) and as chunked torch operations otherwise, with
bit-identical results (see :mod:`fourbit.optim.functional`).

``OPTIMIZER_OPTIONS`` names the configurations the trainer offers (``adamw``, ``adamw_8bit``,
``paged_adamw_8bit``, ``paged_adamw_32bit``); it is the one list of optimizer names.

State of an 8-bit parameter: ``step`` (float32 scalar), ``exp_avg`` (uint8, the parameter's shape),
``exp_avg_absmax`` (float32 [ceil(n / block_size)]), ``exp_avg_sq`` (uint8), ``exp_avg_sq_absmax``.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from fourbit._errors import FieldError
from fourbit.optim.functional import (
    DEFAULT_CHUNK_ELEMENTS,
    adamw_step_8bit_packed,
    adamw_step_32bit,
    uses_fused_kernel,
)
from fourbit.optim.paging import StatePager
from fourbit.optim.quant8 import num_blocks, state_codebook

__all__ = ["AdamW", "OPTIMIZER_NAMES", "OPTIMIZER_OPTIONS", "state_bytes"]

#: The named AdamW configurations (the trainer's ``optim`` field): name -> AdamW keyword arguments.
OPTIMIZER_OPTIONS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "adamw": MappingProxyType({"bits": 32, "paged": False}),
    "adamw_8bit": MappingProxyType({"bits": 8, "paged": False}),
    "paged_adamw_8bit": MappingProxyType({"bits": 8, "paged": True}),
    "paged_adamw_32bit": MappingProxyType({"bits": 32, "paged": True}),
})
#: The optimizer names, in the order they are listed to users.
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZER_OPTIONS)

_KEYS_32 = frozenset({"step", "exp_avg", "exp_avg_sq"})
_KEYS_8 = frozenset({"step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"})
_FORMAT = 1


_LARGEST_LR = 1e6


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str = "") -> None:
    """Raise FieldError (TypeError for a non-number) naming the first bad hyperparameter.

    Args:
        where: appended to the message to say which group is at fault (e.g. " in param group 1").
    """
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{name}` must be a real number{where}, got {value!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise FieldError("lr", f"must be a finite number > 0{where}, got {lr!r}")
    if lr > _LARGEST_LR:  # the update lr * m / sqrt(v) is computed in float32 and would overflow
        raise FieldError("lr", f"must be at most {_LARGEST_LR:g}{where}, got {lr!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise FieldError("eps", f"must be a finite number > 0{where}, got {eps!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise FieldError("weight_decay", f"must be a finite number >= 0{where}, got {weight_decay!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise FieldError("betas", f"must be a pair (beta1, beta2){where}, got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"`betas[{i}]` must be a real number{where}, got {b!r}")
        if not 0.0 <= b < 1.0:
            raise FieldError("betas", f"betas[{i}] must be in [0, 1){where}, got {b!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FieldError(name, f"must be an int >= {minimum}, got {value!r}")


class _Update(NamedTuple):
    """One parameter's share of a step: its group (hyperparameters), the parameter, its state dict."""

    group: dict[str, Any]
    param: torch.Tensor
    state: dict[str, Any]


def _moments(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state tensors a step updates (all but the step counter): what the pager moves."""
    return {k: v for k, v in state.items() if k != "step"}


def _advance_step(group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
    """Increment the parameter's step counter; return the keyword arguments of its update."""
    state["step"] += 1
    beta1, beta2 = group["betas"]
    return dict(
        step=state["step"].item(), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
        weight_decay=group["weight_decay"],
    )


def _states_8bit(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (tensors["exp_avg"], tensors["exp_avg_absmax"], tensors["exp_avg_sq"], tensors["exp_avg_sq_absmax"])


def _update_8bit(
    params: list[torch.Tensor], states: list[tuple[torch.Tensor, ...]], hparams: dict[str, float], block_size: int
) -> None:
    """The 8-bit update of one or more parameters of one dtype and device (several: packed as one)."""
    targets = [p if p.is_contiguous() else p.contiguous() for p in params]
    device = targets[0].device
    adamw_step_8bit_packed(
        targets, [p.grad for p in params], states, state_codebook(True, device), state_codebook(False, device),
        block_size=block_size, **hparams,
    )
    for target, p in zip(targets, params, strict=True):
        if target is not p:
            p.copy_(target)


class _Batch:
    """Resident 8-bit parameters that share a group, a step number, dtypes and a device, collected to be
    updated together by :func:`adamw_step_8bit_packed` (identical results, far fewer calls for the many small
    LoRA matrices). With the fused kernel (float32 CPU tensors, numba installed) one call takes them all where
    they are; the torch path concatenates them, so it takes only small ones and at most
    ``DEFAULT_CHUNK_ELEMENTS`` elements at a time. A batch is flushed when its key changes, when it is full,
    and at the end of the step."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.key: tuple | None = None
        self.fused = False
        self.hparams: dict[str, float] = {}
        self.params: list[torch.Tensor] = []
        self.states: list[tuple[torch.Tensor, ...]] = []
        self.numel = 0

    def add(self, param: torch.Tensor, states: tuple[torch.Tensor, ...], hparams: dict[str, float], key: tuple) -> None:
        if key != self.key:
            self.flush()
            self.key, self.hparams = key, hparams
            self.fused = uses_fused_kernel(param, param.grad)
        self.params.append(param)
        self.states.append(states)
        self.numel += param.numel()
        if not self.fused and self.numel >= DEFAULT_CHUNK_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if self.params:
            _update_8bit(self.params, self.states, self.hparams, self.block_size)
        self.params, self.states, self.numel = [], [], 0


def _merged_group(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A param group with the saved hyperparameters and this optimizer's parameters (and names)."""
    merged = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
    merged["betas"] = tuple(merged.get("betas", current["betas"]))
    merged["params"] = current["params"]
    if "param_names" in current:
        merged["param_names"] = current["param_names"]
    return {**current, **merged}


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with 32-bit or blockwise 8-bit states, optionally paged.

    Args:
        params: parameters or param-group dicts (each group may override lr, betas, eps, weight_decay).
        lr: learning rate, > 0.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator, > 0.
        weight_decay: decoupled weight decay coefficient, >= 0 (``p <- p * (1 - lr * weight_decay)``).
        bits: 32 (float32 states, identical to ``torch.optim.AdamW``) or 8 (blockwise 8-bit states).
        paged: keep states in host memory and stream them to the device for each update.
        block_size: elements per 8-bit quantization block (one float32 absmax each).
        min_8bit_size: with ``bits=8``, tensors with fewer elements keep float32 states.
        device_budget_bytes: with ``paged=True``, state bytes allowed to stay on the device (greedy in
            parameter order); None pages everything.

    Raises:
        FieldError: (a ValueError) naming the argument, for a non-finite or out-of-range hyperparameter,
            ``bits`` not in {8, 32}, a non-positive ``block_size`` or a negative ``min_8bit_size``.
        TypeError: for non-numeric hyperparameters or non-floating-point parameters.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        bits: int = 32,
        paged: bool = False,
        block_size: int = 256,
        *,
        min_8bit_size: int = 4096,
        device_budget_bytes: int | None = None,
    ) -> None:
        if isinstance(bits, bool) or bits not in (8, 32):
            raise FieldError("bits", f"must be 8 or 32, got {bits!r}")
        _check_int("block_size", block_size, 1)
        _check_int("min_8bit_size", min_8bit_size, 0)
        _check_hparams(lr, betas, eps, weight_decay)
        self.bits = int(bits)
        self.paged = bool(paged)
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self.pager = StatePager(self.paged, device_budget_bytes)
        self._signature: dict[int, tuple[torch.dtype, torch.device]] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # ---- groups and names ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyperparameters and that its parameters are floating point."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        where = f" in param group {len(self.param_groups)}"
        _check_hparams(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"], where)
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # sets: torch raises its own error (no order)
            params = list(params)  # materialise a generator once, for the check and for torch
            param_group["params"] = params
            for i, p in enumerate(params):
                t = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, tensor) pairs
                if isinstance(t, torch.Tensor) and not t.is_floating_point():
                    raise TypeError(f"parameter {i}{where} has dtype {t.dtype}; AdamW needs floating point")
        super().add_param_group(param_group)

    def _name(self, gi: int, pi: int, p: torch.Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        label = names[pi] if names else f"param_groups[{gi}]['params'][{pi}]"
        return f"{label!s} (shape {list(p.shape)}, {p.dtype}, {p.device})"

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.bits == 8 and p.numel() >= self.min_8bit_size

    def _state_nbytes(self, p: torch.Tensor) -> int:
        if self._uses_8bit(p):
            return 2 * p.numel() + 2 * 4 * num_blocks(p.numel(), self.block_size)
        return 8 * p.numel()

    # ---- state -----------------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        dev = self.pager.place(p, self._state_nbytes(p))
        state["step"] = torch.tensor(0.0)
        if self._uses_8bit(p):
            nb = (num_blocks(p.numel(), self.block_size),)
            state["exp_avg"] = self.pager.empty(p, torch.uint8, dev)
            state["exp_avg_absmax"] = self.pager.empty(p, torch.float32, dev, nb)
            state["exp_avg_sq"] = self.pager.empty(p, torch.uint8, dev)
            state["exp_avg_sq_absmax"] = self.pager.empty(p, torch.float32, dev, nb)
        else:
            state["exp_avg"] = self.pager.empty(p, torch.float32, dev)
            state["exp_avg_sq"] = self.pager.empty(p, torch.float32, dev)
        self._signature[id(p)] = (p.dtype, p.device)

    def _check_param(self, gi: int, pi: int, p: torch.Tensor) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise TypeError(f"AdamW does not support sparse gradients: {self._name(gi, pi, p)}")
        if grad.shape != p.shape:
            raise ValueError(f"gradient shape {list(grad.shape)} differs from {self._name(gi, pi, p)}")
        sig = self._signature.get(id(p))
        if sig is None:
            return
        if p.dtype != sig[0]:
            raise TypeError(
                f"{self._name(gi, pi, p)} changed dtype from {sig[0]} to {p.dtype} since its optimizer state "
                "was created; create the optimizer after casting the model"
            )
        if p.device != sig[1]:
            raise ValueError(
                f"{self._name(gi, pi, p)} moved from {sig[1]} to {p.device} since its optimizer state was "
                "created; create the optimizer after moving the model"
            )

    def _collect_updates(self) -> list[_Update]:
        """The parameters that have a gradient, in group order, checked, with their states created."""
        updates = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_param(gi, pi, p)
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                updates.append(_Update(group, p, state))
        return updates

    def _batchable(self, p: torch.Tensor) -> bool:
        """Whether an 8-bit update may be deferred into a :class:`_Batch`: its states are resident (a paged
        parameter's working copy is written back as soon as the pager moves on, so its update must run at
        once), and it is small or the fused kernel takes it where it is."""
        if self.paged and not self.pager.is_resident(p):
            return False
        return p.numel() < DEFAULT_CHUNK_ELEMENTS or uses_fused_kernel(p, p.grad)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """Perform one optimization step over all parameters that have a gradient.

        Each parameter's states come from the pager (resident, or a working copy of paged ones), then one
        of three updates runs: 32-bit (:func:`adamw_step_32bit`), 8-bit one by one (paged tensors, and large
        ones the torch path would have to concatenate), or 8-bit batched with other resident tensors
        (:class:`_Batch`).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            TypeError: for a sparse gradient or a parameter whose dtype changed since its state was created.
            ValueError: for a parameter that moved to another device since its state was created.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = self._collect_updates()
        batch = _Batch(self.block_size)
        # Iterate over the pager's generator itself (not zip(updates, ...), which would stop before asking it
        # for the end), so the last paged working copy is written back before step() returns.
        for i, tensors in enumerate(self.pager.stream([(u.param, _moments(u.state)) for u in updates])):
            group, p, state = updates[i]
            hparams = _advance_step(group, state)
            if "exp_avg_absmax" not in tensors:
                adamw_step_32bit(p, p.grad, tensors["exp_avg"], tensors["exp_avg_sq"], **hparams)
            elif self._batchable(p):
                key = (id(group), hparams["step"], p.dtype, p.grad.dtype, p.device)
                batch.add(p, _states_8bit(tensors), hparams, key)
            else:
                _update_8bit([p], [_states_8bit(tensors)], hparams, self.block_size)
        batch.flush()
        return loss

    # ---- (de)serialisation -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a ``"fourbit"`` entry with the state format (bits, block size).

        All values are tensors or JSON-able, so it can be stored with safetensors + JSON.
        """
        sd = super().state_dict()
        sd["fourbit"] = {
            "format": _FORMAT,
            "bits": self.bits,
            "block_size": self.block_size,
            "min_8bit_size": self.min_8bit_size,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from ``torch.optim.AdamW`` when ``bits=32``).

        States are copied (never aliased), keep their dtypes (uint8 codes, float32 absmax and moments) and are
        placed by the pager, so training resumes bit-identically, paged or not.

        Raises:
            TypeError: if ``state_dict`` is not an optimizer state dict.
            ValueError: if groups or parameter counts differ, or a state was made by another configuration
                (e.g. 8-bit states into a 32-bit optimizer, another block size); the message names the
                parameter.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError("load_state_dict expects a dict with 'state' and 'param_groups'")
        self._check_saved_format(state_dict.get("fourbit"))
        saved_groups = state_dict["param_groups"]
        by_saved_id = self._match_saved_params(saved_groups)
        saved_by_param: dict[int, dict[str, Any]] = {}
        for sid, st in state_dict["state"].items():
            if sid not in by_saved_id:
                raise ValueError(f"state dict has state for parameter id {sid!r}, which no param group lists")
            gi, pi, p = by_saved_id[sid]
            self._validate_saved(st, gi, pi, p)
            saved_by_param[id(p)] = st
        # Everything checked: now replace the state (placement in parameter order, like a fresh run).
        self.pager.reset()
        self._signature.clear()
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) in saved_by_param:
                    new_state[p] = self._copy_saved_state(p, saved_by_param[id(p)])
        new_groups = [_merged_group(sg, g) for sg, g in zip(saved_groups, self.param_groups, strict=True)]
        self.__setstate__({"state": new_state, "param_groups": new_groups})

    def _check_saved_format(self, cfg: dict[str, Any] | None) -> None:
        """The ``"fourbit"`` header of a state dict (absent in torch's) must match this optimizer's format."""
        if cfg is None:
            return
        if cfg.get("bits") != self.bits:
            raise ValueError(
                f"state dict was saved by AdamW(bits={cfg.get('bits')}); this optimizer has bits={self.bits}"
            )
        if cfg.get("block_size") != self.block_size:
            raise ValueError(
                f"state dict uses block_size={cfg.get('block_size')}; this optimizer has "
                f"block_size={self.block_size}"
            )

    def _match_saved_params(self, saved_groups: list[dict[str, Any]]) -> dict[Any, tuple[int, int, torch.Tensor]]:
        """Map each saved parameter id to (group index, index in group, this optimizer's parameter), after
        checking that group and parameter counts agree and the saved hyperparameters are valid."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        by_saved_id: dict[Any, tuple[int, int, torch.Tensor]] = {}
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"param group {gi} has {len(sg['params'])} parameters in the state dict, "
                    f"{len(g['params'])} in this optimizer"
                )
            hp = {**self.defaults, **{k: v for k, v in sg.items() if k != "params"}}
            _check_hparams(hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], f" in state dict param group {gi}")
            for pi, (sid, p) in enumerate(zip(sg["params"], g["params"], strict=True)):
                by_saved_id[sid] = (gi, pi, p)
        return by_saved_id

    def _copy_saved_state(self, p: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        """A copy of one parameter's checked saved state, placed by the pager, in the dtypes a step expects."""
        dev = self.pager.place(p, self._state_nbytes(p))
        step = saved["step"]
        out: dict[str, Any] = {
            "step": step.detach().to(device="cpu", dtype=torch.float32).clone()
            if isinstance(step, torch.Tensor)
            else torch.tensor(float(step))
        }
        for k, v in saved.items():
            if k == "step":
                continue
            dtype = torch.uint8 if k in ("exp_avg", "exp_avg_sq") and self._uses_8bit(p) else torch.float32
            t = self.pager.empty(p, dtype, dev, v.shape)
            t.copy_(v)
            out[k] = t
        self._signature[id(p)] = (p.dtype, p.device)
        return out

    def _validate_saved(self, st: Any, gi: int, pi: int, p: torch.Tensor) -> None:
        name = self._name(gi, pi, p)
        if not isinstance(st, dict):
            raise TypeError(f"saved state for {name} is not a dict")
        keys = frozenset(st)
        want = _KEYS_8 if self._uses_8bit(p) else _KEYS_32
        if keys != want:
            saved_kind = "8-bit" if keys == _KEYS_8 else "32-bit" if keys == _KEYS_32 else f"unknown {sorted(keys)}"
            raise ValueError(
                f"saved state for {name} is {saved_kind}, but this AdamW(bits={self.bits}, "
                f"min_8bit_size={self.min_8bit_size}) keeps {'8-bit' if want == _KEYS_8 else '32-bit'} state there"
            )
        for k in ("exp_avg", "exp_avg_sq"):
            v = st[k]
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"saved {k} for {name} has shape {got}")
            if want == _KEYS_8 and v.dtype != torch.uint8:
                raise ValueError(f"saved {k} for {name} has dtype {v.dtype}, 8-bit states are uint8")
            if want == _KEYS_32 and not v.is_floating_point():
                raise ValueError(f"saved {k} for {name} has dtype {v.dtype}, 32-bit states are floating point")
        if want == _KEYS_8:
            nb = num_blocks(p.numel(), self.block_size)
            for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                v = st[k]
                if not isinstance(v, torch.Tensor) or v.numel() != nb:
                    raise ValueError(
                        f"saved {k} for {name} has {getattr(v, 'numel', lambda: '?')()} values, expected {nb} "
                        f"(block_size={self.block_size})"
                    )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in an optimizer's state (moments, 8-bit codes, absmax, step counters).

    Works for any ``torch.optim.Optimizer`` (fourbit, torch, bitsandbytes); a tensor shared between
    parameters (e.g. bitsandbytes' code tables) is counted once.

    Args:
        optimizer: the optimizer.

    Returns:
        The number of bytes.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.data_ptr(), v.numel() * v.element_size())
                if key in seen:
                    continue
                seen.add(key)
                total += key[1]
    return total
