"""The dispatcher's table of kernels: each backend runs its own, the reference runs only where
``dispatch.REFERENCE_FALLBACKS`` says so, and any other missing kernel is an error naming backend and kernel."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest
import torch

from fourbit.kernels import dispatch, reference


def _backends() -> dict[str, types.ModuleType]:
    """The backend modules (Triton's module imports without Triton: it imports Triton on first use)."""
    names = ("reference", "cpu", "triton_kernels")
    return {name: importlib.import_module(f"fourbit.kernels.{name}") for name in names}


def test_the_reference_has_every_kernel_with_the_signature_the_docstring_gives() -> None:
    assert len(dispatch.KERNELS) == len(set(dispatch.KERNELS)) == 11
    for name in dispatch.KERNELS:
        assert name in reference.__all__ and callable(getattr(reference, name))
        assert f"    {name}(" in dispatch.__doc__ or f";  {name}(" in dispatch.__doc__, name
    assert set(reference.__all__) <= {*dispatch.KERNELS, "can_fuse", "linear_4bit", "sorted_bounds"}


@pytest.mark.parametrize("backend_name", ["cpu", "triton_kernels"])
def test_every_kernel_is_the_backends_own_or_a_declared_fallback_never_both(backend_name: str) -> None:
    backend = _backends()[backend_name]
    own = set(backend.__all__) & set(dispatch.KERNELS)
    fallbacks = dispatch.REFERENCE_FALLBACKS[backend_name]
    assert own | fallbacks == set(dispatch.KERNELS) and not own & fallbacks
    for name in own:
        fn = dispatch.kernel(backend, name)
        assert fn is getattr(backend, name) and fn is not getattr(reference, name)
        # the reference's parameters, in its order
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(getattr(reference, name)).parameters)
    for name in fallbacks:
        assert not hasattr(backend, name)
        assert dispatch.kernel(backend, name) is getattr(reference, name)


def test_the_reference_backend_resolves_to_itself() -> None:
    for name in dispatch.KERNELS:
        assert dispatch.kernel(reference, name) is getattr(reference, name)


def test_a_backend_that_lacks_a_kernel_says_so(monkeypatch) -> None:
    partial = types.ModuleType("fourbit.kernels.partial")
    partial.__all__ = ["swiglu", "can_fuse"]
    partial.swiglu = lambda gate, up: gate * 0
    partial.can_fuse = lambda dtype, blocksize, in_features: False
    assert dispatch.kernel(partial, "swiglu") is partial.swiglu
    with pytest.raises(NotImplementedError, match="the partial kernels have no rms_norm"):
        dispatch.kernel(partial, "rms_norm")
    # through the public functions: never the reference in its place
    monkeypatch.setattr(dispatch, "backend_for", lambda t: partial)
    x = torch.randn(3, 8)
    assert torch.equal(dispatch.swiglu(x, x), torch.zeros(3, 8))
    with pytest.raises(NotImplementedError, match="the partial kernels have no rms_norm_backward"):
        dispatch.rms_norm_backward(x, torch.ones(8), x, torch.ones(3))
    with pytest.raises(NotImplementedError, match="the partial kernels have no quantize_8bit_blocks"):
        dispatch.quantize_8bit_blocks(x.reshape(-1), torch.linspace(-1, 1, 256), 64)
    with pytest.raises(NotImplementedError, match="the partial kernels have no dequantize_4bit_blocks"):
        dispatch.linear_4bit(x, torch.zeros(4, dtype=torch.uint8), None, torch.zeros(16), 8, 1, 8)


def test_fallbacks_run_the_reference_on_the_backends_tensors(monkeypatch) -> None:
    # The 8-bit block quantization has no compiled version: on CPU tensors the reference runs, by declaration.
    cpu = _backends()["cpu"]
    monkeypatch.setattr(dispatch, "backend_for", lambda t: cpu)
    x = torch.randn(300)
    code = torch.linspace(-1, 1, 256)
    got = dispatch.quantize_8bit_blocks(x, code, 64)
    want = reference.quantize_8bit_blocks(x, code, 64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
