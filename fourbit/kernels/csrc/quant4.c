/*
 * 4-bit quantization, dequantization and the fused 4-bit matrix-vector product (see fourbit_cpu.h).
 *
 * Codes are bitsandbytes' layout: two per byte, the first in the high nibble, one float32 absmax per block
 * (or its double-quantized form, fb_scales). Blocks have an even size, so that no byte holds the end of one
 * block and the start of the next where a kernel starts a unit of work.
 */
#include "fourbit_cpu.h"
#ifdef __linux__
#include <sys/mman.h>
#endif

static int64_t chunk_blocks(int64_t blocksize) {  /* blocks per unit of parallel work: ~16k elements */
    const int64_t c = ((int64_t)1 << 14) / blocksize;
    return c < 1 ? 1 : c;
}

/* ------------------------------------------------------------------------------------------ quantize */

/*
 * Quantize blocks [b0, b1) of n values to 4-bit codes. Whole blocks are scaled by the reciprocal of their
 * absmax (clamped at 1e-38), the last partial block by division; values are clamped to [-1, 1] and mapped to
 * the nearest code through the 15 sorted midpoints. Two codes per byte, the first in the high nibble.
 * A block holding NaN or Inf gets absmax NaN, which the caller reports. Compiled once per instruction set
 * (FB_ISA_VARIANTS), so the compiler vectorizes the midpoint count for each.
 */
FB_INLINE void quantize_range(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                              const uint8_t *order, uint8_t *packed, float *absmax, int64_t b0, int64_t b1) {
    const int64_t full_blocks = n / blocksize;
    float b[15];
    for (int j = 0; j < 15; ++j) b[j] = bounds[j];
    float vals[FB_MAX_QUANT_BLOCKSIZE + 1];
    uint8_t q[FB_MAX_QUANT_BLOCKSIZE + 1];
    for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t start = blk * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        const int64_t len = end - start;
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

#define FB_QUANT_ARGS                                                                                      \
    const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds, const uint8_t *order,   \
        uint8_t *packed, float *absmax, int64_t b0, int64_t b1
#define FB_QUANT_PASS x, dtype, n, blocksize, bounds, order, packed, absmax, b0, b1

FB_ISA_VARIANTS(quantize, quantize_range, FB_QUANT_ARGS, FB_QUANT_PASS, FB_AVX512)

/* Codes and absmax of n values in blocks of ``blocksize`` (even, at most FB_MAX_QUANT_BLOCKSIZE). */
int fb_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                     const uint8_t *order, uint8_t *packed, float *absmax, int nthreads) {
    if (dtype != FB_F32 && dtype != FB_F16 && dtype != FB_BF16) return FB_ERR_DTYPE;
    if (blocksize < 2 || blocksize % 2 || blocksize > FB_MAX_QUANT_BLOCKSIZE) return FB_ERR_BLOCKSIZE;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int64_t per = chunk_blocks(blocksize);
    const int64_t nchunks = (nblocks + per - 1) / per;
    __typeof__(&quantize_scalar) const run = FB_PICK(quantize);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t b0 = c * per, b1 = b0 + per < nblocks ? b0 + per : nblocks;
        run(FB_QUANT_PASS);
    }
    return FB_OK;
}
/* ---------------------------------------------------------------------------------------- dequantize */

#define FB_DEQ_ARGS                                                                                        \
    const uint8_t *packed, const fb_scales *scales, const float *code, int64_t n, int64_t blocksize,      \
        void *out, int dtype, int64_t b0, int64_t b1
#define FB_DEQ_PASS packed, scales, code, n, blocksize, out, dtype, b0, b1

FB_INLINE void dequantize_tail(const uint8_t *packed, const float *tab, void *out, int dtype, int64_t i,
                               int64_t end) {
    for (; i < end; ++i) {
        const uint8_t byte = packed[i >> 1];
        const uint8_t q = (i & 1) ? (byte & 0x0f) : (byte >> 4);
        store_one(out, dtype, i, tab[q]);
    }
}

/* out[i] = code[q_i] * absmax[block(i)] in float32, converted to the output dtype; blocks [b0, b1). */
static void dequantize_scalar(FB_DEQ_ARGS) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        const float s = block_scale(scales, b);
        float tab[16];
        for (int j = 0; j < 16; ++j) tab[j] = code[j] * s;
        dequantize_tail(packed, tab, out, dtype, start, end);
    }
}

#ifdef FB_X86
/* 16 code values -> the 16 floats for the 16 nibbles of 8 packed bytes, in element order. */
FB_AVX2 FB_INLINE void decode16(const uint8_t *p, __m256 tab_lo, __m256 tab_hi, __m256 *w0, __m256 *w1) {
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

/*
 * Plain stores. (Non-temporal stores were tried for outputs over 32 MiB: the output is always a fresh
 * allocation, whose pages fault in on first touch, and there they made fp32 dequantization 1.6x slower.)
 */
FB_AVX2 FB_INLINE void store8(void *out, int dtype, int64_t i, __m256 v) {
    if (dtype == FB_F32) {
        _mm256_storeu_ps((float *)out + i, v);
    } else if (dtype == FB_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        /* bf16 round-to-nearest-even on 8 lanes (inputs are finite products of finite values) */
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
        u = _mm256_srli_epi32(u, 16);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), packed);
    }
}

FB_AVX2 static void dequantize_avx2(FB_DEQ_ARGS) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        const float s = block_scale(scales, b);
        float tab[16];
        for (int j = 0; j < 16; ++j) tab[j] = code[j] * s;
        int64_t i = start;
        const __m256 tab_lo = _mm256_loadu_ps(tab), tab_hi = _mm256_loadu_ps(tab + 8);
        for (; i + 16 <= end; i += 16) {
            __m256 w0, w1;
            decode16(packed + (i >> 1), tab_lo, tab_hi, &w0, &w1);
            store8(out, dtype, i, w0);
            store8(out, dtype, i + 8, w1);
        }
        dequantize_tail(packed, tab, out, dtype, i, end);
    }
}

/* The 32 nibbles of 16 packed bytes -> 32 floats in element order: one 16-entry permute per 16 values
 * (the whole table fits one register, where AVX2 needs two permutes and a blend). */
FB_AVX512 FB_INLINE void decode32(const uint8_t *p, __m512 tab, __m512 *w0, __m512 *w1) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m128i lo = _mm_and_si128(bytes, mask);
    *w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), tab);  /* e0 .. e15 */
    *w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), tab);  /* e16 .. e31 */
}

FB_AVX512 FB_INLINE void store16(void *out, int dtype, int64_t i, __m512 v) {
    if (dtype == FB_F32) {
        _mm512_storeu_ps((float *)out + i, v);
        return;
    }
    __m256i h;
    if (dtype == FB_F16) {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    } else {
        /* bf16 round-to-nearest-even by integer arithmetic, bit for bit as the AVX2 and plain C paths
         * (vcvtneps2bf16 would flush subnormal values to zero) */
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
    }
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), h);
}

FB_AVX512 static void dequantize_avx512(FB_DEQ_ARGS) {
    const __m512 codes = _mm512_loadu_ps(code);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        /* code[j] * s: one float32 multiplication per entry, as the reference computes it */
        const __m512 tab = _mm512_mul_ps(codes, _mm512_set1_ps(block_scale(scales, b)));
        int64_t i = start;
        for (; i + 32 <= end; i += 32) {
            __m512 w0, w1;
            decode32(packed + (i >> 1), tab, &w0, &w1);
            store16(out, dtype, i, w0);
            store16(out, dtype, i + 16, w1);
        }
        if (i < end) {
            float t[16];
            _mm512_storeu_ps(t, tab);
            dequantize_tail(packed, t, out, dtype, i, end);
        }
    }
}
#endif

/*
 * A large output is a fresh allocation whose pages fault in as the kernel first writes them; with 4 KiB
 * pages that costs more than the dequantization itself. Ask Linux for 2 MiB pages there (advice only).
 */
static void advise_huge_pages(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (bytes < (int64_t)8 << 20) return;
    const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (e > a) (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

/* n values from their codes and block scales (blocksize even), converted to the output dtype. */
int fb_dequantize_4bit(const uint8_t *packed, const fb_scales *scales, const float *code, int64_t n,
                       int64_t blocksize, void *out, int dtype, int nthreads) {
    if (dtype != FB_F32 && dtype != FB_F16 && dtype != FB_BF16) return FB_ERR_DTYPE;
    if (blocksize < 2 || blocksize % 2 || !scales_ok(scales)) return FB_ERR_BLOCKSIZE;
    advise_huge_pages(out, n * (dtype == FB_F32 ? 4 : 2));
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int64_t per = chunk_blocks(blocksize);
    const int64_t nchunks = (nblocks + per - 1) / per;
    __typeof__(&dequantize_scalar) const run = FB_PICK(dequantize);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t b0 = c * per, b1 = b0 + per < nblocks ? b0 + per : nblocks;
        run(FB_DEQ_PASS);
    }
    return FB_OK;
}

/* -------------------------------------------------------------------------------------- fused matmul */

/*
 * out[m, r] = sum_k x[m, k] * code[q[r, k]] * absmax[block(r, k)] for a weight W [rows, cols] stored 4-bit
 * row-major, with cols % blocksize == 0 so that no block spans two rows. x is float32 [m_rows, cols];
 * out is float32 [m_rows, rows]. Each weight row is decoded once per 8 input rows (decoding, small batches).
 */
#define FB_GEMV_ARGS                                                                                       \
    const float *x, const uint8_t *packed, const fb_scales *scales, const float *code, int64_t m_rows,    \
        int64_t rows, int64_t cols, int64_t blocksize, float *out, int64_t r0, int64_t r1
#define FB_GEMV_PASS x, packed, scales, code, m_rows, rows, cols, blocksize, out, r0, r1

static void gemv_scalar(FB_GEMV_ARGS) {
    const int64_t blocks_per_row = cols / blocksize;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *wrow = packed + (r * cols >> 1);
        const int64_t first_block = r * blocks_per_row;
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

#ifdef FB_X86
FB_AVX2 FB_INLINE void gemv_rows_avx2(FB_GEMV_ARGS) {  /* blocksize % 16 == 0 */
    const int64_t blocks_per_row = cols / blocksize;
    const __m256 tab_lo = _mm256_loadu_ps(code), tab_hi = _mm256_loadu_ps(code + 8);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *wrow = packed + (r * cols >> 1);
        const int64_t first_block = r * blocks_per_row;
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
    }
}

/* The same 256-bit code twice: compiled for AVX-512 CPUs it may use all 32 vector registers (the 8 + 8
 * accumulators, the tables and the decoded weights do not fit in 16 without spilling). */
FB_AVX2 static void gemv_avx2(FB_GEMV_ARGS) { gemv_rows_avx2(FB_GEMV_PASS); }
FB_AVX512 static void gemv_avx512(FB_GEMV_ARGS) { gemv_rows_avx2(FB_GEMV_PASS); }
#endif

/* x @ dequant(W).T for W [rows, cols] in whole blocks per row (blocksize even, dividing cols). */
int fb_gemv_4bit(const float *x, const uint8_t *packed, const fb_scales *scales, const float *code,
                 int64_t m_rows, int64_t rows, int64_t cols, int64_t blocksize, float *out, int nthreads) {
    if (blocksize < 2 || blocksize % 2 || cols % blocksize || !scales_ok(scales)) return FB_ERR_BLOCKSIZE;
    const int64_t per = 16;  /* weight rows per unit of parallel work */
    const int64_t nchunks = (rows + per - 1) / per;
    /* the vector code decodes 16 weights per step */
    __typeof__(&gemv_scalar) const run = blocksize % 16 ? gemv_scalar : FB_PICK(gemv);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t r0 = c * per, r1 = r0 + per < rows ? r0 + per : rows;
        run(FB_GEMV_PASS);
    }
    return FB_OK;
}
