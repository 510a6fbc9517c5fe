"""The relative weight error ``fourbit quantize`` reports is computed in chunks; it equals the whole-tensor
formula ||W - dequant(quant(W))|| / ||W|| (float64 reference) on awkward shapes, dtypes and layouts, within a
relative 1e-5 (float32 dot products per chunk; the value is reported to 4 digits)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fourbit.models.config import QuantConfig
from fourbit.models.quantize import _relative_error, quantize_named_layer


@pytest.mark.parametrize("shape", [(3, 64), (7, 100), (130, 257), (64, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_chunked_error_equals_the_whole_tensor_formula(shape, dtype, quant_type):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False).to(dtype)
    config = QuantConfig(quant_type=quant_type)
    errors: list[float] = []
    q = quantize_named_layer("x", layer, config, torch.float32, errors)
    w = layer.weight.detach().double()
    want = float((q.dequantize(torch.float64) - w).norm() / w.norm())
    assert errors[0] == pytest.approx(want, rel=1e-5)
    for chunk in (128, 256, 1 << 22):  # chunk edges inside rows, and a last partial chunk
        assert _relative_error(layer, q, chunk=max(chunk, 128)) == pytest.approx(want, rel=1e-5)


def test_conv1d_layout_error_is_over_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(96, 80)  # weight [in 80, out 96]
    errors: list[float] = []
    q = quantize_named_layer("c", conv, QuantConfig(), torch.float32, errors)
    w = conv.weight.detach().t().double()
    assert errors[0] == pytest.approx(float((q.dequantize(torch.float64) - w).norm() / w.norm()), rel=1e-5)
