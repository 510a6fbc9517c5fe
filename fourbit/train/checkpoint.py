"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

Layout of ``<out>/checkpoints/step-000010/``::

    adapter_config.json, adapter_model.safetensors   the adapter (peft format, loadable on its own)
    optimizer.safetensors                            every tensor of optimizer.state_dict(), flattened
    trainer_state.json                               step, data position, scheduler step, the optimizer's
                                                     non-tensor state (param groups, scalars), RNG states

The folder is built under a temporary name and renamed into place, so a crash never leaves a half-written
checkpoint. Nothing is pickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fourbit._io import replace_dir

__all__ = [
    "flatten_state",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unflatten_state",
]

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into a JSON skeleton and named tensors.

    Tensors are replaced by ``{"__tensor__": key}``; tuples and dicts with non-string keys are tagged so
    that :func:`unflatten_state` rebuilds them with the same types. Exact round trip for any
    ``optimizer.state_dict()`` (tested with ``torch.equal`` and ``==``).

    Returns:
        ``(skeleton, tensors)``: a JSON-serializable object and a ``{key: contiguous tensor}`` dict.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().contiguous().clone()
            return {_TENSOR: path}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: walk(v, f"{path}.{k}") for k, v in x.items()}
            return {_DICT: [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path!r} in a checkpoint (not tensor/JSON)")

    return walk(obj, "s"), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_TUPLE}:
            return tuple(unflatten_state(v, tensors) for v in skeleton[_TUPLE])
        if set(skeleton) == {_DICT}:
            return {k: unflatten_state(v, tensors) for k, v in skeleton[_DICT]}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python and torch (CPU, and CUDA when present) RNG states as JSON + tensors."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return {"python": [version, list(state), gauss]}, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def save_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a complete checkpoint into ``folder`` atomically (replacing an older one of the same name).

    Args:
        folder: final checkpoint folder (its parent is created).
        model: the model with LoRA layers.
        optimizer: its ``state_dict()`` is stored exactly.
        state: JSON-serializable trainer state (step, data position, scheduler step...).
        base_model_name_or_path: recorded in the adapter config.
    """
    from safetensors.torch import save_file

    from fourbit.nn.adapters import save_adapter

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path)
        opt_skeleton, opt_tensors = flatten_state(optimizer.state_dict())
        rng_meta, rng_tensors = rng_state()
        save_file({**{f"opt.{k}": v for k, v in opt_tensors.items()}, **rng_tensors},
                  str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "trainer_state.json", {**state, "optimizer": opt_skeleton, "rng": rng_meta})
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_checkpoint(
    folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load adapter weights and optimizer state into ``model``/``optimizer`` and restore the RNG states.

    Returns:
        The trainer state saved with the checkpoint.

    Raises:
        ValueError: a missing or incomplete checkpoint folder.
    """
    from safetensors.torch import load_file

    from fourbit.nn.adapters import load_adapter_weights

    folder = Path(folder)
    for name in ("trainer_state.json", "optimizer.safetensors", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: incomplete checkpoint (no {name})")
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    load_adapter_weights(model, folder)
    opt = {k.removeprefix("opt."): v for k, v in tensors.items() if k.startswith("opt.")}
    optimizer.load_state_dict(unflatten_state(state.pop("optimizer"), opt))
    set_rng_state(state.pop("rng"), {k: v for k, v in tensors.items() if k.startswith("rng.")})
    return state


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/step-*`` folder under ``out`` (None if there is none)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)
