/*
 * llama.cpp's block quantizations for GGUF export (see fourbit_cpu.h): Q8_0, Q4_0, Q5_0, Q4_K and Q6_K.
 *
 * Each gives, byte for byte, what fourbit's reference gives: gguf-py's ``gguf.quants`` for Q8_0, and
 * ``fourbit/models/export/kquants.py`` for the others (numpy ports of ggml-quants.c's ``quantize_row_q4_K_ref``
 * and ``quantize_row_q6_K_ref``; for Q4_0 and Q5_0 a least-squares scale search, ``_symmetric_blocks``). So the
 * arithmetic follows numpy, not ggml, where they differ:
 * - sums of 16 or 32 values run in numpy's pairwise order (eight running sums a[j], a[j+8], ..., then
 *   ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)), then 0 + that), and Q4_K's first error estimate in double, as numpy
 *   promotes float32 * int32;
 * - nearest_int is rint (half to even), and a value outside int32 (or NaN) becomes INT32_MIN, as numpy's cast
 *   does on x86-64;
 * - the maximum of eight scales is the last of equal values (numpy's reduction), which decides the sign of a
 *   zero fp16 scale.
 * With an importance vector (llama.cpp's quant_weights: one per column, from an importance matrix) Q4_0, Q5_0,
 * Q4_K and Q6_K weigh each value's error as ggml-quants.c's quantize_row_*_impl do (Q8_0 ignores it, as
 * llama.cpp does); the mean squares they need are summed as kquants.py sums them (32 values pairwise, then
 * left to right).
 * The library is built with -ffp-contract=off and without -ffast-math, so no product is fused and no sum is
 * reordered, whichever vector code the compiler makes of each loop.
 */
#include "fourbit_cpu.h"

enum { FB_GGML_Q8_0 = 0, FB_GGML_Q4_0 = 1, FB_GGML_Q4_K = 2, FB_GGML_Q6_K = 3, FB_GGML_Q5_0 = 4 };

#define QK_K 256

FB_INLINE uint16_t fp16_bits(float v) {
    const _Float16 h = (_Float16)v;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

FB_INLINE float fp16_value(uint16_t u) {
    _Float16 h;
    memcpy(&h, &u, 2);
    return (float)h;
}

FB_INLINE void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

/* np.rint(v).astype(np.int32) on x86-64: out of range or NaN gives INT32_MIN. */
FB_INLINE int32_t rint_i32(float v) {
    const float r = rintf(v);
    return (r >= -2147483648.0f && r < 2147483648.0f) ? (int32_t)r : INT32_MIN;
}

FB_INLINE int32_t clamp_i32(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* (float)clamp(rint_i32(v), lo, hi), in float: NaN and out-of-int32 values give lo, as INT32_MIN would. */
FB_INLINE float level(float v, float lo, float hi) {
    const float r = rintf(v);
    return (r >= lo && r < 2147483648.0f) ? (r > hi ? hi : r) : lo;
}

/* The index of the first value of largest magnitude, or of the first NaN (numpy's abs(x).argmax()). */
FB_INLINE int first_absmax(const float *x, int n) {
    int pick = 0;
    float best = fabsf(x[0]);
    for (int i = 1; i < n && best == best; ++i) {
        const float a = fabsf(x[i]);
        if (a > best || a != a) {
            best = a;
            pick = i;
        }
    }
    return pick;
}

/* numpy's x.max() over a few values: the last of equal values wins (signed zeros), and a NaN wins. */
FB_INLINE float last_max(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n && m == m; ++i) m = (x[i] >= m || x[i] != x[i]) ? x[i] : m;
    return m;
}

/* ------------------------------------------------------------------------------------ Q8_0 and Q4_0 */

/* gguf.quants.Q8_0: d = max|x| / 127, q = round-half-away(x / d); 34 bytes per 32 values. */
FB_INLINE void q8_0_block(const float *x, uint8_t *out) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float d = amax / 127.0f;
    const float id = d == 0.0f ? 0.0f : 1.0f / d;
    put_u16(out, fp16_bits(d));
    for (int i = 0; i < 32; ++i) out[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
}

/*
 * Q4_0 and Q5_0 (kquants._symmetric_blocks): the scale of least squared error, searched as
 * make_qx_quants(32, nmax, x, L, rmse_type=2, NULL) searches (19 grids iscale = -(nmax + 0.1 s) / max, the
 * least-squares scale of each grid's levels); every value is then rounded to the nearest level of the fp16 scale.
 * SYM_LANES blocks run side by side, x transposed to [value][block], so each loop is one vector op per value over
 * the blocks.
 */
#define SYM_LANES 16

/* numpy's pairwise sum of 32 values a[i][lane] for each of SYM_LANES lanes (as lanes_sum32 below). */
FB_INLINE void sym_sum32(const float a[32][SYM_LANES], float *out) {
    float r[8][SYM_LANES];
    for (int j = 0; j < 8; ++j)
        for (int l = 0; l < SYM_LANES; ++l) r[j][l] = ((a[j][l] + a[8 + j][l]) + a[16 + j][l]) + a[24 + j][l];
    for (int l = 0; l < SYM_LANES; ++l)
        out[l] = 0.0f + (((r[0][l] + r[1][l]) + (r[2][l] + r[3][l])) + ((r[4][l] + r[5][l]) + (r[6][l] + r[7][l])));
}

/* The levels clip(rint(iscale x), -nmax, nmax - 1) of each block: sum(w x l) and sum(w l l) (w 1 without
 * importances: 1 v = v exactly, so the bytes are the unweighted reference's). */
FB_INLINE void sym_fit(const float x[32][SYM_LANES], const float w[32][SYM_LANES], const float *iscale, float nmax,
                       float *slx, float *sl2) {
    float a[32][SYM_LANES], b[32][SYM_LANES];
    for (int i = 0; i < 32; ++i)
        for (int l = 0; l < SYM_LANES; ++l) {
            const float lv = level(iscale[l] * x[i][l], -nmax, nmax - 1.0f);
            a[i][l] = w[i][l] * x[i][l] * lv;
            b[i][l] = w[i][l] * lv * lv;
        }
    sym_sum32(a, slx);
    sym_sum32(b, sl2);
}

/* The fp16 scale d (bits) and levels q in 0..2 nmax - 1 (value = d (q - nmax)) of SYM_LANES blocks. */
FB_INLINE void sym_blocks(const float x[32][SYM_LANES], const float w[32][SYM_LANES], float nmax, uint16_t *d,
                          uint8_t q[32][SYM_LANES]) {
    float peak[SYM_LANES], amax[SYM_LANES], iscale[SYM_LANES], scale[SYM_LANES], best[SYM_LANES];
    float slx[SYM_LANES], sl2[SYM_LANES], dl[SYM_LANES];
    int32_t zero[SYM_LANES];
    for (int l = 0; l < SYM_LANES; ++l) {
        peak[l] = x[0][l];
        amax[l] = fabsf(x[0][l]);
    }
    for (int i = 1; i < 32; ++i)  /* the first value of largest magnitude */
        for (int l = 0; l < SYM_LANES; ++l) {
            const int more = fabsf(x[i][l]) > amax[l];
            amax[l] = more ? fabsf(x[i][l]) : amax[l];
            peak[l] = more ? x[i][l] : peak[l];
        }
    for (int l = 0; l < SYM_LANES; ++l) {
        zero[l] = fabsf(peak[l]) < 1e-15f;
        peak[l] = zero[l] ? 1.0f : peak[l];
        iscale[l] = -nmax / peak[l];
    }
    sym_fit(x, w, iscale, nmax, slx, sl2);
    for (int l = 0; l < SYM_LANES; ++l) {
        scale[l] = sl2[l] > 0.0f ? slx[l] / sl2[l] : 0.0f;
        best[l] = scale[l] * slx[l];
    }
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        for (int l = 0; l < SYM_LANES; ++l) iscale[l] = -(nmax + 0.1f * (float)step) / peak[l];
        sym_fit(x, w, iscale, nmax, slx, sl2);
        for (int l = 0; l < SYM_LANES; ++l) {
            const int better = sl2[l] > 0.0f && slx[l] * slx[l] > best[l] * sl2[l];
            scale[l] = better ? slx[l] / (sl2[l] > 0.0f ? sl2[l] : 1.0f) : scale[l];
            best[l] = better ? scale[l] * slx[l] : best[l];
        }
    }
    for (int l = 0; l < SYM_LANES; ++l) {
        d[l] = fp16_bits(zero[l] ? 0.0f : scale[l]);
        dl[l] = fp16_value(d[l]);
    }
    for (int i = 0; i < 32; ++i)
        for (int l = 0; l < SYM_LANES; ++l)
            q[i][l] = (uint8_t)(dl[l] != 0.0f ? level(x[i][l] / (dl[l] != 0.0f ? dl[l] : 1.0f), -nmax, nmax - 1.0f) +
                                                    nmax
                                              : nmax);
}

/* Blocks b0..b1 of 32 values to Q4_0 (18 bytes: d, q[j] | q[j+16] << 4) or Q5_0 (22 bytes: d, the fifth bits
 * as a little-endian uint32, the low nibbles as Q4_0's), SYM_LANES at a time; a short last group is padded
 * with zeros. With importances qw [cols], value j of a row weighs qw[j] sqrt(sigma2 + x^2), sigma2 the row's
 * mean square (row_ms[row], quantize_row_q4_0_impl). */
FB_INLINE void sym_range(const float *x, int q5, uint8_t *out, int64_t b0, int64_t b1, int64_t cols,
                         const float *qw, const float *row_ms) {
    const int size = q5 ? 22 : 18;
    for (int64_t b = b0; b < b1; b += SYM_LANES) {
        const int n = b1 - b < SYM_LANES ? (int)(b1 - b) : SYM_LANES;
        float xt[32][SYM_LANES], w[32][SYM_LANES];
        uint8_t q[32][SYM_LANES];
        uint16_t d[SYM_LANES];
        for (int l = 0; l < SYM_LANES; ++l)
            for (int i = 0; i < 32; ++i) xt[i][l] = l < n ? x[32 * (b + l) + i] : 0.0f;
        for (int l = 0; l < SYM_LANES; ++l) {
            const int64_t at = 32 * (b + (l < n ? l : 0));
            for (int i = 0; i < 32; ++i)
                w[i][l] = (qw && l < n) ? qw[at % cols + i] * sqrtf(row_ms[at / cols] + xt[i][l] * xt[i][l]) : 1.0f;
        }
        sym_blocks(xt, w, q5 ? 16.0f : 8.0f, d, q);
        for (int l = 0; l < n; ++l) {
            uint8_t *o = out + size * (b + l);
            put_u16(o, d[l]);
            if (q5) {
                uint32_t qh = 0;
                for (int i = 0; i < 32; ++i) qh |= (uint32_t)(q[i][l] >> 4) << i;
                memcpy(o + 2, &qh, 4);  /* little-endian, as np.packbits(bitorder="little") */
                o += 4;
            }
            for (int i = 0; i < 16; ++i) o[2 + i] = (uint8_t)((q[i][l] & 0xF) | ((q[i + 16][l] & 0xF) << 4));
        }
    }
}

/*
 * Q4_K and Q6_K work on the sub-blocks of one super-block side by side: x is transposed to [value][sub-block],
 * and every loop runs over the sub-blocks innermost, so the compiler makes one vector lane of each sub-block
 * (8 for Q4_K, 16 for Q6_K) and the per-sub-block choices become blends. Each lane does the reference's
 * arithmetic in the reference's order.
 */

/* numpy's pairwise sum of 32 values a[i][lane] for each of 8 lanes. */
FB_INLINE void lanes_sum32(const float a[32][8], float *out) {
    float r[8][8];
    for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 8; ++l) r[j][l] = ((a[j][l] + a[8 + j][l]) + a[16 + j][l]) + a[24 + j][l];
    for (int l = 0; l < 8; ++l)
        out[l] = 0.0f + (((r[0][l] + r[1][l]) + (r[2][l] + r[3][l])) + ((r[4][l] + r[5][l]) + (r[6][l] + r[7][l])));
}

FB_INLINE void lanes_sum32_f64(const double a[32][8], double *out) {
    double r[8][8];
    for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 8; ++l) r[j][l] = ((a[j][l] + a[8 + j][l]) + a[16 + j][l]) + a[24 + j][l];
    for (int l = 0; l < 8; ++l)
        out[l] = 0.0 + (((r[0][l] + r[1][l]) + (r[2][l] + r[3][l])) + ((r[4][l] + r[5][l]) + (r[6][l] + r[7][l])));
}

/* The starting point of make_qkx2_quants: min (<= 0) and max, the flat sub-blocks, sum(w), sum(w x), and the
 * levels and weighted error of the plain min-max grid (that error in double: numpy's float32 * int32). */
FB_INLINE void qkx2_start(const float x[32][8], const float w[32][8], float *lo, float *hi, int32_t *flat,
                          float *sum_w, float *sum_x, float *scale, double *best, float L[32][8]) {
    float xmin[8], t[32][8], iscale[8];
    double e[32][8];
    for (int l = 0; l < 8; ++l) xmin[l] = hi[l] = x[0][l];
    for (int i = 1; i < 32; ++i)
        for (int l = 0; l < 8; ++l) {
            xmin[l] = x[i][l] < xmin[l] ? x[i][l] : xmin[l];
            hi[l] = x[i][l] > hi[l] ? x[i][l] : hi[l];
        }
    for (int l = 0; l < 8; ++l) {
        lo[l] = xmin[l] < 0.0f ? xmin[l] : 0.0f;  /* np.minimum(min, 0): +0 on a tie */
        flat[l] = hi[l] == lo[l];
        iscale[l] = 15.0f / (flat[l] ? 1.0f : hi[l] - lo[l]);
        scale[l] = 1.0f / iscale[l];
    }
    for (int i = 0; i < 32; ++i)
        for (int l = 0; l < 8; ++l) {
            t[i][l] = w[i][l] * x[i][l];
            L[i][l] = level(iscale[l] * (x[i][l] - lo[l]), 0.0f, 15.0f);
            const double diff = (double)scale[l] * (double)L[i][l] + (double)lo[l] - (double)x[i][l];
            e[i][l] = (double)w[i][l] * diff * diff;
        }
    lanes_sum32(w, sum_w);
    lanes_sum32(t, sum_x);
    lanes_sum32_f64(e, best);
}

/*
 * make_qkx2_quants(32, nmax=15, x, w, L, rmin=-1, rdelta=0.1, nstep=20) for the 8 sub-blocks x[i][sub-block]:
 * the (scale, min) of least weighted squared error among nstep + 1 grids, each fitted by least squares
 * (kquants._make_qkx2_quants). L gets the levels as floats. With rmin -0.9, rdelta 0.05, nstep 36 it is
 * make_qkx3_quants, the search quantize_row_q4_K_impl runs with importances.
 */
FB_INLINE void make_qkx2_lanes(const float x[32][8], const float w[32][8], float rmin, float rdelta, int nstep,
                               float *scale_out, float *min_out, float L[32][8]) {
    float lo[8], hi[8], sum_w[8], sum_x[8], scale[8], the_min[8], iscale[8];
    float sum_l[8], sum_l2[8], sum_xl[8], err[8], this_scale[8], this_min[8];
    float aux[32][8], t[32][8], t2[32][8], t3[32][8];
    int32_t flat[8], ok[8];
    double best[8];
    qkx2_start(x, w, lo, hi, flat, sum_w, sum_x, scale, best, L);
    for (int l = 0; l < 8; ++l) the_min[l] = lo[l];
    for (int step = 0; step <= nstep; ++step) {
        for (int l = 0; l < 8; ++l)
            iscale[l] = (rmin + rdelta * (float)step + 15.0f) /
                        ((flat[l] || hi[l] == the_min[l]) ? 1.0f : hi[l] - the_min[l]);
        for (int i = 0; i < 32; ++i)
            for (int l = 0; l < 8; ++l) {
                aux[i][l] = level(iscale[l] * (x[i][l] - the_min[l]), 0.0f, 15.0f);
                t[i][l] = w[i][l] * aux[i][l];
                t2[i][l] = t[i][l] * aux[i][l];
                t3[i][l] = t[i][l] * x[i][l];
            }
        lanes_sum32(t, sum_l);
        lanes_sum32(t2, sum_l2);
        lanes_sum32(t3, sum_xl);
        for (int l = 0; l < 8; ++l) {
            const float det = sum_w[l] * sum_l2[l] - sum_l[l] * sum_l[l];
            ok[l] = det > 0.0f;
            const float safe_det = ok[l] ? det : 1.0f;
            const float ts = (sum_w[l] * sum_xl[l] - sum_x[l] * sum_l[l]) / safe_det;
            const float tm = (sum_l2[l] * sum_x[l] - sum_l[l] * sum_xl[l]) / safe_det;
            const int positive = tm > 0.0f;
            this_min[l] = positive ? 0.0f : tm;
            this_scale[l] = positive ? sum_xl[l] / (sum_l2[l] > 0.0f ? sum_l2[l] : 1.0f) : ts;
        }
        for (int i = 0; i < 32; ++i)
            for (int l = 0; l < 8; ++l) {
                const float diff = this_scale[l] * aux[i][l] + this_min[l] - x[i][l];
                t[i][l] = w[i][l] * diff * diff;
            }
        lanes_sum32(t, err);
        for (int l = 0; l < 8; ++l) {
            ok[l] = ok[l] && (double)err[l] < best[l] && !flat[l];  /* now: this grid is better */
            best[l] = ok[l] ? (double)err[l] : best[l];
            scale[l] = ok[l] ? this_scale[l] : scale[l];
            the_min[l] = ok[l] ? this_min[l] : the_min[l];
        }
        for (int i = 0; i < 32; ++i)
            for (int l = 0; l < 8; ++l) L[i][l] = ok[l] ? aux[i][l] : L[i][l];
    }
    for (int l = 0; l < 8; ++l) {
        scale_out[l] = flat[l] ? 0.0f : scale[l];
        min_out[l] = -the_min[l];
    }
    for (int i = 0; i < 32; ++i)
        for (int l = 0; l < 8; ++l) L[i][l] = flat[l] ? 0.0f : L[i][l];
}

/* Q4_K's 6-bit scales and mins of the reference (kquants._q4_k_blocks): each over the largest, in 63 steps. */
FB_INLINE void q4_k_scales(const float *scales, const float *mins, uint8_t *ls, uint8_t *lm, uint16_t *d,
                           uint16_t *dmin) {
    const float max_scale = last_max(scales, 8), max_min = last_max(mins, 8);
    const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    *d = fp16_bits(max_scale / 63.0f);
    *dmin = fp16_bits(max_min / 63.0f);
    for (int j = 0; j < 8; ++j) {
        ls[j] = (uint8_t)clamp_i32(rint_i32(inv_scale * scales[j]), 0, 63);
        lm[j] = (uint8_t)clamp_i32(rint_i32(inv_min * mins[j]), 0, 63);
    }
}

/*
 * make_qp_quants(8, nmax, x, L, w) (kquants._make_qp_quants): the unsigned scale of the 8 sub-block scales (or
 * mins) x >= 0, weighted by each sub-block's total weight w, searched over 9 grids, then up to 5 passes that
 * move one level at a time while the weighted fit improves. Sums left to right; levels clipped to 0..nmax.
 */
FB_INLINE float make_qp(const float *x, float nmax, const float *w, uint8_t *L) {
    float peak = 0.0f, lv[8], best = 0.0f, sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < 8; ++i) peak = peak > x[i] ? peak : x[i];
    const int zero = peak < 1e-15f;
    peak = zero ? 1.0f : peak;
    float iscale = nmax / peak;
    for (int i = 0; i < 8; ++i) {
        const float diff = x[i] - (1.0f / iscale) * level(iscale * x[i], 0.0f, nmax);
        best += w[i] * diff * diff;
    }
    for (int step = -4; step <= 4; ++step) {
        if (step == 0) continue;
        const float this = (0.1f * (float)step + nmax) / peak;
        float err = 0.0f;
        for (int i = 0; i < 8; ++i) {
            const float diff = x[i] - (1.0f / this) * level(this * x[i], 0.0f, nmax);
            err += w[i] * diff * diff;
        }
        iscale = err < best ? this : iscale;
        best = err < best ? err : best;
    }
    for (int i = 0; i < 8; ++i) {
        lv[i] = level(iscale * x[i], 0.0f, nmax);
        sumlx += w[i] * x[i] * lv[i];
    }
    for (int i = 0; i < 8; ++i) suml2 += w[i] * lv[i] * lv[i];
    for (int pass = 0; pass < 5; ++pass)
        for (int i = 0; i < 8; ++i) {
            float slx = sumlx - w[i] * x[i] * lv[i], sl2 = suml2 - w[i] * lv[i] * lv[i];
            const int ok = slx > 0.0f && sl2 > 0.0f;
            const float nl = level(x[i] * sl2 / (ok ? slx : 1.0f), 0.0f, nmax);
            slx = slx + w[i] * x[i] * nl;
            sl2 = sl2 + w[i] * nl * nl;
            if (ok && nl != lv[i] && slx * slx * suml2 > sumlx * sumlx * sl2) {
                lv[i] = nl;
                sumlx = slx;
                suml2 = sl2;
            }
        }
    for (int i = 0; i < 8; ++i) L[i] = zero ? 0 : (uint8_t)lv[i];
    return (zero || !(suml2 > 0.0f)) ? 0.0f : sumlx / suml2;
}

/* The 12 bytes that pack Q4_K's 6-bit scales and mins, fp16 d and dmin; dl and ml the stored scales and mins. */
FB_INLINE void q4_k_put_scales(const uint8_t *ls, const uint8_t *lm, uint16_t d, uint16_t dmin, float *dl, float *ml,
                               uint8_t *out) {
    for (int j = 0; j < 8; ++j) {
        dl[j] = fp16_value(d) * (float)ls[j];
        ml[j] = fp16_value(dmin) * (float)lm[j];
    }
    put_u16(out, d);
    put_u16(out + 2, dmin);
    for (int j = 0; j < 4; ++j) {
        out[4 + j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        out[8 + j] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        out[12 + j] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
}

/* quantize_row_q4_K_ref on one super-block of 256 values -> 144 bytes (kquants._q4_k_blocks); with
 * importances qw [256], quantize_row_q4_K_impl (kquants._q4_k_weighted). */
FB_INLINE void q4_k_block(const float *x, const float *qw, uint8_t *out) {
    float xt[32][8], w[32][8], t[32][8], L[32][8];
    float sum_x2[8], scales[8], mins[8], dl[8], ml[8], sw[8];
    uint8_t ls[8], lm[8];
    uint16_t d, dmin;
    for (int l = 0; l < 8; ++l)
        for (int i = 0; i < 32; ++i) xt[i][l] = x[32 * l + i];
    for (int i = 0; i < 32; ++i)
        for (int l = 0; l < 8; ++l) t[i][l] = xt[i][l] * xt[i][l];
    lanes_sum32(t, sum_x2);
    if (qw) {  /* value j weighs qw[j] sqrt(sigma2 + x^2), sigma2 = 2 mean(x^2) over the super-block */
        float s = 0.0f;
        for (int l = 0; l < 8; ++l) s = s + sum_x2[l];
        const float sigma2 = 2.0f * s / 256.0f;
        for (int i = 0; i < 32; ++i)
            for (int l = 0; l < 8; ++l) w[i][l] = qw[32 * l + i] * sqrtf(sigma2 + t[i][l]);
        lanes_sum32(w, sw);
        make_qkx2_lanes(xt, w, -0.9f, 0.05f, 36, scales, mins, L);
        d = fp16_bits(make_qp(scales, 63.0f, sw, ls));
        dmin = fp16_bits(make_qp(mins, 63.0f, sw, lm));
    } else {
        for (int l = 0; l < 8; ++l) sum_x2[l] = sqrtf(sum_x2[l] / 32.0f);
        for (int i = 0; i < 32; ++i)
            for (int l = 0; l < 8; ++l) w[i][l] = sum_x2[l] + fabsf(xt[i][l]);
        make_qkx2_lanes(xt, w, -1.0f, 0.1f, 20, scales, mins, L);
        q4_k_scales(scales, mins, ls, lm, &d, &dmin);
    }
    q4_k_put_scales(ls, lm, d, dmin, dl, ml, out);
    for (int i = 0; i < 32; ++i)  /* requantize against the scales as stored, where the scale is not 0 */
        for (int l = 0; l < 8; ++l)
            L[i][l] = dl[l] != 0.0f ? level((xt[i][l] + ml[l]) / (dl[l] != 0.0f ? dl[l] : 1.0f), 0.0f, 15.0f)
                                    : L[i][l];
    for (int c = 0; c < 4; ++c)
        for (int i = 0; i < 32; ++i)
            out[16 + 32 * c + i] = (uint8_t)((uint8_t)L[i][2 * c] | ((uint8_t)L[i][2 * c + 1] << 4));
}

/* ----------------------------------------------------------------------------------------------- Q6_K */

/* numpy's pairwise sum of 16 values a[i][lane] for each of 16 lanes. */
FB_INLINE void lanes_sum16(const float a[16][16], float *out) {
    float r[8][16];
    for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 16; ++l) r[j][l] = a[j][l] + a[8 + j][l];
    for (int l = 0; l < 16; ++l)
        out[l] = 0.0f + (((r[0][l] + r[1][l]) + (r[2][l] + r[3][l])) + ((r[4][l] + r[5][l]) + (r[6][l] + r[7][l])));
}

/* One grid of make_qx_quants for the 16 groups: levels of iscale * x in [-32, 31], sum(w x l), sum(w l l). */
FB_INLINE void qx_grid(const float x[16][16], const float w[16][16], const float *iscale, float lv[16][16],
                       float *sumlx, float *suml2) {
    float a[16][16], b[16][16];
    for (int i = 0; i < 16; ++i)
        for (int l = 0; l < 16; ++l) {
            lv[i][l] = level(iscale[l] * x[i][l], -32.0f, 31.0f);
            a[i][l] = w[i][l] * x[i][l] * lv[i][l];
            b[i][l] = w[i][l] * lv[i][l] * lv[i][l];
        }
    lanes_sum16(a, sumlx);
    lanes_sum16(b, suml2);
}

/* make_qx_quants(16, nmax=32, x, L, rmse_type=1, qw) for the 16 groups x[i][group]: a symmetric scale searched
 * over 19 grids, weighted by x^2, or by the importances qw [256] where given (kquants._make_qx_quants); L in
 * 0..63, or all 0 for a group of zeros. */
FB_INLINE void make_qx_lanes(const float x[16][16], const float *qw, float *scale, float L[16][16]) {
    float w[16][16], lv[16][16], peak[16], amax[16], iscale[16], sumlx[16], suml2[16], best[16];
    for (int l = 0; l < 16; ++l) {
        peak[l] = x[0][l];
        amax[l] = fabsf(x[0][l]);
    }
    for (int i = 1; i < 16; ++i)  /* the first value of largest magnitude */
        for (int l = 0; l < 16; ++l) {
            const int more = fabsf(x[i][l]) > amax[l];
            amax[l] = more ? fabsf(x[i][l]) : amax[l];
            peak[l] = more ? x[i][l] : peak[l];
        }
    for (int i = 0; i < 16; ++i)
        for (int l = 0; l < 16; ++l) w[i][l] = qw ? qw[16 * l + i] : x[i][l] * x[i][l];
    for (int l = 0; l < 16; ++l) iscale[l] = -32.0f / peak[l];
    qx_grid(x, w, iscale, L, sumlx, suml2);
    for (int l = 0; l < 16; ++l) {
        scale[l] = suml2[l] > 0.0f ? sumlx[l] / suml2[l] : 0.0f;
        best[l] = scale[l] * sumlx[l];
    }
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        for (int l = 0; l < 16; ++l) iscale[l] = -(32.0f + 0.1f * (float)step) / peak[l];
        qx_grid(x, w, iscale, lv, sumlx, suml2);
        int32_t better[16];
        for (int l = 0; l < 16; ++l) {
            better[l] = suml2[l] > 0.0f && sumlx[l] * sumlx[l] > best[l] * suml2[l];
            scale[l] = better[l] ? sumlx[l] / (suml2[l] > 0.0f ? suml2[l] : 1.0f) : scale[l];
            best[l] = better[l] ? scale[l] * sumlx[l] : best[l];
        }
        for (int i = 0; i < 16; ++i)
            for (int l = 0; l < 16; ++l) L[i][l] = better[l] ? lv[i][l] : L[i][l];
    }
    for (int l = 0; l < 16; ++l) scale[l] = fabsf(peak[l]) < 1e-15f ? 0.0f : scale[l];
    for (int i = 0; i < 16; ++i)
        for (int l = 0; l < 16; ++l) L[i][l] = fabsf(peak[l]) < 1e-15f ? 0.0f : L[i][l] + 32.0f;
}

/* quantize_row_q6_K_ref on one super-block of 256 values -> 210 bytes (kquants._q6_k_blocks); with
 * importances qw [256], quantize_row_q6_K_impl. */
FB_INLINE void q6_k_block(const float *x, const float *qw, uint8_t *out) {
    float xt[16][16], Lf[16][16], scales[16], dl[16];
    uint8_t L[QK_K];
    for (int l = 0; l < 16; ++l)
        for (int i = 0; i < 16; ++i) xt[i][l] = x[16 * l + i];
    make_qx_lanes(xt, qw, scales, Lf);
    const float max_scale = scales[first_absmax(scales, 16)];
    if (fabsf(max_scale) < 1e-15f) {
        memset(out, 0, 210);
        return;
    }
    const float iscale = -128.0f / max_scale;
    const uint16_t d = fp16_bits(1.0f / iscale);
    int8_t sc[16];
    for (int j = 0; j < 16; ++j) {
        const int32_t v = rint_i32(iscale * scales[j]);
        sc[j] = (int8_t)(v < 127 ? v : 127);
        dl[j] = fp16_value(d) * (float)sc[j];
    }
    for (int i = 0; i < 16; ++i)  /* requantize against the scales as stored, where the scale is not 0 */
        for (int l = 0; l < 16; ++l)
            Lf[i][l] = dl[l] != 0.0f ? level(xt[i][l] / (dl[l] != 0.0f ? dl[l] : 1.0f), -32.0f, 31.0f) + 32.0f
                                     : Lf[i][l];
    for (int l = 0; l < 16; ++l)
        for (int i = 0; i < 16; ++i) L[16 * l + i] = (uint8_t)Lf[i][l];
    for (int h = 0; h < 2; ++h) {  /* two halves of 128 values: 64 bytes of low nibbles, 32 of high bits */
        const uint8_t *q = L + 128 * h;
        for (int l = 0; l < 32; ++l) {
            out[64 * h + l] = (uint8_t)((q[l] & 0xF) | ((q[64 + l] & 0xF) << 4));
            out[64 * h + 32 + l] = (uint8_t)((q[32 + l] & 0xF) | ((q[96 + l] & 0xF) << 4));
            out[128 + 32 * h + l] = (uint8_t)((q[l] >> 4) | ((q[32 + l] >> 4) << 2) | ((q[64 + l] >> 4) << 4) |
                                              ((q[96 + l] >> 4) << 6));
        }
    }
    memcpy(out + 192, sc, 16);
    put_u16(out + 208, d);
}

/* --------------------------------------------------------------------------------------------- driver */

FB_INLINE void ggml_blocks(const float *x, int type, uint8_t *out, int64_t b0, int64_t b1, int64_t cols,
                           const float *qw, const float *row_ms) {
    if (type == FB_GGML_Q4_0 || type == FB_GGML_Q5_0) {
        sym_range(x, type == FB_GGML_Q5_0, out, b0, b1, cols, qw, row_ms);
        return;
    }
    for (int64_t b = b0; b < b1; ++b) {
        const float *w = qw ? qw + (QK_K * b) % cols : NULL;
        switch (type) {
        case FB_GGML_Q8_0: q8_0_block(x + 32 * b, out + 34 * b); break;
        case FB_GGML_Q4_K: q4_k_block(x + QK_K * b, w, out + 144 * b); break;
        default: q6_k_block(x + QK_K * b, w, out + 210 * b); break;
        }
    }
}

#define FB_GGML_ARGS \
    const float *x, int type, uint8_t *out, int64_t b0, int64_t b1, int64_t cols, const float *qw, const float *row_ms
#define FB_GGML_PASS x, type, out, b0, b1, cols, qw, row_ms

FB_ISA_VARIANTS(ggml_quantize, ggml_blocks, FB_GGML_ARGS, FB_GGML_PASS, FB_AVX512)

/* The mean square of each of the n / cols rows of x (kquants._row_mean_squares: each 32 values pairwise as
 * numpy sums them, those sums left to right), for Q4_0's and Q5_0's importance weights. */
static void row_mean_squares(const float *x, int64_t n, int64_t cols, float *row_ms, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n / cols; ++r) {
        float s = 0.0f;
        for (int64_t b = 0; b < cols / 32; ++b) {
            const float *v = x + r * cols + 32 * b;
            float r8[8];
            for (int j = 0; j < 8; ++j)
                r8[j] = ((v[j] * v[j] + v[8 + j] * v[8 + j]) + v[16 + j] * v[16 + j]) + v[24 + j] * v[24 + j];
            const float piece =
                0.0f + (((r8[0] + r8[1]) + (r8[2] + r8[3])) + ((r8[4] + r8[5]) + (r8[6] + r8[7])));
            s = b ? s + piece : piece;
        }
        row_ms[r] = s / (float)cols;
    }
}

/* Quantize n float32 values, rows of `cols` (a multiple of the type's block: 32 for Q8_0/Q4_0/Q5_0, 256 for
 * Q4_K/Q6_K), to GGML type `type` (FB_GGML_*), blocks in order into `out`. `importance` is NULL or one weight
 * per column (llama.cpp's quant_weights), which Q8_0 ignores; `row_ms` is scratch for n / cols floats (Q4_0 and
 * Q5_0 keep each row's mean square there when they have importances). */
int fb_quantize_ggml(const float *x, int type, int64_t n, int64_t cols, const float *importance, float *row_ms,
                     uint8_t *out, int nthreads) {
    if (type < FB_GGML_Q8_0 || type > FB_GGML_Q5_0) return FB_ERR_DTYPE;
    const int64_t block = (type == FB_GGML_Q4_K || type == FB_GGML_Q6_K) ? QK_K : 32;
    if (n % block || cols < block || cols % block || n % cols) return FB_ERR_BLOCKSIZE;
    const float *qw = type == FB_GGML_Q8_0 ? NULL : importance;
    if (qw && block == 32) row_mean_squares(x, n, cols, row_ms, nthreads);
    /* Units of ~8k values, handed out as threads come free (on a shared machine a thread may lose its core
     * for a while); every unit writes its own blocks, so the bytes do not depend on who runs which. */
    const int64_t count = n / block, per = ((int64_t)1 << 13) / block, nchunks = (count + per - 1) / per;
    __typeof__(&ggml_quantize_scalar) const run = FB_PICK(ggml_quantize);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t b0 = c * per, b1 = b0 + per < count ? b0 + per : count;
        run(FB_GGML_PASS);
    }
    return FB_OK;
}
