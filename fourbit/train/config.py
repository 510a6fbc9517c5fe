"""The fine-tuning configuration: one dataclass holding every default, overridden by YAML, then by CLI flags.

Defaults follow the QLoRA paper (Dettmers et al. 2023, Appendix B): LoRA r=64, alpha=16, dropout 0.1 on all
linear layers, AdamW (paged, 8-bit in the paper) at lr 2e-4 with a constant schedule, max grad norm 0.3 and
an effective batch of 16. Warmup is 3% of the steps.

Every value is checked where it enters: :class:`TrainConfig` rejects a wrong type, a non-finite number or one
out of its range with a :class:`~fourbit._errors.FieldError` naming the field (the CLI turns the name into its
flag), and :func:`load_yaml_overrides` names the YAML file, the line and the key, suggesting the closest
known key for a typo.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError, InputFileError
from fourbit._io import atomic_write_text
from fourbit.optim import OPTIMIZER_NAMES
from fourbit.quant import QUANT_TYPES

from .data import FORMATS
from .pairs import DPO_LOSS_TYPES, PREFERENCE_TASKS
from .prepare import CHECKPOINT_POLICIES

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "add_config_flags",
    "config_from_args",
    "load_yaml_overrides",
    "save_config",
]

OPTIMIZERS = OPTIMIZER_NAMES
SCHEDULES = ("constant", "cosine", "linear")
_TASKS = ("causal", "classify", *PREFERENCE_TASKS)
_QUANTS = (*QUANT_TYPES, "none")
_DTYPES = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Every fine-tuning option. Each field is also a CLI flag (``lora_r`` -> ``--lora-r``).

    Data:
        data: training file (.jsonl/.json/.csv/.parquet) or a folder saved with ``Dataset.save_to_disk``.
        eval_data: optional separate evaluation file; otherwise ``eval_fraction`` of ``data`` is held out.
        format: ``auto`` (from the columns), ``text`` (``text``), ``instruction`` (``instruction``/``input``/
            ``output``, Alpaca prompt) or ``chat`` (``messages``, rendered with the tokenizer's chat template).
        train_on_inputs: also put loss on prompt tokens (instruction/chat); default: responses only.
        packing: pack short examples into full ``max_length`` sequences (positions restart per example, so
            attention does not cross examples); plain-text documents longer than ``max_length`` are split into
            ``max_length`` pieces instead of truncated, so no text is lost. ``group_by_length`` instead batches
            examples of similar length.
    Preference training (``task`` dpo or orpo; records ``prompt``/``chosen``/``rejected``, see
    :mod:`fourbit.train.pairs`):
        beta: DPO's β (the KL penalty; IPO's τ), or ORPO's λ, the weight of the odds-ratio term (TRL's
            ``beta`` in both).
        loss_type: DPO's loss, as TRL names it: ``sigmoid`` (DPO), ``ipo``, ``hinge`` or ``robust``.
        label_smoothing: ``robust`` only: the assumed rate of flipped preferences, in [0, 0.5).
    Model:
        model: model folder or GGUF file; ``None`` is the bundled SmolLM2-135M-Instruct.
        quant: base weights ``nf4`` (QLoRA), ``fp4``, ``int4`` or ``none`` (plain LoRA); ``double_quant`` for DQ.
        compute_dtype: ``auto`` (bf16 autocast on GPUs and CPUs with native bf16, else fp32), ``bf16`` or
            ``fp32``. On AVX2-only CPUs torch emulates bf16 matmuls and they run several times slower than fp32.
    Adapter:
        use_dora: DoRA (Liu et al. 2024): a trained magnitude per output row times the normalised direction
            ``W + s·B·A`` (peft's ``use_dora``; adapters load in peft).
        init_lora_weights: ``default`` (peft's: A Kaiming-uniform, B = 0) or ``loftq`` (Li et al. 2023: the
            4-bit base and the adapter computed together from the float weights, so that ``Q + s·B·A`` starts
            closer to W than ``Q``; needs a float checkpoint and a 4-bit ``quant``).
        loftq_iter: LoftQ's alternating steps T (1: plain quantization plus the best rank-r fit of its error,
            so the base is exactly the plain 4-bit one; more change the base, which ``fourbit merge`` rebuilds
            from the run's recorded settings).
    Memory and speed:
        gradient_checkpointing: recompute each decoder layer's activations in backward instead of keeping them.
        gradient_checkpointing_policy: ``keep-matmuls`` keeps the LoRA layers' outputs and recomputes only the
            cheap parts (norms, rotary embeddings, activations, attention); ``full`` recomputes everything
            (least memory); ``auto`` (default) is keep-matmuls for sequences of up to 1,024 tokens and full
            beyond, where attention dominates the recomputation and kept outputs would cost much memory; and
            full for a model whose kept outputs would pass 1 GiB (an 8B at 1,024 tokens: 2.6 GiB in bf16).
        loss_chunk_size: tokens per chunk of the fused output-head cross-entropy; 0 computes the full logits.
        fused_kernels: run the fused LoRA, gated-MLP and RMSNorm training paths (default); off, the model runs
            the plain composition of PyTorch modules they are tested against
            (:func:`fourbit.nn.fused.fused_kernels`).
        memory_check: refuse a run, before the model loads, whose planned peak memory
            (:mod:`fourbit.train.memory_check`) is above the memory available, naming the settings that fit.

    Raises:
        FieldError: naming the field, for a value of the wrong type, a number that is not finite or out of its
            range (``learning_rate > 0``, ``lora_dropout`` in [0, 1), ``max_grad_norm > 0`` or None for no
            clipping, ...), a name that is not one of the choices, or two fields that exclude each other.
    """

    model: str | None = None
    data: str | None = None
    out: str | None = None
    eval_data: str | None = None
    task: str = "causal"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    format: str = "auto"
    text_column: str = "text"
    label_column: str = "label"
    train_on_inputs: bool = False
    max_length: int = 512
    packing: bool = False
    group_by_length: bool = False
    eval_fraction: float = 0.05
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    target_modules: str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = "default"
    loftq_iter: int = 1
    optim: str = "adamw"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    max_steps: int = 1000
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_grad_norm: float | None = 0.3
    gradient_checkpointing: bool = False
    gradient_checkpointing_policy: str = "auto"
    loss_chunk_size: int = 1024
    fused_kernels: bool = True
    memory_check: bool = True
    eval_steps: int = 50
    eval_batch_size: int = 8
    save_steps: int = 100
    logging_steps: int = 1
    seed: int = 0
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _check_field(f.name, getattr(self, f.name)))
        if self.packing and self.group_by_length:
            raise FieldError("group_by_length", "`packing` and `group_by_length` are exclusive; pick one")
        if self.packing and self.task == "classify":
            raise FieldError("packing", "packing is for causal LM data; it cannot be used with `task` "
                                        "classify")
        self._check_preference()
        if self.resume and self.overwrite:
            raise FieldError("overwrite", "`resume` continues the run in the output folder and `overwrite` "
                                          "replaces it; pick one")
        if self.init_lora_weights == "loftq" and self.quant == "none":
            raise FieldError("init_lora_weights", "loftq computes the adapter against a 4-bit base; `quant` none "
                                                  "trains over the float weights: use the default init there")
        if self.init_lora_weights == "loftq" and self.task == "classify":
            raise NotImplementedError("`init_lora_weights` loftq is not implemented for `task` classify")
        if not self.target_module_list:
            raise FieldError("target_modules", f"names no module; got {self.target_modules!r} (give "
                                               "comma-separated names such as q_proj,v_proj, a regex or all-linear)")

    def _check_preference(self) -> None:
        if self.task in PREFERENCE_TASKS and self.packing:
            raise FieldError("packing", f"packing is for causal LM data; it cannot be used with `task` {self.task}")
        if self.task in PREFERENCE_TASKS and self.format == "instruction":
            raise FieldError("format", "preference pairs are text or chat; use `format` auto, text or chat")
        if self.task in PREFERENCE_TASKS and self.init_lora_weights == "loftq":
            raise NotImplementedError(f"`init_lora_weights` loftq is not implemented for `task` {self.task}")
        if self.task != "dpo" and self.loss_type != "sigmoid":
            raise FieldError("loss_type", f"is DPO's; `task` {self.task} has one loss (leave `loss_type` sigmoid)")
        if self.label_smoothing and self.loss_type != "robust":
            raise FieldError("label_smoothing", "is used by `loss_type` robust only; set `loss_type` robust or "
                                                "leave `label_smoothing` 0")

    @property
    def target_module_list(self) -> str | tuple[str, ...]:
        """``"all-linear"``, a regex (any regex metacharacter: matched against full module names, as peft
        does), or the comma-separated names as a tuple."""
        if self.target_modules == "all-linear" or any(c in self.target_modules for c in "\\^$*+?()[]{}|"):
            return self.target_modules
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())

    @property
    def warmup(self) -> int:
        """Warmup steps: ``warmup_steps`` if set, else ``ceil(warmup_ratio * max_steps)``."""
        if self.warmup_steps:
            return self.warmup_steps
        return int(-(-self.warmup_ratio * self.max_steps // 1))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serializable dict of every field."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


# Every numeric field's range, as (test, description). Floats must also be finite.
def _at_least(n: int) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= n), f">= {n}"


_POSITIVE = ((lambda v: v > 0), "> 0")
_FRACTION = ((lambda v: 0 <= v < 1), "in [0, 1)")
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "max_length": _at_least(1), "lora_r": _at_least(1), "max_steps": _at_least(1), "batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1), "eval_batch_size": _at_least(1), "logging_steps": _at_least(1),
    "loftq_iter": _at_least(1),
    "warmup_steps": _at_least(0), "save_steps": _at_least(0), "eval_steps": _at_least(0),
    "loss_chunk_size": _at_least(0), "seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    "eval_fraction": _FRACTION, "lora_dropout": _FRACTION, "warmup_ratio": _FRACTION, "adam_beta1": _FRACTION,
    "adam_beta2": _FRACTION, "lora_alpha": _POSITIVE, "learning_rate": _POSITIVE, "adam_epsilon": _POSITIVE,
    "max_grad_norm": _POSITIVE, "beta": _POSITIVE,
    "label_smoothing": ((lambda v: 0 <= v < 0.5), "in [0, 0.5)"), "weight_decay": ((lambda v: v >= 0), ">= 0"),
}
_HINTS = {
    "save_steps": " (0: no checkpoints)", "eval_steps": " (0: evaluate at the end only)",
    "loss_chunk_size": " (0: the model's full logits)", "max_grad_norm": " (null/None: no clipping)",
}
_CHOICES = {"task": _TASKS, "loss_type": DPO_LOSS_TYPES, "format": FORMATS, "quant": _QUANTS, "compute_dtype": _DTYPES,
            "init_lora_weights": ("default", "loftq"),
            "optim": OPTIMIZERS, "lr_scheduler": SCHEDULES, "gradient_checkpointing_policy": CHECKPOINT_POLICIES}
_NON_EMPTY = ("text_column", "label_column", "target_modules")
_PATHS = ("model", "data", "out", "eval_data")


def _base_type(tp: Any) -> type:
    """``int | None`` -> int, ``str`` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


@functools.cache
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _expected(name: str) -> str:
    """What a field takes, in words: ``a number > 0``, ``true or false``, ``one of a, b``."""
    tp = _field_types()[name]
    base = _base_type(tp)
    if name in _CHOICES:
        text = f"one of {', '.join(_CHOICES[name])}"
    elif base is bool:
        text = "true or false"
    elif base is int:
        text = f"a whole number {_RANGES[name][1]}" if name in _RANGES else "a whole number"
    elif base is float:
        text = f"a finite number {_RANGES[name][1]}" if name in _RANGES else "a finite number"
    else:
        text = "a path" if name in _PATHS else "a non-empty string" if name in _NON_EMPTY else "a string"
    return text + _HINTS.get(name, "") + (" or null" if base is not tp and name not in _HINTS else "")


def _check_field(name: str, value: Any) -> Any:
    """``value`` checked for field ``name`` and normalized (an integral number for a float field becomes a
    float, a path becomes a string).

    Raises:
        FieldError: a value of the wrong type, not finite, out of range or not one of the choices.
    """
    tp = _field_types()[name]
    base = _base_type(tp)

    def bad() -> FieldError:
        return FieldError(name, f"must be {_expected(name)}; got {value!r}")

    if value is None:
        if base is tp:
            raise bad()
        return None
    if base is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if base in (int, float):
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not (whole or (base is float and isinstance(value, numbers.Real) and not isinstance(value, bool))):
            raise bad()
        value = int(value) if base is int else float(value)
        if not math.isfinite(value) or (name in _RANGES and not _RANGES[name][0](value)):
            raise bad()
        return value
    if name in _PATHS and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or (name in _NON_EMPTY and not value.strip()):
        raise bad()
    if name in _CHOICES and value not in _CHOICES[name]:
        raise bad()
    return value


def _from_yaml(name: str, value: Any) -> Any:
    """A YAML value for field ``name`` in the field's type: numbers may be written as strings (YAML 1.1 reads
    ``2e-4`` as a string) and ``target_modules`` as a list of names."""
    base = _base_type(_field_types()[name])
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)  # warmup_steps: 1.0e+1
    if base in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value  # rejected by _check_field with the expected type
        return int(number) if base is int and number.is_integer() else number
    if name == "target_modules" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # target_modules: [q_proj, v_proj]
    return value


def load_yaml_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file of ``field: value`` lines into checked field overrides.

    Keys are :class:`TrainConfig` field names (``lora-r`` is read as ``lora_r``); each value is checked as
    :class:`TrainConfig` checks it. Checks between fields (``packing`` with ``group_by_length``) are left to
    :class:`TrainConfig`, since flags may still change them.

    Raises:
        InputFileError: naming the file, the line and the key: a missing or unreadable file, invalid YAML, a
            document that is not a mapping, an unknown key (with the closest known key), a key given twice, or
            a value of the wrong type or out of range (with the expected type).
    """
    import yaml

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a folder; give a YAML config file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(path, "not UTF-8 text; save the file as UTF-8",
                             line=data.count(b"\n", 0, err.start) + 1) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {node.value!r}"
            raise InputFileError(path, f"a config file holds 'field: value' lines, one per option; found {kind}",
                                 line=node.start_mark.line + 1)
        entries = [(loader.construct_object(k, deep=True), loader.construct_object(v, deep=True),
                    k.start_mark.line + 1) for k, v in node.value]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputFileError(path, f"not valid YAML ({problem})",
                             line=mark.line + 1 if mark is not None else None) from None
    finally:
        loader.dispose()
    known = list(_field_types())
    out: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key, value, line in entries:
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = (f"; did you mean '{close[0]}'?" if close else
                    "; the keys are TrainConfig's fields (fourbit finetune --help lists them as flags)")
            raise InputFileError(path, f"unknown key {key!r}{hint}", line=line)
        if name in lines:
            raise InputFileError(path, f"'{name}' is set twice (lines {lines[name]} and {line}); keep one",
                                 line=line)
        lines[name] = line
        try:
            out[name] = _check_field(name, _from_yaml(name, value))
        except FieldError as err:
            raise InputFileError(path, f"'{key}' {err.message}", line=line) from None
    return out


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per :class:`TrainConfig` field (default suppressed, so only given flags override).

    Booleans get ``--flag/--no-flag``; an optional number takes ``none`` (``--max-grad-norm none``). Help text
    shows the dataclass default.
    """
    defaults = TrainConfig()
    for name, tp in _field_types().items():
        if name in skip:
            continue
        base = _base_type(tp)
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f"(default: {default!r})"}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _or_none(base) if base is not tp and base is not str else base
            kwargs["metavar"] = name.upper()
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _or_none(base: type) -> Callable[[str], Any]:
    """An argparse type for an optional number: ``none`` (or ``null``) is None."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error: "invalid float value"
    return parse


def config_from_args(args: argparse.Namespace, *, config_file: str | None = None, **fixed: Any) -> TrainConfig:
    """Resolve the configuration: dataclass defaults < YAML file < CLI flags < ``fixed``.

    Args:
        args: parsed namespace from a parser built with :func:`add_config_flags`.
        config_file: YAML file of overrides (``--config``).
        fixed: final overrides (e.g. the positional MODEL argument when given).
    """
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_yaml_overrides(config_file))
    for name in _field_types():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values.update({k: v for k, v in fixed.items() if v is not None})
    return TrainConfig(**values)


def save_config(config: TrainConfig, folder: str | os.PathLike, name: str = "train_config.yaml") -> Path:
    """Write the resolved config as YAML (loadable with ``--config``) atomically into ``folder``."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)
    return atomic_write_text(folder / name, text)
