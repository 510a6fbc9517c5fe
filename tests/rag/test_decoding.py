"""Decoding that cannot ramble (fourbit.rag.decoding): the answer-only n-gram ban against a brute-force
reference and against transformers' whole-sequence ban, the paragraph stop, the finished text, the length rule;
and HFChatLLM on a tiny llama with them."""

from __future__ import annotations

import pytest
import torch

from fourbit.rag.decoding import AnswerNoRepeatNGram, ParagraphEnd, answer_token_limit, finish_answer


def _banned_reference(row: list[int], prompt_length: int, n: int) -> set[int]:
    """Tokens that would complete an n-gram the generated part of ``row`` already holds (plain loops)."""
    gen = row[prompt_length:]
    if len(gen) < n:
        return set()
    prefix = gen[len(gen) - n + 1 :]
    return {gen[i + n - 1] for i in range(len(gen) - n + 1) if gen[i : i + n - 1] == prefix}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_answer_ngram_ban_equals_the_brute_force_reference(n):
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 5, (6, 40), generator=gen)  # a small vocabulary: many repeats
    scores = torch.randn(6, 5, generator=gen)
    for prompt_length in (0, 10, 37):
        out = AnswerNoRepeatNGram(n, prompt_length)(ids, scores.clone())
        for row in range(ids.shape[0]):
            banned = _banned_reference(ids[row].tolist(), prompt_length, n)
            assert {int(t) for t in torch.nonzero(torch.isinf(out[row])).flatten()} == banned
            kept = [t for t in range(5) if t not in banned]
            assert torch.equal(out[row, kept], scores[row, kept])


def test_the_prompt_may_be_quoted_unlike_transformers_whole_sequence_ban():
    from transformers import NoRepeatNGramLogitsProcessor

    prompt = [7, 8, 9, 1, 2, 3]  # the evidence holds 7 8 9
    ids = torch.tensor([prompt + [7, 8]])  # the answer starts quoting it
    scores = torch.zeros(1, 10)
    assert torch.isinf(NoRepeatNGramLogitsProcessor(3)(ids, scores.clone())[0, 9])  # quoting banned
    assert not torch.isinf(AnswerNoRepeatNGram(3, len(prompt))(ids, scores.clone())).any()  # quoting allowed
    ids = torch.tensor([prompt + [7, 8, 9, 4, 7, 8]])  # the answer says 7 8 9 a second time
    assert torch.isinf(AnswerNoRepeatNGram(3, len(prompt))(ids, scores.clone())[0, 9])
    with pytest.raises(ValueError, match="`n`"):
        AnswerNoRepeatNGram(1, 0)


def test_finish_answer():
    rambling = "Paged optimizers use NVIDIA unified memory.\n\nIn the context of the context, it is a"
    assert finish_answer(rambling) == "Paged optimizers use NVIDIA unified memory."
    assert finish_answer("One.\n\nTwo is here.", cut_paragraph=False) == "One.\n\nTwo is here."
    assert finish_answer("It needs 3.5 GB. Then the", drop_partial=False) == "It needs 3.5 GB. Then the"
    assert finish_answer("It needs 3.5 GB. Then the") == "It needs 3.5 GB."
    assert finish_answer("Steps:\n\n1. Load the model.") == "Steps:\n\n1. Load the model."  # no sentence ended
    assert finish_answer("A fragment only") == "A fragment only"  # nothing better to keep
    assert finish_answer('He said "yes."\n \nMore.') == 'He said "yes."'
    # Once the answer says a word 4-gram again, it is over (list numbers are not sentence ends).
    listed = ("1. Paged optimizers use NVIDIA unified memory to avoid spikes. 2. Pager optimizers utilize NVIDIA "
              "Unified Memory to avoid spikes.")
    assert finish_answer(listed) == "1. Paged optimizers use NVIDIA unified memory to avoid spikes."
    assert finish_answer(listed, drop_repeats=False) == listed
    assert finish_answer("The rank of the rank of the rank.") == "The rank of the rank of the rank."  # kept: first


def test_answer_token_limit():
    assert answer_token_limit(200, 256) == 200
    assert answer_token_limit(10, 256) == 32  # the floor
    assert answer_token_limit(400, 256) == 256  # the cap
    assert answer_token_limit(200, 256, ratio=0.5) == 100
    assert answer_token_limit(200, 64, ratio=0) == 64


def test_paragraph_end_stops_each_row_on_its_own():
    from _tiny_models import make_tokenizer

    tok = make_tokenizer()
    rows = ["P: ", "P: It is done.\n\n", "P: Not done\n\nyet", "P: Done!\n  \n"]
    enc = tok(rows, return_tensors="pt", padding=True)
    done = ParagraphEnd(tok, 0)(enc.input_ids, None)
    assert done.tolist() == [False, True, False, True]


@pytest.fixture(scope="module")
def tiny_llm():
    from _tiny_models import make_llama, make_tokenizer

    from fourbit.rag.llm import HFChatLLM

    tok = make_tokenizer()
    return HFChatLLM(make_llama(3).eval(), tok, name="tiny", batch_size=2)


def _repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_generation_never_repeats_its_own_ngram(tiny_llm, monkeypatch):
    model = tiny_llm.model
    outputs = []  # (prompt length, generated ids) of every model.generate call
    real = type(model).generate

    def spy(self, *args, **kwargs):
        ids = real(self, *args, **kwargs)
        outputs.append(ids[:, kwargs["input_ids"].shape[1] :].tolist())
        return ids

    monkeypatch.setattr(type(model), "generate", spy)
    prompts = ["aaaa aaaa aaaa", "comets comets comets and their tails"]
    tiny_llm.no_repeat_ngram_size = 0
    free = tiny_llm.generate(prompts, max_new_tokens=40)
    assert any(_repeated_ngram(row, 3) for row in outputs[-1])  # a random tiny model loops without the ban
    try:
        tiny_llm.no_repeat_ngram_size = 3
        banned = tiny_llm.generate(prompts, max_new_tokens=40)
        rows = outputs[-1]
        single = [tiny_llm.generate([p], max_new_tokens=40)[0] for p in prompts]
        streamed = "".join(tiny_llm.stream(prompts[1], max_new_tokens=40)).strip()
    finally:
        tiny_llm.no_repeat_ngram_size = 4
    assert banned != free and banned == single and streamed == banned[1]  # batched, single, streamed agree
    pad = tiny_llm.tokenizer.pad_token_id
    assert not any(_repeated_ngram([t for t in row if t != pad], 3) for row in rows)


def test_stop_at_paragraph_ends_generation(tiny_llm, monkeypatch):
    """The model's output forced to a sentence, a blank line and more: the stop ends it at the blank line."""
    from transformers import LogitsProcessor

    import fourbit.rag.decoding

    tok = tiny_llm.tokenizer
    script = tok("Ok.\n\nmore words follow here", add_special_tokens=False).input_ids

    class Force(LogitsProcessor):
        def __init__(self, prompt_length):
            self.prompt_length = prompt_length

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - self.prompt_length
            forced = torch.full_like(scores, float("-inf"))
            forced[:, script[step] if step < len(script) else tok.eos_token_id] = 0.0
            return forced

    real = fourbit.rag.decoding.generation_helpers

    def helpers(tokenizer, prompt_length, **kwargs):
        out = real(tokenizer, prompt_length, **kwargs)
        out["logits_processor"].append(Force(prompt_length))
        return out

    monkeypatch.setattr(fourbit.rag.decoding, "generation_helpers", helpers)
    tiny_llm.no_repeat_ngram_size = 0
    try:
        assert tiny_llm.generate(["hello"], max_new_tokens=40) == ["Ok.\n\nmore words follow here"]
        tiny_llm.stop_at_paragraph = True
        assert tiny_llm.generate(["hello", "a longer prompt"], max_new_tokens=40) == ["Ok.", "Ok."]
        assert "".join(tiny_llm.stream("hello", max_new_tokens=40)).strip() == "Ok."
    finally:
        tiny_llm.stop_at_paragraph, tiny_llm.no_repeat_ngram_size = False, 4
