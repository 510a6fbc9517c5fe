"""Paged optimizer states: identical results, the residency policy under a budget, prefetch and write-back."""

from __future__ import annotations

import pytest
import torch

from fourbit.optim import AdamW, StatePager

# 300_000 elements is above the 8-bit packing threshold (2^18), so both the packed and the one-by-one
# 8-bit paths run; 1000 elements keeps 32-bit states.
SHAPES = [(300, 1000), (1000,), (64, 80), (6000,)]


def _train(bits: int, paged: bool, steps: int = 6, budget: int | None = None):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    opt = AdamW(params, lr=1e-2, bits=bits, paged=paged, device_budget_bytes=budget)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("budget", [None, 620_000])  # all paged; first two resident (8-bit)
def test_paged_equals_unpaged_bit_exact(bits: int, budget: int | None) -> None:
    ref, o_ref = _train(bits, paged=False)
    got, o_got = _train(bits, paged=True, budget=budget)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
        for k, v in o_ref.state[a].items():
            assert torch.equal(v, o_got.state[b][k])
    assert o_got.pager.stats.copies_in > 0


def _nbytes_8bit(n: int) -> int:
    return 2 * n + 2 * 4 * -(-n // 256)


def test_budget_keeps_states_resident_while_they_fit() -> None:
    # 8-bit state sizes in parameter order: 300k -> 609,376 B; 1000 (32-bit) -> 8,000 B; 5120 -> 10,400 B;
    # 6000 -> 12,192 B. A 620,000 B budget holds the first two (617,376 B); the third would overflow it
    # (627,776 B) and is paged; the fourth would too (629,568 B). Greedy in order, never revisited.
    sizes = [_nbytes_8bit(300_000), 8 * 1000, _nbytes_8bit(5120), _nbytes_8bit(6000)]
    params, opt = _train(8, paged=True, steps=2, budget=620_000)
    assert [opt.pager.is_resident(p) for p in params] == [True, True, False, False]
    st = opt.pager.stats
    assert st.resident_bytes == sizes[0] + sizes[1]
    assert st.paged_bytes == sizes[2] + sizes[3]
    # On the device at once: the resident states plus at most two paged working copies.
    assert st.peak_device_bytes <= st.resident_bytes + sizes[2] + sizes[3]
    assert st.copies_in == 2 * 2  # two paged parameters, two steps

    # A budget that skips a large state but admits a later small one.
    params, opt = _train(8, paged=True, steps=1, budget=40_000)
    assert [opt.pager.is_resident(p) for p in params] == [False, True, True, True]
    # No budget: everything is paged.
    params, opt = _train(8, paged=True, steps=1)
    assert not any(opt.pager.is_resident(p) for p in params)
    assert opt.pager.stats.resident_bytes == 0


def test_placement_is_redone_on_load() -> None:
    params, opt = _train(8, paged=True, steps=2, budget=620_000)
    fresh = AdamW(params, lr=1e-2, bits=8, paged=True, device_budget_bytes=620_000)
    fresh.load_state_dict(opt.state_dict())
    assert [fresh.pager.is_resident(p) for p in params] == [True, True, False, False]


def test_stream_prefetches_next_and_writes_back() -> None:
    pager = StatePager(paged=True)
    params = [torch.zeros(4) for _ in range(3)]
    host = []
    for p in params:
        pager.place(p, 8)
        host.append({"m": torch.zeros(4)})
    seen = []
    for i, work in enumerate(pager.stream(list(zip(params, host, strict=True)))):
        # The working copy is not the host tensor, and the next parameter's copy was started already.
        assert work["m"].data_ptr() != host[i]["m"].data_ptr()
        seen.append(pager.stats.copies_in)
        work["m"].add_(i + 1)
    assert seen == [2, 3, 3]
    assert [h["m"][0].item() for h in host] == [1.0, 2.0, 3.0]
    assert pager.stats._live == 0


def test_stream_writes_back_when_consumer_stops_early() -> None:
    pager = StatePager(paged=True)
    params = [torch.zeros(2) for _ in range(3)]
    host = [{"m": torch.zeros(2)} for _ in params]
    for p in params:
        pager.place(p, 8)
    gen = pager.stream(list(zip(params, host, strict=True)))
    work = next(gen)
    work["m"].fill_(7.0)
    gen.close()
    assert host[0]["m"].tolist() == [7.0, 7.0]
    assert host[1]["m"].tolist() == [0.0, 0.0]
    assert pager.stats._live == 0


def test_unpaged_stream_yields_states_themselves() -> None:
    pager = StatePager(paged=False)
    p = torch.zeros(3)
    assert pager.place(p, 24) == p.device
    st = {"m": torch.zeros(3)}
    (work,) = list(pager.stream([(p, st)]))
    assert work is st
    assert pager.stats.copies_in == 0


@pytest.mark.parametrize("budget", [-1, 1.5])
def test_bad_budget(budget) -> None:
    with pytest.raises((ValueError, TypeError), match="device_budget_bytes"):
        StatePager(paged=True, device_budget_bytes=budget)
