"""Peak memory while loading a 4-bit checkpoint: the float weights are never materialised.

Builds a random llama of about 1.1B parameters (TinyLlama's shape: hidden 2048, 22 layers, MLP 5632, vocab
32000) straight into 4 bits -- each linear weight is drawn, quantized and dropped one at a time, the skeleton's
parameters live on the meta device -- saves it with ``save_quantized``, then loads it with ``load_model`` in a
fresh process and reports that process's peak RSS (``VmHWM``, reset after the imports through
``/proc/self/clear_refs``; Linux) above its RSS after imports, against the checkpoint's bytes.
The target (issue 12): peak <= 1.3 x the checkpoint's bytes (which include the non-quantized embeddings, norms
and head). safetensors maps the file, so pages of weights not yet used may still be unread after
``load_model``; the peak after one forward pass (which reads every weight) is reported as well.

    python benchmarks/bench_load.py                  # ~1.1B parameters, ~0.9 GB checkpoint
    python benchmarks/bench_load.py --layers 4       # a quicker, smaller run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch, transformers  # imports first: their memory is not the loader's
from fourbit.models import QuantConfig, load_model

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
model, _ = load_model(sys.argv[1], quant=QuantConfig(compute_dtype="fp32"))
seconds = time.perf_counter() - t0
peak = status("VmHWM")
with torch.no_grad():  # touches every weight: checkpoint pages not read while loading are read now
    model(torch.tensor([[1, 2, 3]]))
print(json.dumps({"rss_after_imports": base, "peak_rss": peak, "rss_after_load": status("VmRSS"),
                  "peak_rss_with_forward": status("VmHWM"), "seconds": seconds}))
"""


def build_checkpoint(folder: Path, layers: int) -> int:
    """Write a random 4-bit llama checkpoint into ``folder``; returns its parameter count."""
    import torch
    import transformers
    from torch import nn

    from fourbit.models import QuantConfig, save_quantized
    from fourbit.models.quantize import quantize_layer
    from fourbit.models.stream import parameters_on_meta as _parameters_on_meta

    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=2048, dtype="bfloat16")
    with _parameters_on_meta():
        model = transformers.LlamaForCausalLM(config)
    qconfig = QuantConfig(compute_dtype="fp32")
    generator = torch.Generator().manual_seed(0)
    params = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            linear = nn.Linear(module.in_features, module.out_features, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                linear.weight.normal_(0, 0.02, generator=generator)
            model.set_submodule(name, quantize_layer(linear, qconfig, torch.float32))
            params += linear.weight.numel()
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # embeddings, norms, head: bf16
            value = torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
            if p.dim() == 1:
                value = torch.ones(p.shape, dtype=torch.bfloat16)
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, nn.Parameter(value, requires_grad=False))
            params += p.numel()
    save_quantized(model, folder)
    return params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: ~1.1B parameters)")
    parser.add_argument("--keep", type=Path, default=None, help="write the checkpoint here and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "llama-4bit"
        t0 = time.perf_counter()
        params = build_checkpoint(folder, args.layers)
        built = time.perf_counter() - t0
        ckpt = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        child = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], capture_output=True, text=True,
                               check=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
    grown = measured["peak_rss"] - measured["rss_after_imports"]
    with_forward = measured["peak_rss_with_forward"] - measured["rss_after_imports"]
    result = {"parameters": params, "checkpoint_bytes": ckpt, "build_seconds": round(built, 1),
              "load_seconds": round(measured["seconds"], 2), "peak_rss_growth_bytes": grown,
              "ratio_to_checkpoint": round(grown / ckpt, 3), "peak_rss_growth_with_forward_bytes": with_forward,
              "ratio_with_forward": round(with_forward / ckpt, 3), "target_ratio": 1.3}
    print("| parameters | checkpoint | peak RSS growth: load_model | ratio | + one forward | ratio | target |\n"
          "|---|---|---|---|---|---|---|\n"
          f"| {params / 1e9:.2f} B | {ckpt / 2**20:,.0f} MiB | {grown / 2**20:,.0f} MiB | {grown / ckpt:.2f}x | "
          f"{with_forward / 2**20:,.0f} MiB | {with_forward / ckpt:.2f}x | <= 1.3x |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
