"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

Layout of ``<out>/checkpoints/step-000010/``::

    adapter_config.json, adapter_model.safetensors   the adapter (peft format, loadable on its own)
    optimizer.safetensors                            every tensor of optimizer.state_dict(), flattened
    trainer_state.json                               step, data position, scheduler step, the optimizer's
                                                     non-tensor state (param groups, scalars), RNG states
    train_config.yaml                                the run's configuration (what a resume is checked against)

The folder is built in a temporary folder beside it and swapped in whole (:func:`fourbit._io.atomic_dir`), so
a crash never leaves a half-written checkpoint. Before a checkpoint is used it is read whole and checked
(:func:`read_checkpoint`); :func:`find_resumable` falls back from a damaged newest checkpoint to the newest
intact one and says which it skipped and why. Nothing is pickled: tensors go through safetensors,
everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fourbit._errors import InputFileError
from fourbit._io import atomic_dir, atomic_write_text, load_safetensors, read_json, save_safetensors

__all__ = [
    "Checkpoint",
    "apply_checkpoint",
    "find_resumable",
    "flatten_state",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unflatten_state",
]

_STEP_DIR = re.compile(r"step-(\d+)")
_STATE, _OPTIMIZER, _CONFIG = "trainer_state.json", "optimizer.safetensors", "train_config.yaml"

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


def save_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    base_model_name_or_path: str | None = None,
    config: Any = None,
) -> Path:
    """Write a complete checkpoint into ``folder`` atomically (replacing an older one of the same name).

    Args:
        folder: final checkpoint folder (its parent is created).
        model: the model with LoRA layers.
        optimizer: its ``state_dict()`` is stored exactly.
        state: JSON-serializable trainer state (step, data position, scheduler step...).
        base_model_name_or_path: recorded in the adapter config.
        config: the run's :class:`~fourbit.train.config.TrainConfig`, saved as ``train_config.yaml``.

    Raises:
        OSError: the disk is full or the folder unwritable (naming the file); nothing is left half-written.
    """
    from fourbit.nn.adapters import save_adapter

    from .config import save_config

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path)
        opt_skeleton, opt_tensors = flatten_state(optimizer.state_dict())
        rng_meta, rng_tensors = rng_state()
        save_safetensors({**{f"opt.{k}": v for k, v in opt_tensors.items()}, **rng_tensors}, tmp / _OPTIMIZER)
        if config is not None:
            save_config(config, tmp, _CONFIG)
        atomic_write_text(tmp / _STATE, json.dumps({**state, "optimizer": opt_skeleton, "rng": rng_meta},
                                                   indent=1) + "\n")
    return folder


@dataclass
class Checkpoint:
    """A checkpoint read whole from disk and checked (see :func:`read_checkpoint`)."""

    folder: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def config_file(self) -> Path | None:
        """The checkpoint's ``train_config.yaml`` (None for checkpoints written before it was saved there)."""
        path = self.folder / _CONFIG
        return path if path.is_file() else None


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Read and check every file of a checkpoint without touching any model.

    Raises:
        InputFileError: naming the missing, truncated or damaged file.
    """
    folder = Path(folder)
    state = read_json(folder / _STATE)
    if not isinstance(state, dict) or not {"step", "epoch", "batch", "optimizer", "rng"} <= set(state):
        raise InputFileError(folder / _STATE, "not a fourbit trainer state (missing step, data position, "
                                              "optimizer or RNG state)")
    tensors = load_safetensors(folder / _OPTIMIZER)
    if "rng.torch" not in tensors:
        raise InputFileError(folder / _OPTIMIZER, "holds no RNG state; the checkpoint is incomplete")
    read_json(folder / "adapter_config.json")
    load_safetensors(folder / "adapter_model.safetensors")
    return Checkpoint(folder, state, tensors)


def apply_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the checkpoint's adapter weights and optimizer state into ``model``/``optimizer`` and restore
    the RNG states.

    Returns:
        The trainer state saved with the checkpoint (step, data position, tokens, scheduler record).

    Raises:
        ValueError: the adapter or optimizer state does not fit the model (naming the checkpoint).
    """
    from fourbit.nn.adapters import load_adapter_weights

    state = dict(checkpoint.state)
    tensors = checkpoint.tensors
    load_adapter_weights(model, checkpoint.folder)
    opt = {k.removeprefix("opt."): v for k, v in tensors.items() if k.startswith("opt.")}
    try:
        optimizer.load_state_dict(unflatten_state(state.pop("optimizer"), opt))
    except (ValueError, KeyError) as err:
        raise InputFileError(checkpoint.folder / _OPTIMIZER, f"the optimizer state does not fit this run ({err})"
                             ) from None
    set_rng_state(state.pop("rng"), {k: v for k, v in tensors.items() if k.startswith("rng.")})
    return state


def load_checkpoint(
    folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """:func:`read_checkpoint` then :func:`apply_checkpoint`.

    Raises:
        InputFileError: a missing, incomplete or damaged checkpoint file (named).
        ValueError: a checkpoint that does not fit the model.
    """
    return apply_checkpoint(read_checkpoint(folder), model, optimizer)


def _step_folders(out: str | os.PathLike) -> list[Path]:
    """``<out>/checkpoints/step-N`` folders, newest first (temporary folders are not among them)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest ``checkpoints/step-*`` folder under ``out`` holding a trainer state (None if there is none);
    see :func:`find_resumable` for one that is checked whole."""
    return next((p for p in _step_folders(out) if (p / _STATE).is_file()), None)


def find_resumable(out: str | os.PathLike) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint under ``out``, read whole, and the newer ones skipped as damaged.

    Returns:
        ``(checkpoint or None, [(skipped folder, why), ...])``.
    """
    skipped: list[tuple[Path, str]] = []
    for folder in _step_folders(out):
        try:
            return read_checkpoint(folder), skipped
        except InputFileError as err:
            skipped.append((folder, str(err)))
    return None, skipped
