"""DoRA and LoftQ through `fourbit finetune` and `fourbit merge`: the run trains them, records them, and the
merged model is the trained 4-bit model + adapter (LoftQ's base rebuilt from the run's settings)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from _tiny_models import make_llama, make_tokenizer

from fourbit._errors import FieldError
from fourbit.cli.train import add_parser
from fourbit.nn.adapters import load_adapter
from fourbit.nn.lora import lora_modules
from fourbit.train.config import TrainConfig
from fourbit.train.loading import load_loftq_model


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    make_llama(0).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _data(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("extra", [["--use-dora"], ["--init-lora-weights", "loftq", "--loftq-iter", "2"],
                                   ["--use-dora", "--init-lora-weights", "loftq", "--loftq-iter", "2"]])
def test_finetune_records_and_merge_rebuilds_the_trained_model(tmp_path: Path, model_dir: Path, capsys,
                                                               extra: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    argv = ["finetune", str(model_dir), "--data", str(_data(tmp_path)), "--out", str(out), "--max-steps", "2",
            "--lora-r", "4", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64",
            "--seed", "0", "--compute-dtype", "fp32", "--learning-rate", "1e-2", "--no-progress", "--json", *extra]
    assert _run(argv) == 0
    capsys.readouterr()
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["use_dora"] == ("--use-dora" in extra)
    assert saved["init_lora_weights"] == ("loftq" if "loftq" in extra else "default")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == ("--use-dora" in extra)
    assert _run(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    # the trained model: its 4-bit base (LoftQ's, rebuilt) and the saved adapter
    trained, _ = load_loftq_model(TrainConfig(**{k: saved[k] for k in saved if k in TrainConfig.__dataclass_fields__}),
                                  with_adapter=False) if "loftq" in extra else (None, None)
    if trained is None:
        from fourbit.models import QuantConfig, load_model

        trained, _ = load_model(model_dir, quant=QuantConfig(compute_dtype="fp32"))
    load_adapter(trained, out)
    assert all(m.use_dora == ("--use-dora" in extra) for m in lora_modules(trained).values())
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_loftq_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(FieldError, match="init_lora_weights"):
        TrainConfig(quant="none", init_lora_weights="loftq")
    with pytest.raises(FieldError, match="loftq_iter"):
        TrainConfig(init_lora_weights="loftq", loftq_iter=0)
    with pytest.raises(FieldError, match="init_lora_weights"):
        TrainConfig(init_lora_weights="pissa")


def test_loftq_starts_from_a_gguf_file(tmp_path: Path) -> None:
    """A GGUF file (the bundled model's format) is a float model to LoftQ: transformers' GGUF loader leaves a
    GgufConfig behind but dequantizes every weight. LoftQ's start Q + s·B·A is closer to the file's weights
    than plain NF4 of them, in every layer."""
    from fourbit.models import QuantConfig, load_model
    from fourbit.models.export import export_gguf
    from fourbit.nn.linear4bit import frozen_weight

    gguf = tmp_path / "tiny.gguf"
    tokenizer = _bpe_tokenizer()
    export_gguf(make_llama(0, vocab_size=len(tokenizer)), tokenizer, gguf, gguf_type="f16", modelfile=False)
    float_model, _ = load_model(str(gguf), quant=None, torch_dtype=torch.float32)
    assert float_model.config.quantization_config is not None  # the GgufConfig that used to refuse LoftQ
    plain, _ = load_model(str(gguf), quant=QuantConfig(compute_dtype="fp32"), torch_dtype=torch.float32)
    config = TrainConfig(model=str(gguf), lora_r=4, lora_alpha=8, init_lora_weights="loftq", loftq_iter=2,
                         compute_dtype="fp32")
    model, _ = load_loftq_model(config)
    layers = lora_modules(model)
    assert len(layers) == 7 * float_model.config.num_hidden_layers
    for name, layer in layers.items():
        w = float_model.get_submodule(name).weight.float()
        loftq_error = (w - frozen_weight(layer.base, torch.float32) - layer.delta_weight()).norm()
        nf4_error = (w - frozen_weight(plain.get_submodule(name), torch.float32)).norm()
        assert loftq_error < nf4_error, name


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer (GGUF export writes its merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the date is the seventh of december, two thousand and twenty six. " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
