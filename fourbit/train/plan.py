"""Where a run writes and what it resumes, decided before anything heavy is loaded.

:func:`plan_run` is the first step of :func:`fourbit.train.train` (and of ``fourbit finetune``, before the
model is loaded): it refuses an output folder that cannot or must not be written, and for ``resume`` it finds
the newest intact checkpoint (skipping damaged newer ones, and saying why) and checks that the new
configuration keeps everything that shapes the model and the data order.

:class:`RunFolder` is the policy for the output folder itself: a new run is built in a temporary folder beside
``out`` and swapped in whole at its first checkpoint, so until the new run has something to resume from, an
older run in ``out`` stays intact; a resumed run writes into ``out``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError
from fourbit._io import atomic_dir, check_output_dir, remove_stale_temps

from .checkpoint import Checkpoint, find_resumable
from .config import TrainConfig, load_yaml_overrides

__all__ = ["RESUME_FIXED_FIELDS", "RunFolder", "RunPlan", "plan_run"]

#: Fields a resumed run must keep: they shape the model (base, quantization, adapter), the optimizer state's
#: format, or the order and content of the batches. Every other field (max_steps, learning rate and schedule,
#: evaluation, saving, logging, compute dtype, checkpointing) may change on resume.
RESUME_FIXED_FIELDS = (
    "model", "quant", "double_quant", "task", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
    "use_rslora", "use_dora", "init_lora_weights", "loftq_iter", "optim", "data", "eval_data", "format", "text_column", "label_column", "train_on_inputs",
    "max_length", "packing", "group_by_length", "eval_fraction", "batch_size", "gradient_accumulation_steps",
    "seed",
)
_PATH_FIELDS = ("model", "data", "eval_data")


@dataclass
class RunPlan:
    """What :func:`plan_run` decided.

    Attributes:
        out: the run's output folder.
        resume: the checkpoint to continue from, read whole and checked (None for a new run).
        skipped: newer checkpoints skipped as damaged, with the reason.
        changed: fields that differ from the checkpoint's run and may (``{name: (saved, new)}``).
    """

    out: Path
    resume: Checkpoint | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _inputs(config: TrainConfig) -> list[str]:
    return [p for p in (config.data, config.eval_data, config.model) if p and Path(p).exists()]


def plan_run(config: TrainConfig, *, log: Callable[[str], Any] | None = None, world_size: int = 1) -> RunPlan:
    """Check the output folder and, for ``resume``, choose and check the checkpoint; loads no model.

    Args:
        config: the run's configuration (``out`` required).
        log: where to report skipped checkpoints and changed fields (default: print).
        world_size: the number of processes of this run; a resumed one must have as many as the checkpoint's
            (the global batch, and so the order of the data, depends on it).

    Returns:
        A :class:`RunPlan`.

    Raises:
        FieldError: ``out`` missing, a file, unwritable, an input or inside one, or holding another run
            without ``overwrite``/``resume``; ``resume`` without an intact checkpoint; a resumed run that
            changes a field of :data:`RESUME_FIXED_FIELDS` (naming the field, the saved and the new value)
            or the number of processes.
        InputFileError: a damaged ``train_config.yaml`` of the checkpoint.
    """
    log = log or print
    if not config.out:
        raise FieldError("out", "is required: the folder that receives the adapter, checkpoints and metrics")
    out = Path(config.out)
    if not config.resume and out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise FieldError("out", f"{out} already holds files (another run?); pass `overwrite` to replace it "
                                "or `resume` to continue it")
    check_output_dir(out, overwrite=True, field="out", inputs=_inputs(config))
    if not config.resume:
        return RunPlan(out)
    checkpoint, skipped = find_resumable(out)
    for folder, why in skipped:
        log(f"skipping damaged checkpoint {folder}: {why}")
    if checkpoint is None:
        if skipped:
            raise FieldError("resume", f"no intact checkpoint in {out / 'checkpoints'} (newest: {skipped[0][1]}); "
                                       "start a new run without `resume`")
        raise FieldError("resume", f"{out} holds no checkpoint to resume from; start a new run without `resume`")
    saved_world = int(checkpoint.state.get("world_size", 1))
    if saved_world != world_size:
        raise FieldError("resume", f"{checkpoint.folder} was written by a run on {saved_world} process(es), this "
                                   f"run has {world_size}; the global batch (`batch_size` x "
                                   f"`gradient_accumulation_steps` x processes) and the order of the data depend "
                                   f"on it: resume with {saved_world} process(es) (torchrun --nproc-per-node), or "
                                   "start a new run without `resume`")
    changed = _compare_with_checkpoint(config, checkpoint, out)
    for name, (old, new) in changed.items():
        log(f"resuming with {name} changed: {old!r} -> {new!r}")
    return RunPlan(out, checkpoint, skipped, changed)


def _same(name: str, a: Any, b: Any) -> bool:
    if name in _PATH_FIELDS and a is not None and b is not None:
        return os.path.abspath(str(a)) == os.path.abspath(str(b))
    return a == b


def _compare_with_checkpoint(config: TrainConfig, checkpoint: Checkpoint, out: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse a change of :data:`RESUME_FIXED_FIELDS` against the configuration the checkpoint was trained
    with; return the other fields that changed."""
    source = checkpoint.config_file or (out / "train_config.yaml")
    if not source.is_file():
        return {}
    saved = {**TrainConfig().to_dict(), **load_yaml_overrides(source)}
    new = config.to_dict()
    for name in (n for n in RESUME_FIXED_FIELDS if n in new):
        if not _same(name, saved.get(name), new[name]):
            raise FieldError(name, f"{checkpoint.folder} was trained with {saved.get(name)!r}, this run asks for "
                                   f"{new[name]!r}; a resumed run keeps what shapes the model and the data order: "
                                   f"pass {saved.get(name)!r}, or start a new run without `resume`")
    skip = set(RESUME_FIXED_FIELDS) | {"resume", "overwrite", "progress"}
    return {k: (saved[k], new[k]) for k in new if k not in skip and saved.get(k) != new[k]}


class RunFolder:
    """The folder a run writes into (``path``), and the moment it becomes ``out``.

    A new run (``fresh``) writes into a temporary folder beside ``out`` (fourbit's temp naming, so a killed
    run's leftovers are removed by the next writer); :meth:`commit` swaps it in whole, replacing an older run
    only then. Leaving the ``with`` block with an exception before the commit removes the temporary folder
    and leaves ``out`` as it was. A resumed run writes into ``out`` from the start. With ``write=False`` (the
    ranks other than 0 of a distributed run) it only names the folder and creates nothing.
    """

    def __init__(self, out: str | os.PathLike, *, fresh: bool, write: bool = True) -> None:
        self.out = Path(out)
        self.path = self.out
        self.committed = not fresh or not write
        self.write = write
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunFolder:
        if not self.write:  # a rank other than 0 of a distributed run: it names the folder, never touches it
            return self
        if not self.committed:
            self.path = self._stack.enter_context(atomic_dir(self.out))
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out.parent)  # a killed new run's folder beside `out`
        return self

    def commit(self) -> None:
        """Make what was written so far ``out`` (a no-op once done)."""
        if not self.committed:
            self._stack.close()
            self.committed, self.path = True, self.out

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._stack.__exit__(*exc))
