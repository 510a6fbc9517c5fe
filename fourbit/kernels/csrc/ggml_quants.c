/*
 * llama.cpp's block quantizations for GGUF export (see fourbit_cpu.h): Q8_0, Q4_0, Q4_K and Q6_K.
 *
 * Each gives, byte for byte, what fourbit's reference gives: gguf-py's ``gguf.quants`` for Q8_0 and Q4_0, and
 * ``fourbit/models/export/kquants.py`` (numpy ports of ggml-quants.c's ``quantize_row_q4_K_ref`` and
 * ``quantize_row_q6_K_ref``) for Q4_K and Q6_K. So the arithmetic follows numpy, not ggml, where they differ:
 * - sums of 16 or 32 values run in numpy's pairwise order (eight running sums a[j], a[j+8], ..., then
 *   ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)), then 0 + that), and Q4_K's first error estimate in double, as numpy
 *   promotes float32 * int32;
 * - nearest_int is rint (half to even), and a value outside int32 (or NaN) becomes INT32_MIN, as numpy's cast
 *   does on x86-64;
 * - the maximum of eight scales is the last of equal values (numpy's reduction), which decides the sign of a
 *   zero fp16 scale.
 * The library is built with -ffp-contract=off and without -ffast-math, so no product is fused and no sum is
 * reordered, whichever vector code the compiler makes of each loop.
 */
#include "fourbit_cpu.h"

enum { FB_GGML_Q8_0 = 0, FB_GGML_Q4_0 = 1, FB_GGML_Q4_K = 2, FB_GGML_Q6_K = 3 };

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

/* numpy's pairwise float32 sum of 16 or 32 values (n a multiple of 8, at most 128). */
FB_INLINE float pairwise_sum(const float *a, int n) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    for (int i = 8; i < n; i += 8)
        for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    return 0.0f + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

FB_INLINE double pairwise_sum_f64(const double *a, int n) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    for (int i = 8; i < n; i += 8)
        for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    return 0.0 + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
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

/* gguf.quants.Q4_0: d = (the value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)); 18 bytes. */
FB_INLINE void q4_0_block(const float *x, uint8_t *out) {
    const float d = x[first_absmax(x, 32)] / -8.0f;
    const float id = d == 0.0f ? 0.0f : 1.0f / d;
    put_u16(out, fp16_bits(d));
    uint8_t q[32];
    for (int i = 0; i < 32; ++i) {
        const float v = x[i] * id + 8.5f;
        const int t = (int)v;
        q[i] = (uint8_t)(t < 0 ? 0 : (t > 15 ? 15 : t));
    }
    for (int i = 0; i < 16; ++i) out[2 + i] = (uint8_t)(q[i] | (q[i + 16] << 4));
}

/* ----------------------------------------------------------------------------------------------- Q4_K */

/*
 * make_qkx2_quants(32, nmax=15, x, w, L, rmin=-1, rdelta=0.1, nstep=20): the (scale, min) of least weighted
 * squared error among 21 grids, each fitted by least squares (kquants._make_qkx2_quants, one row).
 */
FB_INLINE void make_qkx2_32(const float *x, const float *w, float *scale_out, float *min_out, uint8_t *L) {
    float xmin = x[0], hi = x[0];
    for (int i = 1; i < 32; ++i) {
        xmin = x[i] < xmin ? x[i] : xmin;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float lo = xmin < 0.0f ? xmin : 0.0f;  /* np.minimum(min, 0): +0 on a tie */
    const int flat = hi == lo;
    float t[32], t2[32], t3[32];
    int32_t lev[32];
    for (int i = 0; i < 32; ++i) t[i] = w[i] * x[i];
    const float sum_w = pairwise_sum(w, 32), sum_x = pairwise_sum(t, 32);
    const float iscale0 = 15.0f / (flat ? 1.0f : hi - lo);
    float scale = 1.0f / iscale0;
    double e64[32];
    for (int i = 0; i < 32; ++i) {
        lev[i] = clamp_i32(rint_i32(iscale0 * (x[i] - lo)), 0, 15);
        const double diff = (double)scale * (double)lev[i] + (double)lo - (double)x[i];
        e64[i] = (double)w[i] * diff * diff;  /* float32 * int32 is float64 in numpy */
    }
    double best = pairwise_sum_f64(e64, 32);
    float the_min = lo;
    for (int step = 0; step <= 20; ++step) {
        const float span = (flat || hi == the_min) ? 1.0f : hi - the_min;
        const float iscale = (-1.0f + 0.1f * (float)step + 15.0f) / span;
        float aux[32];
        for (int i = 0; i < 32; ++i) {
            aux[i] = (float)clamp_i32(rint_i32(iscale * (x[i] - the_min)), 0, 15);
            t[i] = w[i] * aux[i];
            t2[i] = t[i] * aux[i];
            t3[i] = t[i] * x[i];
        }
        const float sum_l = pairwise_sum(t, 32), sum_l2 = pairwise_sum(t2, 32), sum_xl = pairwise_sum(t3, 32);
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        const int ok = det > 0.0f;
        const float safe_det = ok ? det : 1.0f;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det;
        if (this_min > 0.0f) {
            this_min = 0.0f;
            this_scale = sum_xl / (sum_l2 > 0.0f ? sum_l2 : 1.0f);
        }
        for (int i = 0; i < 32; ++i) {
            const float diff = this_scale * aux[i] + this_min - x[i];
            t[i] = w[i] * diff * diff;
        }
        const float err = pairwise_sum(t, 32);
        if (ok && (double)err < best && !flat) {
            for (int i = 0; i < 32; ++i) lev[i] = (int32_t)aux[i];
            best = (double)err;
            scale = this_scale;
            the_min = this_min;
        }
    }
    *scale_out = flat ? 0.0f : scale;
    *min_out = -the_min;
    for (int i = 0; i < 32; ++i) L[i] = flat ? 0 : (uint8_t)lev[i];
}

/* quantize_row_q4_K_ref on one super-block of 256 values -> 144 bytes (kquants._q4_k_blocks). */
FB_INLINE void q4_k_block(const float *x, uint8_t *out) {
    float scales[8], mins[8], t[32], w[32];
    uint8_t L[QK_K], ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
        const float *sub = x + 32 * j;
        for (int i = 0; i < 32; ++i) t[i] = sub[i] * sub[i];
        const float av_x = sqrtf(pairwise_sum(t, 32) / 32.0f);
        for (int i = 0; i < 32; ++i) w[i] = av_x + fabsf(sub[i]);
        make_qkx2_32(sub, w, &scales[j], &mins[j], L + 32 * j);
    }
    const float max_scale = last_max(scales, 8), max_min = last_max(mins, 8);
    const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < 8; ++j) {
        ls[j] = (uint8_t)clamp_i32(rint_i32(inv_scale * scales[j]), 0, 63);
        lm[j] = (uint8_t)clamp_i32(rint_i32(inv_min * mins[j]), 0, 63);
    }
    const uint16_t d = fp16_bits(max_scale / 63.0f), dmin = fp16_bits(max_min / 63.0f);
    const float d32 = fp16_value(d), dmin32 = fp16_value(dmin);
    for (int j = 0; j < 8; ++j) {  /* requantize against the scales as stored */
        const float dl = d32 * (float)ls[j], ml = dmin32 * (float)lm[j];
        if (dl == 0.0f) continue;
        for (int i = 0; i < 32; ++i) L[32 * j + i] = (uint8_t)clamp_i32(rint_i32((x[32 * j + i] + ml) / dl), 0, 15);
    }
    put_u16(out, d);
    put_u16(out + 2, dmin);
    for (int j = 0; j < 4; ++j) {
        out[4 + j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        out[8 + j] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        out[12 + j] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) out[16 + 32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
}

/* ----------------------------------------------------------------------------------------------- Q6_K */

/* One grid of make_qx_quants: levels of iscale * x in [-32, 31], and sum(w x l), sum(w l l). */
FB_INLINE void qx_grid(const float *x, const float *w, float iscale, int32_t *lv, float *sumlx, float *suml2) {
    float a[16], b[16];
    for (int i = 0; i < 16; ++i) {
        lv[i] = clamp_i32(rint_i32(iscale * x[i]), -32, 31);
        const float l = (float)lv[i];
        a[i] = w[i] * x[i] * l;
        b[i] = w[i] * l * l;
    }
    *sumlx = pairwise_sum(a, 16);
    *suml2 = pairwise_sum(b, 16);
}

/* make_qx_quants(16, nmax=32, x, L, rmse_type=1): a symmetric scale searched over 19 grids, weighted by x^2
 * (kquants._make_qx_quants, one row); L in 0..63, or all 0 for a group of zeros. */
FB_INLINE float make_qx_16(const float *x, uint8_t *L) {
    const float peak = x[first_absmax(x, 16)];
    if (fabsf(peak) < 1e-15f) {
        memset(L, 0, 16);
        return 0.0f;
    }
    float w[16];
    int32_t levels[16], lv[16];
    for (int i = 0; i < 16; ++i) w[i] = x[i] * x[i];
    float sumlx, suml2;
    qx_grid(x, w, -32.0f / peak, levels, &sumlx, &suml2);
    float scale = suml2 > 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        qx_grid(x, w, -(32.0f + 0.1f * (float)step) / peak, lv, &sumlx, &suml2);
        if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
            memcpy(levels, lv, sizeof(levels));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    for (int i = 0; i < 16; ++i) L[i] = (uint8_t)(levels[i] + 32);
    return scale;
}

/* quantize_row_q6_K_ref on one super-block of 256 values -> 210 bytes (kquants._q6_k_blocks). */
FB_INLINE void q6_k_block(const float *x, uint8_t *out) {
    float scales[16];
    uint8_t L[QK_K];
    for (int j = 0; j < 16; ++j) scales[j] = make_qx_16(x + 16 * j, L + 16 * j);
    const float max_scale = scales[first_absmax(scales, 16)];
    if (fabsf(max_scale) < 1e-15f) {
        memset(out, 0, 210);
        return;
    }
    const float iscale = -128.0f / max_scale;
    const uint16_t d = fp16_bits(1.0f / iscale);
    const float d32 = fp16_value(d);
    int8_t sc[16];
    for (int j = 0; j < 16; ++j) {
        const int32_t v = rint_i32(iscale * scales[j]);
        sc[j] = (int8_t)(v < 127 ? v : 127);
        const float dl = d32 * (float)sc[j];
        if (dl == 0.0f) continue;
        for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)(clamp_i32(rint_i32(x[16 * j + i] / dl), -32, 31) + 32);
    }
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

FB_INLINE void ggml_blocks(const float *x, int type, uint8_t *out, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        switch (type) {
        case FB_GGML_Q8_0: q8_0_block(x + 32 * b, out + 34 * b); break;
        case FB_GGML_Q4_0: q4_0_block(x + 32 * b, out + 18 * b); break;
        case FB_GGML_Q4_K: q4_k_block(x + QK_K * b, out + 144 * b); break;
        default: q6_k_block(x + QK_K * b, out + 210 * b); break;
        }
    }
}

#define FB_GGML_ARGS const float *x, int type, uint8_t *out, int64_t b0, int64_t b1
#define FB_GGML_PASS x, type, out, b0, b1

FB_ISA_VARIANTS(ggml_quantize, ggml_blocks, FB_GGML_ARGS, FB_GGML_PASS, FB_AVX512)

/* Quantize n float32 values (n a multiple of the type's block: 32 for Q8_0/Q4_0, 256 for Q4_K/Q6_K) to
 * GGML type `type` (FB_GGML_*), blocks in order into `out`. */
int fb_quantize_ggml(const float *x, int type, int64_t n, uint8_t *out, int nthreads) {
    if (type < FB_GGML_Q8_0 || type > FB_GGML_Q6_K) return FB_ERR_DTYPE;
    const int64_t block = type <= FB_GGML_Q4_0 ? 32 : QK_K;
    if (n % block) return FB_ERR_BLOCKSIZE;
    /* ~8k values per unit of work: whole rows of a big matrix spread evenly over the threads */
    FB_PARALLEL_CHUNKS(ggml_quantize, n / block, ((int64_t)1 << 13) / block, b0, b1, FB_GGML_PASS);
    return FB_OK;
}
