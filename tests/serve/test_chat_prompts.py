"""One renderer and one stop list: ``generate``, ``rag`` (HFChatLLM) and ``serve`` (Engine) render a chat the
same way and stop a Phi-style model (turns end with ``<|end|>``, eos is ``<|endoftext|>``) at the same token.

The Phi-style model is built so that its greedy reply is known in advance: its layers add nothing to the
residual stream (o_proj and down_proj are zero), so the logits depend only on the last token, and its output
head maps "\\n" -> "H" -> "i" -> "<|end|>" -> "!" (each a margin of 64 over noise of about 1).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from fourbit.generate import generate
from fourbit.models.chat import render_chat, stop_token_ids
from fourbit.rag.llm import HFChatLLM
from fourbit.serve import Engine, Sampling

PHI_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


def phi_tokenizer(chat_template: bool = True):
    """Byte-level, every byte one token, with Phi-3's special tokens; eos is <|endoftext|>, not <|end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    if chat_template:
        fast.chat_template = PHI_TEMPLATE
    return fast


def phi_model(tok):
    """A tiny llama whose greedy continuation of "\\n" is "Hi" then <|end|> (then "!" if nothing stops it)."""
    from _tiny_models import make_llama

    model = make_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=None, tie_word_embeddings=False).eval()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("Ċ", "H", "i", "<|end|>", "!")}  # Ċ: the byte "\n"
    chain = [ids["Ċ"], ids["H"], ids["i"], ids["<|end|>"], ids["!"]]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        unit = emb / emb.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).sqrt()  # final RMSNorm
        head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.01
        for prev, nxt in zip(chain, chain[1:], strict=False):
            head[nxt] = unit[prev]
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def phi():
    tok = phi_tokenizer()
    return phi_model(tok), tok


def test_the_model_runs_on_past_end_without_the_end_of_turn_stop(phi):
    """The stop matters: stopping on eos alone, the reply goes on past <|end|> (the old ``rag`` list)."""
    model, tok = phi
    ids = tok(render_chat(tok, MESSAGES), return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=[tok.eos_token_id],
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    assert tok.convert_ids_to_tokens(out[0, ids.shape[1]:].tolist()) == ["H", "i", "<|end|>", "!"]


def test_stop_ids_name_end_of_turn_and_generation_config(phi):
    model, tok = phi
    end = tok.convert_tokens_to_ids("<|end|>")
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, end})
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    try:
        assert stop_token_ids(tok, model) == sorted({tok.eos_token_id, end, 7})
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id


def test_phi_style_model_stops_at_end_in_generate_rag_and_serve(phi):
    model, tok = phi
    text, n = generate(model, tok, MESSAGES, max_new_tokens=8, return_num_tokens=True)
    assert (text, n) == ("Hi", 3)  # H, i, <|end|>
    llm = HFChatLLM(model, tok, name="phi")
    assert llm.generate([MESSAGES], max_new_tokens=8) == ["Hi"]
    assert "".join(llm.stream(MESSAGES, max_new_tokens=8)) == "Hi"
    engine = Engine(model, tok, model_name="phi")
    try:
        reply, req = engine.generate(engine.chat_prompt(MESSAGES), Sampling(max_tokens=8, temperature=0.0),
                                     timeout=60)
    finally:
        engine.close()
    assert (reply, req.finish_reason, req.completion_tokens) == ("Hi", "stop", 2)


@pytest.mark.parametrize("templated", [True, False])
def test_rendering_is_identical_in_generate_rag_and_serve(templated):
    from fourbit.generate import build_prompt

    tok = phi_tokenizer(chat_template=templated)
    model = phi_model(tok)
    if templated:  # the independent reference: the template itself
        want = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert want == "<|system|>\nBe brief.<|end|>\n<|user|>\nSay hi.<|end|>\n<|assistant|>\n"
    else:
        want = "Be brief.\n\nSay hi.\n\n"
    assert build_prompt(tok, MESSAGES) == want
    assert build_prompt(tok, MESSAGES[1:], system="Be brief.") == want
    assert HFChatLLM(model, tok).render(MESSAGES) == want
    assert HFChatLLM(model, tok, system="Be brief.").render(MESSAGES[1:]) == want
    engine = Engine(model, tok)
    try:
        assert engine.chat_prompt(MESSAGES) == tok(want, add_special_tokens=False).input_ids
    finally:
        engine.close()


def test_plain_string_without_template_stays_a_text_prompt():
    tok = phi_tokenizer(chat_template=False)
    assert render_chat(tok, "Once upon a time") == "Once upon a time"
    assert render_chat(tok, "Once upon a time", "Tell a story.") == "Tell a story.\n\nOnce upon a time"
    with pytest.raises(ValueError, match="tools"):
        render_chat(tok, MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}])
