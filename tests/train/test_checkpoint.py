"""Optimizer state round-trips exactly through safetensors + JSON; checkpoints are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fourbit.train.checkpoint import flatten_state, unflatten_state


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_state_round_trip(tmp_path: Path, opt_cls) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    kw = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {"betas": (0.8, 0.95)}
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    skeleton, tensors = flatten_state(sd)
    save_file(tensors, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(skeleton))
    back = unflatten_state(json.loads((tmp_path / "o.json").read_text()), load_file(str(tmp_path / "o.safetensors")))
    assert _equal(sd, back)
    fresh = opt_cls(model.parameters(), lr=1e-2, **kw)
    fresh.load_state_dict(back)
    assert _equal(fresh.state_dict(), sd)


def test_nested_and_tagged_values_round_trip() -> None:
    state = {"state": {0: {"q": {"codes": torch.arange(4, dtype=torch.uint8), "absmax": torch.tensor(2.5)},
                           "step": 3}}, "groups": [{"betas": (0.9, 0.99), "x": None, "f": float("inf")}]}
    skeleton, tensors = flatten_state(state)
    assert _equal(unflatten_state(json.loads(json.dumps(skeleton)), tensors), state)
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"bad": object()})
