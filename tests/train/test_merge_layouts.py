"""Merging keeps every layer in its architecture's own layout, the adapted ones and the others alike.

GPT-2 stores its Conv1D weights [in, out]. A merge dequantizes the 4-bit layers the adapter did not target as
well; turned into ``nn.Linear`` ([out, in]) a square ``c_proj`` would load transposed without a word, so the
merged folder is loaded by transformers and its logits compared with the 4-bit model + adapter it came from."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from _tiny_models import make_tokenizer
from transformers.pytorch_utils import Conv1D

from fourbit.models import QuantConfig, load_model
from fourbit.nn.adapters import save_adapter
from fourbit.nn.lora import LoRASpec, inject_lora, lora_modules
from fourbit.train.merge import merge_adapter


def test_gpt2_merge_keeps_conv1d_layout_for_layers_without_an_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=259, n_positions=128,
                                     bos_token_id=256, eos_token_id=256, pad_token_id=256)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")

    model, _ = load_model(tmp_path / "base", quant=QuantConfig(compute_dtype="fp32"))
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("c_attn",)))
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.05)  # a real update, so the merge has something to add
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(ids).logits

    merge_adapter(tmp_path / "adapter", tmp_path / "merged", model=tmp_path / "base", quant="nf4", dtype="fp32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(isinstance(merged.transformer.h[i].attn.c_proj, Conv1D) for i in range(2))
    with torch.no_grad():
        got = merged(ids).logits
    # The same dequantized weights and the same float32 update, summed into one matrix instead of two matmuls.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
