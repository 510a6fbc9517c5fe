/*
 * One decoding step of a Llama-family transformer (Llama, Mistral, Qwen2, Qwen3, SmolLM) for one sequence,
 * in one call: embedding row, per layer RMSNorm -> Q/K/V -> (Qwen3's per-head norms) -> RoPE -> the new K/V
 * written into a static cache -> attention over the cache -> output projection + residual -> RMSNorm ->
 * silu(gate) * up -> down projection + residual, then the final norm and the output head.
 *
 * Why in C: at batch 1 a small model's step is hundreds of tiny operations; through PyTorch modules each costs
 * microseconds of Python and dispatch, more than its arithmetic (SmolLM2-135M: ~400 ops per token). Here the
 * whole step runs inside one OpenMP parallel region, the threads claiming chunks of each matrix's rows phase by
 * phase (see "Phases instead of barriers" below).
 *
 * Weights are read where the model holds them (fourbit/models/decode.py passes the tensors' pointers): 4-bit
 * layers in bitsandbytes' layout (fb_scales, plain or double-quantized), dense ones in float32/bfloat16/float16.
 * Arithmetic is float32 throughout (activations, cache, softmax); each weight row's dot product sums in float32
 * in another order than PyTorch, so results agree with the PyTorch model to float32 rounding.
 *
 * The 4-bit matrix-vector product (AVX2): 16 packed bytes -> 32 weights by four byte-plane table lookups
 * (pshufb on the 16-entry codebook split into its four bytes) and two interleaves. The weights come out in a
 * fixed permuted order within each group of 8 (the even elements, then the odd ones); the input vector is
 * permuted once per step to match, so no shuffle is spent on restoring the order. With AVX-512, vpermps looks
 * the 16 codebook floats up directly: 32 weights from 16 bytes in two lookups, the input permuted in groups of
 * 32 instead (about 1.3x the AVX2 rows' decode speed on a 135M model, AMD EPYC; benchmarks/RESULTS.md).
 * On CPUs with AVX512_VNNI, int8 rows as llama.cpp's Q4 x Q8 (row4_vnni below), the input quantized to int8
 * per 64 values, within a stated bound of the float rows. By default (FB_ROWS_AUTO) they run for layers of at
 * least FB_INT8_AUTO_COLS columns: a Llama-3.1-8B-shaped model decoded 1.3x faster with them, while on
 * SmolLM2-135M (576 and 1536 columns) they were no faster in the whole step (its short rows: the per-row
 * scales and reduction weigh as much as the dot). fb_set_decode_rows chooses float or int8 for every layer.
 *
 * Greedy output head (optional): an int8 copy of a dense head (blocks of 32, float32 scales) scores every row;
 * with e_r >= |w_r - w~_r|_2 (plus rounding), |logit_r - approx_r| <= |x|_2 e_r (Cauchy-Schwarz), so only rows
 * whose upper bound reaches the best lower bound can be the argmax; their exact logits decide. The result is
 * the exact head's argmax while reading about a quarter of a float32 head.
 */
#include <sched.h>
#include <stdlib.h>

#include "fourbit_cpu.h"

/* ------------------------------------------------------------------------------------------ row kernels */

FB_INLINE float dense_at(const void *w, int dtype, int64_t i) { return load_one(w, dtype, i); }

/* One 4-bit row of any shape: blocks may span rows and rows may start mid-byte (flat element indices). */
static float row4_general(const fb_dlinear *l, const float *x, int64_t r) {
    const int64_t i0 = r * l->cols;
    int64_t cur = i0 / l->blocksize;
    float total = 0.0f, acc = 0.0f;
    for (int64_t k = 0; k < l->cols; ++k) {
        const int64_t i = i0 + k, b = i / l->blocksize;
        if (b != cur) {
            total += acc * block_scale(&l->scales, cur);
            acc = 0.0f;
            cur = b;
        }
        const uint8_t byte = l->packed[i >> 1];
        acc += x[k] * l->code[(i & 1) ? (byte & 0x0f) : (byte >> 4)];
    }
    return total + acc * block_scale(&l->scales, cur);
}

#define FB_DENSE_ROW_BODY(l, x, r, OUT)                                                                     \
    do {                                                                                                    \
        const int64_t base_ = (r) * (l)->cols;                                                              \
        float s_ = 0.0f;                                                                                    \
        if ((l)->dense_dtype == FB_F32) {                                                                   \
            const float *w_ = (const float *)(l)->dense + base_;                                            \
            _Pragma("omp simd reduction(+:s_)") for (int64_t k = 0; k < (l)->cols; ++k) s_ += (x)[k] * w_[k]; \
        } else if ((l)->dense_dtype == FB_BF16) {                                                           \
            const uint16_t *w_ = (const uint16_t *)(l)->dense + base_;                                      \
            _Pragma("omp simd reduction(+:s_)") for (int64_t k = 0; k < (l)->cols; ++k)                    \
                s_ += (x)[k] * bf16_to_f32(w_[k]);                                                          \
        } else {                                                                                            \
            const _Float16 *w_ = (const _Float16 *)(l)->dense + base_;                                      \
            _Pragma("omp simd reduction(+:s_)") for (int64_t k = 0; k < (l)->cols; ++k) s_ += (x)[k] * (float)w_[k]; \
        }                                                                                                   \
        OUT = s_;                                                                                           \
    } while (0)

static float row_dense_scalar(const fb_dlinear *l, const float *x, int64_t r) {
    float s;
    FB_DENSE_ROW_BODY(l, x, r, s);
    return s;
}

/* int8 screening row: blocks of 32 with one float32 scale each. */
static float row_screen_scalar(const int8_t *q, const float *scale, const float *x, int64_t cols, int64_t r) {
    float total = 0.0f;
    for (int64_t b = 0; b < cols / 32; ++b) {
        const int8_t *qb = q + r * cols + b * 32;
        const float *xb = x + b * 32;
        float acc = 0.0f;
        _Pragma("omp simd reduction(+:acc)") for (int k = 0; k < 32; ++k) acc += xb[k] * (float)qb[k];
        total += acc * scale[r * (cols / 32) + b];
    }
    return total;
}

#ifdef FB_X86
/* How far ahead of the bytes it is decoding a row kernel asks for its weights (_mm_prefetch). The hardware
 * prefetchers stop at every 4 KB page, and a thread that then waits for the next page's first lines reads far
 * below the machine's rate. On a Llama-3.1-8B-shaped 4-layer slice (AMD EPYC, 1 and 2 threads, variants
 * interleaved in one process), 4 KB ahead decoded 1.3-1.5x faster than no prefetch; 8 KB was as fast, 2 KB
 * and 16 KB slower. Past a layer's end the request is for bytes nobody needs or another thread's chunk: a
 * prefetch never faults. */
#define FB_PREFETCH_BYTES 4096

FB_INLINE void prefetch_ahead(const void *at) { _mm_prefetch((const char *)at + FB_PREFETCH_BYTES, _MM_HINT_T0); }

FB_AVX2 FB_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The scales of blocks first .. first + n - 1: one division per run of blocks that share a second-level scale
 * (none for the usual power-of-two blocksize2), not one per block (a 64-bit division per block of 64 weights
 * cost as much as decoding them); within a run, a plain loop the compiler vectorizes (gathers from code2). */
FB_INLINE void block_scales_run(const fb_scales *s, int64_t first, int64_t n, float *out) {
    if (s->absmax) {
        memcpy(out, s->absmax + first, n * sizeof(float));
        return;
    }
    const int64_t b2 = s->blocksize2;
    const int pow2 = (b2 & (b2 - 1)) == 0;  /* the usual 256 */
    const int shift = pow2 ? __builtin_ctzll((unsigned long long)b2) : 0;
    const float offset = s->offset;
    for (int64_t i = 0; i < n;) {
        const int64_t at = first + i, q2 = pow2 ? at >> shift : at / b2, rem = pow2 ? at & (b2 - 1) : at % b2;
        const int64_t len = n - i < b2 - rem ? n - i : b2 - rem;
        const float a2 = s->absmax2[q2];
        const uint8_t *q = s->qabsmax + at;
        float *o = out + i;
        for (int64_t j = 0; j < len; ++j) o[j] = s->code2[q[j]] * a2 + offset;
        i += len;
    }
}

/* A 4-bit row with blocksize % 32 == 0 and cols % blocksize == 0, against xp (x permuted by permute_x). */
FB_AVX2 static float row4_avx2(const fb_dlinear *l, const float *xp, int64_t r, const __m256i planes[4]) {
    const int64_t bs = l->blocksize, nblk = l->cols / bs;
    const uint8_t *p = l->packed + (r * l->cols >> 1);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256 total = _mm256_setzero_ps();
    float scale[256];
    for (int64_t b0 = 0; b0 < nblk; b0 += 256) {
        const int64_t nb = nblk - b0 < 256 ? nblk - b0 : 256;
        block_scales_run(&l->scales, r * nblk + b0, nb, scale);
        for (int64_t b = b0; b < b0 + nb; ++b) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            for (int64_t k = b * bs; k < (b + 1) * bs; k += 32) {
                if ((k & 127) == 0) prefetch_ahead(p + (k >> 1));
                const __m128i bytes = _mm_loadu_si128((const __m128i *)(p + (k >> 1)));
                /* lane 0: high nibbles (elements 0, 2, .., 30); lane 1: low nibbles (1, 3, .., 31) */
                const __m256i idx = _mm256_and_si256(
                    _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_srli_epi16(bytes, 4)), bytes, 1), low4);
                const __m256i c0 = _mm256_shuffle_epi8(planes[0], idx), c1 = _mm256_shuffle_epi8(planes[1], idx);
                const __m256i c2 = _mm256_shuffle_epi8(planes[2], idx), c3 = _mm256_shuffle_epi8(planes[3], idx);
                const __m256i lo01 = _mm256_unpacklo_epi8(c0, c1), hi01 = _mm256_unpackhi_epi8(c0, c1);
                const __m256i lo23 = _mm256_unpacklo_epi8(c2, c3), hi23 = _mm256_unpackhi_epi8(c2, c3);
                const float *xk = xp + k;
                a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)), _mm256_loadu_ps(xk),
                                     a0);
                a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
                                     _mm256_loadu_ps(xk + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
                                     _mm256_loadu_ps(xk + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
                                     _mm256_loadu_ps(xk + 24), a3);
            }
            const __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(scale[b - b0]), total);
        }
    }
    return hsum8(total);
}

/* row4_avx2 with AVX-512: vpermps looks the 16-entry codebook up directly (the index's low 4 bits pick, so the
 * low nibble needs no mask), 32 weights per 16 packed bytes in two lookups. Against xp permuted by permute_x
 * for AVX-512: in each group of 32, the even elements (the high nibbles), then the odd ones. */
FB_AVX512_WIDE static float row4_avx512(const fb_dlinear *l, const float *xp, int64_t r) {
    const int64_t bs = l->blocksize, nblk = l->cols / bs;
    const uint8_t *p = l->packed + (r * l->cols >> 1);
    const __m512 table = _mm512_loadu_ps(l->code);
    __m512 total = _mm512_setzero_ps();
    float scale[256];
    for (int64_t b0 = 0; b0 < nblk; b0 += 256) {
        const int64_t nb = nblk - b0 < 256 ? nblk - b0 : 256;
        block_scales_run(&l->scales, r * nblk + b0, nb, scale);
        for (int64_t b = b0; b < b0 + nb; ++b) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int64_t k = b * bs; k < (b + 1) * bs; k += 32) {
                if ((k & 127) == 0) prefetch_ahead(p + (k >> 1));
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + (k >> 1))));
                const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
                const __m512 odd = _mm512_permutexvar_ps(bytes, table);
                a0 = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp + k), a0);
                a1 = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp + k + 16), a1);
            }
            total = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scale[b - b0]), total);
        }
    }
    return _mm512_reduce_add_ps(total);
}

/* ------------------------------------------------------------------- int8 rows (AVX-512 VNNI, row4_vnni)
 *
 * As llama.cpp's Q4 x Q8 dot products: the layer input is quantized once to int8 per group of 64 (scale
 * max|x|/127, quantize_x), and each weight is the int8 w~ = round(127 * level) of its codebook level. The
 * codebook is a 16-entry table of unsigned bytes u = w~ + 128 (one vpshufb per 64 weights); vpdpbusd sums
 * u * x~ over four bytes per int32 lane, and the +128 is taken back exactly by starting each group's sum at
 * -128 * sum(x~) (made once per input, shared by every row). Per group: the integer sum -> float, times the
 * weight block's scale and the group's input scale d / 127. 64 packed bytes (two groups) per step, against about
 * about twice as many instructions on the float rows. Taken for blocksizes 64, 128, .., 4096 (cols % 64 == 0
 * follows); other layers keep the float rows.
 *
 * Error against the dequantized float matvec, per block of scale s: |s| sum_j (|x_j| |level_j - w~_j/127| +
 * |w~_j/127| |x_j - d x~_j|) <= |s| sum_j (|x_j| / 254 + |w~_j| / 127 * d / 2), d the group's input scale
 * (tests/kernels/test_decode_int8.py checks this bound). */
#define FB_AVX512_VNNI                                                                                      \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,prefer-vector-width=512")))

/* One layer input in the order row4_vnni reads it. */
typedef struct {
    int8_t *q;     /* [n]: within each 128 the even elements, then the odd ones (a last lone 64 likewise) */
    float *scale;  /* [n / 64]: d / 127 of each group of 64 (d = max|x| / 127; the /127 undoes w~'s scale) */
    int32_t *off;  /* [n / 8]: per group, -128 * sum(q) and seven zeros (the start of its int32 lanes) */
} xint8;

/* x [n] (natural order, n % 64 == 0) to int8 per group of 64, as llama.cpp's Q8_0: d = max|x| / 127,
 * q = round-half-even(x * (1 / d)), 0 where d == 0. Laid out for row4_vnni: the high nibbles of its 64 packed
 * bytes are the even elements of 128, the low nibbles the odd ones. */
FB_AVX512_WIDE static void quantize_x(const float *x, int64_t n, const xint8 *o) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int64_t g = 0; g < n / 64; ++g) {
        const float *xg = x + 64 * g;
        __m512 m = _mm512_abs_ps(_mm512_loadu_ps(xg));
        for (int k = 16; k < 64; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
        const float d = _mm512_reduce_max_ps(m) / 127.0f;
        const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        const int64_t base = g / 2 * 128, span = base + 128 <= n ? 128 : 64;
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < 2; ++k) {  /* 32 elements: 16 even, 16 odd */
            const int64_t at = base + (64 * g - base) / 2 + 16 * k;
            const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(xg + 32 * k), id);
            const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(xg + 32 * k + 16), id);
            const __m512i qe = _mm512_cvtps_epi32(_mm512_permutex2var_ps(a, ev, b));
            const __m512i qo = _mm512_cvtps_epi32(_mm512_permutex2var_ps(a, od, b));
            _mm_storeu_si128((__m128i *)(o->q + at), _mm512_cvtsepi32_epi8(qe));
            _mm_storeu_si128((__m128i *)(o->q + at + span / 2), _mm512_cvtsepi32_epi8(qo));
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(qe, qo));
        }
        o->scale[g] = d / 127.0f;
        memset(o->off + 8 * g, 0, 8 * sizeof(int32_t));
        o->off[8 * g] = -128 * _mm512_reduce_add_epi32(sum);
    }
}

/* The int32 sums of two groups (lanes 0-7, 8-15) of 64 weights from the 64 packed bytes at pb, against x~ at
 * xq (the even elements of the 128, then the odd ones). */
FB_AVX512_VNNI FB_INLINE __m512i two_groups(const uint8_t *pb, const int8_t *xq, const int32_t *off, __m512i lut) {
    const __m512i low4 = _mm512_set1_epi8(0x0f), bytes = _mm512_loadu_si512(pb);
    const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4));
    const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(bytes, low4));
    const __m512i acc = _mm512_dpbusd_epi32(_mm512_loadu_si512(off), hi, _mm512_loadu_si512(xq));
    return _mm512_dpbusd_epi32(acc, lo, _mm512_loadu_si512(xq + 64));
}

/* The int32 sums of one lone group of 64 weights (32 packed bytes; lanes 0-7, the others 0). */
FB_AVX512_VNNI FB_INLINE __m512i lone_group(const uint8_t *pb, const int8_t *xq, const int32_t *off, __m512i lut) {
    const __mmask64 half = 0xffffffffu;
    const __m512i low4 = _mm512_set1_epi8(0x0f), bytes = _mm512_maskz_loadu_epi8(half, pb);
    const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4));
    const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(bytes, low4));
    __m512i acc = _mm512_maskz_loadu_epi32(0x00ff, off);
    acc = _mm512_dpbusd_epi32(acc, hi, _mm512_maskz_loadu_epi8(half, xq));
    return _mm512_dpbusd_epi32(acc, lo, _mm512_maskz_loadu_epi8(half, xq + 32));
}

/* Two groups' sums to float, times their scales cs[0] (lanes 0-7) and cs[1] (8-15), added to t. */
FB_AVX512_VNNI FB_INLINE __m512 scaled(__m512i acc, const float *cs, __m512 t) {
    const __m512 sc = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(cs[0]), _mm512_set1_ps(cs[1]));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sc, t);
}

/* A 4-bit row (blocksize a power of two from 64 to 4096; cols % blocksize == 0) against x8 (quantize_x of the
 * input); lut8: the codebook's unsigned bytes round(127 * level) + 128. No divisions: a short row (576 weights)
 * is only five steps, which a few 64-bit divisions per row would outweigh. */
FB_AVX512_VNNI static float row4_vnni(const fb_dlinear *l, const xint8 *x8, const uint8_t lut8[16], int64_t r) {
    const int shift = __builtin_ctzll((unsigned long long)l->blocksize) - 6;  /* groups per block: 1 << shift */
    const int64_t ng = l->cols >> 6;
    const uint8_t *p = l->packed + (r * l->cols >> 1);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)lut8));
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
    float ws[256], cs[256];
    for (int64_t g0 = 0; g0 < ng; g0 += 256) {  /* runs of 256 groups: whole blocks, an even count */
        const int64_t n = ng - g0 < 256 ? ng - g0 : 256;
        block_scales_run(&l->scales, (r * ng + g0) >> shift, n >> shift, ws);
        for (int64_t i = 0; i < n; ++i) cs[i] = ws[i >> shift] * x8->scale[g0 + i];
        const uint8_t *pb = p + 32 * g0;
        const int8_t *xq = x8->q + 64 * g0;
        const int32_t *off = x8->off + 8 * g0;
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
            prefetch_ahead(pb + 32 * i);
            prefetch_ahead(pb + 32 * i + 64);
            t0 = scaled(two_groups(pb + 32 * i, xq + 64 * i, off + 8 * i, lut), cs + i, t0);
            t1 = scaled(two_groups(pb + 32 * i + 64, xq + 64 * i + 128, off + 8 * i + 16, lut), cs + i + 2, t1);
        }
        if (i + 2 <= n) t0 = scaled(two_groups(pb + 32 * i, xq + 64 * i, off + 8 * i, lut), cs + i, t0), i += 2;
        if (i < n)  /* the row's last group, alone in its 128 (the layout of quantize_x) */
            t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lone_group(pb + 32 * i, xq + 64 * i, off + 8 * i, lut)),
                                 _mm512_set1_ps(cs[i]), t1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
}

FB_AVX2 static float row_dense_avx2(const fb_dlinear *l, const float *x, int64_t r) {
    float s;
    FB_DENSE_ROW_BODY(l, x, r, s);
    return s;
}

FB_AVX2 static float row_screen_avx2(const int8_t *q, const float *scale, const float *x, int64_t cols, int64_t r) {
    const int64_t nblk = cols / 32;
    const int8_t *qr = q + r * cols;
    __m256 total = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b) {
        const int8_t *qb = qr + b * 32;
        const float *xb = x + b * 32;
        if ((b & 1) == 0) prefetch_ahead(qb);
        __m256 acc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qb))),
                                   _mm256_loadu_ps(xb));
        for (int j = 8; j < 32; j += 8) {
            const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + j))));
            acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + j), acc);
        }
        total = _mm256_fmadd_ps(acc, _mm256_set1_ps(scale[r * nblk + b]), total);
    }
    return hsum8(total);
}
#endif

/* ------------------------------------------------------------------------------------------ the step */

typedef struct {
    const fb_dmodel *m;
    int vec;                /* AVX2 code in use */
    int wide;               /* AVX-512 code in use for the 4-bit rows (row4_avx512, permute_x's layout) */
    int int8;               /* FB_ROWS_*: which layers take the int8 rows (row4_vnni; fast8) */
#ifdef FB_X86
    __m256i planes[4];      /* the 4-bit codebook's four byte planes, each repeated in both 128-bit lanes */
    uint8_t lut8[16];       /* the codebook as row4_vnni's unsigned bytes */
#endif
} step_ctx;

/* A thread's own copies of the input of the phase at hand: normed (xn), permuted for the float rows (xp), and
 * quantized for the int8 rows (x8; made when c->int8). */
typedef struct {
    float *xn, *xp;
#ifdef FB_X86
    xint8 x8;
#endif
} mine;

/* Whether row4_avx2 takes this layer. */
FB_INLINE int fast4(const step_ctx *c, const fb_dlinear *l) {
    return c->vec && l->blocksize % 32 == 0 && l->cols % l->blocksize == 0 && l->code == c->m->code4;
}

/* Whether the int8 rows are on for layers of ``cols`` columns (the mode of fb_set_decode_rows, in c->int8). */
FB_INLINE int int8_cols(const step_ctx *c, int64_t cols) {
    return c->int8 == FB_ROWS_INT8 || (c->int8 == FB_ROWS_AUTO && cols >= FB_INT8_AUTO_COLS);
}

/* Whether row4_vnni takes this layer: blocksize 64, 128, .., 4096 (cols % 64 == 0 follows from fast4). */
FB_INLINE int fast8(const step_ctx *c, const fb_dlinear *l) {
    const int64_t bs = l->blocksize;
    return int8_cols(c, l->cols) && fast4(c, l) && bs >= 64 && bs <= 4096 && (bs & (bs - 1)) == 0;
}

/* The row kernel fb_decode_step runs for a layer: 0 plain C or dense, 1 the float 4-bit vector rows, 2 int8. */
static int path_of(const step_ctx *c, const fb_dlinear *l) {
    if (!l->packed || !fast4(c, l)) return 0;
    return fast8(c, l) ? 2 : 1;
}

/* Row r of the layer against x (natural order) / t's copies of it (t->xp, t->x8), bias included. */
static float row_of(const step_ctx *c, const fb_dlinear *l, const float *x, const mine *t, int64_t r) {
    float v;
#ifdef FB_X86
    if (l->packed && fast8(c, l)) v = row4_vnni(l, &t->x8, c->lut8, r);
    else if (l->packed && fast4(c, l)) v = c->wide ? row4_avx512(l, t->xp, r) : row4_avx2(l, t->xp, r, c->planes);
    else if (l->packed) v = row4_general(l, x, r);
    else v = c->vec ? row_dense_avx2(l, x, r) : row_dense_scalar(l, x, r);
#else
    (void)t;
    v = l->packed ? row4_general(l, x, r) : row_dense_scalar(l, x, r);
#endif
    return l->bias ? v + l->bias[r] : v;
}

/* The order the 4-bit row kernels decode weights in: within each group of 8, the even elements, then the odd
 * ones (row4_avx2); with AVX-512, within each group of 32 (row4_avx512). The tail stays in order. */
static void permute_x(const step_ctx *c, const float *x, float *xp, int64_t n) {
    const int group = c->wide ? 32 : 8, half = group / 2;
    int64_t g = 0;
    for (; g + group <= n; g += group)
        for (int i = 0; i < half; ++i) {
            xp[g + i] = x[g + 2 * i];
            xp[g + half + i] = x[g + 2 * i + 1];
        }
    for (; g < n; ++g) xp[g] = x[g];
}

/* Llama's RMSNorm: w * (x * rsqrt(mean(x^2) + eps)), the mean summed in double. */
static void rms_norm_row(const float *x, const float *w, float eps, float *out, int64_t n) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

/* HF's apply_rotary_pos_emb on one head: v * cos + rotate_half(v) * sin. */
static void rope(float *v, const float *cs, const float *sn, int64_t d) {
    const int64_t h = d / 2;
    float tmp[1024];
    for (int64_t i = 0; i < d; ++i) tmp[i] = v[i];
    for (int64_t i = 0; i < h; ++i) v[i] = tmp[i] * cs[i] + -tmp[i + h] * sn[i];
    for (int64_t i = h; i < d; ++i) v[i] = tmp[i] * cs[i] + tmp[i - h] * sn[i];
}

/* Softmax attention of one query head over positions 0..pos of its K/V head; scores: pos + 1 floats. */
#define FB_ATTEND_ARGS                                                                                      \
    const float *q, const float *K, const float *V, int64_t d, int64_t pos, float scale, float *scores, float *out
#define FB_ATTEND_PASS q, K, V, d, pos, scale, scores, out
FB_INLINE void attend_body(FB_ATTEND_ARGS) {
    float mx = -INFINITY;
    for (int64_t t = 0; t <= pos; ++t) {
        const float *k = K + t * d;
        float s = 0.0f;
        _Pragma("omp simd reduction(+:s)") for (int64_t i = 0; i < d; ++i) s += q[i] * k[i];
        scores[t] = s * scale;
        mx = scores[t] > mx ? scores[t] : mx;
    }
    float sum = 0.0f;
    for (int64_t t = 0; t <= pos; ++t) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
    for (int64_t t = 0; t <= pos; ++t) {
        const float p = scores[t] / sum;
        const float *v = V + t * d;
        _Pragma("omp simd") for (int64_t i = 0; i < d; ++i) out[i] += p * v[i];
    }
}
FB_ISA_VARIANTS(attend, attend_body, FB_ATTEND_ARGS, FB_ATTEND_PASS, FB_AVX512)

/* Scratch layout (floats): x [hidden], q, att [heads * d], k, v [kv * d], h [intermediate],
 * scores [heads * max_len], rows [vocab]; then per thread (fb_decode_step allocates them) xn [hidden] and
 * xp [max(hidden, heads * d, intermediate)]. */
int64_t fb_decode_work_floats(const fb_dmodel *m) {
    const int64_t hd = m->n_heads * m->head_dim, kvd = m->n_kv_heads * m->head_dim;
    return m->hidden + 2 * hd + 2 * kvd + m->intermediate + m->n_heads * m->max_len + m->vocab + 64;
}

typedef struct {
    float *x, *q, *att, *k, *v, *h, *scores, *rows;
} scratch;

static scratch carve(const fb_dmodel *m, float *w) {
    const int64_t hd = m->n_heads * m->head_dim, kvd = m->n_kv_heads * m->head_dim;
    scratch s;
    s.x = w;
    s.q = s.x + m->hidden;
    s.att = s.q + hd;
    s.k = s.att + hd;
    s.v = s.k + kvd;
    s.h = s.v + kvd;
    s.scores = s.h + m->intermediate;
    s.rows = s.scores + m->n_heads * m->max_len;
    return s;
}

/*
 * Phases instead of barriers. Each dependent step of the token (Q/K/V rows, K/V into the cache, query heads,
 * output rows, gate/up rows, down rows, head rows) is a phase: its work is cut into chunks that threads claim
 * from a shared counter, and a phase is over when all its chunks are done -- not when every thread has
 * arrived. On a machine where other processes hold the cores, a thread that is descheduled while holding no
 * chunk delays nothing (a barrier would wait for it, ~ms each, ~180 times per token); when it runs again it
 * finds the phases it missed finished and skips them. Every row is still computed by one thread with the same
 * code, so results do not depend on which thread takes it.
 */
typedef struct {
    int64_t next, done;
} phase;

FB_INLINE int64_t claim(phase *p) { return __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED); }

FB_INLINE void finish(phase *p) { __atomic_fetch_add(&p->done, 1, __ATOMIC_RELEASE); }

static void wait_all(phase *p, int64_t n) {
    int spins = 0;
    while (__atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < n) {
        if (++spins < 4000) {
#ifdef FB_X86
            _mm_pause();
#endif
        } else {
            spins = 0;
            sched_yield();  /* let a descheduled thread that holds a chunk run */
        }
    }
}

typedef struct {
    const step_ctx *c;
    const scratch *s;
    const mine *t;
    phase *ph;  /* the next phase of this token */
    int64_t pos;
} walk;

/* Rows per chunk of a phase of ``rows`` rows of ``cols`` weights: about 512K weights (256 KB of 4-bit codes: a
 * thread's first prefetch distance of each chunk is read without prefetching, so longer runs read faster --
 * on the 8B slice above 512K decoded ~5 % faster than 128K, 1M no faster within the noise), at most a
 * sixteenth of the phase (so that two or more threads share even a small model's phases evenly), and a
 * multiple of 16 rows: one chunk's float32 outputs fill whole 64-byte cache lines, so two threads never write
 * into the same line. */
FB_INLINE int64_t chunk_rows(int64_t cols, int64_t rows) {
    const int64_t weights = cols * rows / 16 < 524288 ? cols * rows / 16 : 524288;
    const int64_t r = weights / (cols > 0 ? cols : 1) / 16 * 16;
    return r < 16 ? 16 : r;
}

typedef void (*prepare_fn)(const walk *w, const void *arg);

/* One phase over the stacked rows of up to three layers (NULL ends): out[r] (+)= row r, or with gated,
 * out0[r] = silu(row r of layer 0) * row r of layer 1. ``prepare`` runs before a thread's first chunk. */
static void rows_phase(walk *w, const fb_dlinear *const ls[3], float *const outs[3], const float *const *x,
                       int add, int gated, prepare_fn prepare, const void *arg) {
    int64_t n = 0;
    for (int j = 0; j < (gated ? 1 : 3) && ls[j]; ++j) n += ls[j]->rows;
    const int64_t per = chunk_rows(ls[0]->cols, n), chunks = (n + per - 1) / per;
    phase *p = w->ph++;
    int prepared = 0;
    for (int64_t ch = claim(p); ch < chunks; ch = claim(p)) {
        if (!prepared) prepare(w, arg), prepared = 1;
        const int64_t lo = ch * per, hi = lo + per < n ? lo + per : n;
        int64_t base = 0;
        for (int j = 0; j < 3 && ls[j] && base < hi; base += ls[j]->rows, ++j) {
            const int64_t a = lo > base ? lo - base : 0, b = hi - base < ls[j]->rows ? hi - base : ls[j]->rows;
            for (int64_t r = a; r < b; ++r) {
                const float v = row_of(w->c, ls[j], *x, w->t, r);
                if (gated) {
                    const float u = row_of(w->c, ls[1], *x, w->t, r);
                    outs[0][r] = v / (1.0f + expf(-v)) * u;  /* silu(g) * u, as torch: g / (1 + exp(-g)) */
                } else {
                    outs[j][r] = add ? outs[j][r] + v : v;
                }
            }
            if (gated) break;
        }
        finish(p);
    }
    wait_all(p, chunks);
}

/* A thread's copies of the input x [n] that the row kernels read (each thread makes its own when it first
 * takes a chunk of a phase: the norm and copies of a few thousand values are cheaper than a barrier). */
static void copies_of(const step_ctx *c, const float *x, const mine *t, int64_t n) {
    permute_x(c, x, t->xp, n);
#ifdef FB_X86
    if (int8_cols(c, n) && n % 64 == 0) quantize_x(x, n, &t->x8);
#endif
}

static void prep_norm(const walk *w, const void *weight) {
    rms_norm_row(w->s->x, (const float *)weight, w->c->m->eps, w->t->xn, w->c->m->hidden);
    copies_of(w->c, w->t->xn, w->t, w->c->m->hidden);
}

static void prep_att(const walk *w, const void *unused) {
    (void)unused;
    copies_of(w->c, w->s->att, w->t, w->c->m->n_heads * w->c->m->head_dim);
}

static void prep_h(const walk *w, const void *unused) {
    (void)unused;
    copies_of(w->c, w->s->h, w->t, w->c->m->intermediate);
}

/* Attention: K heads normed (Qwen3), rotated and written with V into the cache at pos (a phase); then each
 * query head normed, rotated and attended (a phase). */
static void attention(walk *w, const fb_dlayer *L) {
    const fb_dmodel *m = w->c->m;
    const scratch *s = w->s;
    const int64_t d = m->head_dim, group = m->n_heads / m->n_kv_heads, pos = w->pos;
    const float *cs = m->rope_cos + pos * d, *sn = m->rope_sin + pos * d;
    phase *p = w->ph++;
    for (int64_t h = claim(p); h < m->n_kv_heads; h = claim(p)) {
        float *kh = s->k + h * d;
        if (L->k_norm) rms_norm_row(kh, L->k_norm, m->eps, kh, d);
        rope(kh, cs, sn, d);
        memcpy(L->k_cache + (h * m->max_len + pos) * d, kh, d * sizeof(float));
        memcpy(L->v_cache + (h * m->max_len + pos) * d, s->v + h * d, d * sizeof(float));
        finish(p);
    }
    wait_all(p, m->n_kv_heads);
    __typeof__(&attend_scalar) const run = w->c->vec ? FB_PICK(attend) : attend_scalar;
    p = w->ph++;
    for (int64_t h = claim(p); h < m->n_heads; h = claim(p)) {
        float *qh = s->q + h * d;
        if (L->q_norm) rms_norm_row(qh, L->q_norm, m->eps, qh, d);
        rope(qh, cs, sn, d);
        const int64_t kvh = h / group;
        run(qh, L->k_cache + kvh * m->max_len * d, L->v_cache + kvh * m->max_len * d, d, pos, m->attn_scale,
            s->scores + h * m->max_len, s->att + h * d);
        finish(p);
    }
    wait_all(p, m->n_heads);
}

/* Phases of one transformer block, and of the whole token. */
#define FB_PHASES_PER_LAYER 6

static void layer_step(walk *w, const fb_dlayer *L) {
    const scratch *s = w->s;
    const float *xn = w->t->xn;
    const fb_dlinear *qkv[3] = {&L->q, &L->k, &L->v}, *o[3] = {&L->o, NULL, NULL};
    const fb_dlinear *gu[3] = {&L->gate, &L->up, NULL}, *down[3] = {&L->down, NULL, NULL};
    float *const qkv_out[3] = {s->q, s->k, s->v}, *const x_out[3] = {s->x, NULL, NULL};
    float *const h_out[3] = {s->h, NULL, NULL};
    const float *att = s->att, *h = s->h;
    rows_phase(w, qkv, qkv_out, &xn, 0, 0, prep_norm, L->attn_norm);
    attention(w, L);
    rows_phase(w, o, x_out, &att, 1, 0, prep_att, NULL);
    rows_phase(w, gu, h_out, &xn, 0, 1, prep_norm, L->mlp_norm);
    rows_phase(w, down, x_out, &h, 1, 0, prep_h, NULL);
}

/* The screened argmax of the head (see the top of this file); one thread, after the approximations. */
static int64_t screened_argmax(const step_ctx *c, const scratch *s, const mine *t) {
    const fb_dmodel *m = c->m;
    double nx2 = 0.0;
    for (int64_t i = 0; i < m->hidden; ++i) nx2 += (double)t->xn[i] * t->xn[i];
    const float nx = (float)sqrt(nx2) * (1.0f + 1e-6f);
    float floor_ = -INFINITY;
    for (int64_t r = 0; r < m->vocab; ++r) {
        const float lower = s->rows[r] - nx * m->screen_err[r];
        floor_ = lower > floor_ ? lower : floor_;
    }
    int64_t best = -1;
    float best_v = -INFINITY;
    for (int64_t r = 0; r < m->vocab; ++r) {
        if (s->rows[r] + nx * m->screen_err[r] < floor_) continue;
        const float v = row_of(c, &m->head, t->xn, t, r);
        if (best < 0 || v > best_v) best = r, best_v = v;
    }
    return best;
}

/* The head's rows (exact logits), or the int8 screen's approximations into s->rows. */
static void head_phase(walk *w, float *logits, int screen) {
    const fb_dmodel *m = w->c->m;
    const int64_t per = chunk_rows(m->hidden, m->vocab), chunks = (m->vocab + per - 1) / per;
    phase *p = w->ph++;
    int prepared = 0;
    for (int64_t ch = claim(p); ch < chunks; ch = claim(p)) {
        if (!prepared) prep_norm(w, m->final_norm), prepared = 1;
        const int64_t hi = (ch + 1) * per < m->vocab ? (ch + 1) * per : m->vocab;
        for (int64_t r = ch * per; r < hi; ++r) {
#ifdef FB_X86
            if (screen)
                w->s->rows[r] = w->c->vec ? row_screen_avx2(m->screen_q, m->screen_scale, w->t->xn, m->hidden, r)
                                          : row_screen_scalar(m->screen_q, m->screen_scale, w->t->xn, m->hidden, r);
#else
            if (screen) w->s->rows[r] = row_screen_scalar(m->screen_q, m->screen_scale, w->t->xn, m->hidden, r);
#endif
            else logits[r] = row_of(w->c, &m->head, w->t->xn, w->t, r);
        }
        finish(p);
    }
    wait_all(p, chunks);
}

/* Which 4-bit layers the int8 rows take where the CPU has them (fb_set_decode_rows; FB_ROWS_*). */
static int int8_mode = FB_ROWS_AUTO;

/* Whether row4_vnni can run: AVX-512 in use (fb_isa) and a CPU with AVX512_VNNI. */
static int int8_possible(void) {
#ifdef FB_X86
    __builtin_cpu_init();
    return fb_isa() >= FB_ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* Set the mode (FB_ROWS_FLOAT, _INT8 or _AUTO; another value changes nothing); returns the mode in effect. */
int fb_set_decode_rows(int mode) {
    if (mode == FB_ROWS_FLOAT || mode == FB_ROWS_INT8 || mode == FB_ROWS_AUTO) int8_mode = mode;
    return int8_possible() ? int8_mode : FB_ROWS_FLOAT;
}

/* row4_vnni's unsigned bytes of the codebook and c->int8 = the mode in effect, when every level is within
 * [-1, 1] (as NF4's, FP4's and INT4's); else c->int8 = FB_ROWS_FLOAT. */
static void make_lut8(step_ctx *c) {
    c->int8 = c->m->code4 && int8_possible() ? int8_mode : FB_ROWS_FLOAT;
#ifdef FB_X86
    for (int j = 0; j < 16 && c->int8; ++j) {
        const float v = c->m->code4[j];
        if (!(fabsf(v) <= 1.0f)) c->int8 = FB_ROWS_FLOAT;
        else c->lut8[j] = (uint8_t)(lrintf(127.0f * v) + 128);
    }
#endif
}

/* The byte planes of m->code4, the codebook of the layers row4_avx2 takes (fast4), and make_lut8. */
static void make_planes(step_ctx *c) {
    make_lut8(c);
#ifdef FB_X86
    c->vec = fb_isa() >= FB_ISA_AVX2;
    c->wide = fb_isa() >= FB_ISA_AVX512;
    if (!c->vec || !c->m->code4) return;
    uint8_t bytes[4][32];
    for (int j = 0; j < 16; ++j) {
        uint32_t u;
        memcpy(&u, c->m->code4 + j, 4);
        for (int b = 0; b < 4; ++b) bytes[b][j] = bytes[b][j + 16] = (uint8_t)(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b) memcpy(&c->planes[b], bytes[b], 32);
#else
    c->vec = c->wide = 0;
#endif
}

/* The longest layer input. */
FB_INLINE int64_t widest(const fb_dmodel *m) {
    const int64_t wide = m->hidden > m->intermediate ? m->hidden : m->intermediate;
    return wide > m->n_heads * m->head_dim ? wide : m->n_heads * m->head_dim;
}

/* Floats of one thread's copies (carve_mine): xn, xp, and x8's scales, offsets and int8 values. */
FB_INLINE int64_t own_floats(const fb_dmodel *m) {
    const int64_t wide = widest(m);
    return (m->hidden + wide + (wide / 64 + 16) + (wide / 8 + 16) + (wide / 4 + 16) + 15) / 16 * 16;
}

static mine carve_mine(const fb_dmodel *m, float *base) {
    mine t;
    t.xn = base;
    t.xp = base + m->hidden;
#ifdef FB_X86
    const int64_t wide = widest(m);
    t.x8.scale = t.xp + wide;
    t.x8.off = (int32_t *)(t.x8.scale + wide / 64 + 16);
    t.x8.q = (int8_t *)(t.x8.off + wide / 8 + 16);
#endif
    return t;
}

/*
 * Run token ``token`` at position ``pos`` (0-based; the caches hold positions < pos). Writes the float32
 * logits [vocab] when ``logits`` is not NULL, and the greedy token into *next when ``next`` is not NULL (from
 * the logits, else through the int8 screen when the model has one, else from the exact head in scratch).
 */
int fb_decode_step(const fb_dmodel *m, int64_t token, int64_t pos, float *logits, int64_t *next, float *work,
                   int64_t work_floats, int nthreads) {
    if (pos < 0 || pos >= m->max_len || token < 0 || token >= m->embed_rows || work_floats < fb_decode_work_floats(m)
        || m->head_dim > 1024 || m->n_kv_heads < 1 || m->n_heads % m->n_kv_heads)
        return FB_ERR_BLOCKSIZE;
    step_ctx c;
    c.m = m;
    make_planes(&c);
    const scratch s = carve(m, work);
    const int screen = logits == NULL && next != NULL && m->screen_q != NULL;
    float *out = logits ? logits : s.rows;
    const int nt = nthreads > 0 ? nthreads : 1;
    const int64_t per = own_floats(m), nphases = m->n_layers * FB_PHASES_PER_LAYER + 1;
    float *own = malloc((size_t)((nt + 1) * per) * sizeof(float));
    phase *phases = calloc((size_t)nphases, sizeof(phase));
    if (!own || !phases) {
        free(own);
        free(phases);
        return FB_ERR_BLOCKSIZE;
    }
    for (int64_t i = 0; i < m->hidden; ++i) s.x[i] = dense_at(m->embed, m->embed_dtype, token * m->hidden + i);
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        float *base = own + (1 + omp_get_thread_num()) * per;
#else
        float *base = own + per;
#endif
        const mine t = carve_mine(m, base);
        walk w = {&c, &s, &t, phases, pos};
        for (int64_t l = 0; l < m->n_layers; ++l) layer_step(&w, &m->layers[l]);
        head_phase(&w, out, screen);
    }
    int64_t best = 0;
    if (next != NULL && screen) {
        const mine t = carve_mine(m, own);
        walk w = {&c, &s, &t, NULL, pos};
        prep_norm(&w, m->final_norm);
        best = screened_argmax(&c, &s, &t);
    } else if (next != NULL) {
        for (int64_t r = 1; r < m->vocab; ++r) best = out[r] > out[best] ? r : best;
    }
    if (next != NULL) *next = best;
    free(own);
    free(phases);
    return FB_OK;
}

/* Every row of one layer against x [l->cols], computed as fb_decode_step computes them (code4: the codebook
 * that the step's vector rows take, or NULL), into out [l->rows]; *path: the row kernel taken (path_of).
 * For tests, which check each path against a reference. */
int fb_decode_rows(const fb_dlinear *l, const float *code4, const float *x, float *out, int *path) {
    fb_dmodel m;
    memset(&m, 0, sizeof m);
    m.hidden = l->cols;
    m.code4 = code4;
    step_ctx c;
    c.m = &m;
    make_planes(&c);
    float *own = malloc((size_t)own_floats(&m) * sizeof(float));
    if (!own) return FB_ERR_BLOCKSIZE;
    const mine t = carve_mine(&m, own);
    copies_of(&c, x, &t, l->cols);
    for (int64_t r = 0; r < l->rows; ++r) out[r] = row_of(&c, l, x, &t, r);
    *path = path_of(&c, l);
    free(own);
    return FB_OK;
}
