"""Codebooks: NF4 built from the paper's construction equals the published table; the others equal bitsandbytes'."""

import pytest
import torch

from fourbit.quant import dynamic_map, fp4_code, get_code, int4_code, nf4_code

# Published NF4 values (QLoRA, Appendix E; also bitsandbytes' hard-coded table).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_equals_published_table_bit_for_bit():
    assert torch.equal(nf4_code(), torch.tensor(PUBLISHED_NF4, dtype=torch.float32))


def test_nf4_structure():
    code = nf4_code()
    assert code.shape == (16,)
    assert torch.all(code[1:] > code[:-1]), "sorted, distinct"
    assert code[7] == 0.0, "exact zero"
    assert code[0] == -1.0 and code[-1] == 1.0
    assert int((code > 0).sum()) == 8 and int((code < 0).sum()) == 7, "asymmetric halves"


def test_nf4_levels_are_normal_quantiles():
    # Each positive level is Q(p)/Q(1-delta) for p evenly spaced in [0.5, 1-delta] (float64 check, 1e-6).
    delta = 0.5 * (1 / 30 + 1 / 32)
    p = torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1]
    expected = torch.special.ndtri(p) / torch.special.ndtri(torch.tensor(1 - delta, dtype=torch.float64))
    got = nf4_code()[8:].double().flip(0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_codebooks_match_bitsandbytes():
    import bitsandbytes.functional as bnbf
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(fp4_code(), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(True), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), bnbf.create_dynamic_map(signed=False))


def test_int4_is_symmetric():
    code = int4_code()
    assert torch.equal(code.sort().values, (-code).sort().values)
    assert set((code * 7).round().tolist()) == set(range(-7, 8))


def test_get_code_rejects_unknown_type():
    with pytest.raises(ValueError, match="quant_type"):
        get_code("nf3")
