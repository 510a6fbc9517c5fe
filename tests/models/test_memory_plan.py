"""The memory planner (fourbit.models.memory_plan, ``fourbit plan``) against measured peaks.

The measured quantity is the growth of the process's peak RSS above its RSS once torch, transformers and
fourbit are imported (``VmHWM`` reset through ``/proc/self/clear_refs``, as benchmarks/bench_load.py does),
compared with the plan's peak minus its ``runtime`` term: the imported runtime is a constant of the machine,
and at test scale it would otherwise outweigh every term the formula is about. The model is sized so that
those terms are a few hundred MiB (a 2-layer llama of hidden 1024 with a 32000-token vocabulary, bf16: 178 MB).

Tolerance: ±15 % of the measured growth (the issue's target at 135M and 8B) plus 48 MiB for what no
parameter count predicts: modules imported lazily by the command itself (safetensors, tokenizers, rich), the
allocator's arenas and the tokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from _cli import run_cli

from fourbit.models import QuantConfig
from fourbit.models.memory_plan import (
    RUNTIME_BYTES,
    FinetuneSettings,
    model_counts,
    plan_memory,
    quantized_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
SLACK = 48 * 2**20

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="measures peak RSS through /proc/self/clear_refs (Linux)")

_CHILD = textwrap.dedent("""
    import json, sys
    import torch, transformers, safetensors, tokenizers, rich  # the runtime: imported before the reset
    import transformers.modeling_utils, transformers.initialization
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    import fourbit.cli, fourbit.models, fourbit.generate
    from fourbit.cli import main

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "base": base, "peak": status("VmHWM")}))
""")


def _measure(*argv: str) -> int:
    """Growth of the peak RSS of ``fourbit ARGV`` above the imported runtime, in a fresh process."""
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin"}
    done = subprocess.run([sys.executable, "-c", _CHILD, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-2000:]
    return result["peak"] - result["base"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from _tiny_models import make_tokenizer

    path = tmp_path_factory.mktemp("plan") / "llama"
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=4096, pad_token_id=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _assert_within(estimate: int, measured: int) -> None:
    grown = estimate - RUNTIME_BYTES
    assert abs(grown - measured) <= 0.15 * measured + SLACK, \
        f"planned growth {grown / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"


def test_counts_and_4bit_bytes_match_a_quantized_model(folder):
    from fourbit.models import fourbit_info, load_model

    model, _ = load_model(folder, quant=QuantConfig(compute_dtype="fp32"))
    fp = fourbit_info(model).footprint
    counts = model_counts(folder)
    assert counts.quantized_params == fp.quantized_params
    assert quantized_bytes(counts.quantized_params, QuantConfig()) == pytest.approx(fp.quantized_bytes, rel=1e-3)
    assert counts.total_params == sum(p.numel() for p in transformers.LlamaForCausalLM(
        transformers.LlamaConfig.from_pretrained(folder)).parameters())


def test_quantize_and_generate_peaks_are_planned(folder, tmp_path):
    plan = plan_memory(model_counts(folder), QuantConfig(), float_bytes=2, prompt_tokens=8, new_tokens=8)
    out = tmp_path / "q4"
    _assert_within(plan.peak("quantize"), _measure("quantize", folder, "--out", out, "--json"))
    _assert_within(plan.peak("generate"),
                   # transformers' generate: the compiled decode step's memory (an int8 head copy, a float32 KV
                   # cache) is not planned yet
                   _measure("generate", out, "hello there", "--max-new-tokens", "8", "--decoder", "hf"))


def test_gradient_checkpointing_and_length_move_the_finetune_plan_as_the_formula_says(folder):
    counts = model_counts(folder)
    base = plan_memory(counts, QuantConfig(), finetune=FinetuneSettings(max_length=256, batch_size=1))
    longer = plan_memory(counts, QuantConfig(), finetune=FinetuneSettings(max_length=512, batch_size=1))
    def checkpointed(policy: str):
        return plan_memory(counts, QuantConfig(), finetune=FinetuneSettings(
            max_length=512, batch_size=1, gradient_checkpointing=True, checkpoint_policy=policy))

    plans = {"base": base, "longer": longer, "full": checkpointed("full"), "keep": checkpointed("keep-matmuls")}
    act = {n: p.terms["finetune"]["activations"] for n, p in plans.items()}
    assert act["longer"] > 2 * act["base"]  # linear in tokens, plus the attention mask quadratic in length
    # full recomputation keeps one layer's set (and its gradients) instead of every layer's: on these 2 layers,
    # 2 sets and the layers' inputs against 3 sets
    assert act["full"] < 0.75 * act["longer"]
    # keeping the LoRA matmul outputs costs more than full recomputation, still less than no checkpointing
    assert act["full"] < act["keep"] < act["longer"]


def test_plan_cli_prints_every_command_and_names_a_bad_model(folder, tmp_path):
    result = run_cli("plan", folder, "--max-length", "256", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert set(doc["peak_bytes"]) == {"quantize", "generate", "finetune", "merge"}
    assert all(v > RUNTIME_BYTES for v in doc["peak_bytes"].values())
    bad = run_cli("plan", tmp_path / "nothing")
    assert bad.code == 1 and "MODEL" in bad.err and "config.json" in bad.err


def _text_data(path: Path, tokens_per_record: int, records: int) -> Path:
    words = " ".join(f"w{i % 97}" for i in range(tokens_per_record))
    path.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(records)))
    return path


@pytest.mark.parametrize("checkpointing,length,batch", [(False, 256, 2), (True, 256, 2), (True, 4096, 1)],
                         ids=["no-checkpointing", "checkpointing", "long-context"])
def test_finetune_and_merge_peaks_are_planned(folder, tmp_path, checkpointing, length, batch):
    """At 4,096 tokens the attention probabilities an eager attention would hold (heads x length^2, 0.5 GiB
    here) would be half the measured growth: the plan counts what SDPA holds, and must still come within 15 %."""
    from fourbit.train.config import TrainConfig
    from fourbit.train.memory_check import finetune_plan

    data = _text_data(tmp_path / "train.jsonl", max(600, length + 100), 8 if length <= 256 else 2)
    flags = ["--max-length", str(length), "--batch-size", str(batch), "--lora-r", "16", "--max-steps", "2",
             "--eval-fraction", "0", "--save-steps", "0", "--compute-dtype", "fp32", "--no-progress",
             "--no-memory-check", "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"]
    config = TrainConfig(model=str(folder), max_length=length, batch_size=batch, lora_r=16, compute_dtype="fp32",
                         gradient_checkpointing=checkpointing)
    plan = finetune_plan(config, new_tokens=8, prompt_tokens=8)
    run = tmp_path / "run"
    _assert_within(plan.peak("finetune"), _measure("finetune", folder, "--data", data, "--out", run, *flags))
    if checkpointing:
        return
    _assert_within(plan.peak("merge"), _measure("merge", "--adapter", run, "--out", tmp_path / "merged"))
