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

State of an 8-bit parameter: ``step`` (float32 scalar), ``exp_avg`` (uint8, the parameter's shape),
``exp_avg_absmax`` (float32 [ceil(n / block_size)]), ``exp_avg_sq`` (uint8), ``exp_avg_sq_absmax``.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from fourbit.optim.functional import (
    DEFAULT_CHUNK_ELEMENTS,
    adamw_step_8bit,
    adamw_step_8bit_packed,
    adamw_step_32bit,
)
from fourbit.optim.paging import StatePager
from fourbit.optim.quant8 import num_blocks, state_codebook

__all__ = ["AdamW", "state_bytes"]

_KEYS_32 = frozenset({"step", "exp_avg", "exp_avg_sq"})
_KEYS_8 = frozenset({"step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"})
_FORMAT = 1


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str) -> None:
    """Raise ValueError/TypeError naming the first bad hyperparameter."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
    if not lr > 0:
        raise ValueError(f"{where}: lr must be > 0, got {lr}")
    if not eps > 0:
        raise ValueError(f"{where}: eps must be > 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"{where}: betas[{i}] must be a real number, got {b!r}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {b}")


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
        ValueError: for out-of-range hyperparameters, ``bits`` not in {8, 32}, a non-positive block size.
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
            raise ValueError(f"AdamW: bits must be 8 or 32, got {bits!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"AdamW: block_size must be a positive int, got {block_size!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"AdamW: min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        _check_hparams(lr, betas, eps, weight_decay, "AdamW")
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
        where = f"AdamW param group {len(self.param_groups)}"
        _check_hparams(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"], where)
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # sets: torch raises its own error (no order)
            params = list(params)  # materialise a generator once, for the check and for torch
            param_group["params"] = params
            for i, p in enumerate(params):
                t = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, tensor) pairs
                if isinstance(t, torch.Tensor) and not t.is_floating_point():
                    raise TypeError(f"{where}: parameter {i} has dtype {t.dtype}; AdamW needs floating point")
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

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """Perform one optimization step over all parameters that have a gradient.

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
        work: list[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]] = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_param(gi, pi, p)
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                work.append((group, p, state))
        items = [(p, {k: v for k, v in st.items() if k != "step"}) for _, p, st in work]
        # Small resident 8-bit tensors of the same group and step are updated together (identical results,
        # far fewer torch calls); large or paged ones one by one.
        pack: list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]] = []
        pack_key: tuple | None = None
        pack_numel = 0
        pack_hp: dict[str, Any] = {}

        def flush() -> None:
            nonlocal pack, pack_numel
            if pack:
                targets = [t if t.is_contiguous() else t.contiguous() for t, _, _ in pack]
                dev = targets[0].device
                adamw_step_8bit_packed(
                    targets, [g for _, g, _ in pack], [st for _, _, st in pack],
                    state_codebook(True, dev), state_codebook(False, dev), block_size=self.block_size, **pack_hp,
                )
                for t, (p, _, _) in zip(targets, pack, strict=True):
                    if t is not p:
                        p.copy_(t)
            pack, pack_numel = [], 0

        # Drive the pager's generator to its end (not zip), so the last paged write-back always runs.
        for i, tensors in enumerate(self.pager.stream(items)):
            group, p, state = work[i]
            state["step"] += 1
            step = state["step"].item()
            beta1, beta2 = group["betas"]
            hp = dict(step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"])
            if "exp_avg_absmax" not in tensors:
                adamw_step_32bit(p, p.grad, tensors["exp_avg"], tensors["exp_avg_sq"], **hp)
                continue
            st = (tensors["exp_avg"], tensors["exp_avg_absmax"], tensors["exp_avg_sq"], tensors["exp_avg_sq_absmax"])
            if p.numel() < DEFAULT_CHUNK_ELEMENTS and (not self.paged or self.pager.is_resident(p)):
                key = (id(group), step, p.dtype, p.grad.dtype, p.device)
                if key != pack_key:
                    flush()
                    pack_key, pack_hp = key, hp
                pack.append((p, p.grad, st))
                pack_numel += p.numel()
                if pack_numel >= DEFAULT_CHUNK_ELEMENTS:
                    flush()
                continue
            target = p if p.is_contiguous() else p.contiguous()
            adamw_step_8bit(
                target, p.grad, *st, state_codebook(True, p.device), state_codebook(False, p.device),
                block_size=self.block_size, **hp,
            )
            if target is not p:
                p.copy_(target)
        flush()
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
        cfg = state_dict.get("fourbit")
        if cfg is not None:
            if cfg.get("bits") != self.bits:
                raise ValueError(
                    f"state dict was saved by AdamW(bits={cfg.get('bits')}); this optimizer has bits={self.bits}"
                )
            if cfg.get("block_size") != self.block_size:
                raise ValueError(
                    f"state dict uses block_size={cfg.get('block_size')}; this optimizer has "
                    f"block_size={self.block_size}"
                )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        id_map: dict[Any, tuple[int, int, torch.Tensor]] = {}
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"param group {gi} has {len(sg['params'])} parameters in the state dict, "
                    f"{len(g['params'])} in this optimizer"
                )
            hp = {**self.defaults, **{k: v for k, v in sg.items() if k != "params"}}
            _check_hparams(hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], f"state dict param group {gi}")
            for pi, (sid, p) in enumerate(zip(sg["params"], g["params"], strict=True)):
                id_map[sid] = (gi, pi, p)
        saved_by_param: dict[int, dict[str, Any]] = {}
        for sid, st in state_dict["state"].items():
            if sid not in id_map:
                raise ValueError(f"state dict has state for parameter id {sid!r}, which no param group lists")
            gi, pi, p = id_map[sid]
            self._validate_saved(st, gi, pi, p)
            saved_by_param[id(p)] = st
        # Everything checked: now replace the state (placement in parameter order, like a fresh run).
        self.pager.reset()
        self._signature.clear()
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for g in self.param_groups:
            for p in g["params"]:
                st = saved_by_param.get(id(p))
                if st is None:
                    continue
                dev = self.pager.place(p, self._state_nbytes(p))
                out: dict[str, Any] = {}
                step = st["step"]
                out["step"] = (
                    step.detach().to(device="cpu", dtype=torch.float32).clone()
                    if isinstance(step, torch.Tensor)
                    else torch.tensor(float(step))
                )
                for k, v in st.items():
                    if k == "step":
                        continue
                    dtype = torch.uint8 if k in ("exp_avg", "exp_avg_sq") and self._uses_8bit(p) else torch.float32
                    t = self.pager.empty(p, dtype, dev, v.shape)
                    t.copy_(v)
                    out[k] = t
                new_state[p] = out
                self._signature[id(p)] = (p.dtype, p.device)
        new_groups = []
        for sg, g in zip(saved_groups, self.param_groups, strict=True):
            ng = {k: v for k, v in sg.items() if k not in ("params", "param_names")}
            ng["betas"] = tuple(ng.get("betas", g["betas"]))
            ng["params"] = g["params"]
            if "param_names" in g:
                ng["param_names"] = g["param_names"]
            new_groups.append({**g, **ng})
        self.__setstate__({"state": new_state, "param_groups": new_groups})

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
