"""QLoRA's promise at 8B on a small machine: quantize, fine-tune, merge, export and generate a Llama-3.1-8B-shaped
model with fourbit, beside transformers + bitsandbytes + peft, each step in its own process: wall time, peak
RSS, and the step's own rate (tokens/s) against the machine's bound.

The checkpoint is shaped exactly like Llama-3.1-8B (hidden 4096, 32 layers, MLP 14336, 32 heads, 8 KV heads,
vocabulary 128256, untied head; bf16 safetensors in ~5 GB shards with ``model.safetensors.index.json``) with
random weights: no hub is reachable, and neither speed nor memory depends on the values. It is written once
under ``--dir`` (about 16.1 GB for 32 layers; the free space is checked first, and so is the ~32 GB more that
the 4-bit copies, the merged model and the GGUF need) and reused by later runs; ``--layers N`` writes and
measures the same shapes with N decoder layers (1 layer: 2.5 GB). Rotary scaling (Llama 3.1's ``llama3`` rope
type) is left out: it changes no weight and no memory.

Steps (``--steps``, default all, in this order; later ones use the earlier ones' outputs):

- ``quantize``: ``fourbit quantize`` (streaming) vs ``from_pretrained(load_in_4bit=True)`` + ``save_pretrained``;
- ``finetune``: ``fourbit finetune`` on the 4-bit model with its defaults (dropout 0.1, AdamW) and LoRA r=16 on
  every linear layer, packed 1 x ``--seq`` tokens (1,024), gradient checkpointing, ``--train-steps`` steps; the
  peer: peft LoRA (same r, dropout, targets) on the peer's 4-bit checkpoint, torch AdamW, the same batches.
  tokens/s is the median step after the first; the bound is 6 x parameters FLOP per token (forward, the
  recomputation and the input-gradient pass through the frozen base) at the measured matmul rate;
- ``long``: one fourbit step of 1 x ``--long-seq`` tokens (8,192): peak RSS;
- ``merge``: ``fourbit merge`` of the fine-tuned adapter to bf16 shards (5 GB each, with an index);
- ``export``: ``fourbit export --gguf --type q4_0`` of the 4-bit model with the adapter;
- ``generate``: benchmarks/bench_generate.py on the 4-bit model (fourbit's decode step; llama.cpp on the
  exported GGUF when llama-cpp-python is installed): decode tokens/s against the bandwidth bound (bytes read per
  token over the measured read rate) and prompt tokens/s against the matmul bound.

Peak RSS is the largest sum of ``VmRSS`` over the process and its children, sampled every 50 ms from /proc
(Linux); a run that goes above ``--limit-gib`` (default 21 GiB: a 24 GiB machine keeps room for the system)
is killed and reported as such. ``--emulate-avx2`` holds torch (``ATEN_CPU_CAPABILITY=avx2``), oneDNN
(``ONEDNN_MAX_CPU_ISA=AVX2``), MKL (``MKL_ENABLE_INSTRUCTIONS=AVX2``) and fourbit's kernels
(``FOURBIT_CPU_ISA=avx2``) to AVX2, at fp32 compute, in every measured process and in the bound.

    python benchmarks/bench_scale.py --dir /data/bench                 # the recorded run: 32 layers
    python benchmarks/bench_scale.py --dir /tmp/bench --layers 1       # a quick look (2.5 GB on disk)
    python benchmarks/bench_scale.py --dir /tmp/bench --layers 1 --vocab 49152 --limit-gib 4 --train-steps 2 \
        --seq 128 --long-seq 256 --no-peer   # script check
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


_PEER_FINETUNE = r"""
import json, statistics, sys, time
import torch, peft
from transformers import AutoModelForCausalLM
folder, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if sys.argv[4] == "fp32" else torch.bfloat16)
model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    print(json.dumps({"step_seconds": times[-1]}), flush=True)
rest = times[1:] or times
print(json.dumps({"tokens_per_s": seq / statistics.median(rest), "step_seconds": times}))
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
    save_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def save_tokenizer(folder: Path) -> None:
    """The bundled SmolLM2 tokenizer (49,152 ids, all inside Llama-3.1's 128,256) and its chat template, so that
    the fine-tuning and generation steps have real text to work on; Llama 3.1's own is not reachable offline."""
    from transformers import AutoTokenizer

    from fourbit.models import bundled_model_path

    gguf = bundled_model_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


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


def _last_json(out: str) -> dict:
    """The last JSON object in ``out`` that starts a line (commands print logs before their result)."""
    starts = [i for i in range(len(out)) if out[i] == "{" and (i == 0 or out[i - 1] == "\n")]
    for i in reversed(starts):
        try:
            doc = json.loads(out[i:])
        except ValueError:
            try:
                doc = json.loads(out[i:].splitlines()[0])
            except (ValueError, IndexError):
                continue
        if isinstance(doc, dict):
            return doc
    return {}


_REPORTED = ("seconds", "bits_per_param", "quantized_bytes", "load_seconds", "tokens_per_s", "step_seconds",
             "train_loss", "steps")


def run_measured(argv: list[str], limit_bytes: int, env: dict | None = None) -> dict:
    """Run ``argv`` in its own process group; wall time, peak tree RSS, exit code, and whether it was killed
    at ``limit_bytes``; what the command reported (its last JSON object) under ``reported``."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
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
        result["stderr"] = err.strip().splitlines()[-3:] if err.strip() else []
    if proc.returncode == 0:
        doc = _last_json(out)
        result["reported"] = {k: doc[k] for k in _REPORTED if k in doc} or doc
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


STEPS = ("quantize", "finetune", "long", "merge", "export", "generate")
#: Environment that holds torch, oneDNN, MKL and fourbit's kernels to AVX2 (``--emulate-avx2``)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FOURBIT_MAX_CPU_ISA": "avx2"}


def _text_data(path: Path, tokens: int) -> Path:
    """Plain-text records of real-looking words, about ``tokens`` tokens in all, packed by the trainer."""
    words = ("the model reads each weight once and writes four bits with a scale for every block of sixty "
             "four values so that the memory of the machine holds the whole network while training").split()
    rng = __import__("random").Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) for _ in range(tokens // 350 + 2)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Run:
    """The outputs the steps share and how each process is run (limit, environment, compute dtype)."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder = args, folder
        self.work = args.dir / f"{folder.name}-outputs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.q4, self.bnb = self.work / "fourbit-nf4", self.work / "bnb-nf4"
        self.adapter, self.merged, self.gguf = self.work / "adapter", self.work / "merged-bf16", self.work / "q4_0.gguf"
        self.limit = int(args.limit_gib * 2**30)
        self.env = dict(AVX2_ENV) if args.emulate_avx2 else {}
        self.compute = "fp32" if args.emulate_avx2 else "auto"

    def measure(self, argv: list[str]) -> dict:
        return run_measured(argv, self.limit, self.env)

    def fourbit(self, *argv) -> dict:
        return self.measure([sys.executable, "-m", "fourbit", *map(str, argv)])


def step_quantize(run: Run) -> dict:
    out = {"fourbit": run.fourbit("quantize", run.folder, "--out", run.q4, "--json", "--overwrite")}
    if not run.args.no_peer:
        shutil.rmtree(run.bnb, ignore_errors=True)
        out["transformers_bnb"] = run.measure([sys.executable, "-c", _PEER, str(run.folder), str(run.bnb)])
        save_tokenizer(run.bnb)
    return out


def _finetune_flags(run: Run, seq: int, steps: int) -> list:
    return ["--data", _text_data(run.work / f"text-{seq}.jsonl", seq * (steps + 1)), "--max-length", seq,
            "--packing", "--batch-size", 1, "--gradient-accumulation-steps", 1, "--lora-r", 16,
            "--target-modules", "all-linear", "--gradient-checkpointing", "--max-steps", steps, "--save-steps", 0,
            "--eval-fraction", 0, "--eval-steps", 0, "--compute-dtype", run.compute, "--no-progress", "--json",
            "--overwrite", "--gradient-checkpointing-policy", run.args.policy]


def step_finetune(run: Run) -> dict:
    a = run.args
    out = {"fourbit": run.fourbit("finetune", run.q4, "--out", run.adapter, *_finetune_flags(run, a.seq, a.train_steps))}
    if not a.no_peer and run.bnb.is_dir():
        dtype = "fp32" if a.emulate_avx2 or not machine_bounds()["native_bf16"] else "bf16"
        out["transformers_bnb_peft"] = run.measure([sys.executable, "-c", _PEER_FINETUNE, str(run.bnb), str(a.seq),
                                                    str(a.train_steps), dtype])
    return out


def step_long(run: Run) -> dict:
    return {"fourbit": run.fourbit("finetune", run.q4, "--out", run.work / "adapter-long",
                                   *_finetune_flags(run, run.args.long_seq, 1))}


def step_merge(run: Run) -> dict:
    out = {"fourbit": run.fourbit("merge", "--adapter", run.adapter, "--out", run.merged, "--overwrite", "--json")}
    if run.merged.is_dir():
        out["shard_gb"] = sorted(round(f.stat().st_size / 1e9, 2) for f in run.merged.glob("*.safetensors"))
        out["index"] = (run.merged / "model.safetensors.index.json").is_file()
    return out


def step_export(run: Run) -> dict:
    return {"fourbit": run.fourbit("export", run.q4, "--adapter", run.adapter, "--gguf", run.gguf, "--type", "q4_0",
                                   "--force", "--json")}


def step_generate(run: Run) -> dict:
    argv = [sys.executable, str(_HERE / "bench_generate.py"), "--model", str(run.q4), "--tokens", "16",
            "--prompt-tokens", "512", "--repeats", "1", "--json"]
    if run.gguf.is_file():
        argv += ["--gguf", str(run.gguf)]
    return {"fourbit_and_llama_cpp": run.measure(argv)}


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.print_bounds:
        print(json.dumps(machine_bounds()))
        return {}
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if args.layers < 1 or not steps or set(steps) - set(STEPS):
        raise SystemExit(f"bench_scale: --layers must be at least 1 and --steps a list of {', '.join(STEPS)}")
    vocab = "" if args.vocab == SHAPE["vocab_size"] else f"-vocab{args.vocab}"
    folder = write_checkpoint(args.dir / f"llama-3.1-8b-shape-{args.layers}l{vocab}-bf16", args.layers, args.vocab)
    if not (folder / "tokenizer_config.json").is_file():
        save_tokenizer(folder)
    _check_output_space(args, folder)
    run = Run(args, folder)
    results = {"layers": args.layers, "vocab": args.vocab, "emulate_avx2": args.emulate_avx2,
               "checkpoint_gb": round(checkpoint_bytes(args.layers, args.vocab) / 1e9, 2), "steps": {}}
    for name in STEPS:
        if name in steps:
            results["steps"][name] = globals()[f"step_{name}"](run)
            print(f"{name}: {json.dumps(results['steps'][name])}", file=sys.stderr, flush=True)
    results["machine"] = _bounds_in_child(run)
    results["cpu"] = cpu_line()
    _print_table(results)
    print(json.dumps(results))
    return results


def _bounds_in_child(run: Run) -> dict:
    """The machine's bounds measured under the same environment as the steps (AVX2-held or not)."""
    env = {**os.environ, **run.env}
    done = subprocess.run([sys.executable, __file__, "--dir", str(run.args.dir), "--print-bounds"], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_output_space(args: argparse.Namespace, folder: Path) -> None:
    """Refuse early when the disk cannot take the outputs: two 4-bit copies, the merged model, the GGUF."""
    need = checkpoint_bytes(args.layers, args.vocab) * 2
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"bench_scale: {args.dir} has {free / 1e9:.1f} GB free; the outputs of {folder.name} "
                         f"need about {need / 1e9:.1f} GB")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="where the float checkpoint and the outputs are kept")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3.1-8B)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--limit-gib", type=float, default=21.0, help="kill a run whose RSS passes this")
    p.add_argument("--no-peer", action="store_true", help="skip transformers + bitsandbytes + peft")
    p.add_argument("--emulate-avx2", action="store_true", help="hold every library to AVX2, fp32 compute")
    p.add_argument("--seq", type=int, default=1024, help="fine-tuning tokens per step (packed 1 x seq)")
    p.add_argument("--long-seq", type=int, default=8192, help="the long-context step's tokens")
    p.add_argument("--policy", default="auto", choices=("auto", "keep-matmuls", "full"),
                   help="fine-tuning's gradient-checkpointing policy (auto: fourbit's default)")
    p.add_argument("--train-steps", type=int, default=3, help="fine-tuning steps (the first is not timed)")
    p.add_argument("--print-bounds", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=SHAPE["vocab_size"],
                   help="vocabulary size; smaller only to check the script on a crowded machine (the 1-layer "
                        "model's bf16 embeddings and head are 2.1 GB of its 2.5 GB)")
    return p


def _rate(m: dict) -> str:
    r = m.get("reported", {})
    return f"{r['tokens_per_s']:.2f} tok/s" if "tokens_per_s" in r else ""


def _print_table(r: dict) -> None:
    mb = r["machine"]
    params = 8.03e9 * r["layers"] / 32 if r["vocab"] == SHAPE["vocab_size"] else None
    rate = mb["fp32_matmul_gflops"] if r["emulate_avx2"] or not mb["native_bf16"] else mb["bf16_matmul_gflops"]
    print(f"| {r['layers']}-layer Llama-3.1-8B shape ({r['checkpoint_gb']} GB bf16) | who | wall s | peak RSS GiB "
          "| rate | result |\n|---|---|---|---|---|---|")
    for step, runs in r["steps"].items():
        for who, m in runs.items():
            if not isinstance(m, dict) or "exit" not in m:
                continue
            state = "killed at limit" if m["killed_at_limit"] else ("done" if m["exit"] == 0 else f"exit {m['exit']}")
            print(f"| {step} | {who} | {m['seconds']} | {m['peak_rss_gib']} | {_rate(m)} | {state} |")
    if params:
        print(f"fine-tuning bound: {rate * 1e9 / (6 * params):.1f} tokens/s (6 x {params / 1e9:.2f}G FLOP per token "
              f"at {rate} GFLOP/s)")
    emulated = "" if mb["native_bf16"] else " (emulated: no AVX512-BF16/AMX)"
    held = "; every process held to AVX2 (--emulate-avx2)" if r["emulate_avx2"] else ""
    print(f"machine: bf16 matmul {mb['bf16_matmul_gflops']} GFLOP/s{emulated}, fp32 {mb['fp32_matmul_gflops']} "
          f"GFLOP/s, memory read {mb['read_gb_per_s']} GB/s ({mb['threads']} threads){held}; {r['cpu']}")


if __name__ == "__main__":
    main()
