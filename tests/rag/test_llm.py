"""HFChatLLM on a tiny random llama: batched (left-padded) decoding equals one-by-one; streaming too."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_llm():
    from _tiny_models import make_llama
    from transformers import AutoTokenizer

    from fourbit.rag.embeddings import default_embedding_model_path
    from fourbit.rag.llm import HFChatLLM

    # Any local tokenizer will do; the MiniLM one ships with the embedding package. Give it a chat template.
    tok = AutoTokenizer.from_pretrained(default_embedding_model_path())
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    model = make_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id).eval()
    return HFChatLLM(model, tok, name="tiny", batch_size=3)


def test_batched_generation_equals_one_by_one(tiny_llm):
    prompts = ["hello", "a much longer prompt about comets and their tails", "bread",
               [{"role": "user", "content": "chat form"}]]
    batched = tiny_llm.generate(prompts, max_new_tokens=6)
    single = [tiny_llm.generate([p], max_new_tokens=6)[0] for p in prompts]
    # Greedy decoding; left padding is masked, so the same tokens come out (exact).
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_stream_equals_generate(tiny_llm):
    pieces = list(tiny_llm.stream("comets", max_new_tokens=6))
    assert "".join(pieces).strip() == tiny_llm.generate(["comets"], max_new_tokens=6)[0]


def test_render_uses_chat_template_and_system(tiny_llm):
    tiny_llm.system = "be brief"
    try:
        assert tiny_llm.render("hi") == "<system> be brief <user> hi <assistant>"
    finally:
        tiny_llm.system = None
