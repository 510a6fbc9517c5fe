"""Quantizing an 8B float checkpoint on a small machine: ``fourbit quantize`` against transformers +
bitsandbytes ``from_pretrained(load_in_4bit=True)``, each in its own process, wall time and peak RSS.

The checkpoint is shaped exactly like Llama-3.1-8B (hidden 4096, 32 layers, MLP 14336, 32 heads, 8 KV heads,
vocabulary 128256, untied head; bf16 safetensors in ~5 GB shards with ``model.safetensors.index.json``) with
random weights: no hub is reachable, and neither speed nor memory depends on the values. It is written once
under ``--dir`` (about 16.1 GB for 32 layers; the free space is checked first) and reused by later runs;
``--layers N`` writes and measures the same shapes with N decoder layers (1 layer: 2.5 GB). Rotary scaling
(Llama 3.1's ``llama3`` rope type) is left out: it changes no weight and no memory.

Peak RSS is the largest sum of ``VmRSS`` over the process and its children, sampled every 50 ms from /proc
(Linux); a run that goes above ``--limit-gib`` (default 21 GiB: a 24 GiB machine keeps room for the system)
is killed and reported as such. The machine's own bounds are printed beside the figures: bf16 and fp32 matmul
rate (1024 x 4096 @ 4096 x 14336, torch's thread count) and memory read bandwidth.

    python benchmarks/bench_scale.py --dir /data/bench                 # the recorded run: 32 layers
    python benchmarks/bench_scale.py --dir /tmp/bench --layers 1       # a quick look (2.5 GB on disk)
    python benchmarks/bench_scale.py --dir /tmp/bench --layers 1 --vocab 32000 --limit-gib 3   # script check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_line

#: Llama-3.1-8B's shapes
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, head_dim=128)
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
_BF16 = 2
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent

_PEER = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
t0 = time.perf_counter()
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config, dtype=torch.bfloat16)
loaded = time.perf_counter() - t0
model.save_pretrained(sys.argv[2])
print(json.dumps({"load_seconds": loaded}))
"""


def tensor_shapes(layers: int, vocab: int = SHAPE["vocab_size"]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the Llama-3.1-8B-shaped checkpoint with ``layers`` decoder layers, in file order."""
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], vocab
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_bytes(layers: int, vocab: int = SHAPE["vocab_size"]) -> int:
    """Bytes the bf16 weights take on disk (headers and config are a few hundred kB more)."""
    return sum(_numel(s) * _BF16 for _, s in tensor_shapes(layers, vocab))


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], block) -> None:
    """A safetensors file written tensor by tensor (never a whole shard in memory): norms are ones, every
    other tensor is a window of one random N(0, 0.02) bf16 block, shifted per tensor."""
    import torch

    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = _numel(shape) * _BF16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k, (_name, shape) in enumerate(tensors):
            n = _numel(shape)
            if len(shape) == 1:
                f.write(torch.ones(n, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
                continue
            start = (k * 7919) % block.numel()
            while n:
                piece = block[start:start + n]
                f.write(piece.view(torch.uint8).numpy().tobytes())
                n -= piece.numel()
                start = 0


def write_checkpoint(folder: Path, layers: int, vocab: int = SHAPE["vocab_size"]) -> Path:
    """Write the checkpoint into ``folder`` (atomically: a temporary folder renamed at the end) unless a
    complete one is there already; returns ``folder``.

    Raises:
        SystemExit: not enough free disk, naming the amount needed.
    """
    import torch
    import transformers

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    need = checkpoint_bytes(layers, vocab) + 2**20
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < need:
        raise SystemExit(f"bench_scale: {folder.parent} has {free / 1e9:.1f} GB free; the {layers}-layer "
                         f"checkpoint needs {need / 1e9:.1f} GB (and --out needs about a third of that again)")
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder.parent))
    tmp.chmod(0o755)
    block = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(layers, vocab):
        nbytes = _numel(shape) * _BF16
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(tmp / name, tensors, block)
        weight_map.update({t: name for t, _ in tensors})
    index = {"metadata": {"total_size": checkpoint_bytes(layers, vocab)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = transformers.LlamaConfig(**{**SHAPE, "vocab_size": vocab}, num_hidden_layers=layers, max_position_embeddings=131072,
                                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      bos_token_id=min(128000, vocab - 2), eos_token_id=min(128001, vocab - 1),
                                      dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _tree_rss(pid: int) -> int:
    """VmRSS in bytes of ``pid`` and every descendant (0 for processes gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                stack += [int(c) for c in children]
        except (OSError, ValueError):
            continue
    return total


def run_measured(argv: list[str], limit_bytes: int) -> dict:
    """Run ``argv`` in its own process group; wall time, peak tree RSS, exit code, and whether it was killed
    at ``limit_bytes``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    peak, killed = 0, False
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        if peak > limit_bytes:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    result = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak / 2**30, 2),
              "exit": proc.returncode, "killed_at_limit": killed}
    if proc.returncode != 0 and not killed:
        result["stderr"] = err.strip().splitlines()[-1:] if err.strip() else []
    start = out.find("{")
    if start >= 0 and proc.returncode == 0:
        try:
            doc = json.loads(out[start:])
        except ValueError:
            doc = {}
        result["reported"] = {k: doc[k] for k in ("seconds", "bits_per_param", "quantized_bytes", "load_seconds")
                              if k in doc}
    return result


def machine_bounds() -> dict:
    """bf16 and fp32 matmul rate (GFLOP/s) at torch's thread count, and memory read bandwidth (GB/s)."""
    import torch
    from _machine import cpu_info

    native_bf16 = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(cpu_info()["simd_flags"]))
    a32, b32 = torch.randn(1024, 4096), torch.randn(4096, 14336)
    rates = {}
    for name, (a, b) in {"fp32": (a32, b32), "bf16": (a32.bfloat16(), b32.bfloat16())}.items():
        # Without native bf16 torch emulates it, some 500x slower than fp32 here: a 4-row slice gives the rate.
        rows = 4 if name == "bf16" and not native_bf16 else 1024
        torch.mm(a[:2], b)  # warm-up: kernel selection and packing
        t0 = time.perf_counter()
        torch.mm(a[:rows], b)
        rates[f"{name}_matmul_gflops"] = round(2 * rows * 4096 * 14336 / (time.perf_counter() - t0) / 1e9, 2)
    del a32, b32
    big = torch.ones(1 << 28, dtype=torch.uint8).view(torch.float32)  # 256 MiB, far larger than the caches
    big.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        big.sum()
    rates["read_gb_per_s"] = round(5 * big.nbytes / (time.perf_counter() - t0) / 1e9, 1)
    rates["threads"], rates["native_bf16"] = torch.get_num_threads(), native_bf16
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the float checkpoint is cached")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3.1-8B)")
    parser.add_argument("--limit-gib", type=float, default=21.0, help="kill a run whose RSS passes this")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers + bitsandbytes")
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"],
                        help="vocabulary size; smaller only to check the script on a crowded machine (the 1-layer "
                             "model's bf16 embeddings and head are 2.1 GB of its 2.5 GB)")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers: must be at least 1, got {args.layers}")
    vocab = "" if args.vocab == SHAPE["vocab_size"] else f"-vocab{args.vocab}"
    folder = write_checkpoint(args.dir / f"llama-3.1-8b-shape-{args.layers}l{vocab}-bf16", args.layers, args.vocab)
    limit = int(args.limit_gib * 2**30)
    results = {"layers": args.layers, "vocab": args.vocab,
               "checkpoint_gb": round(checkpoint_bytes(args.layers, args.vocab) / 1e9, 2)}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results["fourbit"] = run_measured([sys.executable, "-m", "fourbit", "quantize", str(folder), "--out",
                                           str(Path(tmp) / "fourbit"), "--json"], limit)
        if not args.no_peer:
            results["transformers_bnb"] = run_measured([sys.executable, "-c", _PEER, str(folder),
                                                        str(Path(tmp) / "bnb")], limit)
    results["machine"] = machine_bounds()
    results["cpu"] = cpu_line()
    _print_table(results)
    print(json.dumps(results))
    return results


def _print_table(r: dict) -> None:
    print(f"| quantize {r['layers']}-layer Llama-3.1-8B shape ({r['checkpoint_gb']} GB bf16) | wall s | "
          "peak RSS GiB | result |\n|---|---|---|---|")
    for name in ("fourbit", "transformers_bnb"):
        if name in r:
            m = r[name]
            state = "killed at limit" if m["killed_at_limit"] else ("done" if m["exit"] == 0 else f"exit {m['exit']}")
            print(f"| {name} | {m['seconds']} | {m['peak_rss_gib']} | {state} |")
    mb = r["machine"]
    emulated = "" if mb["native_bf16"] else " (emulated: no AVX512-BF16/AMX)"
    print(f"machine: bf16 matmul {mb['bf16_matmul_gflops']} GFLOP/s{emulated}, fp32 {mb['fp32_matmul_gflops']} GFLOP/s, "
          f"memory read {mb['read_gb_per_s']} GB/s ({mb['threads']} threads); {r['cpu']}")


if __name__ == "__main__":
    main()
