"""Reference workflow 1: causal-LM QLoRA fine-tuning on quotes, the way the original QLoRA notebook does it.

The notebook (``bnb-4bit-training.ipynb``) loads GPT-NeoX-20B in NF4 with double quantization, enables
gradient checkpointing, puts LoRA r=8, alpha=32 on ``query_key_value``, and trains 10 steps of paged 8-bit
AdamW on the ``quote`` column of Abirate/english_quotes. Here the same settings are in
``examples/quotes_qlora.yaml`` and the data is ``examples/data/quotes.jsonl`` (40 public-domain quotes with a
``text`` column; the hub dataset is not reachable offline).

    python examples/finetune_quotes.py                       # the bundled SmolLM2 (q_proj,k_proj,v_proj)
    python examples/finetune_quotes.py path/to/gpt-neox-model --out runs/quotes --max-steps 10

A model without ``query_key_value`` (the bundled llama-style SmolLM2) gets LoRA on its attention input
projections ``q_proj,k_proj,v_proj``, which play the same role. Prints the held-out loss before and after.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    from fourbit.nn.lora import trainable_parameters_report
    from fourbit.train import TrainConfig, evaluate, prepare_data, train
    from fourbit.train.config import load_yaml_overrides
    from fourbit.train.loading import load_for_training

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled SmolLM2)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)

    out = args.out or tempfile.mkdtemp(prefix="fourbit-quotes-")
    settings = load_yaml_overrides(HERE / "quotes_qlora.yaml")
    if args.max_steps is not None:
        settings["max_steps"] = args.max_steps
    config = TrainConfig(**settings, model=args.model, data=str(HERE / "data" / "quotes.jsonl"), out=out,
                         overwrite=True, progress=False)
    model, tokenizer = load_for_training(config)
    if not any(name.endswith("query_key_value") for name, _ in model.named_modules()):
        config = config.replace(target_modules="q_proj,k_proj,v_proj")
    train_ds, eval_ds = prepare_data(config, tokenizer)
    pad = tokenizer.pad_token_id
    before = evaluate(model, eval_ds, config, pad)["eval_loss"]
    result = train(config, model, tokenizer, data=(train_ds, eval_ds), log=lambda *_: None)
    report = {"model": args.model or "bundled SmolLM2-135M-Instruct", "target_modules": config.target_modules,
              "steps": result.steps, "eval_loss_before": before, "eval_loss_after": result.eval["eval_loss"],
              "trainable": trainable_parameters_report(model), "adapter": str(result.out)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
