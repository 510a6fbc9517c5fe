"""The compiled GGUF block quantizers (``csrc/ggml_quants.c``, :func:`fourbit.kernels.cpu.quantize_ggml`) give the
bytes of the numpy reference they replace: ``gguf.quants`` (gguf-py) for Q8_0, fourbit's
``models/export/kquants.py`` for Q4_0, Q5_0, Q4_K and Q6_K, on every vector path and thread count, including the
inputs where float rounding, signed zeros and overflow decide a byte; with and without an importance vector
(llama.cpp's ``quant_weights``), whose effect is also checked on its own (a lower importance-weighted error)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from fourbit.kernels import cpu
from fourbit.models.export.kquants import quantize_q4_0, quantize_q4_k, quantize_q5_0, quantize_q6_k

TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K")
WEIGHTED = ("Q4_0", "Q5_0", "Q4_K", "Q6_K")  # the types an importance vector weighs


@pytest.fixture
def compiled():
    if not cpu.available():
        pytest.skip("no C compiler: the compiled kernels are not built")


def _reference(values: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    with np.errstate(all="ignore"):  # the overflow cases warn in numpy; the bytes are what count
        if type_name == "Q4_K":
            return quantize_q4_k(values)
        if type_name == "Q6_K":
            return quantize_q6_k(values)
        if type_name == "Q4_0":
            return quantize_q4_0(values)
        if type_name == "Q5_0":
            return quantize_q5_0(values)
        return quants.quantize(values, GGMLQuantizationType[type_name])


def _awkward(rows: int, cols: int, seed: int) -> dict[str, np.ndarray]:
    """Named [rows, cols] float32 inputs: Gaussian and heavy-tailed, zeros (both signs), one huge outlier,
    one-signed rows, values near fp16's and float32's subnormals, small integers and halves (rounding ties),
    sparse rows, and (on x86-64) values so large that squares and scales overflow."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((rows, cols)).astype(np.float32)
    signed_zeros = np.where(rng.random((rows, cols)) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    outlier = g.copy()
    outlier[rows // 2, cols // 3] = 3e4
    sparse = g.copy()
    sparse[:, ::2] = 0
    mixed = g.copy()
    mixed[:, : cols // 2] = np.abs(mixed[:, : cols // 2])  # super-blocks whose every min is a zero
    cases = {
        "gaussian": g,
        "heavy": (g * np.exp(2 * rng.standard_normal((rows, cols)))).astype(np.float32),
        "zeros": np.zeros((rows, cols), np.float32),
        "signed_zeros": signed_zeros,
        "outlier": outlier,
        "negative": -np.abs(g),
        "positive": np.abs(g),
        "half_positive": mixed,
        "fp16_subnormal": (g * 6e-8).astype(np.float32),
        "f32_subnormal": (g * 1e-40).astype(np.float32),
        "integers": rng.integers(-8, 8, (rows, cols)).astype(np.float32),
        "halves": (rng.integers(-64, 64, (rows, cols)) / 2).astype(np.float32),
        "sparse": sparse,
        "beyond_fp16": (g * 7e4).astype(np.float32),
    }
    if platform.machine().lower() in ("x86_64", "amd64"):
        # squares that overflow make NaN levels, which numpy casts to INT32_MIN on x86-64 (the kernel copies
        # that) but to 0 on ARM: compared where the reference's bytes are the ones the kernel follows
        cases["squares_overflow"] = (g * 1e30).astype(np.float32)
        cases["float32_max"] = (np.sign(g) * 3.4e38).astype(np.float32)
    return cases


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows", [1, 7])
def test_bytes_equal_the_numpy_reference_on_every_path(type_name, rows, isa):
    cols = 512 if type_name in ("Q4_K", "Q6_K") else 96
    for case, values in _awkward(rows, cols, seed=rows).items():
        got = cpu.quantize_ggml(torch.from_numpy(values), type_name).numpy()
        want = _reference(values, type_name)
        assert got.shape == want.shape and got.dtype == np.uint8, case
        assert np.array_equal(got, want), f"{type_name} {case}: blocks differ"


@pytest.mark.parametrize("type_name, weighted", [(t, False) for t in TYPES] + [(t, True) for t in WEIGHTED])
def test_a_large_matrix_over_two_threads_equals_the_reference(type_name, weighted, two_threads, compiled):
    """Enough rows that the work is split over threads (chunks of whole blocks), odd row count; with an
    importance vector for the types that take one."""
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((129, 2304)) * rng.uniform(1e-3, 10, (129, 1))).astype(np.float32)
    if not weighted:
        got = cpu.quantize_ggml(torch.from_numpy(values), type_name).numpy()
        assert np.array_equal(got, _reference(values, type_name))
        return
    importance = _skewed_importance(2304, seed=5)
    got = cpu.quantize_ggml(torch.from_numpy(values), type_name, torch.from_numpy(importance)).numpy()
    assert np.array_equal(got, _weighted_reference(values, type_name, importance))


def test_the_reference_bytes_decode_back_near_the_input(compiled):
    """An independent check of the reference itself: gguf's dequantizers read the blocks back close to the
    input (the parity tests above would pass for two equally wrong implementations)."""
    from gguf import GGMLQuantizationType, quants

    values = np.random.default_rng(4).standard_normal((8, 512)).astype(np.float32)
    bounds = {"Q8_0": 0.01, "Q4_0": 0.15, "Q5_0": 0.06, "Q4_K": 0.08, "Q6_K": 0.025}
    for type_name, bound in bounds.items():
        decoded = quants.dequantize(cpu.quantize_ggml(torch.from_numpy(values), type_name).numpy(),
                                    GGMLQuantizationType[type_name])
        assert np.linalg.norm(decoded - values) / np.linalg.norm(values) < bound, type_name


def test_rows_that_do_not_split_into_blocks_and_unknown_types_are_refused(compiled):
    with pytest.raises(ValueError, match="Q4_K blocks of 256"):
        cpu.quantize_ggml(torch.zeros(2, 320), "Q4_K")
    with pytest.raises(ValueError, match="no compiled kernel for 'Q5_1'"):
        cpu.quantize_ggml(torch.zeros(2, 256), "Q5_1")
    with pytest.raises(ValueError, match="Q5_0 blocks of 32"):
        cpu.quantize_ggml(torch.zeros(2, 48), "Q5_0")


# --------------------------------------------------------------------------------- importance-weighted blocks


def _skewed_importance(cols: int, seed: int) -> np.ndarray:
    """A per-column importance as activations give it: log-normal over three orders of magnitude, a few columns
    a hundred times the rest, and a run of exact zeros (a column that never saw input)."""
    rng = np.random.default_rng(seed)
    imp = np.exp(1.5 * rng.standard_normal(cols)).astype(np.float32)
    imp[rng.choice(cols, max(1, cols // 50), replace=False)] *= 100
    imp[: cols // 8] = 0
    return imp


def _weighted_reference(values: np.ndarray, type_name: str, importance: np.ndarray) -> np.ndarray:
    fn = {"Q4_0": quantize_q4_0, "Q5_0": quantize_q5_0, "Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}[type_name]
    with np.errstate(all="ignore"):
        return fn(values, importance)


@pytest.mark.parametrize("type_name", WEIGHTED)
@pytest.mark.parametrize("rows", [1, 7])
def test_weighted_bytes_equal_the_numpy_reference_on_every_path(type_name, rows, isa):
    cols = 512 if type_name in ("Q4_K", "Q6_K") else 96
    importance = _skewed_importance(cols, seed=rows)
    for case, values in _awkward(rows, cols, seed=rows).items():
        for imp_case, imp in (("skewed", importance), ("ones", np.ones(cols, np.float32)),
                              ("zeros", np.zeros(cols, np.float32))):
            got = cpu.quantize_ggml(torch.from_numpy(values), type_name, torch.from_numpy(imp)).numpy()
            want = _weighted_reference(values, type_name, imp)
            assert got.shape == want.shape and got.dtype == np.uint8, case
            assert np.array_equal(got, want), f"{type_name} {case} ({imp_case} importance): blocks differ"



def test_q8_0_ignores_the_importance_and_bad_lengths_are_refused(compiled):
    values = np.random.default_rng(6).standard_normal((3, 256)).astype(np.float32)
    imp = torch.from_numpy(_skewed_importance(256, seed=6))
    assert torch.equal(cpu.quantize_ggml(torch.from_numpy(values), "Q8_0", imp),
                       cpu.quantize_ggml(torch.from_numpy(values), "Q8_0"))
    with pytest.raises(ValueError, match="importance vector of 255 values for rows of 256"):
        cpu.quantize_ggml(torch.from_numpy(values), "Q4_K", imp[:255])
    with pytest.raises(ValueError, match="importance vector of 255 values for rows of 256"):
        quantize_q4_k(values, imp[:255].numpy())


@pytest.mark.parametrize("type_name,most", [("Q4_0", 0.8), ("Q5_0", 0.8), ("Q4_K", 0.7), ("Q6_K", 0.8)])
def test_importance_lowers_the_importance_weighted_error(type_name, most):
    """An independent check of what the weights are for: decoded by gguf's dequantizers, the blocks quantized
    with an importance vector have a lower importance-weighted squared error than those without, on Gaussian
    rows and a skewed importance (measured ratios on this seed: Q4_0 0.65, Q5_0 0.64, Q4_K 0.44, Q6_K 0.54),
    and the unweighted error rises (the trade is real, not a better quantizer)."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(7)
    values = rng.standard_normal((64, 512)).astype(np.float32)
    importance = np.exp(2 * rng.standard_normal(512)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    plain = quants.dequantize(_reference(values, type_name), qtype)
    weighted = quants.dequantize(_weighted_reference(values, type_name, importance), qtype)
    plain_err, weighted_err = (((d - values) ** 2 * importance).sum() for d in (plain, weighted))
    assert weighted_err < most * plain_err
    assert ((weighted - values) ** 2).sum() > ((plain - values) ** 2).sum()


@pytest.mark.parametrize("type_name", WEIGHTED)
def test_the_weighted_reference_gives_the_same_bytes_in_small_steps(type_name, monkeypatch):
    """The numpy reference quantizes a few blocks at a time; each block must still get its own columns'
    importances and its own row's mean square when a step starts mid-row."""
    from fourbit.models.export import kquants

    rng = np.random.default_rng(8)
    values = rng.standard_normal((5, 768)).astype(np.float32)
    importance = _skewed_importance(768, seed=8)
    whole = _weighted_reference(values, type_name, importance)
    monkeypatch.setattr(kquants, "_CHUNK_BLOCKS", 1)  # 8 blocks of 32 or 1 super-block a step
    assert np.array_equal(_weighted_reference(values, type_name, importance), whole)
