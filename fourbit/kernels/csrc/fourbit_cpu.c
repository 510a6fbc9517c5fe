/*
 * fourbit CPU kernels: blockwise 4-bit quantization, dequantization and a fused 4-bit matrix-vector product.
 *
 * Written by hand because no maintained library offers these three on the CPU with bitsandbytes' exact
 * byte layout: PyTorch needs several full passes (and int64 index tensors) for each, and bitsandbytes' own
 * CPU kernels are slower than memory bandwidth allows. Built on first use by fourbit/kernels/cpu.py with the
 * system C compiler (-O3 -march=native -fopenmp -ffp-contract=off) and called through ctypes.
 *
 * Results are bit-identical to fourbit/kernels/reference.py (the tests check this), except the matrix-vector
 * product, whose float32 sums run in another order than BLAS.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { FB_F32 = 0, FB_F16 = 1, FB_BF16 = 2 };

/*
 * Block scales: plain float32 absmax, or double-quantized (QLoRA section 3): 8-bit codes of absmax - offset
 * with their own float32 absmax per blocksize2 codes. absmax = code2[q] * absmax2[b / blocksize2] + offset,
 * in float32 and in that order, as the PyTorch reference computes it.
 */
typedef struct {
    const float *absmax;    /* plain scales, or NULL when nested */
    const uint8_t *qabsmax; /* nested codes */
    const float *code2;     /* 256-entry code of the nested quantization */
    const float *absmax2;   /* nested block scales */
    int64_t blocksize2;
    float offset;
} fb_scales;

static inline float block_scale(const fb_scales *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    const float v = s->code2[s->qabsmax[b]] * s->absmax2[b / s->blocksize2];
    return v + s->offset;
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_one(const void *x, int dtype, int64_t i) {
    if (dtype == FB_F32) return ((const float *)x)[i];
    if (dtype == FB_BF16) return bf16_to_f32(((const uint16_t *)x)[i]);
    return (float)((const _Float16 *)x)[i];
}

static inline void store_one(void *out, int dtype, int64_t i, float v) {
    if (dtype == FB_F32) ((float *)out)[i] = v;
    else if (dtype == FB_BF16) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else ((_Float16 *)out)[i] = (_Float16)v;
}

/*
 * Quantize n values to 4-bit codes in blocks. Whole blocks are scaled by the reciprocal of their absmax
 * (clamped at 1e-38), the last partial block by division; values are clamped to [-1, 1] and mapped to the
 * nearest code through the 15 sorted midpoints. Two codes per byte, the first in the high nibble.
 * A block holding NaN or Inf gets absmax NaN, which the caller reports.
 */
void fb_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                      const uint8_t *order, uint8_t *packed, float *absmax, int nthreads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int64_t full_blocks = n / blocksize;
    float b[15];
    for (int j = 0; j < 15; ++j) b[j] = bounds[j];
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t start = blk * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        const int64_t len = end - start;
        float vals[4096 + 1];
        uint8_t q[4096 + 1];
        float m = 0.0f;
        int bad = 0;
        for (int64_t i = 0; i < len; ++i) {
            const float v = load_one(x, dtype, start + i);
            vals[i] = v;
            const float a = fabsf(v);
            bad |= !(a <= FLT_MAX);
            m = a > m ? a : m;
        }
        const int whole = blk < full_blocks;
        const float clamped = m < 1e-38f ? 1e-38f : m;
        absmax[blk] = bad ? NAN : (whole ? m : clamped);
        if (whole) {
            const float recip = 1.0f / clamped;
            for (int64_t i = 0; i < len; ++i) vals[i] *= recip;
        } else {
            for (int64_t i = 0; i < len; ++i) vals[i] /= clamped;
        }
        vals[len] = 0.0f;  /* the pad nibble of an odd-sized tensor encodes 0 */
        const int64_t padded = len + (len & 1);
        /* torch.bucketize(scaled, bounds): the number of midpoints strictly below the value (vectorizes) */
        for (int64_t i = 0; i < padded; ++i) {
            float s = vals[i];
            s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
            int c = 0;
            for (int j = 0; j < 15; ++j) c += b[j] < s;
            q[i] = (uint8_t)c;
        }
        uint8_t *dst = packed + (start >> 1);
        for (int64_t i = 0; i < padded; i += 2) dst[i >> 1] = (uint8_t)((order[q[i]] << 4) | order[q[i + 1]]);
    }
}

#ifdef __AVX2__
/* 16 code values -> the 16 floats for the 16 nibbles of 8 packed bytes, in element order. */
static inline void decode16(const uint8_t *p, __m256 tab_lo, __m256 tab_hi, __m256 *w0, __m256 *w1) {
    const __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i idx8 = _mm_unpacklo_epi8(hi, lo);  /* e0 e1 ... e15 */
    const __m256i seven = _mm256_set1_epi32(7);
    __m256i i0 = _mm256_cvtepu8_epi32(idx8);
    __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(idx8, 8));
    __m256 a0 = _mm256_permutevar8x32_ps(tab_lo, i0), b0 = _mm256_permutevar8x32_ps(tab_hi, i0);
    __m256 a1 = _mm256_permutevar8x32_ps(tab_lo, i1), b1 = _mm256_permutevar8x32_ps(tab_hi, i1);
    *w0 = _mm256_blendv_ps(a0, b0, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i0, seven)));
    *w1 = _mm256_blendv_ps(a1, b1, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i1, seven)));
}

/* Non-temporal stores for outputs far larger than the caches: they skip the read-for-ownership. */
static inline void store8(void *out, int dtype, int64_t i, __m256 v, int stream) {
    if (dtype == FB_F32) {
        float *dst = (float *)out + i;
        if (stream && ((uintptr_t)dst & 31) == 0) _mm256_stream_ps(dst, v);
        else _mm256_storeu_ps(dst, v);
    } else if (dtype == FB_F16) {
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
        uint16_t *dst = (uint16_t *)out + i;
        if (stream && ((uintptr_t)dst & 15) == 0) _mm_stream_si128((__m128i *)dst, h);
        else _mm_storeu_si128((__m128i *)dst, h);
    } else {
        /* bf16 round-to-nearest-even on 8 lanes (inputs are finite products of finite values) */
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
        u = _mm256_srli_epi32(u, 16);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        uint16_t *dst = (uint16_t *)out + i;
        if (stream && ((uintptr_t)dst & 15) == 0) _mm_stream_si128((__m128i *)dst, packed);
        else _mm_storeu_si128((__m128i *)dst, packed);
    }
}
#endif

/* out[i] = code[q_i] * absmax[block(i)] in float32, converted to the output dtype. */
void fb_dequantize_4bit(const uint8_t *packed, const fb_scales *scales, const float *code, int64_t n,
                        int64_t blocksize, void *out, int dtype, int nthreads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int stream = n * (dtype == FB_F32 ? 4 : 2) > (int64_t)32 << 20;  /* > 32 MiB of output */
    (void)stream;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        const float s = block_scale(scales, b);
        float tab[16];
        for (int j = 0; j < 16; ++j) tab[j] = code[j] * s;
        int64_t i = start;
#ifdef __AVX2__
        const __m256 tab_lo = _mm256_loadu_ps(tab), tab_hi = _mm256_loadu_ps(tab + 8);
        for (; i + 16 <= end; i += 16) {
            __m256 w0, w1;
            decode16(packed + (i >> 1), tab_lo, tab_hi, &w0, &w1);
            store8(out, dtype, i, w0, stream);
            store8(out, dtype, i + 8, w1, stream);
        }
#endif
        for (; i < end; ++i) {
            const uint8_t byte = packed[i >> 1];
            const uint8_t q = (i & 1) ? (byte & 0x0f) : (byte >> 4);
            store_one(out, dtype, i, tab[q]);
        }
    }
#ifdef __AVX2__
    _mm_sfence();
#endif
}

/*
 * out[m, r] = sum_k x[m, k] * code[q[r, k]] * absmax[block(r, k)] for a weight W [rows, cols] stored 4-bit
 * row-major, with cols % blocksize == 0 so that no block spans two rows. x is float32 [m_rows, cols];
 * out is float32 [m_rows, rows]. Each weight row is decoded once per 8 input rows (decoding, small batches).
 */
void fb_gemv_4bit(const float *x, const uint8_t *packed, const fb_scales *scales, const float *code,
                  int64_t m_rows, int64_t rows, int64_t cols, int64_t blocksize, float *out, int nthreads) {
    const int64_t blocks_per_row = cols / blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *wrow = packed + (r * cols >> 1);
        const int64_t first_block = r * blocks_per_row;
#ifdef __AVX2__
        if (blocksize % 16 == 0) {
            const __m256 tab_lo = _mm256_loadu_ps(code), tab_hi = _mm256_loadu_ps(code + 8);
            /* up to 8 input rows share each decoded weight vector (8 accumulators stay in registers) */
            for (int64_t m0 = 0; m0 < m_rows; m0 += 8) {
                const int mc = m_rows - m0 < 8 ? (int)(m_rows - m0) : 8;
                const float *xb = x + m0 * cols;
                __m256 total[8];
                for (int m = 0; m < mc; ++m) total[m] = _mm256_setzero_ps();
                for (int64_t blk = 0; blk < blocks_per_row; ++blk) {
                    __m256 acc[8];
                    for (int m = 0; m < mc; ++m) acc[m] = _mm256_setzero_ps();
                    const int64_t k0 = blk * blocksize;
                    for (int64_t k = k0; k < k0 + blocksize; k += 16) {
                        __m256 w0, w1;
                        decode16(wrow + (k >> 1), tab_lo, tab_hi, &w0, &w1);
                        for (int m = 0; m < mc; ++m) {
                            const float *xr = xb + m * cols + k;
                            acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[m]);
                            acc[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[m]);
                        }
                    }
                    const __m256 scale = _mm256_set1_ps(block_scale(scales, first_block + blk));
                    for (int m = 0; m < mc; ++m) total[m] = _mm256_fmadd_ps(acc[m], scale, total[m]);
                }
                for (int m = 0; m < mc; ++m) {
                    __m128 s = _mm_add_ps(_mm256_castps256_ps128(total[m]), _mm256_extractf128_ps(total[m], 1));
                    s = _mm_hadd_ps(s, s);
                    s = _mm_hadd_ps(s, s);
                    out[(m0 + m) * rows + r] = _mm_cvtss_f32(s);
                }
            }
            continue;
        }
#endif
        for (int64_t m = 0; m < m_rows; ++m) {
            const float *xr = x + m * cols;
            float total = 0.0f;
            for (int64_t blk = 0; blk < blocks_per_row; ++blk) {
                float acc = 0.0f;
                for (int64_t k = blk * blocksize; k < (blk + 1) * blocksize; k += 2) {
                    const uint8_t byte = wrow[k >> 1];
                    acc += xr[k] * code[byte >> 4] + xr[k + 1] * code[byte & 0x0f];
                }
                total += acc * block_scale(scales, first_block + blk);
            }
            out[m * rows + r] = total;
        }
    }
}
