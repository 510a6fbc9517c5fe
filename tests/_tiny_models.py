"""Tiny models and a byte-level tokenizer, built in the tests (nothing is downloaded).

A module of its own (not conftest) so that test files can ``from _tiny_models import ...``; tests/conftest.py
puts this folder on sys.path and builds its fixtures from the same functions."""

from __future__ import annotations

import torch
import transformers

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: bool = True):
    """A byte-level BPE with no merges: every byte is one token; 3 special tokens on top (vocab 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(seed: int = 0, vocab_size: int = 259, intermediate_size: int = 96, model_class=None,
               **overrides):
    """A 2-layer llama with hidden size 64 (weights 64x96 and friends), random weights, in train mode.

    ``intermediate_size=128`` gives a model whose every ``in_features`` is a multiple of the 4-bit block size
    (64): the only shapes that every CPU path of bitsandbytes 0.50 accepts (its AVX-512/AMX path repacks
    weights per row of blocks), so interop tests through bitsandbytes' modules use it. ``overrides`` replace
    any other LlamaConfig field (``pad_token_id=None``, ``num_hidden_layers=1``, ``tie_word_embeddings``...);
    ``model_class`` builds e.g. ``LlamaForSequenceClassification`` instead of the causal LM."""
    config = dict(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=256)
    config.update(overrides)
    torch.manual_seed(seed)
    return (model_class or transformers.LlamaForCausalLM)(transformers.LlamaConfig(**config))
