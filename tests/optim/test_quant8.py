"""Blockwise 8-bit state quantization: exact nearest-code search, the states the optimizer stores, and their
bitsandbytes-compatible layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fourbit.optim import AdamW
from fourbit.optim.quant8 import nearest_code, num_blocks, state_codebook


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


# ---- quantization through the optimizer ------------------------------------------------------------------
# quant8 has no stand-alone quantize/dequantize functions: the optimizer's step is the only producer of codes.
# After one step from zero states the moments are exactly m = g * (1 - beta1) and v = (g * g) * (1 - beta2)
# (float32 products; 0 * beta + x == x), so the stored codes and block maxima can be checked against an
# independent numpy reference: absmax = max |x| per block, code = first midpoint >= x / absmax (binary search).

BETAS = (0.9, 0.999)


def _one_step(grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 8-bit states of a parameter after one AdamW step with gradient ``grad`` (8-bit at any size)."""
    p = torch.zeros(grad.shape, requires_grad=True)
    opt = AdamW([p], lr=1e-3, betas=BETAS, bits=8, min_8bit_size=0)
    p.grad = grad.clone()
    opt.step()
    return opt.state[p]


def _reference_quantize(x: np.ndarray, signed: bool, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    n = x.size
    nb = -(-n // block)
    padded = np.zeros(nb * block, np.float32)
    padded[:n] = x
    blocks = padded.reshape(nb, block)
    absmax = np.abs(blocks).max(axis=1)
    scale = np.where(absmax > 0, absmax, np.float32(1))
    mid = state_codebook(signed).midpoints.numpy()
    codes = np.searchsorted(mid, (blocks / scale[:, None]).reshape(-1), side="left")[:n]
    return codes.astype(np.uint8), absmax


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block: int = 256) -> torch.Tensor:
    n = codes.numel()
    return state_codebook(signed).code[codes.view(-1).long()] * absmax.repeat_interleave(block)[:n]


@pytest.mark.parametrize("n", [1, 255, 256, 257, 4096, 10_000])
def test_optimizer_states_are_nearest_codes_of_block_normalised_moments(n: int) -> None:
    # Exact: codes and block maxima (including a partial last block) equal the numpy reference.
    g = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=g) * torch.rand(n, generator=g).exp()
    st = _one_step(grad)
    gn = grad.numpy()
    m = gn * np.float32(1 - BETAS[0])
    v = (gn * gn) * np.float32(1 - BETAS[1])
    for (key, absmax_key), x, signed in (
        (("exp_avg", "exp_avg_absmax"), m, True),
        (("exp_avg_sq", "exp_avg_sq_absmax"), v, False),
    ):
        codes, absmax = _reference_quantize(x, signed)
        assert st[key].dtype == torch.uint8 and st[key].shape == (n,)
        assert st[absmax_key].shape == (num_blocks(n, 256),)
        assert np.array_equal(st[absmax_key].numpy(), absmax)
        assert np.array_equal(st[key].numpy(), codes)
        # The round-trip error is the distance to the nearest code (times absmax), up to float32 rounding of
        # the product: relative 2^-23 of absmax, allow 4 ulps.
        xt = torch.from_numpy(x)
        scale = torch.from_numpy(absmax).repeat_interleave(256)[:n]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        nearest = (xt / safe).unsqueeze(1).sub(state_codebook(signed).code).abs().min(dim=1).values * scale
        err = (_dequantize(st[key], st[absmax_key], signed) - xt).abs()
        assert torch.all(err <= nearest + 4 * 2**-23 * scale)


def test_zero_block_and_unsigned_map() -> None:
    grad = torch.zeros(600)
    grad[300:] = torch.rand(300) + 0.1
    st = _one_step(grad)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        absmax = st[key + "_absmax"]
        assert absmax[0] == 0 and absmax[1] > 0
        y = _dequantize(st[key], absmax, signed)
        assert torch.equal(y[:256], torch.zeros(256))
    assert (_dequantize(st["exp_avg_sq"], st["exp_avg_sq_absmax"], False) >= 0).all()


@pytest.mark.parametrize("signed", [True, False])
def test_layout_matches_bitsandbytes_dequantize(signed: bool) -> None:
    # Byte compatibility: bitsandbytes' own dequantize_blockwise reads the optimizer's codes and absmax to the
    # same float32 values as code[codes] * absmax (exact), so states can be exchanged with bitsandbytes.
    import bitsandbytes as bnb
    cb = state_codebook(signed)
    assert torch.equal(cb.code, bnb.functional.create_dynamic_map(signed=signed))
    g = torch.Generator().manual_seed(1)
    st = _one_step(torch.randn(5000, generator=g))
    key = "exp_avg" if signed else "exp_avg_sq"
    codes, absmax = st[key], st[key + "_absmax"]
    ref = torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, cb.code.clone(), 256, torch.float32)
    assert torch.equal(_dequantize(codes, absmax, signed), ref)


def test_nearest_code_rejects_non_float32() -> None:
    with pytest.raises(TypeError, match="float32"):
        nearest_code(torch.zeros(4, dtype=torch.float64), state_codebook(True))
