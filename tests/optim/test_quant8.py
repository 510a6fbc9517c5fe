"""Blockwise 8-bit state quantization: exact nearest-code search, bitsandbytes-compatible layout."""

from __future__ import annotations

import pytest
import torch

from fourbit.optim.quant8 import (
    dequantize_blockwise_8bit,
    nearest_code,
    num_blocks,
    quantize_blockwise_8bit,
    state_codebook,
)


def _probe_values(signed: bool) -> torch.Tensor:
    """Random values over many magnitudes plus every code, midpoint and their float neighbours."""
    g = torch.Generator().manual_seed(0)
    cb = state_codebook(signed)
    x = torch.rand(200_000, generator=g) * (2 if signed else 1) - (1 if signed else 0)
    scales = torch.cat([x, x * 1e-2, x * 1e-4, x * 1e-6, x * 1e-9, x * 1e-38])
    edges = torch.cat([
        cb.code,
        cb.midpoints,
        torch.nextafter(cb.midpoints, torch.full_like(cb.midpoints, 2.0)),
        torch.nextafter(cb.midpoints, torch.full_like(cb.midpoints, -2.0)),
        torch.tensor([0.0, -0.0, 1.0, torch.finfo(torch.float32).tiny, 1e-45]),
    ])
    if signed:
        edges = torch.cat([edges, torch.tensor([-1.0])])
    vals = torch.cat([scales, edges])
    return vals.clamp(-1.0, 1.0) if signed else vals.clamp(0.0, 1.0)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_equals_bucketize(signed: bool) -> None:
    # Exact: the lookup-table search must reproduce a binary search over the midpoints bit for bit,
    # including values exactly on and one ulp either side of every midpoint.
    cb = state_codebook(signed)
    x = _probe_values(signed)
    assert torch.equal(nearest_code(x, cb).long(), torch.bucketize(x, cb.midpoints))


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_nearest_in_float64(signed: bool) -> None:
    # Independent brute-force reference: argmin |x - code| in float64. The search uses float32 midpoints,
    # which are within half an ulp (2^-24 relative) of the true ones, so values whose two nearest codes are
    # equally far up to 2.5e-7 * |x| (near-ties) may go either way and are left out.
    cb = state_codebook(signed)
    x = _probe_values(signed)[::41]
    d = (x.double().unsqueeze(1) - cb.code.double().unsqueeze(0)).abs()
    best = d.argmin(dim=1)
    two = d.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 2.5e-7 * x.double().abs()
    assert clear.float().mean() > 0.99
    got = nearest_code(x, cb).long()
    assert torch.equal(cb.code[got][clear], cb.code[best][clear])


@pytest.mark.parametrize("n", [1, 255, 256, 257, 4096, 10_000])
def test_quantize_roundtrip_error_is_distance_to_nearest_code(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).exp()
    cb = state_codebook(True)
    codes, absmax = quantize_blockwise_8bit(x, cb, 256)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (num_blocks(n, 256),)
    blocks_max = torch.nn.functional.pad(x.abs(), (0, absmax.numel() * 256 - n)).view(-1, 256).amax(1)
    assert torch.equal(absmax, blocks_max)
    y = dequantize_blockwise_8bit(codes, absmax, cb, 256)
    scale = absmax.repeat_interleave(256)[:n]
    # The round-trip error is exactly the distance to the nearest code (times absmax), up to float32
    # rounding of the product: relative 2^-23 of absmax, allow 4 ulps.
    nearest = (x / scale).unsqueeze(1).sub(cb.code).abs().min(dim=1).values * scale
    assert torch.all((x - y).abs() <= nearest + 4 * 2**-23 * scale)


def test_zero_block_and_unsigned_map() -> None:
    cb2 = state_codebook(False)
    v = torch.zeros(600)
    v[300:] = torch.rand(300)
    codes, absmax = quantize_blockwise_8bit(v, cb2, 256)
    assert absmax[0] == 0 and absmax[1] > 0
    y = dequantize_blockwise_8bit(codes, absmax, cb2, 256)
    assert torch.equal(y[:256], torch.zeros(256))
    assert (y >= 0).all()


@pytest.mark.parametrize("signed", [True, False])
def test_layout_matches_bitsandbytes_dequantize(signed: bool) -> None:
    # Byte compatibility: bitsandbytes' own dequantize_blockwise reads our codes and absmax to the same
    # float32 values (exact), so states can be exchanged with bitsandbytes optimizers.
    bnb = pytest.importorskip("bitsandbytes")
    cb = state_codebook(signed)
    assert torch.equal(cb.code, bnb.functional.create_dynamic_map(signed=signed))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g)
    x = x if signed else x.square()
    codes, absmax = quantize_blockwise_8bit(x, cb, 256)
    ref = torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, cb.code.clone(), 256, torch.float32)
    assert torch.equal(dequantize_blockwise_8bit(codes, absmax, cb, 256), ref)


def test_nearest_code_rejects_non_float32() -> None:
    with pytest.raises(TypeError, match="float32"):
        nearest_code(torch.zeros(4, dtype=torch.float64), state_codebook(True))
