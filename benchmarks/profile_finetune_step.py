"""Time (wall and process CPU) or profile the optimizer steps of one ``fourbit finetune`` run of bench_finetune's
``--part dpo`` workload: ``dpo`` on its pairs, or ``causal`` (supervised) on the same texts, in one compute dtype.

On a shared machine the wall time of a step follows the other jobs' load; the process CPU time of the step
(both threads) follows it much less, so DPO and supervised steps are compared by CPU seconds per token.
``--profile`` runs torch.profiler over the last step and prints its operators by self CPU time.

    python benchmarks/profile_finetune_step.py dpo bf16 --steps 3
    python benchmarks/profile_finetune_step.py causal bf16 --steps 1 --profile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_finetune as bench  # noqa: E402


def _timed_step(real, args, count: list[int]):
    import torch

    def step(self, *a, **kw):
        count[0] += 1
        if args.profile and count[0] == args.steps + 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as p:
                result = real(self, *a, **kw)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))
            return result
        c0, t0 = time.process_time(), time.perf_counter()
        result = real(self, *a, **kw)
        cpu = time.process_time() - c0
        print(f"step {count[0]}: wall {time.perf_counter() - t0:.2f} s, cpu {cpu:.2f} s, tokens {result.n_tokens}, "
              f"cpu ms/token {1e3 * cpu / result.n_tokens:.1f}, loss {result.loss:.6f}", flush=True)
        return result

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("dpo", "causal"))
    ap.add_argument("dtype", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=3, help="steps after the first (as bench_finetune's --steps)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--workdir", default="/tmp/fourbit_profile_step")
    args = ap.parse_args()
    import torch

    from fourbit.cli import console_main
    from fourbit.train import step as step_module

    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(workdir=args.workdir, batch=args.batch, steps=args.steps, seq_len=args.seq_len,
                            compute_dtype=args.dtype, lora_dropout=None)
    bench._export_fp32()
    bench._write_pairs(Path(args.workdir), args.batch * (args.steps + 1), args.seq_len)
    argv = [a for a in bench._pairs_argv(ns, args.task, Path(args.workdir) / f"run-{args.task}-{args.dtype}")
            if a != "--json"]
    step_module.Stepper.step = _timed_step(step_module.Stepper.step, args, [0])
    print(f"CPU: {bench.cpu_line()}", flush=True)
    sys.argv = ["fourbit", *argv]
    console_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
