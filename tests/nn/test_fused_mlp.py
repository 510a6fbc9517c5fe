"""fuse_gated_mlps: Llama-style MLPs compute silu(gate) * up in one kernel, with the plain module's results."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_models import make_llama
from torch import nn

from fourbit.nn.fused import fuse_gated_mlps, fused_kernels


def _assert_same_training_step(model: nn.Module, fused: nn.Module) -> None:
    """Logits and the gradients of the trainable parameters of one step agree between the two models."""
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for m in (model, fused):
        out = m(input_ids=ids, labels=ids)
        params = [p for p in m.parameters() if p.requires_grad]
        results.append((out.logits, torch.autograd.grad(out.loss, params)))
    # float32 arithmetic on both sides; the kernels' exp is a polynomial (~1e-7 relative)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_llama_mlps_are_fused_and_give_the_plain_results_forward_and_backward() -> None:
    model = make_llama(num_hidden_layers=2)
    fused = copy.deepcopy(model)
    assert fuse_gated_mlps(fused) == 2
    assert fuse_gated_mlps(fused) == 0  # already fused: nothing changes twice
    _assert_same_training_step(model, fused)


def test_the_fused_forward_is_the_one_that_runs_and_the_switch_turns_it_off() -> None:
    model = make_llama(num_hidden_layers=1)
    fuse_gated_mlps(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, model.config.hidden_size, requires_grad=True)
    assert type(mlp(x).grad_fn.next_functions[0][0]).__name__ == "_SwiGLUBackward"
    with fused_kernels(False):
        assert "SwiGLU" not in type(mlp(x).grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_mlps_with_another_activation_are_left_alone(act: str) -> None:
    model = make_llama(num_hidden_layers=1, hidden_act=act)
    assert fuse_gated_mlps(model) == 0


def test_a_module_with_another_forward_is_left_alone() -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))  # a sum, not a product

    assert fuse_gated_mlps(nn.Sequential(Other())) == 0


def test_rms_norms_are_fused_and_give_the_plain_results_forward_and_backward() -> None:
    from fourbit.nn.fused import fuse_rms_norms

    model = make_llama(num_hidden_layers=2).requires_grad_(False)
    for name, p in model.named_parameters():
        if "proj" in name:
            p.requires_grad_(True)  # gradients through every norm, as with adapters on every layer
    fused = copy.deepcopy(model)
    assert fuse_rms_norms(fused) == 2 * 2 + 1  # two per layer and the final norm
    assert type(fused.model.norm(torch.randn(2, 64, requires_grad=True)).grad_fn).__name__ == "_RMSNormBackward"
    _assert_same_training_step(model, fused)


def test_a_trainable_norm_weight_keeps_the_modules_own_forward() -> None:
    from fourbit.nn.fused import fuse_rms_norms

    model = make_llama(num_hidden_layers=1)
    fuse_rms_norms(model)
    x = torch.randn(2, 64, requires_grad=True)
    assert "RMSNorm" not in type(model.model.norm(x).grad_fn).__name__  # its weight trains: autograd's path
    model.model.norm.weight.requires_grad_(False)
    assert type(model.model.norm(x).grad_fn).__name__ == "_RMSNormBackward"
