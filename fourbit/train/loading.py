"""Loading the model to fine-tune: 4-bit (QLoRA) or not, causal LM or sequence classifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fourbit._errors import FieldError

from .config import TrainConfig

__all__ = ["load_for_training", "quant_config"]


def quant_config(config: TrainConfig, skip: Sequence[str] = ("lm_head",)):
    """The ``fourbit.models.QuantConfig`` for ``config`` (None for ``quant="none"``)."""
    from fourbit.models import QuantConfig

    if config.quant == "none":
        return None
    return QuantConfig(quant_type=config.quant, double_quant=config.double_quant,
                       compute_dtype=config.compute_dtype, skip_modules=tuple(skip))


def _classifier_from_causal(causal: nn.Module, num_labels: int) -> nn.Module:
    """A ``...ForSequenceClassification`` sharing the causal LM's decoder (new, seeded ``score`` head)."""
    from transformers import AutoModelForSequenceClassification

    cfg = causal.config
    cfg.num_labels = num_labels
    clf = AutoModelForSequenceClassification.from_config(cfg, dtype=causal.get_input_embeddings().weight.dtype)
    setattr(clf, clf.base_model_prefix, causal.get_decoder())
    return clf.eval()


def load_for_training(config: TrainConfig, *, label_names: Sequence[str] = ()) -> tuple[nn.Module, Any]:
    """Load ``config.model`` (None: the bundled SmolLM2) and its tokenizer, quantized per ``config.quant``.

    For ``task="classify"`` the causal LM's decoder is reused under a sequence-classification head with
    ``len(label_names)`` classes (the head is seeded with ``config.seed`` and stays in full precision).

    Raises:
        FieldError: a model without a tokenizer (``model``), or classification with fewer than two labels
            (``label_column``).
    """
    from fourbit.models import load_model, quantize_model

    from .trainer import seed_everything

    seed_everything(config.seed)
    if config.task == "classify":
        if len(label_names) < 2:
            raise FieldError("label_column", f"`task` classify needs at least two distinct labels in column "
                                             f"{config.label_column!r}; found {list(label_names)}")
        causal, tokenizer = load_model(config.model, quant=None, torch_dtype=torch.float32)
        model = _classifier_from_causal(causal, len(label_names))
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
        q = quant_config(config, skip=("lm_head", "score"))
        if q is not None:
            quantize_model(model, q)
    elif config.init_lora_weights == "loftq":
        model, tokenizer = load_loftq_model(config)
    else:
        model, tokenizer = load_model(config.model, quant=quant_config(config), torch_dtype=torch.float32)
    if tokenizer is None:
        raise FieldError("model", f"{config.model} comes without a tokenizer; add one to the folder")
    rows = model.get_input_embeddings().num_embeddings
    if (tokenizer.vocab_size or 0) > rows:
        raise FieldError("model", f"{config.model}: its tokenizer has {tokenizer.vocab_size:,} tokens but the "
                                  f"model embeds only {rows:,}: the tokenizer files belong to another model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _holds_quantized_weights(model: nn.Module) -> bool:
    """Whether ``model`` was loaded with quantized weights (a 4-bit checkpoint): 4-bit layers, or a quantization
    config other than GGUF's. transformers' GGUF loader dequantizes every tensor to float and leaves a
    ``GgufConfig`` behind, so a GGUF file (the bundled model) is a float model here."""
    from fourbit.nn.linear4bit import Linear4bit

    if any(isinstance(m, Linear4bit) for m in model.modules()):
        return True
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) != "gguf"


def load_loftq_model(config: TrainConfig, *, with_adapter: bool = True) -> tuple[nn.Module, Any]:
    """The float model quantized with LoftQ (:func:`fourbit.nn.loftq.inject_loftq`): the targets' 4-bit base and
    LoRA layers computed together, then the rest of the model quantized as ``config.quant`` says. Deterministic
    for the same checkpoint and settings, so ``fourbit merge`` rebuilds the same base from the run's config
    (``with_adapter=False`` then drops the adapter the init made; the trained one is loaded instead).

    Raises:
        FieldError: a model that is already 4-bit (``init_lora_weights``: LoftQ needs the float weights).
    """
    from fourbit.models import load_model, quantize_model
    from fourbit.nn.linear4bit import resolve_compute_dtype
    from fourbit.nn.loftq import inject_loftq
    from fourbit.nn.lora import unload_lora

    from .trainer import lora_spec_of

    model, tokenizer = load_model(config.model, quant=None, torch_dtype=torch.float32)
    if _holds_quantized_weights(model):
        raise FieldError("init_lora_weights", f"loftq needs the float weights and {config.model} is a 4-bit "
                                              "checkpoint: start from the float model")
    quant = quant_config(config)
    inject_loftq(model, lora_spec_of(config), num_iter=config.loftq_iter, quant_type=quant.quant_type,
                 blocksize=quant.blocksize, double_quant=quant.double_quant,
                 compute_dtype=resolve_compute_dtype(quant.compute_dtype))
    quantize_model(model, quant)
    if not with_adapter:
        unload_lora(model)
    return model, tokenizer
