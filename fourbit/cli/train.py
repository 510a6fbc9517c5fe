"""``fourbit finetune`` and ``fourbit merge``: thin wrappers over :mod:`fourbit.train`.

Each command checks what it can (flags, files, the output folder, the checkpoint to resume) before it loads a
model, then calls the same functions a Python user calls.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from fourbit._errors import FieldError
from fourbit.cli import CtrlCOutsideImports

__all__ = ["add_parser", "cmd_finetune", "cmd_merge"]


def _print_config(config: Any, as_json: bool) -> None:
    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="resolved config", show_header=False, box=None)
    for k, v in config.to_dict().items():
        table.add_row(k, repr(v))
    Console(stderr=True).print(table)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None, so the output is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _global_batch(config: Any, global_batch_size: int | None, world_size: int) -> Any:
    """``config`` with ``gradient_accumulation_steps`` set so that ``batch_size`` x it x ``world_size`` is
    ``global_batch_size`` (unchanged when that is None)."""
    if global_batch_size is None:
        return config
    per_step = config.batch_size * world_size
    if global_batch_size < 1 or global_batch_size % per_step:
        raise FieldError("global_batch_size", f"{global_batch_size} is not a positive multiple of `batch_size` "
                                              f"({config.batch_size}) x {world_size} process(es) = {per_step}; "
                                              "choose a multiple, or change `batch_size` or the process count")
    return config.replace(gradient_accumulation_steps=global_batch_size // per_step)


def cmd_finetune(args: argparse.Namespace) -> int:
    """QLoRA/LoRA fine-tuning of MODEL (default: the bundled SmolLM2-135M-Instruct) on --data into --out.

    Options come from the dataclass defaults (QLoRA paper), then --config FILE.yaml, then flags. The adapter,
    train_config.yaml, metrics.jsonl, loss_curve.png and checkpoints/ are written into --out itself. A new run
    replaces an older one in --out (with --overwrite) only once it has written its first checkpoint. Ctrl-C
    stops at the next step with a checkpoint; --resume continues from the newest intact checkpoint.

    Under torchrun (WORLD_SIZE > 1) the run is data-parallel over the processes (gloo on CPU, nccl on CUDA):
    each step's global batch is --batch-size x --gradient-accumulation-steps x processes (or --global-batch-size),
    rank 0 prints and writes; see docs/distributed.md.
    """
    from fourbit.train.config import config_from_args
    from fourbit.train.distributed import init_world, world_size_from_env

    # Options that are wrong on every rank fail here, before any rank waits for the others.
    config = config_from_args(args, config_file=args.config, model=args.model_pos)
    _global_batch(config, args.global_batch_size, world_size_from_env())
    world = init_world(args.distributed, timeout_s=args.dist_timeout)
    try:
        return _finetune(args, world)
    finally:
        world.close()


def _finetune(args: argparse.Namespace, world: Any) -> int:
    from fourbit.train.trainer import TrainingInterrupted, train

    quiet = not world.is_main
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    # One SIGINT handler from here to the end of the command, so that no Ctrl-C meets Python's default one in
    # between: it stops the loading at once, the trainer's own handler takes over while it trains (and takes a
    # Ctrl-C that came before it did), and once the run is complete a Ctrl-C has nothing left to stop.
    with _CtrlC.installed() as ctrl_c:
        try:
            config, plan, model, tokenizer, data = world.agree(lambda: _prepare(args, world, log),
                                                               "the loading of the model and data")
            ctrl_c.stop_at_once = False
        except KeyboardInterrupt:
            if not quiet:
                print("fourbit finetune: interrupted before the first step; nothing was written", file=sys.stderr)
            return 130
        before = _newest_checkpoint(config.out) if not quiet else None
        try:
            result = train(config, model, tokenizer, data=data, plan=plan, log=log, world=world)
        except TrainingInterrupted as stop:
            if not quiet:
                print(f"fourbit finetune: interrupted at step {stop.step}; checkpoint {stop.checkpoint} written: "
                      "run the same command with --resume to continue", file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # a second Ctrl-C stops at once; checkpoints are written whole or not at all
            if not quiet:
                print(_stopped_at_once(config.out, before, resumed=config.resume), file=sys.stderr)
            return 130
        if not quiet:
            _print_summary(result, args.json)
    return 0


def _prepare(args: argparse.Namespace, world: Any, log: Any) -> tuple[Any, Any, Any, Any, Any]:
    """The resolved config, the output plan, the model, its tokenizer and the tokenized data; the output folder
    and checkpoint, then the data file, are checked before the slow model load."""
    from fourbit.train.config import config_from_args
    from fourbit.train.data import check_records, load_records
    from fourbit.train.loading import load_for_training
    from fourbit.train.pairs import PREFERENCE_TASKS, check_pairs
    from fourbit.train.trainer import plan_run, prepare_data

    config = config_from_args(args, config_file=args.config, model=args.model_pos)
    for name in ("data", "out"):
        if not getattr(config, name):
            raise FieldError(name, "is required: finetune needs `data` (training file) and `out` (run folder)")
    config = _global_batch(config, args.global_batch_size, world.size)
    if world.is_main:
        _print_config(config, args.json)
    # rank 0 alone reads and writes `out`
    plan = plan_run(config, log=log, world_size=world.size) if world.is_main else None
    # A bad data file fails before the model load too, judged on the whole file (not the training split).
    label_column = config.label_column if config.task == "classify" else None
    records = load_records(config.data)
    eval_records = load_records(config.eval_data) if config.eval_data else None
    for rows in (records, eval_records) if eval_records is not None else (records,):
        if config.task in PREFERENCE_TASKS:
            check_pairs(rows, format=config.format)
        else:
            check_records(rows, format=config.format, text_column=config.text_column, label_column=label_column)
    from fourbit.train.memory_check import check_finetune_fits, resolve_checkpoint_policy

    config = resolve_checkpoint_policy(config)  # every rank alike
    if config.memory_check and world.is_main:  # before the slow load: a run that cannot fit never starts
        config = check_finetune_fits(config, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world.size > 1 else 1)
    labels: list[str] = []
    if config.task == "classify":
        labels = sorted({str(r.get(config.label_column)) for r in records if config.label_column in r})
    model, tokenizer = load_for_training(config, label_names=labels)
    if world.size > 1 and next(model.parameters()).device != world.device:
        model = model.to(world.device)
    data = prepare_data(config, tokenizer, records=records, eval_records=eval_records)
    return config, plan, model, tokenizer, data


def _newest_checkpoint(out: Any) -> tuple[str, int] | None:
    """The newest checkpoint folder under ``out`` as (path, inode), so that one written by this run is told
    from an older run's of the same name; None if there is none."""
    from fourbit.train.checkpoint import latest_checkpoint

    folder = latest_checkpoint(out)
    return (str(folder), folder.stat().st_ino) if folder is not None else None


def _stopped_at_once(out: Any, before: tuple[str, int] | None, *, resumed: bool) -> str:
    """The line for a run stopped at once by Ctrl-C: the checkpoint to resume from, or that nothing was written
    (a new run's folder becomes ``out`` only at its first checkpoint; an older run there stays as it was)."""
    newest = _newest_checkpoint(out)
    if newest is None or (newest == before and not resumed):
        return "fourbit finetune: interrupted before this run's first checkpoint; nothing was written"
    return (f"fourbit finetune: interrupted; checkpoint {newest[0]} is the newest: run the same command with "
            "--resume to continue")


class _CtrlC(CtrlCOutsideImports):
    """The SIGINT handler of ``finetune``: ``KeyboardInterrupt`` while ``stop_at_once`` (the loading; never
    inside an import, see :class:`~fourbit.cli.CtrlCOutsideImports`), after that a request to stop, recorded in
    ``requested``. The trainer's handler replaces it while the run trains and starts with the request recorded
    here, if any (see :func:`fourbit.train.trainer.train`)."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_at_once = True
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.stop_at_once:
            super().__call__(signum, frame)
        else:
            self.requested = True


def _print_summary(result: Any, as_json: bool) -> None:
    """The run's results: one JSON document (``--json``) or a table."""
    summary = _json_safe({
        "out": str(result.out), "steps": result.steps, "train_loss": result.train_loss, **result.eval,
        "n_train": result.n_train, "n_eval": result.n_eval, "n_truncated": result.n_truncated,
        "n_dropped": result.n_dropped, "tokens_per_s": result.tokens_per_s, "resumed_from": result.resumed_from,
        "world_size": result.world_size,
    })
    if as_json:
        print(json.dumps(summary, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fine-tuned adapter in {result.out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base and write a 16-bit model folder (with tokenizer) to --out.

    --adapter is the finetune run folder (its --out), one of its checkpoints, or a peft adapter folder. The
    adapter is merged onto the weights it was trained against: for a QLoRA adapter the dequantized NF4 weight,
    with the base and quantization recorded in the run's train_config.yaml; another MODEL or --quant is
    refused unless --force. Re-quantizing a merged model to 4 bits would round most of the adapter's update away.
    """
    from fourbit.train.merge import merge_adapter, merge_base

    model = args.model_pos
    out = merge_adapter(args.adapter_dir, args.out, model=model, quant=args.quant, dtype=args.dtype,
                        overwrite=args.overwrite, force=args.force)
    base = merge_base(args.adapter_dir, model=model, quant=args.quant, force=args.force)
    info = {"out": str(out), "base": str(base.model or "bundled SmolLM2-135M-Instruct"), "merged_on": base.quant,
            "dtype": args.dtype}
    print(json.dumps(info) if args.json else f"merged {args.adapter_dir} into {info['base']} ({base.quant} base) "
          f"-> {out} ({args.dtype})")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``finetune`` and ``merge``."""
    from fourbit.train.config import add_config_flags

    p = subparsers.add_parser("finetune", help="QLoRA/LoRA fine-tuning", description=cmd_finetune.__doc__)
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="model folder or .gguf (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML file overriding the defaults")
    p.add_argument("--json", action="store_true", help="print one JSON document with the results")
    add_config_flags(p)
    d = p.add_argument_group("several processes (under torchrun; see docs/distributed.md)")
    d.add_argument("--distributed", choices=("ddp", "fsdp"), default=None,
                   help="when WORLD_SIZE > 1: ddp keeps the whole 4-bit base on every process (default), fsdp "
                        "shards it layer by layer")
    d.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="longest wait for the rendezvous and for a peer rank (default: 300)")
    d.add_argument("--global-batch-size", type=int, default=None, metavar="N",
                   help="examples per optimizer step over all processes; sets --gradient-accumulation-steps to "
                        "N / (--batch-size x processes)")
    p.set_defaults(func=cmd_finetune)

    m = subparsers.add_parser("merge", help="merge an adapter into a 16-bit model folder",
                              description=cmd_merge.__doc__)
    m.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="base model (default: the one recorded with the adapter, else bundled SmolLM2)")
    m.add_argument("--adapter", dest="adapter_dir", required=True, metavar="DIR",
                   help="the finetune run folder (its --out), a checkpoint of it, or a peft adapter folder")
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--quant", choices=("nf4", "fp4", "none"), default=None,
                   help="base the adapter was trained on (default: from the run's train_config.yaml, else nf4)")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    m.add_argument("--force", action="store_true", help="merge onto another MODEL/--quant than the run's")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_merge)
