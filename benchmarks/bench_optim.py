"""Optimizer benchmark: state memory, step time and paging of fourbit.optim.AdamW against its peers.

Run: ``python benchmarks/bench_optim.py`` (``--quick`` for a smoke run, ``--json`` for one JSON document).

1. Optimizer-state bytes per trainable parameter for the bundled SmolLM2-135M with LoRA r=64 on all linear
   layers (``fourbit.nn.lora``; if that is unavailable, standalone tensors of the same LoRA shapes):
   fourbit AdamW 32/8-bit, torch.optim.AdamW, bitsandbytes AdamW8bit.
2. Step time of the optimizer alone (random gradients, no model) on 10M, 50M and 100M parameters laid out
   as LoRA-like matrices (r=64 x 576..1536, the shapes of (1)) and as a few large tensors: fourbit 32/8-bit
   vs torch.optim.AdamW (default = single-tensor on CPU, foreach, fused) vs bitsandbytes AdamW8bit on CPU.
   Threads pinned (``--threads``, default 1); median of ``--repeats`` steps after a warm-up step, the peers
   stepped round-robin on shared parameters; wall and process CPU time; ratio to torch's default AdamW
   measured in the same run.
3. A paged run: a small random llama trained with ``AdamW(bits=8, paged=True, device_budget_bytes=B)``
   where B is a third of its state bytes (the unpaged state would not fit), against the unpaged run:
   the loss curves must be equal, bit for bit.

The report starts with the machine: CPU model, its SIMD flags, threads, torch and numba versions (the
8-bit step uses the numba kernel when numba is installed). Measured numbers are not kept here: they go to
benchmarks/RESULTS.md with the command and machine that produced them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from fourbit.optim import AdamW, state_bytes

# LoRA shapes for SmolLM2-135M (hidden 576, intermediate 1536, 9 q-heads/3 kv-heads of 64, 30 layers):
# per layer q,o: 576->576; k,v: 576->192; gate,up: 576->1536; down: 1536->576. A is r x in, B is out x r.
_SMOL_LINEARS = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def _lora_shapes(r: int = 64, layers: int = 30) -> list[tuple[int, int]]:
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in _SMOL_LINEARS:
            shapes += [(r, fan_in), (fan_out, r)]
    return shapes


def _peers(bnb_ok: bool) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    peers: dict[str, Callable] = {
        "torch AdamW (default)": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "fourbit AdamW 32-bit": lambda ps: AdamW(ps, lr=1e-4, bits=32),
        "fourbit AdamW 8-bit": lambda ps: AdamW(ps, lr=1e-4, bits=8),
    }
    if bnb_ok:
        import bitsandbytes as bnb

        peers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
    return peers


def _bnb_available() -> bool:
    try:
        import bitsandbytes as bnb

        p = torch.zeros(4096, requires_grad=True)
        p.grad = torch.ones(4096)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not runnable here"
        return False


from _machine import cpu_info  # noqa: E402  (the SIMD flags that decide the vectorized loops; all flags in --json)


def _numba_version() -> str | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.__version__


# ---- 1. state bytes ---------------------------------------------------------------------------------------


def _smollm2_lora_params() -> tuple[list[torch.Tensor], str]:
    try:
        from fourbit.models import load_model
        from fourbit.nn.lora import LoRASpec, inject_lora

        model, _ = load_model(None, quant=None)
        inject_lora(model, LoRASpec(r=64, alpha=16, dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
        return params, "SmolLM2-135M + fourbit.nn.lora r=64 all-linear"
    except Exception as exc:  # noqa: BLE001 - fall back to the shapes
        print(f"(LoRA injection unavailable: {exc!r}; using LoRA shapes of SmolLM2-135M)", file=sys.stderr)
        return [torch.zeros(s, requires_grad=True) for s in _lora_shapes()], "LoRA r=64 shapes of SmolLM2-135M"


def bench_state_bytes(bnb_ok: bool) -> dict:
    params, source = _smollm2_lora_params()
    n = sum(p.numel() for p in params)
    rows = []
    peers = _peers(bnb_ok)
    for name in ("torch AdamW (default)", "fourbit AdamW 32-bit", "fourbit AdamW 8-bit", "bitsandbytes AdamW8bit"):
        if name not in peers:
            continue
        ps = [p.detach().clone().requires_grad_() for p in params]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = peers[name](ps)
        opt.step()
        b = state_bytes(opt)
        rows.append({"optimizer": name, "state_bytes": b, "bytes_per_param": b / n})
    return {"source": source, "trainable_params": n, "tensors": len(params), "rows": rows}


# ---- 2. step time -------------------------------------------------------------------------------------------


def _layout(kind: str, total: int) -> list[tuple[int, ...]]:
    if kind == "large":
        size = 4 * 1024 * 1024
        shapes = [(size,)] * (total // size)
        rest = total - size * len(shapes)
        return shapes + ([(rest,)] if rest else [])
    lora = _lora_shapes()
    shapes, count, i = [], 0, 0
    while count < total:
        s = lora[i % len(lora)]
        shapes.append(s)
        count += s[0] * s[1]
        i += 1
    return shapes


def bench_step_time(sizes: list[int], layouts: list[str], repeats: int, bnb_ok: bool) -> list[dict]:
    """Median step time per optimizer. The peers share one set of parameters and gradients and are stepped
    round-robin (one step of each per repeat), so a change in machine load hits them all alike."""
    rows = []
    peers = _peers(bnb_ok)
    for layout in layouts:
        for total in sizes:
            g = torch.Generator().manual_seed(0)
            shapes = _layout(layout, total)
            ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            n = sum(t.numel() for t in ps)
            result = {"layout": layout, "params": n, "tensors": len(shapes), "times": {}}
            opts, walls, cpus = {}, {}, {}
            for name, make in peers.items():
                try:
                    opts[name] = make(ps)
                    opts[name].step()  # warm-up: creates the states
                    walls[name], cpus[name] = [], []
                except Exception as exc:  # noqa: BLE001 - report and go on
                    result["times"][name] = {"error": repr(exc)[:80]}
            for _ in range(repeats):
                for name, opt in opts.items():
                    w0, c0 = time.perf_counter(), time.process_time()
                    opt.step()
                    walls[name].append(time.perf_counter() - w0)
                    cpus[name].append(time.process_time() - c0)
            for name in opts:
                result["times"][name] = {"wall_s": statistics.median(walls[name]),
                                         "cpu_s": statistics.median(cpus[name])}
            result["times"] = {k: result["times"][k] for k in peers if k in result["times"]}
            del opts, ps
            rows.append(result)
            print(f"  step time: {layout} {n / 1e6:.0f}M done", file=sys.stderr)
    return rows


# ---- 3. paged run under a budget ----------------------------------------------------------------------


def bench_paged(steps: int) -> dict:
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    data = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    probe = AdamW([p for p in copy.deepcopy(base).parameters()], bits=8)
    for p in probe.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    probe.step()
    total = state_bytes(probe)
    budget = total // 3

    def run(paged: bool) -> tuple[list[float], AdamW, float]:
        model = copy.deepcopy(base)
        kw = dict(device_budget_bytes=budget) if paged else {}
        opt = AdamW(list(model.parameters()), lr=1e-3, bits=8, paged=paged, **kw)
        losses = []
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = model(input_ids=data, labels=data).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, opt, time.perf_counter() - t0

    ref, _, t_ref = run(False)
    got, opt, t_paged = run(True)
    st = opt.pager.stats
    return {
        "params": sum(p.numel() for p in base.parameters()),
        "state_bytes": total,
        "budget_bytes": budget,
        "resident_bytes": st.resident_bytes,
        "paged_bytes": st.paged_bytes,
        "peak_device_bytes": st.peak_device_bytes,
        "copies_in": st.copies_in,
        "steps": steps,
        "loss_first": ref[0],
        "loss_last": ref[-1],
        "identical": ref == got,
        "seconds_unpaged": t_ref,
        "seconds_paged": t_paged,
    }


# ---- output ----------------------------------------------------------------------------------------------


def _print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    env = report["env"]
    cpu = env["cpu"]
    con.print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs); SIMD flags: {' '.join(cpu['simd_flags'])}")
    con.print(
        f"torch {env['torch']}, numba {env['numba'] or 'not installed'}, threads {env['threads']}, "
        f"load average before {env['loadavg']}, repeats {env['repeats']} (medians)"
    )
    sb = report["state_bytes"]
    t = Table(title=f"Optimizer state bytes per trainable parameter: {sb['source']} "
                    f"({sb['trainable_params'] / 1e6:.2f}M params in {sb['tensors']} tensors)")
    for c in ("optimizer", "state MiB", "bytes/param", "vs torch"):
        t.add_column(c, justify="left" if c == "optimizer" else "right")
    ref = sb["rows"][0]["bytes_per_param"]
    for r in sb["rows"]:
        t.add_row(r["optimizer"], f"{r['state_bytes'] / 2**20:.1f}", f"{r['bytes_per_param']:.3f}",
                  f"{r['bytes_per_param'] / ref:.3f}x")
    con.print(t)

    t = Table(title="Optimizer step time (optimizer alone), median wall / CPU seconds, ratio to torch default")
    names = list(report["step_time"][0]["times"])
    t.add_column("layout")
    t.add_column("params", justify="right")
    for name in names:
        t.add_column(name, justify="right")
    for row in report["step_time"]:
        ref = row["times"]["torch AdamW (default)"].get("wall_s")
        cells = []
        for name in names:
            v = row["times"][name]
            if "error" in v:
                cells.append("error")
            else:
                cells.append(f"{v['wall_s']:.3f} / {v['cpu_s']:.3f}\n{v['wall_s'] / ref:.2f}x")
        t.add_row(row["layout"], f"{row['params'] / 1e6:.0f}M ({row['tensors']})", *cells)
    con.print(t)

    pg = report["paged"]
    t = Table(title="Paged 8-bit AdamW under a device budget (tiny random llama)")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k in ("params", "state_bytes", "budget_bytes", "resident_bytes", "paged_bytes", "peak_device_bytes",
              "copies_in", "steps", "loss_first", "loss_last", "identical", "seconds_unpaged", "seconds_paged"):
        v = pg[k]
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    con.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="10e6,50e6,100e6", help="comma-separated parameter counts")
    ap.add_argument("--layouts", default="lora,large")
    ap.add_argument("--paged-steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small sizes and repeats (smoke run)")
    ap.add_argument("--skip-smollm2", action="store_true", help="use LoRA shapes instead of loading the model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.paged_steps = "2e6", 2, 3
    torch.set_num_threads(args.threads)
    bnb_ok = _bnb_available()
    report = {
        "env": {
            "cpu": cpu_info(),
            "torch": torch.__version__,
            "numba": _numba_version(),
            "threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "repeats": args.repeats,
            "bitsandbytes_cpu_8bit": bnb_ok,
        }
    }
    if args.skip_smollm2:
        global _smollm2_lora_params  # noqa: PLW0603 - a flag-controlled substitute
        _smollm2_lora_params = lambda: (  # noqa: E731
            [torch.zeros(s, requires_grad=True) for s in _lora_shapes()], "LoRA r=64 shapes of SmolLM2-135M"
        )
    report["state_bytes"] = bench_state_bytes(bnb_ok)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    report["step_time"] = bench_step_time(sizes, args.layouts.split(","), args.repeats, bnb_ok)
    report["paged"] = bench_paged(args.paged_steps)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_tables(report)
    return 0 if report["paged"]["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
