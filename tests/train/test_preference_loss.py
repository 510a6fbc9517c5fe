"""DPO and ORPO losses equal TRL's own trainers (TRL is a test oracle from the dev extra, never a runtime
dependency): on a tiny llama in fp32, the same LoRA weights in fourbit's layers and in peft's (TRL's model),
and the same pairs, the loss and the rewards agree within 1e-5, and fourbit's tokenization of the pairs is
TRL's token for token. The per-token head path (chunked, gradient computed in forward) equals the plain
logits path with gradients.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import make_llama, make_tokenizer

from fourbit.nn.lora import LoRASpec, adapters_disabled, inject_lora, lora_modules
from fourbit.train.config import TrainConfig
from fourbit.train.loss import token_cross_entropy
from fourbit.train.pairs import collate_pairs, encode_pairs
from fourbit.train.preference import dpo_loss, orpo_loss, pair_logps, pair_loss, reference_logps

PAIRS = [
    {"prompt": "Q: 2+3=", "chosen": " 5", "rejected": " 6 or so"},
    {"prompt": "Q: capital of France?", "chosen": " Paris.", "rejected": " Lyon, I think"},
    {"prompt": "Say hi:", "chosen": " hi", "rejected": " bye bye"},
    {"prompt": "ISO date of March 5, 1997:", "chosen": " 1997-03-05", "rejected": " 1997-05-03"},
]
TARGETS = ("q_proj", "v_proj", "up_proj")


def _fourbit_model() -> torch.nn.Module:
    model = make_llama(0).float()
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter, so that the policy differs from the reference
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
    return model


def _copy_adapter(src: torch.nn.Module, peft_model: torch.nn.Module) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in lora_modules(src).items():
            for part in ("lora_A", "lora_B"):
                key = next(k for k in params if k.endswith(f"{name}.{part}.default.weight"))
                params[key].copy_(getattr(layer, part).weight)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _dpo_trainer(tmp_path, tokenizer, **args):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(PAIRS), report_to=[],
                       max_length=64, use_cpu=True, bf16=False, **args)
    trainer = DPOTrainer(model=make_llama(0).float(), args=config, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS)))
    return trainer


@pytest.mark.parametrize(("loss_type", "smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.2)])
def test_dpo_loss_and_rewards_equal_trl(tmp_path, tokenizer, loss_type, smoothing) -> None:
    trainer = _dpo_trainer(tmp_path, tokenizer, beta=0.3, loss_type=[loss_type], label_smoothing=smoothing)
    model = _fourbit_model()
    _copy_adapter(model, trainer.model)
    data = encode_pairs(PAIRS, tokenizer, max_length=64)
    rows = trainer.train_dataset
    for pair, row in zip(data.examples, rows, strict=True):  # TRL's tokenization, token for token
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (row["prompt_ids"], row["chosen_ids"],
                                                                         row["rejected_ids"])
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, batch))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    config = TrainConfig(task="dpo", beta=0.3, loss_type=loss_type, label_smoothing=smoothing,
                         compute_dtype="fp32", loss_chunk_size=5, eval_batch_size=3)
    reference_logps(model, data.examples, config, tokenizer.pad_token_id)
    out = pair_loss(model, collate_pairs([[p] for p in data.examples], tokenizer.pad_token_id), config,
                    n_pairs=len(PAIRS), n_nll_tokens=0)
    n = len(PAIRS)
    torch.testing.assert_close(float(out.loss.detach()), expected, rtol=0, atol=1e-5)
    assert abs(out.chosen_rewards / n - metrics["rewards/chosen"]) < 1e-5
    assert abs(out.rejected_rewards / n - metrics["rewards/rejected"]) < 1e-5
    assert abs((out.chosen_rewards - out.rejected_rewards) / n - metrics["rewards/margins"]) < 1e-5
    assert out.correct / n == metrics["rewards/accuracies"]
    assert 0 < out.correct < n or abs(metrics["rewards/margins"]) > 1e-3  # a non-trivial case


def _orpo_batch(data, pad_id: int) -> dict[str, torch.Tensor]:
    """TRL ORPO's batch layout (prompt + reply ids, mask, labels with the prompt ignored) of fourbit's pairs."""
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [p.sequences()[0 if side == "chosen" else 1] for p in data.examples]
        width = max(len(s) for s in seqs)
        out[f"{side}_input_ids"] = torch.tensor([s.input_ids + [pad_id] * (width - len(s)) for s in seqs])
        out[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        out[f"{side}_labels"] = torch.tensor([s.labels + [-100] * (width - len(s)) for s in seqs])
    return out


def test_orpo_loss_and_rewards_equal_trl(tmp_path, tokenizer) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], max_length=64,
                      use_cpu=True, bf16=False, beta=0.25)
    trainer = ORPOTrainer(model=make_llama(0).float(), args=args, train_dataset=Dataset.from_list(PAIRS),
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS)))
    model = _fourbit_model()
    _copy_adapter(model, trainer.model)
    data = encode_pairs(PAIRS, tokenizer, max_length=64)
    with torch.no_grad():
        expected, metrics = trainer.get_batch_loss_metrics(trainer.model, _orpo_batch(data, tokenizer.pad_token_id))
    batch = collate_pairs([[p] for p in data.examples], tokenizer.pad_token_id)
    config = TrainConfig(task="orpo", beta=0.25, compute_dtype="fp32", loss_chunk_size=0)
    out = pair_loss(model, batch, config, n_pairs=len(PAIRS), n_nll_tokens=batch.n_chosen_tokens)
    n = len(PAIRS)
    torch.testing.assert_close(float(out.loss.detach()), float(expected), rtol=0, atol=1e-5)
    assert abs(out.chosen_rewards / n - float(metrics["rewards/chosen"])) < 1e-5
    assert abs(out.rejected_rewards / n - float(metrics["rewards/rejected"])) < 1e-5
    assert out.correct / n == float(metrics["rewards/accuracies"])


def test_reference_is_the_base_with_the_adapter_off(tokenizer) -> None:
    """Cached reference log-probs equal the base model without LoRA, and differ from the policy's."""
    model = _fourbit_model()
    data = encode_pairs(PAIRS, tokenizer, max_length=64)
    reference_logps(model, data.examples, TrainConfig(task="dpo", compute_dtype="fp32", eval_batch_size=2), 258)
    base = make_llama(0).float()
    batch = collate_pairs([[p] for p in data.examples], 258)
    with torch.no_grad():
        plain, _, _ = pair_logps(base, batch, chunk_size=0)
        policy, _, _ = pair_logps(model, batch, chunk_size=0)
        with adapters_disabled(model):
            off, _, _ = pair_logps(model, batch, chunk_size=0)
    cached = batch.ref.float()
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-4)
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-5)
    assert (policy - plain).abs().max() > 1e-2


def test_chunked_token_cross_entropy_equals_full_logits_with_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(13, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=g)
    weights = torch.randn(13, generator=g)
    chunked = token_cross_entropy(hidden, head, targets, chunk_size=4)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), hidden)
    full = torch.nn.functional.cross_entropy(hidden @ head.weight.T, targets, reduction="none")
    (grad_full,) = torch.autograd.grad((full * weights).sum(), hidden)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-5, atol=1e-6)


def test_loss_functions_against_their_formulas_in_float64() -> None:
    """The closed forms of the papers, in float64: DPO Eq. 7, IPO Eq. 17, ORPO Eq. 4-7 (with p = exp(mean
    log-prob), odds = p / (1 - p))."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.2
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    delta = (pc - rc) - (pr - rr)
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-beta * delta)))
    torch.testing.assert_close(chosen - rejected, beta * delta)
    lc, lr = torch.tensor([3.0, 5.0], dtype=torch.float64), torch.tensor([4.0, 2.0], dtype=torch.float64)
    ipo, _, _ = dpo_loss(pc[:2], pr[:2], rc[:2], rr[:2], beta=beta, loss_type="ipo", chosen_lengths=lc,
                         rejected_lengths=lr)
    torch.testing.assert_close(ipo, ((pc[:2] - rc[:2]) / lc - (pr[:2] - rr[:2]) / lr - 1 / (2 * beta)) ** 2)
    mc, mr = pc / 10, pr / 10
    terms, _, _, log_odds = orpo_loss(mc, mr, beta=beta)
    odds = lambda m: torch.exp(m) / (1 - torch.exp(m))  # noqa: E731
    torch.testing.assert_close(log_odds.double(), torch.log(odds(mc) / odds(mr)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.double(), beta * torch.log(torch.sigmoid(torch.log(odds(mc) / odds(mr)))),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
