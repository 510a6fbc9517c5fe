"""The generated date task (fast) and the demo on the bundled model (slow, opt-in)."""

from __future__ import annotations

import calendar
import datetime as dt
from pathlib import Path

import pytest

from fourbit.train.tasks import DATE_INSTRUCTION, date_examples, exact_match, to_chat_records


def test_date_examples_are_correct_deterministic_and_disjoint() -> None:
    train = date_examples(300, seed=0)
    assert train == date_examples(300, seed=0) and train != date_examples(300, seed=1)
    held = date_examples(50, seed=1, exclude={e.answer for e in train})
    assert not {e.answer for e in train} & {e.answer for e in held}
    assert len({e.answer for e in train}) == 300
    for e in train + held:
        date = dt.date.fromisoformat(e.answer)  # a valid ISO date
        text = e.prompt.removeprefix(DATE_INSTRUCTION)
        assert str(date.year) in text
        assert calendar.month_name[date.month] in text or f"{calendar.month_abbr[date.month]}." in text
    rec = to_chat_records(train[:1])[0]["messages"]
    assert [m["role"] for m in rec] == ["user", "assistant"] and rec[1]["content"] == train[0].answer


def test_exact_match() -> None:
    assert exact_match(" 1997-03-05.\n", "1997-03-05")
    assert not exact_match("The date is 1997-03-05", "1997-03-05")


@pytest.mark.slow
def test_demo_improves_exact_match_on_bundled_model(tmp_path: Path) -> None:
    from fourbit.demo.finetune import run_finetune_demo
    from fourbit.models import load_model

    model, tok = load_model()
    result = run_finetune_demo(model, tok, tmp_path, max_steps=20)
    assert result["accuracy_after"] > result["accuracy_before"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
