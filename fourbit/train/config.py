"""The fine-tuning configuration: one dataclass holding every default, overridden by YAML, then by CLI flags.

Defaults follow the QLoRA paper (Dettmers et al. 2023, Appendix B): LoRA r=64, alpha=16, dropout 0.1 on all
linear layers, AdamW (paged, 8-bit in the paper) at lr 2e-4 with a constant schedule, max grad norm 0.3 and
an effective batch of 16. Warmup is 3% of the steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fourbit._io import atomic_write_text

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "add_config_flags",
    "config_from_args",
    "load_yaml_overrides",
    "save_config",
]

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
SCHEDULES = ("constant", "cosine", "linear")
_FORMATS = ("auto", "text", "instruction", "chat")
_TASKS = ("causal", "classify")
_QUANTS = ("nf4", "fp4", "none")
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
            attention does not cross examples). ``group_by_length`` instead batches examples of similar length.
    Model:
        model: model folder or GGUF file; ``None`` is the bundled SmolLM2-135M-Instruct.
        quant: base weights ``nf4`` (QLoRA), ``fp4`` or ``none`` (plain LoRA); ``double_quant`` for DQ.
        compute_dtype: ``auto`` (bf16 autocast on GPUs and CPUs with native bf16, else fp32), ``bf16`` or
            ``fp32``. On AVX2-only CPUs torch emulates bf16 matmuls and they run several times slower than fp32.
    """

    model: str | None = None
    data: str | None = None
    out: str | None = None
    eval_data: str | None = None
    task: str = "causal"
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
    max_grad_norm: float = 0.3
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 1024
    eval_steps: int = 50
    eval_batch_size: int = 8
    save_steps: int = 100
    logging_steps: int = 1
    seed: int = 0
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        choices = {"task": _TASKS, "format": _FORMATS, "quant": _QUANTS, "compute_dtype": _DTYPES,
                   "optim": OPTIMIZERS, "lr_scheduler": SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        positive = ("max_length", "lora_r", "max_steps", "batch_size", "gradient_accumulation_steps",
                    "eval_batch_size", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{_flag(name)} must be > 0; got {getattr(self, name)!r}")
        for name in ("warmup_steps", "save_steps", "eval_steps", "loss_chunk_size", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0; got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be > 0; got {self.learning_rate!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0; got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1); got {self.lora_dropout!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1); got {self.warmup_ratio!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1); got {self.eval_fraction!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"--max-grad-norm must be >= 0 (0 disables clipping); got {self.max_grad_norm!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{_flag(name)} must be in [0, 1); got {getattr(self, name)!r}")
        if self.packing and self.group_by_length:
            raise ValueError("--packing and --group-by-length are exclusive; pick one")
        if self.packing and self.task == "classify":
            raise ValueError("--packing is for causal LM data; it cannot be used with --task classify")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite are exclusive")

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


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(tp: Any) -> type:
    """``int | None`` -> int, ``str`` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    base = _base_type(tp)
    if value is None:
        if base is not tp:
            return None
        raise ValueError(f"{source}: {name!r} must not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{source}: {name!r} must be true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{source}: {name!r} must be a number, got {value!r}")
        try:
            out = base(value)
        except ValueError:
            raise ValueError(f"{source}: {name!r} must be a number, got {value!r}") from None
        if base is int and float(value) != out:
            raise ValueError(f"{source}: {name!r} must be an integer, got {value!r}")
        return out
    if base is str:
        if isinstance(value, (list, tuple)):  # e.g. target_modules: [q_proj, v_proj]
            return ",".join(str(v) for v in value)
        return str(value)
    return value


def load_yaml_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into validated field overrides.

    Raises:
        ValueError: naming the file and the key for an unknown key, a bad value, or a non-mapping document.
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value, got {type(doc).__name__}")
    types_ = _field_types()
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise ValueError(f"config file {str(path)!r}: unknown key {key!r}")
        out[name] = _coerce(name, value, types_[name], f"config file {str(path)!r}")
    return out


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per :class:`TrainConfig` field (default suppressed, so only given flags override).

    Booleans get ``--flag/--no-flag``. Help text shows the dataclass default.
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
            kwargs["type"] = base
            kwargs["metavar"] = name.upper()
        parser.add_argument(f"--{_flag(name)}", **kwargs)


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
