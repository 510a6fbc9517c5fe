"""Write ``date_pairs.jsonl`` beside this script: 200 preference pairs made from fourbit's ``dates`` task.

Each pair asks for a date written in words in ISO 8601 (the prompt of :func:`fourbit.train.tasks.date_examples`);
the chosen reply is the right ISO date, the rejected one a mistake a small model makes: day and month swapped,
the US format, a chatty sentence around the answer, or the wrong year. Deterministic (seed 0): run it again and
the file is the same byte for byte (a test checks it).

    python examples/preference/make_pairs.py
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

from fourbit.train.tasks import date_examples

HERE = Path(__file__).resolve().parent
N_PAIRS = 200


def wrong_answer(iso: str, rng: random.Random) -> str:
    """A wrong reply for the date ``iso`` (YYYY-MM-DD), one of four kinds of mistake."""
    date = dt.date.fromisoformat(iso)
    kinds = ["us", "chatty", "year"] + (["swapped"] if date.day <= 12 and date.day != date.month else [])
    kind = rng.choice(kinds)
    if kind == "swapped":
        return f"{date.year:04d}-{date.day:02d}-{date.month:02d}"
    if kind == "us":
        return f"{date.month:02d}/{date.day:02d}/{date.year:04d}"
    if kind == "chatty":
        return f"Sure! The date in ISO format is {iso}."
    return f"{date.year + rng.choice([-1, 1]):04d}-{date.month:02d}-{date.day:02d}"


def make_pairs(n: int = N_PAIRS, seed: int = 0) -> list[dict[str, str]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected"}``, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [{"prompt": e.prompt, "chosen": e.answer, "rejected": wrong_answer(e.answer, rng)}
            for e in date_examples(n, seed=seed)]


def main() -> Path:
    path = HERE / "date_pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(main())
