"""Small, exactly scorable fine-tuning tasks generated on the fly (no download), for demos and benchmarks.

``dates``: a date written in words ("the 5th of March, 1997", "March 5, 1997", "Wednesday, 5 March 1997")
-> ISO 8601 "1997-03-05". A small instruct model rarely answers with the bare ISO string zero-shot (it talks,
or gets the month number wrong); after a few minutes of QLoRA it does, so exact match shows the effect.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
from dataclasses import dataclass

from fourbit._errors import FieldError

__all__ = ["DATE_INSTRUCTION", "TaskExample", "date_examples", "exact_match", "to_chat_records"]

DATE_INSTRUCTION = "Write this date in ISO format (YYYY-MM-DD), nothing else: "

_ORDINAL_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                  "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
                  "eighteenth", "nineteenth", "twentieth", "twenty-first", "twenty-second", "twenty-third",
                  "twenty-fourth", "twenty-fifth", "twenty-sixth", "twenty-seventh", "twenty-eighth",
                  "twenty-ninth", "thirtieth", "thirty-first"]


@dataclass(frozen=True)
class TaskExample:
    """A prompt and its one exact answer."""

    prompt: str
    answer: str


def _suffix(day: int) -> str:
    if 10 <= day % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _render(date: dt.date, style: int) -> str:
    month = calendar.month_name[date.month]
    d, y = date.day, date.year
    weekday = calendar.day_name[date.weekday()]
    return [
        f"{month} {d}, {y}",
        f"{d} {month} {y}",
        f"the {d}{_suffix(d)} of {month}, {y}",
        f"{month} {d}{_suffix(d)}, {y}",
        f"{weekday}, {d} {month} {y}",
        f"the {_ORDINAL_WORDS[d - 1]} of {month} {y}",
        f"{calendar.month_abbr[date.month]}. {d}, {y}",
    ][style]


def date_examples(n: int, seed: int = 0, *, exclude: set[str] | frozenset[str] = frozenset()) -> list[TaskExample]:
    """``n`` distinct date-to-ISO examples, deterministic in ``seed``; answers in ``exclude`` are skipped
    (use it to keep a held-out split disjoint from the training split).

    Raises:
        FieldError: if ``n`` is not positive.
    """
    if n <= 0:
        raise FieldError("n", f"must be positive; got {n}")
    rng = random.Random(seed)
    start, span = dt.date(1900, 1, 1).toordinal(), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    seen = set(exclude)
    out: list[TaskExample] = []
    while len(out) < n:
        date = dt.date.fromordinal(start + rng.randrange(span + 1))
        iso = date.isoformat()
        if iso in seen:
            continue
        seen.add(iso)
        out.append(TaskExample(DATE_INSTRUCTION + _render(date, rng.randrange(7)), iso))
    return out


def to_chat_records(examples: list[TaskExample]) -> list[dict]:
    """Chat-format training records (``messages``: user prompt, assistant answer)."""
    return [{"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]}
            for e in examples]


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction, stripped of surrounding whitespace and a trailing period, is the answer."""
    return prediction.strip().rstrip(".").strip() == answer
