"""``fourbit finetune`` / ``fourbit merge`` end to end on a tiny llama folder (QLoRA, NF4 + DQ)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from _cli import assert_clean_error, run_cli
from _tiny_models import make_llama, make_tokenizer
from safetensors.torch import load_file

from fourbit.cli.train import add_parser
from fourbit.train.config import TrainConfig, config_from_args, load_yaml_overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    make_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_flags_yaml_defaults_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora_r: 8\nlora-alpha: 32\ntarget_modules: [q_proj, v_proj]\n")
    args = _parser().parse_args(["finetune", "--data", "d.jsonl", "--out", "o", "--lora-r", "4",
                                 "--learning-rate", "1e-4", "--no-packing"])
    cfg = config_from_args(args, config_file=str(cfg_file))
    assert (cfg.lora_r, cfg.lora_alpha, cfg.learning_rate) == (4, 32.0, 1e-4)  # flag > yaml > default
    assert cfg.target_module_list == ("q_proj", "v_proj") and cfg.max_grad_norm == 0.3
    assert TrainConfig(target_modules=r"model\.layers\.1\..*proj").target_module_list == r"model\.layers\.1\..*proj"
    cfg_file.write_text("lora_rank: 8\n")
    with pytest.raises(ValueError, match="unknown key 'lora_rank'"):
        load_yaml_overrides(cfg_file)
    # (flag or field spelling: the config's messages name the field either way)
    with pytest.raises(ValueError, match=r"learning.rate\W{0,3} must be (a finite number )?> 0"):
        TrainConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match=r"optim\W{0,3} must be one of"):
        TrainConfig(optim="sgd")


def test_every_config_field_is_a_flag() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["finetune"]
    flags = {o for a in sub._actions for o in a.option_strings}
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in flags, name


def test_shipped_configs_load() -> None:
    for path in sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml")):
        TrainConfig(**load_yaml_overrides(path))


def test_finetune_then_merge_qlora(tmp_path: Path, model_dir: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from fourbit.models import QuantConfig, load_model
    from fourbit.nn.adapters import load_adapter

    rows = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["finetune", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", "2",
            "--lora-r", "4", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64",
            "--save-steps", "1", "--eval-steps", "1", "--seed", "0", "--compute-dtype", "fp32",
            "--learning-rate", "1e-2", "--target-modules", "q_proj,v_proj", "--no-progress", "--json"]
    assert _run(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["eval_loss"] > 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["lora_r"] == 4 and saved["quant"] == "nf4" and saved["model"] == str(model_dir)
    assert_clean_error(run_cli(*argv), "--out", "--overwrite", "resume")
    merged = tmp_path / "merged"
    assert _run(["merge", "--adapter", str(out), "--out", str(merged), "--dtype", "fp32", "--json"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # untargeted 4-bit layers dequantized too
    qlora, _ = load_model(model_dir, quant=QuantConfig(compute_dtype="fp32"))
    load_adapter(qlora, out)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        # merged fp32 weight = dequantized NF4 + sBA: the same model up to fp32 rounding
        torch.testing.assert_close(plain(ids).logits, qlora(ids).logits, rtol=1e-4, atol=1e-4)
    assert (merged / "tokenizer.json").is_file() or (merged / "tokenizer_config.json").is_file()
    # the last checkpoint is the same adapter and records the same base: the same merged weights
    from_ckpt = tmp_path / "merged-ckpt"
    assert _run(["merge", "--adapter", str(out / "checkpoints" / "step-000002"), "--out", str(from_ckpt),
                 "--dtype", "fp32"]) == 0
    a, b = load_file(str(merged / "model.safetensors")), load_file(str(from_ckpt / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_merge_bundled_gguf_model(tmp_path: Path) -> None:
    """The bundled GGUF model merges into a plain folder that transformers loads (GGUF quantizer dropped)."""
    from transformers import AutoModelForCausalLM

    from fourbit.models import QuantConfig, load_model
    from fourbit.nn.adapters import save_adapter
    from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules

    model, tok = load_model(quant=QuantConfig(compute_dtype="fp32"))
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.01)
    save_adapter(model, tmp_path / "a")
    assert _run(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # fp32 merge of the dequantized NF4 weight + update: the same function up to fp32 rounding
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("flag", ["--fused-kernels", "--no-fused-kernels"])
def test_fused_kernels_flag_reaches_the_config_and_decides_the_path(tmp_path: Path, model_dir: Path, monkeypatch,
                                                                    flag: str) -> None:
    """``--no-fused-kernels`` is saved in the resolved config and the model runs its plain PyTorch composition:
    the fused SwiGLU of the gated MLPs (:func:`fourbit.nn.fused.swiglu`) is never called; on, it is."""
    from fourbit.nn import fused

    on = flag == "--fused-kernels"
    args = _parser().parse_args(["finetune", "--data", "d.jsonl", "--out", "o", flag])
    assert config_from_args(args).fused_kernels is on and TrainConfig().fused_kernels is True
    calls: list[int] = []
    real = fused.swiglu
    monkeypatch.setattr(fused, "swiglu", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}."}) + "\n" for i in range(8)))
    res = run_cli("finetune", model_dir, "--data", data, "--out", tmp_path / "run", "--max-steps", "1",
                  "--lora-r", "4", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--save-steps", "0",
                  "--eval-steps", "0", "--compute-dtype", "fp32", "--no-progress", "--json", flag)
    assert res.code == 0, res.err
    assert yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["fused_kernels"] is on
    assert bool(calls) is on, len(calls)


def test_ctrl_c_while_the_model_loads_writes_nothing(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    """Before training begins a Ctrl-C stops at once (a model load may take minutes): exit 130, one line,
    no output folder."""
    import signal

    from fourbit.train import loading

    def interrupted_load(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Python's default handler: KeyboardInterrupt here
        raise AssertionError("not reached")

    monkeypatch.setattr(loading, "load_for_training", interrupted_load)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}."}) + "\n" for i in range(8)))
    res = run_cli("finetune", model_dir, "--data", data, "--out", tmp_path / "run", "--no-progress", "--json")
    assert res.code == 130 and "Traceback" not in res.err, res.err
    assert [line for line in res.err.splitlines() if "interrupted" in line] == [
        "fourbit finetune: interrupted before the first step; nothing was written"]
    assert not (tmp_path / "run").exists()
