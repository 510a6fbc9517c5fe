"""Profile one training step of fourbit's default path on the bundled SmolLM2-135M (not a test).

Builds the model the way ``fourbit finetune`` does (NF4 + double quantization, ``prepare_model_for_training``
with the compute dtype's activations, LoRA r=16 on every linear layer), runs warm-up steps of the trainer's loss
(fused head cross-entropy) on random token ids, then one step under ``torch.profiler`` and prints its top
entries by self CPU time, with the CPU it ran on.

    python benchmarks/profile_finetune.py                   # bf16 where the CPU has native bf16, else fp32
    python benchmarks/profile_finetune.py --compute-dtype fp32 --gradient-checkpointing --rows 30
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from _machine import cpu_line  # noqa: E402
from bench_finetune import _export_fp32  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compute-dtype", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps before the profiled one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20, help="profile entries to print")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fourbit.models import QuantConfig, load_model
    from fourbit.nn.linear4bit import resolve_compute_dtype
    from fourbit.nn.lora import LoRASpec, inject_lora
    from fourbit.train.batching import Batch
    from fourbit.train.loss import causal_lm_loss
    from fourbit.train.prepare import prepare_model_for_training

    torch.set_num_threads(args.threads)
    dtype = resolve_compute_dtype(args.compute_dtype, "cpu")
    model, _ = load_model(_export_fp32(), quant=QuantConfig(compute_dtype=dtype), torch_dtype=torch.float32)
    prepare_model_for_training(model, gradient_checkpointing=args.gradient_checkpointing,
                               activation_dtype=dtype if dtype != torch.float32 else None)
    inject_lora(model, LoRASpec(r=16, alpha=16, dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, ids, torch.ones_like(ids), None, ids.numel())
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = causal_lm_loss(model, batch) / batch.n_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(f"{args.batch}x{args.seq_len} tokens, compute {str(dtype).removeprefix('torch.')}, gradient checkpointing "
          f"{args.gradient_checkpointing}: {args.batch * args.seq_len / statistics.median(walls):.0f} tokens/s "
          f"(median of {args.steps} unprofiled steps)")
    print(f"CPU: {cpu_line()}; threads={args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
