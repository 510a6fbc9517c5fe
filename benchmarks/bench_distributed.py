"""Scaling of data-parallel fine-tuning on one machine (not a test).

Runs the same QLoRA fine-tuning (NF4 + double quantization base, LoRA on all linear layers, fp32 compute) of a
small random llama (hidden 512, 4 layers: big enough that a step is compute, small enough for a CPU) as

* 1 process x 1 thread, accumulation ``2 G``, and
* 2 processes x 1 thread (torchrun, gloo), accumulation ``G`` each: the same global batch, with ddp and fsdp,

and prints tokens/s over all ranks (median over the steps after the first), the speed-up, each rank's peak RSS
and the bytes of the model each rank holds: DDP keeps a whole base on every rank, FSDP (``--distributed fsdp``)
shards the decoder layers' 4-bit bytes so that each rank holds about 1/N of them.

    python benchmarks/bench_distributed.py                 # defaults below
    python benchmarks/bench_distributed.py --steps 8 --batch 2 --accum 2 --seq-len 256 --json

Other processes share the machine's cores: compare the ratio measured in one run, not absolute numbers across
runs. With 2 cores, 2 x 1 thread can at best double 1 x 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import peak_rss_mb  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]



def _make_inputs(folder: Path, seq_len: int) -> None:
    """A random llama with the tests' byte-level tokenizer, and text rows of about ``seq_len`` tokens."""
    sys.path.insert(0, str(_REPO / "tests"))
    import torch
    from _tiny_models import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=259, max_position_embeddings=max(512, seq_len),
                         pad_token_id=256)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    make_tokenizer().save_pretrained(folder / "model")
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps".split()
    rows = [" ".join(words[(i + j) % len(words)] for j in range(seq_len // 5)) for i in range(256)]
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))


def _local_bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _worker(argv: list[str]) -> None:
    """One rank: the library calls ``fourbit finetune`` makes, then this rank's memory into a file."""
    from fourbit.train.config import TrainConfig
    from fourbit.train.distributed import init_world
    from fourbit.train.loading import load_for_training
    from fourbit.train.trainer import prepare_data, train

    config = TrainConfig(**json.loads(argv[0]))
    world = init_world(argv[1], timeout_s=120)
    try:
        model, tokenizer = load_for_training(config)
        result = train(config, model, tokenizer, data=prepare_data(config, tokenizer), world=world,
                       log=lambda *_: None)
        # after training: under fsdp the model is sharded, and each rank holds its shard of the base
        base_bytes = sum(_local_bytes(t) for t in [*model.parameters(), *model.buffers()])
        report = Path(config.out).parent / f"rank-{world.size}-{world.rank}.json"
        report.write_text(json.dumps({"rank": world.rank, "peak_rss_mb": peak_rss_mb(), "base_bytes": base_bytes,
                                      "steps": result.steps}))
    finally:
        world.close()


def _run(folder: Path, nproc: int, mode: str, args: argparse.Namespace) -> dict:
    out = folder / f"out-{nproc}-{mode}"
    config = dict(model=str(folder / "model"), data=str(folder / "data.jsonl"), out=str(out), overwrite=True,
                  max_steps=args.steps, batch_size=args.batch, gradient_accumulation_steps=args.accum * 2 // nproc,
                  lora_r=16, lora_alpha=32, compute_dtype="fp32", eval_steps=0, save_steps=0, progress=False,
                  eval_fraction=0.0, max_length=args.seq_len, learning_rate=1e-4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(_REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TORCH_CPP_LOG_LEVEL": "FATAL"}
    script = [str(Path(__file__).resolve()), "--worker", json.dumps(config), mode]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{nproc}-process run failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out.parent / f"rank-{nproc}-{r}.json").read_text()) for r in range(nproc)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first step warms up
    return {"processes": nproc, "mode": mode if nproc > 1 else "single", "threads_per_process": 1, "tokens_per_s": statistics.median(speeds),
            "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
            "weights_mb_per_rank": [round(r["base_bytes"] / 2**20, 2) for r in ranks],
            "global_batch": args.batch * args.accum * 2}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per rank per step on 2 processes")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fourbit-bench-dist-") as tmp:
        folder = Path(tmp)
        _make_inputs(folder, args.seq_len)
        rows = [_run(folder, n, mode, args) for n, mode in ((1, "ddp"), (2, "ddp"), (2, "fsdp"))]
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.json:
        print(json.dumps({"runs": rows, "speedup": speedup, "load_average": load}))
        return
    print(f"QLoRA (NF4 + DQ base, LoRA r=16 all-linear), global batch {rows[0]['global_batch']} x {args.seq_len} "
          f"tokens, {args.steps} steps; load average {load}")
    print("| processes x threads | mode | tokens/s (all ranks) | vs 1 x 1 | peak RSS per rank (MiB) | "
          "model weights per rank (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} x 1 | {r['mode']} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | "
              f"{', '.join(str(m) for m in r['peak_rss_mb_per_rank'])} | "
              f"{', '.join(str(m) for m in r['weights_mb_per_rank'])} |")


if __name__ == "__main__":
    main()
