"""GPU benchmark of fourbit's Triton kernels against bitsandbytes, torch.matmul and the copy bandwidth.

    python benchmarks/bench_gpu.py [--repeats 100] [--skip train] [--json]

Needs a CUDA device (exits with a message otherwise). Sections:

    check    the Triton kernels on the GPU give the same bytes as the CPU reference (quantize, dequantize, DQ)
    dequant  a 4096x11008 NF4 + double-quant weight to bf16: GB/s moved, vs the card's measured copy bandwidth
             and vs bitsandbytes' dequantize_4bit
    gemv     4-bit decode matmul at batch 1 and 8 for a 7B model's projections (out x in: 4096x4096,
             11008x4096, 4096x11008) vs bitsandbytes' matmul_4bit (its gemv_4bit kernel for one row) and vs
             a bf16 torch.matmul with the unquantized weight
    train    one QLoRA training step of a ~1.1B llama config (random weights, batch 8 x 512 tokens, r=64 on
             all linear layers, gradient checkpointing, AdamW): tokens/s and peak memory, fourbit vs
             transformers + bitsandbytes + peft

Kernel times are device-side (torch.cuda.Event pairs queued behind a sleep kernel, so that launch latency does
not count), medians of ``--repeats`` runs after warm-up, inputs rotated over enough copies that the working
set is several times the L2 cache. The wall column is the synchronous host-side time per call, launch and
Python overhead included (what one decoding step pays). bitsandbytes and peft are imported lazily; missing
peers are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DEQUANT_SHAPE = (4096, 11008)
ROTATE_BYTES = 256 << 20  # working set across rotated inputs: >> the 50 MB L2 of an H100
COPY_BYTES = 1 << 30
CHECK_SIZES = [(4096 * 1024 + 77, 64), (1000003, 4096)]  # (n, blocksize): odd n, partial last blocks


# ------------------------------------------------------------------------------------------------- timing
def _device_seconds(fn: Callable, inputs: Sequence[tuple], repeats: int, warmup: int) -> float:
    """Median device time of ``fn(*inputs[i % len(inputs)])`` over ``repeats`` runs (seconds)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda._sleep(int(2e8))  # ~0.1 s: the host queues every run before the first one starts
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) / 1e3


def _wall_seconds(fn: Callable, inputs: Sequence[tuple], repeats: int) -> float:
    """Median synchronous host time per call (launch and Python overhead included)."""
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copies(nbytes: int) -> int:
    return max(2, min(64, -(-ROTATE_BYTES // max(1, nbytes))))


def copy_bandwidth(repeats: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), 1 GiB buffers."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _device_seconds(lambda d, s: d.copy_(s), [(dst, src)], repeats, warmup=3)
    return 2 * COPY_BYTES / seconds / 1e9


# -------------------------------------------------------------------------------------------- peers
def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        return None
    return bnb, F


def _fourbit_quantize(w: torch.Tensor):
    import fourbit

    return fourbit.quantize_4bit(w, "nf4", 64, double_quant=True)


def _tk():
    from fourbit.kernels import triton_kernels

    if not triton_kernels.available():
        sys.exit("fourbit's Triton kernels are unavailable (is triton installed?)")
    return triton_kernels


# ------------------------------------------------------------------------------------------- sections
def check() -> list[dict]:
    """Bytes from the Triton kernels on the GPU vs the PyTorch reference on the CPU (must be equal)."""
    from fourbit.kernels import reference
    from fourbit.kernels.scales import BlockScales
    from fourbit.quant import get_code

    tk = _tk()
    rows = []
    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4", "int4"):
        for n, blocksize in CHECK_SIZES:
            code = get_code(quant_type)
            x = torch.randn(n, dtype=torch.bfloat16)
            x[:4096] = 0
            p_ref, a_ref = reference.quantize_4bit_blocks(x, code, blocksize)
            p, a = tk.quantize_4bit_blocks(x.cuda(), code.cuda(), blocksize)
            d_ref = reference.dequantize_4bit_blocks(p_ref, BlockScales(a_ref), code, blocksize, n, torch.bfloat16)
            d = tk.dequantize_4bit_blocks(p, BlockScales(a), code.cuda(), blocksize, n, torch.bfloat16)
            ok = torch.equal(p.cpu(), p_ref) and torch.equal(a.cpu(), a_ref) and torch.equal(d.cpu(), d_ref)
            rows.append({"check": f"quant+dequant {quant_type} n={n} block={blocksize}", "equal": ok})
    w = torch.randn(DEQUANT_SHAPE)
    packed, state = _fourbit_quantize(w)
    expected = reference.dequantize_4bit_blocks(packed, state.block_scales(), state.code, 64, w.numel(),
                                                torch.bfloat16)
    state.to("cuda")
    got = tk.dequantize_4bit_blocks(packed.cuda(), state.block_scales(), state.code, 64, w.numel(), torch.bfloat16)
    rows.append(
        {
            "check": f"double-quantized dequant {DEQUANT_SHAPE[0]}x{DEQUANT_SHAPE[1]} (in-kernel absmax)",
            "equal": torch.equal(got.cpu(), expected),
        }
    )
    return rows


def bench_dequant(repeats: int, copy_gbs: float) -> list[dict]:
    tk = _tk()
    out_features, in_features = DEQUANT_SHAPE
    n = out_features * in_features
    w = torch.randn(DEQUANT_SHAPE, device="cuda", dtype=torch.bfloat16)
    packed, state = _fourbit_quantize(w)
    moved = packed.numel() + state.nbytes() + 2 * n  # read codes + scales, write bf16
    copies = _copies(moved)
    fb_inputs = []
    for _ in range(copies):
        p, s = _fourbit_quantize(torch.randn(DEQUANT_SHAPE, device="cuda", dtype=torch.bfloat16))
        fb_inputs.append((p, s))

    def fourbit_dequant(p, s):
        return tk.dequantize_4bit_blocks(p, s.block_scales(), s.code, 64, n, torch.bfloat16)

    results = []
    secs = _device_seconds(fourbit_dequant, fb_inputs, repeats, warmup=5)
    results.append(
        {
            "impl": "fourbit (triton)",
            "us": secs * 1e6,
            "gbs": moved / secs / 1e9,
            "wall_us": _wall_seconds(fourbit_dequant, fb_inputs, min(repeats, 30)) * 1e6,
        }
    )
    peers = _bnb()
    if peers is not None:
        _, F = peers
        bnb_inputs = [
            F.quantize_4bit(
                torch.randn(DEQUANT_SHAPE, device="cuda", dtype=torch.bfloat16),
                blocksize=64,
                compress_statistics=True,
                quant_type="nf4",
            )
            for _ in range(copies)
        ]

        def bnb_dequant(p, s):
            return F.dequantize_4bit(p, quant_state=s)

        secs = _device_seconds(bnb_dequant, bnb_inputs, repeats, warmup=5)
        results.append(
            {
                "impl": "bitsandbytes",
                "us": secs * 1e6,
                "gbs": moved / secs / 1e9,
                "wall_us": _wall_seconds(bnb_dequant, bnb_inputs, min(repeats, 30)) * 1e6,
            }
        )
    for r in results:
        r["of_copy_bw"] = r["gbs"] / copy_gbs
    return results


def bench_gemv(repeats: int) -> list[dict]:
    tk = _tk()
    peers = _bnb()
    results = []
    for out_features, in_features in GEMV_SHAPES:
        n = out_features * in_features
        copies = _copies(n // 2)
        weights = [
            torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(min(copies, 8))
        ]
        fb = [_fourbit_quantize(weights[i % len(weights)]) for i in range(copies)]
        bnb_q = None
        if peers is not None:
            bnb_mod, F = peers
            bnb_q = [
                F.quantize_4bit(
                    weights[i % len(weights)], blocksize=64, compress_statistics=True, quant_type="nf4"
                )
                for i in range(copies)
            ]
        bf16_copies = max(2, min(len(weights), -(-ROTATE_BYTES // (2 * n))))
        for batch in (1, 8):
            x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)

            def fourbit_mm(p, s, x=x, o=out_features, k=in_features):
                return tk.fused_linear_4bit(x, p, s.block_scales(), s.code, 64, o, k)

            impls = {"fourbit (triton)": (fourbit_mm, fb)}
            if bnb_q is not None:
                impls["bitsandbytes"] = (
                    lambda p, s, x=x, b=bnb_mod: b.matmul_4bit(x, p.t(), quant_state=s),
                    bnb_q,
                )
            impls["bf16 torch.matmul"] = (
                lambda w, x=x: torch.nn.functional.linear(x, w),
                [(weights[i],) for i in range(bf16_copies)],
            )
            expected = torch.nn.functional.linear(x.float(), weights[0].float())
            for name, (fn, inputs) in impls.items():
                secs = _device_seconds(fn, inputs, repeats, warmup=10)
                err = None
                if name != "bf16 torch.matmul":
                    got = fn(*inputs[0]).float()
                    err = float((got - expected).norm() / expected.norm())
                results.append(
                    {
                        "shape": f"{out_features}x{in_features}",
                        "batch": batch,
                        "impl": name,
                        "us": secs * 1e6,
                        "wall_us": _wall_seconds(fn, inputs, min(repeats, 30)) * 1e6,
                        "weight_gbs": (n // 2 if name != "bf16 torch.matmul" else 2 * n) / secs / 1e9,
                        "rel_err_vs_bf16": err,
                    }
                )
        del weights, fb, bnb_q
        torch.cuda.empty_cache()
    return results


def _llama_config(layers: int):
    import transformers

    # TinyLlama-1.1B's shapes: hidden 2048, MLP 5632, 32 heads (4 KV heads), vocab 32000.
    return transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        torch_dtype="bfloat16",
    )


def _train_loop(model, batch: int, seq: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    times = []
    for step in range(steps + 2):  # two warm-up steps
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {
        "step_s": sec,
        "tokens_s": batch * seq / sec,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "loss": float(loss),
    }


def _fresh_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench_train(steps: int, batch: int, seq: int, layers: int) -> list[dict]:
    import transformers

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(_llama_config(layers)).to(torch.bfloat16).save_pretrained(tmp)
        gc.collect()

        _fresh_memory()
        try:
            from fourbit.kernels import dispatch
            from fourbit.models import QuantConfig, quantize_model
            from fourbit.nn.lora import LoRASpec, inject_lora
            from fourbit.train.prepare import prepare_model_for_training

            model = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.bfloat16).cuda()
            quantize_model(
                model, QuantConfig(quant_type="nf4", blocksize=64, double_quant=True, compute_dtype="bf16")
            )
            _fresh_memory()
            prepare_model_for_training(model, gradient_checkpointing=True)
            inject_lora(model, LoRASpec(r=64, alpha=16, dropout=0.05))
            backend = dispatch.backend_for(torch.empty(0, device="cuda")).__name__.rsplit(".", 1)[-1]
            results.append({"impl": f"fourbit ({backend} kernels)", **_train_loop(model, batch, seq, steps)})
            del model
        except Exception as err:  # noqa: BLE001 - report and go on to the peer
            results.append({"impl": "fourbit", "error": f"{type(err).__name__}: {err}"})

        _fresh_memory()
        try:
            import peft

            bnb_config = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = transformers.LlamaForCausalLM.from_pretrained(
                tmp, quantization_config=bnb_config, torch_dtype=torch.bfloat16, device_map={"": 0}
            )
            _fresh_memory()
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model = peft.get_peft_model(
                model,
                peft.LoraConfig(
                    r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
                ),
            )
            results.append({"impl": "transformers+bnb+peft", **_train_loop(model, batch, seq, steps)})
            del model
        except ImportError as err:
            results.append({"impl": "transformers+bnb+peft", "error": f"skipped: {err}"})
        except Exception as err:  # noqa: BLE001
            results.append({"impl": "transformers+bnb+peft", "error": f"{type(err).__name__}: {err}"})
        _fresh_memory()
    return results


# ------------------------------------------------------------------------------------------- output
def _print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    header = [c[0] for c in columns]
    cells = [
        [
            ("-" if r.get(key) is None else format(r[key], fmt)) if fmt else str(r.get(key, "-"))
            for _, key, fmt in columns
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def _add_ratios(rows: list[dict], key: str, group: Sequence[str], baseline: str, name: str) -> None:
    """rows[name] = baseline time / row time, for rows in the same group (>1: faster than the baseline)."""
    for r in rows:
        base = next((b for b in rows if b["impl"] == baseline and all(b[g] == r[g] for g in group)), None)
        r[name] = base[key] / r[key] if base and key in base and key in r else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per kernel (median)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["check", "dequant", "gemv", "train"])
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq", type=int, default=512)
    parser.add_argument("--train-layers", type=int, default=22, help="22 layers: ~1.1B parameters")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}). Run it on a GPU host: python benchmarks/bench_gpu.py",
            file=sys.stderr,
        )
        return 2
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        print("bench_gpu.py needs triton (pip install triton)", file=sys.stderr)
        return 2
    peers = _bnb()
    out["bitsandbytes"] = peers[0].__version__ if peers else None
    out["copy_gbs"] = copy_bandwidth(min(args.repeats, 20))
    if "check" not in args.skip:
        out["check"] = check()
    if "dequant" not in args.skip:
        out["dequant"] = bench_dequant(args.repeats, out["copy_gbs"])
        _add_ratios(out["dequant"], "us", [], "bitsandbytes", "speedup_vs_bnb")
    if "gemv" not in args.skip:
        out["gemv"] = bench_gemv(args.repeats)
        _add_ratios(out["gemv"], "us", ["shape", "batch"], "bitsandbytes", "speedup_vs_bnb")
        _add_ratios(out["gemv"], "us", ["shape", "batch"], "bf16 torch.matmul", "speedup_vs_bf16")
    if "train" not in args.skip:
        out["train"] = bench_train(args.train_steps, args.train_batch, args.train_seq, args.train_layers)
        _add_ratios(out["train"], "step_s", [], "transformers+bnb+peft", "speedup_vs_peft")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{out['device']}  torch {out['torch']}  triton {out['triton']}  bitsandbytes {out['bitsandbytes']}"
    )
    print(f"device copy bandwidth: {out['copy_gbs']:.0f} GB/s (read + write)")
    if "check" in out:
        _print_table(
            "GPU kernels vs CPU reference (bytes)",
            out["check"],
            [("check", "check", ""), ("equal", "equal", "")],
        )
    if "dequant" in out:
        _print_table(
            f"dequantize {DEQUANT_SHAPE[0]}x{DEQUANT_SHAPE[1]} NF4+DQ -> bf16 (median of {args.repeats})",
            out["dequant"],
            [
                ("impl", "impl", ""),
                ("device us", "us", ".1f"),
                ("wall us", "wall_us", ".1f"),
                ("GB/s", "gbs", ".0f"),
                ("of copy BW", "of_copy_bw", ".2f"),
                ("vs bnb", "speedup_vs_bnb", ".2f"),
            ],
        )
    if "gemv" in out:
        _print_table(
            "4-bit decode matmul, NF4+DQ block 64, bf16 activations",
            out["gemv"],
            [
                ("W out x in", "shape", ""),
                ("batch", "batch", ""),
                ("impl", "impl", ""),
                ("device us", "us", ".1f"),
                ("wall us", "wall_us", ".1f"),
                ("weight GB/s", "weight_gbs", ".0f"),
                ("vs bnb", "speedup_vs_bnb", ".2f"),
                ("vs bf16", "speedup_vs_bf16", ".2f"),
                ("rel err", "rel_err_vs_bf16", ".1e"),
            ],
        )
    if "train" in out:
        _print_table(
            f"QLoRA step, llama {args.train_layers} layers, batch {args.train_batch}x{args.train_seq}",
            out["train"],
            [
                ("impl", "impl", ""),
                ("tokens/s", "tokens_s", ".0f"),
                ("step s", "step_s", ".3f"),
                ("peak GiB", "peak_gib", ".2f"),
                ("trainable M", "trainable_m", ".1f"),
                ("vs peft", "speedup_vs_peft", ".2f"),
                ("error", "error", ""),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
