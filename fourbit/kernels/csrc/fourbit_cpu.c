/*
 * fourbit CPU kernels: blockwise 4-bit quantization, dequantization and a fused 4-bit matrix-vector product.
 *
 * Written by hand because no maintained library offers these three on the CPU with bitsandbytes' exact
 * byte layout: PyTorch needs several full passes (and int64 index tensors) for each, and bitsandbytes' own
 * CPU kernels are slower than memory bandwidth allows. Built on first use by fourbit/kernels/cpu.py with the
 * system C compiler (-O3 -fopenmp -ffp-contract=off) and called through ctypes.
 *
 * One build serves every x86-64 CPU: the vector code is compiled per instruction set with target attributes
 * (AVX-512: avx512f/bw/vl; AVX2: avx2/fma/f16c) and chosen at run time from what the CPU reports
 * (__builtin_cpu_supports), with a plain C path for anything older. Other architectures are built for the
 * host (-march=native) and run the plain C path, which the compiler vectorizes.
 *
 * Results are bit-identical to fourbit/kernels/reference.py on every path (the tests run each one and check
 * this), except the matrix-vector product, whose float32 sums run in another order than BLAS.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#define FB_X86 1
#include <immintrin.h>
#define FB_AVX2 __attribute__((target("avx2,fma,f16c")))
/* 256-bit auto-vectorization in AVX-512 code, as GCC tunes for recent Xeons (the quantize loop is 10% slower
 * with 512-bit vectors); the hand-written AVX-512 loops use 512-bit registers regardless. */
#define FB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=256")))
#endif
#define FB_INLINE static inline __attribute__((always_inline))
#ifdef __linux__
#include <sys/mman.h>
#endif

enum { FB_F32 = 0, FB_F16 = 1, FB_BF16 = 2 };
enum { FB_ISA_SCALAR = 0, FB_ISA_AVX2 = 1, FB_ISA_AVX512 = 2 };

/* ------------------------------------------------------------------------------------ run-time choice */

/* The plain, AVX2 and AVX-512 builds of one inline range function, for FB_RUN_ISA to choose from. */
#ifdef FB_X86
#define FB_AVX512_WIDE __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512")))
#define FB_ISA_VARIANTS(NAME, BODY, ARGS, PASS)                                                             \
    static void NAME##_scalar(ARGS) { BODY(PASS); }                                                         \
    FB_AVX2 static void NAME##_avx2(ARGS) { BODY(PASS); }                                                   \
    FB_AVX512_WIDE static void NAME##_avx512(ARGS) { BODY(PASS); }
#else
#define FB_ISA_VARIANTS(NAME, BODY, ARGS, PASS) static void NAME##_scalar(ARGS) { BODY(PASS); }
#endif

/* Inside a parallel loop over units of work: run the unit with the vector code chosen at run time. */
#ifdef FB_X86
#define FB_RUN_ISA(isa, NAME, PASS)                                                                         \
    do {                                                                                                    \
        if ((isa) == FB_ISA_AVX512) NAME##_avx512(PASS);                                                    \
        else if ((isa) == FB_ISA_AVX2) NAME##_avx2(PASS);                                                   \
        else NAME##_scalar(PASS);                                                                           \
    } while (0)
#else
#define FB_RUN_ISA(isa, NAME, PASS) ((void)(isa), NAME##_scalar(PASS))
#endif


static int fb_detect_isa(void) {
#ifdef FB_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return FB_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return FB_ISA_AVX2;
#endif
    return FB_ISA_SCALAR;
}

static int fb_isa_level = -1;

/* The vector code in use: 0 plain C, 1 AVX2, 2 AVX-512. */
int fb_isa(void) {
    if (fb_isa_level < 0) fb_isa_level = fb_detect_isa();
    return fb_isa_level;
}

/* Use at most ``level`` (tests run every path on one machine); never more than the CPU has. Returns it. */
int fb_set_isa(int level) {
    const int best = fb_detect_isa();
    fb_isa_level = level < best ? (level < 0 ? 0 : level) : best;
    return fb_isa_level;
}

/* ------------------------------------------------------------------------------------------ scalars */

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

FB_INLINE float block_scale(const fb_scales *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    const float v = s->code2[s->qabsmax[b]] * s->absmax2[b / s->blocksize2];
    return v + s->offset;
}

FB_INLINE float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

FB_INLINE uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

FB_INLINE float load_one(const void *x, int dtype, int64_t i) {
    if (dtype == FB_F32) return ((const float *)x)[i];
    if (dtype == FB_BF16) return bf16_to_f32(((const uint16_t *)x)[i]);
    return (float)((const _Float16 *)x)[i];
}

FB_INLINE void store_one(void *out, int dtype, int64_t i, float v) {
    if (dtype == FB_F32) ((float *)out)[i] = v;
    else if (dtype == FB_BF16) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else ((_Float16 *)out)[i] = (_Float16)v;
}

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
 * (the wrappers below), so the compiler vectorizes the midpoint count for each.
 */
FB_INLINE void quantize_range(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                              const uint8_t *order, uint8_t *packed, float *absmax, int64_t b0, int64_t b1) {
    const int64_t full_blocks = n / blocksize;
    float b[15];
    for (int j = 0; j < 15; ++j) b[j] = bounds[j];
    float vals[4096 + 1];
    uint8_t q[4096 + 1];
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

static void quantize_scalar(FB_QUANT_ARGS) { quantize_range(FB_QUANT_PASS); }
#ifdef FB_X86
FB_AVX2 static void quantize_avx2(FB_QUANT_ARGS) { quantize_range(FB_QUANT_PASS); }
FB_AVX512 static void quantize_avx512(FB_QUANT_ARGS) { quantize_range(FB_QUANT_PASS); }
#endif

void fb_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                      const uint8_t *order, uint8_t *packed, float *absmax, int nthreads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int64_t per = chunk_blocks(blocksize);
    const int64_t nchunks = (nblocks + per - 1) / per;
    const int isa = fb_isa();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t b0 = c * per, b1 = b0 + per < nblocks ? b0 + per : nblocks;
        FB_RUN_ISA(isa, quantize, FB_QUANT_PASS);
    }
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

void fb_dequantize_4bit(const uint8_t *packed, const fb_scales *scales, const float *code, int64_t n,
                        int64_t blocksize, void *out, int dtype, int nthreads) {
    advise_huge_pages(out, n * (dtype == FB_F32 ? 4 : 2));
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int64_t per = chunk_blocks(blocksize);
    const int64_t nchunks = (nblocks + per - 1) / per;
    const int isa = fb_isa();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t b0 = c * per, b1 = b0 + per < nblocks ? b0 + per : nblocks;
#ifdef FB_X86
        if (isa == FB_ISA_AVX512) { dequantize_avx512(FB_DEQ_PASS); continue; }
        if (isa == FB_ISA_AVX2) { dequantize_avx2(FB_DEQ_PASS); continue; }
#endif
        (void)isa;
        dequantize_scalar(FB_DEQ_PASS);
    }
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

void fb_gemv_4bit(const float *x, const uint8_t *packed, const fb_scales *scales, const float *code,
                  int64_t m_rows, int64_t rows, int64_t cols, int64_t blocksize, float *out, int nthreads) {
    const int64_t per = 16;  /* weight rows per unit of parallel work */
    const int64_t nchunks = (rows + per - 1) / per;
    const int isa = fb_isa();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t r0 = c * per, r1 = r0 + per < rows ? r0 + per : rows;
#ifdef FB_X86
        if (isa == FB_ISA_AVX512 && blocksize % 16 == 0) { gemv_avx512(FB_GEMV_PASS); continue; }
        if (isa == FB_ISA_AVX2 && blocksize % 16 == 0) { gemv_avx2(FB_GEMV_PASS); continue; }
#endif
        (void)isa;
        gemv_scalar(FB_GEMV_PASS);
    }
}

/* ------------------------------------------------------------------ softmax cross-entropy, row by row
 *
 * For each row of logits x (one token's scores over the vocabulary) and its target t:
 *     loss = logsumexp(x) - x[t],      dloss/dx = softmax(x) - onehot(t)
 * in three passes over the row (max, sum of exponentials, gradient written over the logits), each row read
 * from cache after the first pass. PyTorch's log_softmax + nll_loss + their backward make about eight passes
 * over [tokens, vocab] in memory and allocate three tensors of that size; this is the heart of the fused
 * linear cross-entropy (fourbit/train/loss.py), which never holds more than one chunk of logits. Float32
 * arithmetic throughout; bf16 logits are read and the gradient written in bf16 (round to nearest even). */

/* e^x for x <= 0 (x below -87 gives e^-87; NaN gives garbage: callers detect non-finite rows separately).
 * Cody-Waite reduction x = n ln2 + f, |f| <= ln2/2, and e^f by its Taylor polynomial to degree 7
 * (remainder < 2e-9 relative): about 1e-7 relative overall, the same as expf. Written out so that the
 * compiler vectorizes the loops that call it. */
FB_INLINE float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896341f - 12582912.0f) + 12582912.0f; /* round(x / ln2), x <= 0 */
    float f = x - n * 0.693359375f;
    f = f - n * -2.12194440e-4f;
    float p = 1.9841270e-4f;
    p = p * f + 1.3888889e-3f;
    p = p * f + 8.3333333e-3f;
    p = p * f + 4.1666667e-2f;
    p = p * f + 1.6666667e-1f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

#define FB_XENT_ROW(NAME, T, LOAD, STORE)                                                                   \
    FB_INLINE float NAME(T *row, int64_t vocab, int64_t target, int write_grad) {                       \
        float m = -FLT_MAX, probe = 0.0f; /* probe: 0 for a finite row, NaN otherwise */                    \
        _Pragma("omp simd reduction(max:m) reduction(+:probe)")                                             \
        for (int64_t j = 0; j < vocab; ++j) {                                                               \
            const float v = LOAD(row[j]);                                                                   \
            m = v > m ? v : m;                                                                              \
            probe += v * 0.0f;                                                                              \
        }                                                                                                   \
        double s = 0.0; /* float sums of 1024 terms, added in double: ~1e-7 relative at any vocabulary */   \
        for (int64_t j0 = 0; j0 < vocab; j0 += 1024) {                                                      \
            const int64_t j1 = j0 + 1024 < vocab ? j0 + 1024 : vocab;                                       \
            float part = 0.0f;                                                                              \
            _Pragma("omp simd reduction(+:part)")                                                           \
            for (int64_t j = j0; j < j1; ++j) part += exp_nonpos(LOAD(row[j]) - m);                         \
            s += part;                                                                                      \
        }                                                                                                   \
        const float lse = m + (float)log(s);                                                                \
        const float x_target = LOAD(row[target]);                                                           \
        if (write_grad) {                                                                                   \
            _Pragma("omp simd")                                                                             \
            for (int64_t j = 0; j < vocab; ++j) row[j] = STORE(exp_nonpos(LOAD(row[j]) - lse) + probe);     \
            row[target] = STORE(exp_nonpos(x_target - lse) - 1.0f + probe);                                 \
        }                                                                                                   \
        return lse - x_target + probe;                                                                      \
    }

#define FB_F32_LOAD(v) (v)
#define FB_F32_STORE(v) (v)
FB_XENT_ROW(xent_row_f32, float, FB_F32_LOAD, FB_F32_STORE)
FB_XENT_ROW(xent_row_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

#define FB_XENT_ARGS void *logits, int dtype, int64_t r0, int64_t r1, int64_t vocab, const int64_t *targets, \
                     float *losses, int write_grad
#define FB_XENT_PASS logits, dtype, r0, r1, vocab, targets, losses, write_grad

FB_INLINE void xent_rows(FB_XENT_ARGS) {
    for (int64_t r = r0; r < r1; ++r) {
        if (dtype == FB_BF16)
            losses[r] = xent_row_bf16((uint16_t *)logits + r * vocab, vocab, targets[r], write_grad);
        else
            losses[r] = xent_row_f32((float *)logits + r * vocab, vocab, targets[r], write_grad);
    }
}

FB_ISA_VARIANTS(xent, xent_rows, FB_XENT_ARGS, FB_XENT_PASS)

/* Per-row losses of ``rows`` x ``vocab`` logits (float32 or bf16, contiguous); with ``write_grad`` the
 * logits are overwritten by softmax - onehot(target). Targets must lie in [0, vocab) (checked by the caller). */
void fb_softmax_xent(void *logits, int dtype, int64_t rows, int64_t vocab, const int64_t *targets, float *losses,
                     int write_grad, int nthreads) {
    const int isa = fb_isa();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t r0 = r, r1 = r + 1;
        FB_RUN_ISA(isa, xent, FB_XENT_PASS);
    }
}

/* ------------------------------------------------------------------ SwiGLU: silu(gate) * up, and its gradient
 *
 * The gated MLP of Llama-family models computes down(silu(gate) * up). PyTorch runs silu, the product and, in
 * backward, silu's derivative and two more products as separate passes over [tokens, intermediate] (the widest
 * activations of the model), each allocating its result; here forward is one pass and backward one pass:
 *     s = sigmoid(g),  out = g s u,  d_up = grad g s,  d_gate = grad u s (1 + g (1 - s)).
 * float32 arithmetic; bf16 tensors are read and written in bf16 (round to nearest even). */

FB_INLINE float sigmoid_f32(float g) {
    const float e = exp_nonpos(g < 0.0f ? g : -g); /* e^-|g|, never overflows */
    const float r = 1.0f / (1.0f + e);
    return g < 0.0f ? e * r : r;
}

#define FB_SWIGLU(NAME, T, LOAD, STORE)                                                                     \
    FB_INLINE void NAME##_fwd(const T *gate, const T *up, T *out, int64_t i0, int64_t i1) {                 \
        _Pragma("omp simd")                                                                                 \
        for (int64_t i = i0; i < i1; ++i) {                                                                 \
            const float g = LOAD(gate[i]);                                                                  \
            out[i] = STORE(g * sigmoid_f32(g) * LOAD(up[i]));                                               \
        }                                                                                                   \
    }                                                                                                       \
    FB_INLINE void NAME##_bwd(const T *gate, const T *up, const T *grad, T *d_gate, T *d_up, int64_t i0,    \
                              int64_t i1) {                                                                 \
        _Pragma("omp simd")                                                                                 \
        for (int64_t i = i0; i < i1; ++i) {                                                                 \
            const float g = LOAD(gate[i]), u = LOAD(up[i]), d = LOAD(grad[i]);                              \
            const float s = sigmoid_f32(g);                                                                 \
            d_up[i] = STORE(d * g * s);                                                                     \
            d_gate[i] = STORE(d * u * s * (1.0f + g * (1.0f - s)));                                         \
        }                                                                                                   \
    }

FB_SWIGLU(swiglu_f32, float, FB_F32_LOAD, FB_F32_STORE)
FB_SWIGLU(swiglu_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

#define FB_SWIGLU_ARGS const void *gate, const void *up, const void *grad, void *out, void *d_up, int dtype, \
                       int64_t i0, int64_t i1
#define FB_SWIGLU_PASS gate, up, grad, out, d_up, dtype, i0, i1

/* grad == NULL: forward (out = silu(gate) * up); else backward (out = d_gate, d_up). */
FB_INLINE void swiglu_range(FB_SWIGLU_ARGS) {
    if (dtype == FB_BF16) {
        if (grad) swiglu_bf16_bwd(gate, up, grad, out, d_up, i0, i1);
        else swiglu_bf16_fwd(gate, up, out, i0, i1);
    } else {
        if (grad) swiglu_f32_bwd(gate, up, grad, out, d_up, i0, i1);
        else swiglu_f32_fwd(gate, up, out, i0, i1);
    }
}

FB_ISA_VARIANTS(swiglu, swiglu_range, FB_SWIGLU_ARGS, FB_SWIGLU_PASS)

void fb_swiglu(const void *gate, const void *up, const void *grad, void *out, void *d_up, int dtype, int64_t n,
               int nthreads) {
    const int64_t per = 16384;
    const int64_t nchunks = (n + per - 1) / per;
    const int isa = fb_isa();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t i0 = c * per, i1 = i0 + per < n ? i0 + per : n;
        FB_RUN_ISA(isa, swiglu, FB_SWIGLU_PASS);
    }
}

/* ------------------------------------------------------------------ RMSNorm (Zhang & Sennrich 2019), row by row
 *
 * Llama's RMSNorm: xhat = x / sqrt(mean(x^2) + eps) in float32, rounded to x's dtype, times the weight. PyTorch
 * runs it as six passes forward and about ten backward over [tokens, hidden]; here one pass each way per row
 * (the row stays in cache). Backward, for a frozen weight w, with r = 1/sqrt(mean(x^2) + eps):
 *     dx = r (g - xhat mean(g xhat)),   g = dy w,   xhat = x r. */

#define FB_RMSNORM(NAME, T, LOAD, STORE)                                                                    \
    FB_INLINE void NAME##_fwd(const T *x, const T *w, T *y, float *rstd, int64_t r0, int64_t r1,            \
                              int64_t cols, float eps) {                                                    \
        for (int64_t r = r0; r < r1; ++r) {                                                                 \
            const T *xr = x + r * cols;                                                                     \
            T *yr = y + r * cols;                                                                           \
            float ss = 0.0f;                                                                                \
            _Pragma("omp simd reduction(+:ss)")                                                             \
            for (int64_t j = 0; j < cols; ++j) { const float v = LOAD(xr[j]); ss += v * v; }                \
            const float rs = 1.0f / sqrtf(ss / (float)cols + eps);                                          \
            rstd[r] = rs;                                                                                   \
            _Pragma("omp simd")                                                                             \
            for (int64_t j = 0; j < cols; ++j) yr[j] = STORE(LOAD(w[j]) * LOAD(STORE(LOAD(xr[j]) * rs)));  \
        }                                                                                                   \
    }                                                                                                       \
    FB_INLINE void NAME##_bwd(const T *x, const T *w, const T *dy, const float *rstd, T *dx, int64_t r0,    \
                              int64_t r1, int64_t cols) {                                                   \
        for (int64_t r = r0; r < r1; ++r) {                                                                 \
            const T *xr = x + r * cols, *gr = dy + r * cols;                                                \
            T *dr = dx + r * cols;                                                                          \
            const float rs = rstd[r];                                                                       \
            float dot = 0.0f;                                                                               \
            _Pragma("omp simd reduction(+:dot)")                                                            \
            for (int64_t j = 0; j < cols; ++j) dot += LOAD(gr[j]) * LOAD(w[j]) * (LOAD(xr[j]) * rs);        \
            const float mean = dot / (float)cols;                                                           \
            _Pragma("omp simd")                                                                             \
            for (int64_t j = 0; j < cols; ++j) {                                                            \
                const float xhat = LOAD(xr[j]) * rs;                                                        \
                dr[j] = STORE(rs * (LOAD(gr[j]) * LOAD(w[j]) - xhat * mean));                               \
            }                                                                                               \
        }                                                                                                   \
    }

FB_RMSNORM(rmsnorm_f32, float, FB_F32_LOAD, FB_F32_STORE)
FB_RMSNORM(rmsnorm_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

#define FB_RMS_ARGS const void *x, const void *w, const void *dy, float *rstd, void *out, int dtype, int64_t r0, \
                    int64_t r1, int64_t cols, float eps
#define FB_RMS_PASS x, w, dy, rstd, out, dtype, r0, r1, cols, eps

/* dy == NULL: forward (out = y, rstd written); else backward (out = dx, rstd read). */
FB_INLINE void rmsnorm_range(FB_RMS_ARGS) {
    if (dtype == FB_BF16) {
        if (dy) rmsnorm_bf16_bwd(x, w, dy, rstd, out, r0, r1, cols);
        else rmsnorm_bf16_fwd(x, w, out, rstd, r0, r1, cols, eps);
    } else {
        if (dy) rmsnorm_f32_bwd(x, w, dy, rstd, out, r0, r1, cols);
        else rmsnorm_f32_fwd(x, w, out, rstd, r0, r1, cols, eps);
    }
}

FB_ISA_VARIANTS(rmsnorm, rmsnorm_range, FB_RMS_ARGS, FB_RMS_PASS)

void fb_rmsnorm(const void *x, const void *w, const void *dy, float *rstd, void *out, int dtype, int64_t rows,
                int64_t cols, float eps, int nthreads) {
    const int64_t per = cols >= 4096 ? 1 : 4096 / cols;  /* rows per unit of parallel work */
    const int64_t nchunks = (rows + per - 1) / per;
    const int isa = fb_isa();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t r0 = c * per, r1 = r0 + per < rows ? r0 + per : rows;
        FB_RUN_ISA(isa, rmsnorm, FB_RMS_PASS);
    }
}
