"""BlockScales: the one description of block scales the backends read; built by quant, decoded in kernels."""

import ast
from pathlib import Path

import pytest
import torch

import fourbit
from fourbit.kernels.scales import BlockScales, dequantize_absmax
from fourbit.quant import dynamic_map


def _nested(n_blocks: int = 600):
    q = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8)
    absmax2 = torch.rand(-(-n_blocks // 256)) + 0.5
    return BlockScales(q, code2=dynamic_map(), absmax2=absmax2, offset=torch.tensor(0.25), blocksize2=256)


def test_nested_scales_decode_as_code_times_absmax2_plus_offset_with_two_roundings():
    scales = _nested()
    q = scales.absmax.long()
    # float32 product, rounded; then float32 sum, rounded: each step exactly as torch computes it in float32.
    product = scales.code2[q] * scales.absmax2.repeat_interleave(256)[: q.numel()]
    expected = product + torch.tensor(0.25)
    got = dequantize_absmax(scales)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    exact = scales.code2.double()[q] * scales.absmax2.double().repeat_interleave(256)[: q.numel()] + 0.25
    assert float((got.double() - exact).abs().max()) <= 2 * 2.0**-24 * float(exact.abs().max())


def test_plain_scales_are_float32_and_decode_to_themselves():
    scales = BlockScales(torch.tensor([[1.0, 2.0]], dtype=torch.float16))
    assert not scales.nested and scales.absmax.dtype == torch.float32 and scales.absmax.shape == (2,)
    assert torch.equal(dequantize_absmax(scales), torch.tensor([1.0, 2.0]))


def test_inputs_already_in_kernel_form_are_not_copied():
    absmax = torch.rand(10)
    assert BlockScales(absmax).absmax is absmax
    nested = _nested()
    again = BlockScales(nested.absmax, nested.code2, nested.absmax2, nested.offset, 256)
    assert again.code2 is nested.code2 and again.absmax2 is nested.absmax2


@pytest.mark.parametrize("make, error, match", [
    (lambda: BlockScales(torch.zeros(4, dtype=torch.uint8)), TypeError, "floating point"),
    (lambda: BlockScales(torch.rand(4), code2=dynamic_map()), ValueError, "together"),
    (lambda: BlockScales(torch.rand(4), dynamic_map(), torch.rand(1), torch.tensor(0.0), 256), TypeError, "uint8"),
    (lambda: BlockScales(torch.zeros(4, dtype=torch.uint8), torch.rand(16), torch.rand(1), torch.tensor(0.0), 256),
     ValueError, "256 entries"),
    (lambda: BlockScales(torch.zeros(4, dtype=torch.uint8), dynamic_map(), torch.rand(1), torch.tensor(0.0), 0),
     ValueError, "blocksize2"),
])
def test_malformed_scales_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_quant_state_builds_scales_once_and_rebuilds_after_a_change():
    packed, state = fourbit.quantize_4bit(torch.randn(40, 64), double_quant=True)
    first = state.block_scales()
    assert first.nested and first is state.block_scales()
    before = fourbit.dequantize_4bit(packed, state)
    state.state2.absmax.mul_(2)  # in place: the cached scales must not be reused
    rebuilt = state.block_scales()
    assert rebuilt is not first
    assert not torch.equal(fourbit.dequantize_4bit(packed, state), before)
    state.offset = state.offset + 1.0  # a new tensor
    assert state.block_scales() is not rebuilt
    _, plain = fourbit.quantize_4bit(torch.randn(40, 64), double_quant=False)
    assert not plain.block_scales().nested and plain.block_scales().absmax is plain.absmax


def test_quant_state_under_inference_mode_still_gives_scales():
    with torch.inference_mode():
        packed, state = fourbit.quantize_4bit(torch.randn(8, 64), double_quant=True)
        assert state.block_scales().nested
        assert torch.isfinite(fourbit.dequantize_4bit(packed, state)).all()


def test_kernels_import_nothing_from_later_layers():
    # Layering: codebooks, kernels, quant, nn, ...: no module of fourbit.kernels imports a later layer, at
    # the top or inside a function (importing fourbit.kernels itself runs fourbit/__init__.py, so the
    # modules' own import statements are read).
    allowed = ("fourbit.kernels", "fourbit._errors", "fourbit._io")
    folder = Path(fourbit.__file__).parent / "kernels"
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [(path.name, n) for n in names
                      if n.startswith("fourbit") and not n.startswith(allowed)]
    assert len(list(folder.glob("*.py"))) >= 7
    assert found == []
