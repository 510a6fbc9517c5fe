"""Refuse a fine-tuning run that will not fit in memory before it starts, and say which flags would make it fit.

The estimate is :func:`fourbit.models.memory_plan.plan_memory`'s finetune term, from the model folder's
config.json and the run's settings alone (no weight is read). The memory available is the kernel's
``MemAvailable`` (``/proc/meminfo``), lowered to a cgroup's remaining limit when the process runs under one.
A run whose model has no config.json to plan from (a GGUF file, the bundled model) is not checked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fourbit.models.memory_plan import FinetuneSettings, MemoryPlan

from .config import TrainConfig

__all__ = ["MemoryWontFit", "available_memory_bytes", "check_finetune_fits", "finetune_plan", "finetune_settings",
           "resolve_checkpoint_policy"]


class MemoryWontFit(ValueError):
    """The planned peak of a run is above the memory available; the message names the settings that fix it."""


def finetune_settings(config: TrainConfig) -> FinetuneSettings:
    """The memory-relevant settings of ``config``, with the compute dtype resolved for the CPU."""
    from fourbit.nn.linear4bit import resolve_compute_dtype
    from fourbit.optim import OPTIMIZER_OPTIONS

    from .pairs import PREFERENCE_TASKS

    compute = resolve_compute_dtype(config.compute_dtype, "cpu")
    return FinetuneSettings(
        # a preference micro-batch of B pairs runs 2B sequences (chosen and rejected)
        max_length=config.max_length, batch_size=config.batch_size * (2 if config.task in PREFERENCE_TASKS else 1),
        lora_r=config.lora_r,
        target_modules=config.target_module_list, optimizer_bits=OPTIMIZER_OPTIONS[config.optim]["bits"],
        gradient_checkpointing=config.gradient_checkpointing,
        checkpoint_policy=config.gradient_checkpointing_policy, loss_chunk_size=config.loss_chunk_size,
        compute_bytes=compute.itemsize)


def finetune_plan(config: TrainConfig, **plan_kwargs) -> MemoryPlan:
    """The memory plan of ``config.model`` (a folder with config.json) under ``config``'s settings."""
    from fourbit.models.memory_plan import float_bytes_of, model_counts, plan_memory

    quant = _quant_config(config)
    counts = model_counts(config.model, quant)
    return plan_memory(counts, quant, float_bytes=float_bytes_of(config.model), finetune=finetune_settings(config),
                       **plan_kwargs)


def _quant_config(config: TrainConfig):
    from fourbit.models import QuantConfig

    return (QuantConfig(include=()) if config.quant == "none"
            else QuantConfig(quant_type=config.quant, double_quant=config.double_quant))


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get now: ``MemAvailable``, capped by a cgroup v2 limit; None if unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = {line.split(":")[0]: line.split()[1] for line in text.splitlines() if ":" in line}
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


#: Changes tried, one at a time, to name the flags that bring a run under the memory available
_REMEDIES = (
    ("`gradient_checkpointing`", lambda c: not c.gradient_checkpointing, {"gradient_checkpointing": True}),
    ("`gradient_checkpointing_policy` full",
     lambda c: c.gradient_checkpointing and c.gradient_checkpointing_policy != "full",
     {"gradient_checkpointing_policy": "full"}),
    ("`batch_size` 1", lambda c: c.batch_size > 1, {"batch_size": 1}),
    ("`max_length` {half}", lambda c: c.max_length > 128, None),
    ("`optim` paged_adamw_8bit", lambda c: c.optim in ("adamw", "paged_adamw_32bit"), {"optim": "paged_adamw_8bit"}),
)


def _peak(config: TrainConfig, processes: int = 1) -> int:
    return processes * finetune_plan(config).peak("finetune")


def resolve_checkpoint_policy(config: TrainConfig) -> TrainConfig:
    """The ``auto`` checkpointing policy as ``full`` when it would not keep the matmul outputs of a model this
    size (:func:`fourbit.models.memory_plan.keeps_matmul_outputs`): the run then does what the plan assumed.
    A model with no config.json to plan from is returned as it is."""
    if config.model is None or not (Path(config.model) / "config.json").is_file():
        return config
    if not config.gradient_checkpointing or config.gradient_checkpointing_policy != "auto":
        return config
    from fourbit.models.memory_plan import keeps_matmul_outputs, model_counts

    if keeps_matmul_outputs(model_counts(config.model, _quant_config(config)), finetune_settings(config)):
        return config
    return dataclasses.replace(config, gradient_checkpointing_policy="full")


def check_finetune_fits(config: TrainConfig, available: int | None = None, processes: int = 1) -> TrainConfig:
    """``config``, checked against the memory available; raise :class:`MemoryWontFit` when its planned peak
    is above it, naming each single setting change that would bring it under (or saying none does).

    The ``auto`` checkpointing policy keeps the LoRA layers' outputs (sequences up to 1,024 tokens) to skip
    the matmuls when recomputing; at 8B that is 5.6 GB in float32 for 1,024 tokens. When the run fits only
    without them, the returned config has the ``full`` policy instead (slower by one matmul pass, not refused).
    A model with no config.json to plan from (a GGUF file, the bundled model) is returned unchecked.

    Args:
        available: bytes (default :func:`available_memory_bytes`).
        processes: how many such runs share this machine's memory (torchrun's processes on this node).
    """
    if config.model is None or not (Path(config.model) / "config.json").is_file():
        return config
    config = resolve_checkpoint_policy(config)
    available = available_memory_bytes() if available is None else available
    peak = _peak(config, processes)
    if available is None or peak <= available:
        return config
    if config.gradient_checkpointing and config.gradient_checkpointing_policy == "auto":
        full = dataclasses.replace(config, gradient_checkpointing_policy="full")
        if _peak(full, processes) <= available:
            return full
    fixes = []
    for flag, applies, change in _REMEDIES:
        if not applies(config):
            continue
        if change is None:
            change = {"max_length": max(64, config.max_length // 2)}
            flag = flag.format(half=change["max_length"])
        if _peak(dataclasses.replace(config, **change), processes) <= available:
            fixes.append(flag)
    gib = 2**30
    advice = (f"any one of {', '.join(fixes)} brings it under" if fixes else
              "no single setting brings it under: combine `gradient_checkpointing`, `batch_size` 1, a smaller "
              "`max_length` and `optim` paged_adamw_8bit, or use a machine with more memory")
    who = f"{processes} processes" if processes > 1 else "it"
    raise MemoryWontFit(f"fine-tuning {config.model} needs about {peak / gib:.1f} GiB at its peak ({who}; "
                        f"`fourbit plan` lists the terms) but {available / gib:.1f} GiB is available: {advice} "
                        "(turn `memory_check` off to run it anyway)")
