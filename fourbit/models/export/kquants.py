"""llama.cpp's Q4_0, Q5_0, Q4_K and Q6_K block quantization, in numpy, for the GGUF files ``fourbit export``
writes.

The ``gguf`` package reads every llama.cpp type but quantizes only the simple ones (Q4_0, Q5_0, Q8_0, ...),
and those as llama.cpp's reference does, with the block's scale set by its largest value. Q4_0 and Q5_0 here
search that scale for the least squared error instead (:func:`_symmetric_blocks`: the files are the same
format, the error is lower; the held-out perplexity of a 135M model at q4_0 drops from +24 % to +18 %). Q4_K
and Q6_K follow llama.cpp's reference quantizers (``ggml-quants.c``: ``quantize_row_q4_K_ref``, which calls
``make_qkx2_quants``, and ``quantize_row_q6_K_ref``, which calls ``make_qx_quants`` with ``rmse_type`` 1), the
functions llama-quantize uses when it has no importance matrix, vectorized over blocks. Float32 arithmetic
and round-half-to-even (``nearest_int``) as in C; sums are added in another order, so a rare value may land on
the next level. The bytes decode with ``gguf.quants.dequantize`` (the test suite checks that round trip).

Each ``quantize_*`` takes an optional ``importance`` [k], one weight per column (llama.cpp's ``quant_weights``,
from an importance matrix: :mod:`.imatrix`), and then weighs each value's squared error as llama-quantize
does with ``--imatrix`` (``quantize_row_q4_0_impl``, ``..._q5_0_impl``, ``..._q4_K_impl``, ``..._q6_K_impl``):
Q4_0, Q5_0 and Q4_K weigh value j by importance_j·sqrt(σ² + x_j²) (σ² the row's mean square, or twice the
super-block's for Q4_K); Q6_K by importance_j alone; Q4_K also searches a finer grid (``make_qkx3_quants``) and
fits its 6-bit scales and mins by a weighted search (``make_qp_quants``) instead of scaling them by the largest.

Q4_0 and Q5_0 blocks hold 32 values: fp16 ``d`` and 4-bit levels (Q4_0, 18 bytes), or fp16 ``d``, 32 fifth
bits and 4-bit levels (Q5_0, 22 bytes); value = d·(q − 8) or d·(q − 16). Super-blocks hold 256 values
(``QK_K``):

- Q4_K (144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of eight 6-bit scales and eight 6-bit mins, 128 bytes
  of 4-bit levels; value = d·scale_j·q − dmin·min_j for sub-block j of 32.
- Q6_K (210 bytes): 128 bytes low 4 bits, 64 bytes high 2 bits, sixteen int8 scales, fp16 ``d``;
  value = d·scale_j·(q − 32) for sub-block j of 16.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QK_K", "Q4_0_BYTES", "Q4_K_BYTES", "Q5_0_BYTES", "Q6_K_BYTES", "quantize_q4_0", "quantize_q4_k",
           "quantize_q5_0", "quantize_q6_k"]

QK_K = 256
QK4_0 = 32
Q4_0_BYTES = 18
Q5_0_BYTES = 22
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_GROUP_MAX_EPS = np.float32(1e-15)
_CHUNK_BLOCKS = 16384  # super-blocks per vectorized step: bounds the temporaries at ~100 MB


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """C's ``nearest_int``: round half to even (the magic-number trick rounds in the FPU's default mode)."""
    return np.rint(v).astype(np.int32)


def _f16(v: np.ndarray) -> np.ndarray:
    """The value an fp16 field stores, back as float32 (``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``)."""
    return v.astype(np.float16).astype(np.float32)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` over rows of ``x`` [n, 32]: the (scale, min) pair of least weighted squared
    error among ``nstep + 1`` candidate grids, found by least squares per grid.

    Returns:
        (scale [n], the_min [n] (>= 0, subtracted), levels [n, 32] uint8 in 0..nmax)
    """
    f32 = np.float32
    lo = np.minimum(x.min(axis=1), f32(0))
    hi = x.max(axis=1)
    flat = hi == lo
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)
    iscale = f32(nmax) / np.where(flat, f32(1), hi - lo)
    scale = f32(1) / iscale
    levels = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    diff = scale[:, None] * levels + lo[:, None] - x
    best = (weights * diff * diff).sum(axis=1)
    the_min = lo.copy()  # as in C, a better min found by one grid moves the grids after it
    for step in range(nstep + 1):
        span = np.where(flat | (hi == the_min), f32(1), hi - the_min)
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        aux = np.clip(_nearest_int(iscale[:, None] * (x - the_min[:, None])), 0, nmax).astype(np.float32)
        sum_l = (weights * aux).sum(axis=1)
        sum_l2 = (weights * aux * aux).sum(axis=1)
        sum_xl = (weights * aux * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_min = np.where(positive, f32(0), this_min)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        diff = this_scale[:, None] * aux + this_min[:, None] - x
        err = (weights * diff * diff).sum(axis=1)
        better = ok & (err < best) & ~flat
        levels = np.where(better[:, None], aux.astype(np.int32), levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        the_min = np.where(better, this_min, the_min)
    scale = np.where(flat, f32(0), scale)
    levels = np.where(flat[:, None], 0, levels)
    return scale.astype(np.float32), (-the_min).astype(np.float32), levels.astype(np.uint8)


def _pack_q4_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins per block ([n, 8] each) into llama.cpp's 12 bytes."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _q4_k_blocks(x: np.ndarray, qw: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> np.ndarray:
    """``quantize_row_q4_K_ref`` on super-blocks ``x`` [n, 256] -> [n, 144] bytes; with importances ``qw``
    [n, 256], ``quantize_row_q4_K_impl`` (:func:`_q4_k_weighted`)."""
    if qw is not None:
        return _q4_k_weighted(x, qw)
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=1) / np.float32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, levels = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, 1), 0)
    ls = np.clip(_nearest_int(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(_nearest_int(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = (max_scale / np.float32(63)).astype(np.float16)
    dmin = (max_min / np.float32(63)).astype(np.float16)
    return _q4_k_pack(x, levels.reshape(n, 8, 32), ls, lm, d, dmin)


def _q4_k_pack(x: np.ndarray, levels: np.ndarray, ls: np.ndarray, lm: np.ndarray, d: np.ndarray,
               dmin: np.ndarray) -> np.ndarray:
    """Q4_K's bytes from the 6-bit scales ``ls`` and mins ``lm`` [n, 8], fp16 ``d``, ``dmin`` [n] and the
    search's ``levels`` [n, 8, 32]: every value requantized against the scales as stored (6-bit, times fp16 d),
    as the reference does, where the sub-block's scale is not 0."""
    n = x.shape[0]
    dl = d.astype(np.float32)[:, None] * ls.astype(np.float32)
    ml = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    nonzero = dl != 0
    safe = np.where(nonzero, dl, 1)[:, :, None]
    requant = np.clip(_nearest_int((x.reshape(n, 8, 32) + ml[:, :, None]) / safe), 0, 15).astype(np.uint8)
    levels = np.where(nonzero[:, :, None], requant, levels).reshape(n, 4, 2, 32)
    qs = (levels[:, :, 0, :] | (levels[:, :, 1, :] << 4)).reshape(n, 128)
    out = np.empty((n, Q4_K_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_q4_k_scales(ls, lm)
    out[:, 16:] = qs
    return out


def _seq_sum(v: np.ndarray) -> np.ndarray:
    """Sum over the last axis of ``v`` [n, m] left to right in float32, from 0 (a C loop ``s += v[i]``)."""
    total = np.zeros(v.shape[0], dtype=np.float32)
    for i in range(v.shape[1]):
        total = total + v[:, i]
    return total


def _make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(8, nmax, x, L, w)`` over rows of ``x`` [n, 8] (the sub-block scales or mins of a Q4_K
    super-block, >= 0), weighted by ``w`` [n, 8]: an unsigned scale searched over 9 grids (max / (nmax + 0.1 s),
    s in -4..4), then up to 5 passes that move one level at a time while the weighted fit improves. Sums
    left to right, as the C. Levels are clipped to 0..nmax (llama.cpp clips only above; x is never negative
    here but for a degenerate fit).

    Returns:
        (scale [n] float32, levels [n, 8] uint8)
    """
    f32 = np.float32
    peak = np.zeros(x.shape[0], dtype=np.float32)
    for i in range(x.shape[1]):
        peak = np.where(peak > x[:, i], peak, x[:, i])  # MAX(max, x[i])
    zero = peak < _GROUP_MAX_EPS
    peak = np.where(zero, f32(1), peak)

    def levels_of(iscale: np.ndarray) -> np.ndarray:
        return np.clip(_nearest_int(iscale[:, None] * x), 0, nmax).astype(np.float32)

    def mse(iscale: np.ndarray) -> np.ndarray:
        diff = x - (f32(1) / iscale)[:, None] * levels_of(iscale)
        return _seq_sum(w * diff * diff)

    iscale = f32(nmax) / peak
    best = mse(iscale)
    for step in (s for s in range(-4, 5) if s):
        this = (f32(0.1) * f32(step) + f32(nmax)) / peak
        err = mse(this)
        better = err < best
        best = np.where(better, err, best)
        iscale = np.where(better, this, iscale)
    lv = levels_of(iscale)
    sumlx, suml2 = _seq_sum(w * x * lv), _seq_sum(w * lv * lv)
    for _ in range(5):  # a pass that changes nothing leaves the state as it was, so C's early break is moot
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], lv[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.clip(_nearest_int(xi * sl2 / np.where(ok, slx, f32(1))), 0, nmax).astype(np.float32)
            slx, sl2 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            lv[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
    scale = np.where(zero | ~(suml2 > 0), f32(0), sumlx / np.where(suml2 > 0, suml2, f32(1)))  # NaN too: 0
    return scale.astype(np.float32), np.where(zero[:, None], 0, lv).astype(np.uint8)


def _q4_k_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_K_impl`` with importances ``qw`` [n, 256] on super-blocks ``x`` [n, 256]: value j
    weighs qw[j]·sqrt(σ² + x[j]²), σ² = 2·mean(x²) over the super-block; each sub-block's (scale, min) from
    ``make_qkx3_quants`` (a finer grid than the reference's: rmin −0.9, step 0.05, 37 grids), the 6-bit scales
    and mins from :func:`_make_qp_quants` weighted by each sub-block's total weight. σ² sums the eight
    sub-blocks' sums of squares left to right (C: one loop over 256 values; the bytes follow this order)."""
    f32 = np.float32
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    sq = sub * sub
    sigma2 = f32(2) * _seq_sum(sq.sum(axis=1).reshape(n, 8)) / f32(QK_K)
    weights = qw.reshape(n * 8, 32) * np.sqrt(np.repeat(sigma2, 8)[:, None] + sq)
    sw = weights.sum(axis=1).reshape(n, 8)
    scales, mins, levels = _make_qkx2_quants(sub, weights, 15, -0.9, 0.05, 36)
    d, ls = _make_qp_quants(scales.reshape(n, 8), 63, sw)
    dmin, lm = _make_qp_quants(mins.reshape(n, 8), 63, sw)
    return _q4_k_pack(x, levels.reshape(n, 8, 32), ls, lm, d.astype(np.float16), dmin.astype(np.float16))


def _make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` over rows of ``x`` [n, 16]: a symmetric scale
    searched over 19 grids, weighted by x² (``qw`` NULL), or by the importances ``w`` [n, 16].

    Returns:
        (scale [n], levels [n, 16] int32 in 0..2·nmax-1)
    """
    f32 = np.float32
    rows = np.arange(x.shape[0])
    pick = np.abs(x).argmax(axis=1)  # first index of the largest magnitude, as the strict ``>`` in C
    peak = x[rows, pick]
    zero = np.abs(peak) < _GROUP_MAX_EPS
    peak = np.where(zero, f32(1), peak)
    w = x * x if w is None else w

    def grid(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(np.float32)
        return lv, (w * x * lf).sum(axis=1), (w * lf * lf).sum(axis=1)

    levels, sumlx, suml2 = grid(f32(-nmax) / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, slx, sl2 = grid(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = np.where(better[:, None], lv, levels)
        scale = np.where(better, slx / np.where(sl2 > 0, sl2, 1), scale)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, f32(0), scale)
    levels = np.where(zero[:, None], 0, levels + nmax)
    return scale.astype(np.float32), levels


def _symmetric_fit(x: np.ndarray, w: np.ndarray | None, iscale: np.ndarray,
                   nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The levels ``clip(rint(iscale · x), -nmax, nmax - 1)`` of blocks ``x`` [n, 32]: (sum(w·x·l), sum(w·l·l)),
    w = 1 where ``w`` is None (1·v = v exactly, so the C multiplies by ones and gives the same bytes)."""
    lv = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
    if w is None:
        return (x * lv).sum(axis=1), (lv * lv).sum(axis=1)
    return (w * x * lv).sum(axis=1), (w * lv * lv).sum(axis=1)


def _symmetric_blocks(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fp16 scale ``d`` and the levels q (value = d·(q − nmax), q in 0..2·nmax−1) of blocks ``x`` [n, 32] for
    Q4_0 (nmax 8) and Q5_0 (nmax 16), the scale of least squared error searched for.

    gguf's and llama.cpp's reference quantizers (``quantize_row_q4_0_ref``, ``..._q5_0_ref``) map the value of
    largest magnitude to level −nmax (d = max / −nmax) and round the rest. Here the scale is the one
    ggml-quants.c's ``make_qx_quants(32, nmax, x, L, rmse_type=2, NULL)`` finds (the search llama.cpp runs for
    Q4_0 and Q5_0 when it has an importance matrix; rmse_type 2 weighs every value alike): the least-squares
    scale of the levels of 19 grids, iscale = −(nmax + 0.1·s) / max for s in −9..9, the one of least squared
    error kept. Every value is then rounded to the nearest level of the scale as stored (fp16), which only
    lowers the error. Float32 throughout, sums in numpy's order: ``csrc/ggml_quants.c`` gives the same bytes.
    With per-value weights ``w`` [n, 32] (an importance matrix, :func:`_importance_weights`) the sums are
    weighted: ``make_qx_quants(32, nmax, x, L, 1, w)`` as ``quantize_row_q4_0_impl`` calls it.

    Returns:
        (d [n] float16, levels [n, 32] uint8)
    """
    f32 = np.float32
    peak = x[np.arange(x.shape[0]), np.abs(x).argmax(axis=1)]
    zero = np.abs(peak) < _GROUP_MAX_EPS
    peak = np.where(zero, f32(1), peak)
    sumlx, suml2 = _symmetric_fit(x, w, f32(-nmax) / peak, nmax)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in (s for s in range(-9, 10) if s):
        slx, sl2 = _symmetric_fit(x, w, -(f32(nmax) + f32(0.1) * f32(step)) / peak, nmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = np.where(better, slx / np.where(sl2 > 0, sl2, f32(1)), scale)
        best = np.where(better, scale * slx, best)
    d = np.where(zero, f32(0), scale).astype(np.float16)
    dl = d.astype(np.float32)
    levels = np.clip(_nearest_int(x / np.where(dl != 0, dl, f32(1))[:, None]), -nmax, nmax - 1) + nmax
    return d, np.where((dl != 0)[:, None], levels, nmax).astype(np.uint8)


def _importance_weights(x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray | None) -> np.ndarray | None:
    """``quantize_row_q4_0_impl``'s (and q5_0's) weights of blocks ``x`` [n, 32]: qw·sqrt(σ² + x²), σ² the
    mean square of the block's row [n]; None without importances."""
    return None if qw is None else qw * np.sqrt(sigma2[:, None] + x * x)


def _q4_0_blocks(x: np.ndarray, qw: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> np.ndarray:
    """Q4_0 blocks ``x`` [n, 32] -> [n, 18] bytes: fp16 ``d``, 16 bytes of 4-bit levels (q[j] | q[j+16] << 4)."""
    d, levels = _symmetric_blocks(x, 8, _importance_weights(x, qw, sigma2))
    out = np.empty((x.shape[0], Q4_0_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    out[:, 2:] = levels[:, :16] | (levels[:, 16:] << 4)
    return out


def _q5_0_blocks(x: np.ndarray, qw: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> np.ndarray:
    """Q5_0 blocks ``x`` [n, 32] -> [n, 22] bytes: fp16 ``d``, 4 bytes of fifth bits (bit j of level j,
    little-endian), 16 bytes of low nibbles (q[j] | q[j+16] << 4)."""
    d, levels = _symmetric_blocks(x, 16, _importance_weights(x, qw, sigma2))
    out = np.empty((x.shape[0], Q5_0_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    out[:, 2:6] = np.packbits(levels >> 4, axis=-1, bitorder="little")
    low = levels & 0xF
    out[:, 6:] = low[:, :16] | (low[:, 16:] << 4)
    return out


def _q6_k_blocks(x: np.ndarray, qw: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> np.ndarray:
    """``quantize_row_q6_K_ref`` on super-blocks ``x`` [n, 256] -> [n, 210] bytes; with importances ``qw``
    [n, 256], ``quantize_row_q6_K_impl``, which weighs each value by its importance alone."""
    n = x.shape[0]
    scales, levels = _make_qx_quants(x.reshape(n * 16, 16), 32, None if qw is None else qw.reshape(n * 16, 16))
    scales, levels = scales.reshape(n, 16), levels.reshape(n, 16, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), pick]
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = np.float32(-128) / np.where(empty, np.float32(1), max_scale)
    d = (np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dl = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    nonzero = dl != 0
    requant = np.clip(_nearest_int(x.reshape(n, 16, 16) / np.where(nonzero, dl, 1)[:, :, None]), -32, 31) + 32
    levels = np.where(nonzero[:, :, None], requant, levels).reshape(n, 2, 4, 32).astype(np.uint8)
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.empty((n, Q6_K_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(n, 128)
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.reshape(n, 1).view(np.uint8)
    out[empty] = 0
    return out


def _row_mean_squares(rows: np.ndarray) -> np.ndarray:
    """The mean square of each row of ``rows`` [m, k] (k a multiple of 32), as ``csrc/ggml_quants.c`` sums it:
    each 32 values in numpy's pairwise order, those sums left to right, over k."""
    m, k = rows.shape
    pieces = (rows * rows).reshape(-1, 32).sum(axis=1).reshape(m, k // 32)
    return np.add.accumulate(pieces, axis=1)[:, -1] / np.float32(k)


def _quantize(rows: np.ndarray, blocks_fn, block_bytes: int, block: int = QK_K,
              importance: np.ndarray | None = None) -> np.ndarray:
    if rows.shape[-1] % block:
        raise ValueError(f"rows of {rows.shape[-1]} values do not split into blocks of {block}")
    k = rows.shape[-1]
    flat = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, block)
    out = np.empty((flat.shape[0], block_bytes), dtype=np.uint8)
    step = _CHUNK_BLOCKS * QK_K // block
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape[0] != k:
            raise ValueError(f"an importance vector of {importance.shape[0]} values for rows of {k}")
        per_row = k // block
        qw_blocks = importance.reshape(per_row, block)
        sigma2 = _row_mean_squares(flat.reshape(-1, k)) if block == 32 else None
    for start in range(0, flat.shape[0], step):
        chunk = flat[start:start + step]
        if importance is None:
            out[start:start + step] = blocks_fn(chunk)
            continue
        index = np.arange(start, start + chunk.shape[0])
        out[start:start + step] = blocks_fn(chunk, qw_blocks[index % per_row],
                                            None if sigma2 is None else sigma2[index // per_row])
    return out.reshape(*rows.shape[:-1], rows.shape[-1] // block * block_bytes)


def quantize_q4_0(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q4_0 bytes of ``rows`` [..., k] (k a multiple of 32) -> uint8 [..., k / 32 · 18], each block's scale
    searched for the least squared error (:func:`_symmetric_blocks`), weighted by ``importance`` [k] (an
    importance matrix's column, llama.cpp's ``quant_weights``) when given."""
    return _quantize(rows, _q4_0_blocks, Q4_0_BYTES, QK4_0, importance)


def quantize_q5_0(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q5_0 bytes of ``rows`` [..., k] (k a multiple of 32) -> uint8 [..., k / 32 · 22], as :func:`quantize_q4_0`
    with 32 levels."""
    return _quantize(rows, _q5_0_blocks, Q5_0_BYTES, QK4_0, importance)


def quantize_q4_k(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q4_K bytes of ``rows`` [..., k] (k a multiple of 256) -> uint8 [..., k / 256 · 144]; with
    ``importance`` [k], llama.cpp's weighted search (:func:`_q4_k_weighted`)."""
    return _quantize(rows, _q4_k_blocks, Q4_K_BYTES, QK_K, importance)


def quantize_q6_k(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q6_K bytes of ``rows`` [..., k] (k a multiple of 256) -> uint8 [..., k / 256 · 210], weighted by
    ``importance`` [k] when given."""
    return _quantize(rows, _q6_k_blocks, Q6_K_BYTES, QK_K, importance)
