"""End-to-end with the bundled 4-bit SmolLM2 (slow: loads the model)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_demo_answers_about_paged_optimizers(tmp_path):
    import torch

    from fourbit.demo.rag import DEMO_QUESTION, run_rag_demo
    from fourbit.models import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model()
    result = run_rag_demo(model, tokenizer, tmp_path, max_new_tokens=48)
    assert result["question"] == DEMO_QUESTION
    assert result["answer"].strip()
    # The retrieval half is deterministic: the top source is the guide's paged-optimizer section.
    assert "Paged optimizers" in result["sources"][0]["text"] or "paged" in result["sources"][0]["text"].lower()
    assert result["embedded"] > 0
    # Grounded: the model was given the guide's sentences about paged optimizers, returned as evidence.
    assert result["evidence"] and "paged" in result["evidence"][0]["text"].lower()
    assert {e["parent_id"] for e in result["evidence"]} <= {s["id"] for s in result["sources"]}
    # Re-running the demo in the same folder re-embeds nothing.
    again = run_rag_demo(model, tokenizer, tmp_path, max_new_tokens=8)
    assert again["embedded"] == 0 and again["sources"][0]["id"] == result["sources"][0]["id"]


@pytest.mark.slow
def test_metadata_from_the_real_model_is_parsed(tmp_path):
    import torch

    from fourbit.demo.rag import guide_path
    from fourbit.rag.chunking import ChunkConfig, split_parents
    from fourbit.rag.embeddings import Embedder
    from fourbit.rag.index import IndexConfig
    from fourbit.rag.llm import load_llm
    from fourbit.rag.loaders import load_document
    from fourbit.rag.metadata import MetadataExtractor

    torch.set_num_threads(2)
    embedder = Embedder()
    parents = split_parents(load_document(guide_path()), ChunkConfig(parent_tokens=256, child_tokens=(128,)),
                            embedder.tokenizer)[:2]
    extractor = MetadataExtractor(load_llm(), batch_size=2)
    out = extractor.extract(parents, IndexConfig(metadata=("questions", "summary")), progress=False)
    assert extractor.generated == 4
    for value in out.values():
        assert all(q.endswith("?") for q in value["questions"])
        assert isinstance(value["summary"], str)


@pytest.mark.slow
def test_the_shipped_answer_adapter_fits_the_bundled_model_and_changes_it():
    import torch

    from fourbit.models import load_model
    from fourbit.nn.adapters import load_adapter
    from fourbit.nn.lora import adapters_disabled, lora_modules
    from fourbit.rag.llm import ANSWER_ADAPTER_DIR, answer_adapter

    assert answer_adapter(None) == ANSWER_ADAPTER_DIR
    torch.set_num_threads(2)
    model, tokenizer = load_model()
    model = load_adapter(model, ANSWER_ADAPTER_DIR).eval()
    assert len(lora_modules(model)) == 30 * 7  # every linear layer of the 30 decoder layers
    ids = tokenizer("Paged optimizers move optimizer states to CPU memory.", return_tensors="pt").input_ids
    with torch.inference_mode():
        tuned = model(ids).logits
        with adapters_disabled(model):
            base = model(ids).logits
    assert not torch.allclose(tuned, base, atol=1e-3)  # the trained update is there (B is no longer zero)
