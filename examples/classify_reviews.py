"""Reference workflow 2: review classification (five star labels) with QLoRA on GPT-2.

The original used a hub review dataset that is not reachable offline; ``examples/data/reviews.csv`` is a
small synthetic one (250 reviews, ``text`` and ``label`` = "1 stars" .. "5 stars"). GPT-2's ``Conv1D``
layers are quantized to NF4 (stored transposed, as bitsandbytes does), LoRA goes on every linear layer and
the new ``score`` head is trained in full and saved with the adapter (peft's ``modules_to_save``), which is
what ``fourbit finetune --task classify`` does. Prints the held-out accuracy before and after.

    python examples/classify_reviews.py path/to/gpt2 --max-steps 60
    python examples/classify_reviews.py          # the bundled SmolLM2 (any causal LM works)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    from fourbit.train import TrainConfig, evaluate, prepare_data, train
    from fourbit.train.loading import load_for_training
    from fourbit.train.records import load_records
    from fourbit.train.trainer import add_lora

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled SmolLM2)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)

    data = HERE / "data" / "reviews.csv"
    config = TrainConfig(model=args.model, data=str(data), out=args.out or tempfile.mkdtemp(prefix="fourbit-rev-"),
                         task="classify", quant="nf4", double_quant=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                         learning_rate=args.learning_rate, max_steps=args.max_steps, batch_size=8,
                         gradient_accumulation_steps=1, max_length=96, eval_fraction=0.2, eval_steps=0,
                         save_steps=0, warmup_steps=2, overwrite=True, progress=False)
    labels = sorted({str(r["label"]) for r in load_records(config.data)})
    model, tokenizer = load_for_training(config, label_names=labels)
    train_ds, eval_ds = prepare_data(config, tokenizer)
    add_lora(model, config)
    before = evaluate(model, eval_ds, config, tokenizer.pad_token_id)
    result = train(config, model, tokenizer, data=(train_ds, eval_ds), log=lambda *_: None)
    report = {"model": args.model or "bundled SmolLM2-135M-Instruct", "labels": labels, "steps": result.steps,
              "eval_examples": result.n_eval, "accuracy_before": before["eval_accuracy"],
              "accuracy_after": result.eval["eval_accuracy"], "eval_loss_before": before["eval_loss"],
              "eval_loss_after": result.eval["eval_loss"], "adapter": str(result.out)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
