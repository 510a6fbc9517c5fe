"""Reference workflow: preference training (DPO or ORPO) that teaches a model to answer with the bare ISO date.

The pairs are ``examples/preference/date_pairs.jsonl`` (200 pairs made by ``examples/preference/make_pairs.py``
from fourbit's ``dates`` task): the prompt asks for a date written in words in ISO 8601, the chosen reply is
the right ISO date and the rejected one a typical mistake (day and month swapped, the US format, a chatty
sentence, the wrong year). The prompts go through the model's chat template (``format`` chat). DPO's reference
is the same 4-bit model with the adapter switched off; its log-probs are computed once per pair.

    python examples/preference_dates.py                        # DPO on the bundled SmolLM2-135M-Instruct
    python examples/preference_dates.py --task orpo --max-steps 40
    fourbit finetune --task dpo --format chat --data examples/preference/date_pairs.jsonl --out runs/dates-dpo

Prints, for each evaluation on the 20 held-out pairs, the reward margin (chosen minus rejected reward) and the
preference accuracy (pairs whose chosen reply gets the higher reward): the margin rises as the model learns.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "preference" / "date_pairs.jsonl"


def main(argv: list[str] | None = None) -> dict:
    from fourbit.train import TrainConfig, train
    from fourbit.train.loading import load_for_training
    from fourbit.train.metrics import read_metrics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled SmolLM2)")
    parser.add_argument("--task", choices=("dpo", "orpo"), default="dpo")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=5)
    args = parser.parse_args(argv)

    out = args.out or tempfile.mkdtemp(prefix=f"fourbit-dates-{args.task}-")
    config = TrainConfig(model=args.model, task=args.task, data=str(DATA), format="chat", out=out, overwrite=True,
                         max_steps=args.max_steps, eval_steps=args.eval_steps, eval_fraction=0.1, batch_size=4,
                         gradient_accumulation_steps=1, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                         learning_rate=5e-4, beta=0.1, max_length=128, save_steps=0, progress=False)
    model, tokenizer = load_for_training(config)
    result = train(config, model, tokenizer, log=lambda *_: None)
    records = read_metrics(Path(result.out) / "metrics.jsonl")
    evals = [{"step": r["step"], "margin": r["eval_rewards/margins"], "accuracy": r["eval_rewards/accuracies"],
              "loss": r["eval_loss"]} for r in records if "eval_rewards/margins" in r]
    steps = [r for r in records if "rewards/margins" in r]
    report = {"model": args.model or "bundled SmolLM2-135M-Instruct", "task": args.task, "steps": result.steps,
              "first_step_margin": steps[0]["rewards/margins"], "evaluations": evals,
              "tokens_per_s": result.tokens_per_s, "adapter": str(result.out)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
