/*
 * fourbit CPU kernels: the shared header of the one library that fourbit/kernels/cpu.py builds and calls
 * through ctypes.
 *
 * Written by hand because no maintained library offers these on the CPU with bitsandbytes' exact byte layout
 * (PyTorch needs several full passes, and int64 index tensors, for each; bitsandbytes' own CPU kernels are
 * slower than memory bandwidth allows), nor the fused training rows in one pass each. The library exports eight
 * kernels, a decoding step (with three helpers) and three functions about itself:
 *
 *   quant4.c      fb_quantize_4bit    blockwise absmax 4-bit quantization (NF4/FP4/INT4 codes, two per byte)
 *                 fb_dequantize_4bit  codes back to float32/float16/bfloat16 (plain or double-quantized scales)
 *                 fb_gemv_4bit        x @ dequant(W).T in one pass over the 4-bit weight (small batches)
 *   train_rows.c  fb_softmax_xent     per-row cross-entropy, and softmax - onehot written over the logits
 *                 fb_swiglu           silu(gate) * up, or its two gradients
 *                 fb_rmsnorm          RMSNorm of each row, or its input gradient
 *                 fb_dropout          x * mask / (1 - p) with a mask made again from a seed, never stored
 *   ggml_quants.c fb_quantize_ggml    llama.cpp's Q8_0, Q4_0, Q5_0, Q4_K, Q6_K blocks (fourbit's GGUF export)
 *   decode.c      fb_decode_step      one decoding step of a Llama-family model (batch 1, static KV cache)
 *                 fb_decode_work_floats  the scratch that step needs
 *                 fb_set_decode_rows  the step's 4-bit rows: float, int8 activations (AVX512_VNNI), or auto
 *                 fb_decode_rows      one layer's rows as the step computes them (for tests)
 *   fourbit_cpu.c fb_abi_version      FB_ABI_VERSION, which cpu.py checks before any other call
 *                 fb_isa, fb_set_isa  the vector code in use, and a lower one for tests and benchmarks
 *
 * Built on first use by cpu.py with the system C compiler (-O3 -fopenmp -ffp-contract=off, all the sources
 * into one shared library). One build serves every x86-64 CPU: each kernel's unit of work is compiled three
 * times, for AVX-512 (avx512f/bw/vl), AVX2 (avx2/fma/f16c) and plain C, by target attributes, and FB_PICK
 * chooses one at run time from what the CPU reports (__builtin_cpu_supports) -- the one dispatch mechanism
 * of the library. Other architectures are built for the host (-march=native) and have only the plain C code,
 * which the compiler vectorizes.
 *
 * Results are bit-identical to fourbit/kernels/reference.py on every path for quantization and
 * dequantization (the tests run each path and check this), and to the numpy reference of the GGUF export
 * for the GGML block types; the matrix-vector product and the training rows
 * sum in float32 in another order than PyTorch, and their exp is a polynomial good to ~1e-7 relative.
 *
 * Every kernel returns FB_OK, or an FB_ERR_* status for arguments it cannot compute (checked before anything
 * is read or written), which cpu.py turns into a ValueError or TypeError.
 */
#ifndef FOURBIT_CPU_H
#define FOURBIT_CPU_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bump on any change of an exported signature, of fb_scales or of a status code; cpu.py's ABI_VERSION must
 * match, and a cached build reporting another version is rebuilt, never called. */
#define FB_ABI_VERSION 7

/* The largest block quantize can take: it holds one block in two stack buffers of this size. */
#define FB_MAX_QUANT_BLOCKSIZE 4096

enum { FB_F32 = 0, FB_F16 = 1, FB_BF16 = 2 };
enum { FB_ISA_SCALAR = 0, FB_ISA_AVX2 = 1, FB_ISA_AVX512 = 2 };
enum { FB_OK = 0, FB_ERR_DTYPE = 1, FB_ERR_BLOCKSIZE = 2 };

#define FB_INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------------------------- run-time ISA choice */

#if defined(__x86_64__) || defined(_M_X64)
#define FB_X86 1
#include <immintrin.h>
#define FB_AVX2 __attribute__((target("avx2,fma,f16c")))
/* 256-bit auto-vectorization in AVX-512 code, as GCC tunes for recent Xeons (the quantize loop is 10% slower
 * with 512-bit vectors); the hand-written AVX-512 loops use 512-bit registers regardless. */
#define FB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=256")))
/* 512-bit auto-vectorization, for the training rows (exp polynomials over long rows). */
#define FB_AVX512_WIDE __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512")))
#endif

/* The vector code in use: FB_ISA_SCALAR, FB_ISA_AVX2 or FB_ISA_AVX512 (fourbit_cpu.c). */
int fb_isa(void);

/*
 * Every kernel's unit of work NAME comes in three builds with one signature, NAME_scalar, NAME_avx2 and
 * NAME_avx512 (only NAME_scalar off x86-64): written out where the vector code is hand-written (quant4.c's
 * dequantize and gemv), else made by FB_ISA_VARIANTS from one always-inline BODY, which the compiler
 * vectorizes for each target. AVX512_TARGET is FB_AVX512 or FB_AVX512_WIDE.
 */
#ifdef FB_X86
#define FB_ISA_VARIANTS(NAME, BODY, ARGS, PASS, AVX512_TARGET)                                              \
    static void NAME##_scalar(ARGS) { BODY(PASS); }                                                         \
    FB_AVX2 static void NAME##_avx2(ARGS) { BODY(PASS); }                                                   \
    AVX512_TARGET static void NAME##_avx512(ARGS) { BODY(PASS); }
/* The build of NAME for the vector code in use, as a function pointer: the one run-time dispatch. */
#define FB_PICK(NAME)                                                                                       \
    __extension__({                                                                                         \
        const int isa_ = fb_isa();                                                                          \
        isa_ == FB_ISA_AVX512 ? NAME##_avx512 : (isa_ == FB_ISA_AVX2 ? NAME##_avx2 : NAME##_scalar);        \
    })
#else
#define FB_ISA_VARIANTS(NAME, BODY, ARGS, PASS, AVX512_TARGET) static void NAME##_scalar(ARGS) { BODY(PASS); }
#define FB_PICK(NAME) NAME##_scalar
#endif

/* Run the picked build of NAME over [0, COUNT) in chunks of PER items, on the caller's `nthreads` threads:
 * each call sees its chunk as [LO, HI), the names PASS uses. The chunks are fixed by COUNT and PER alone, so the
 * result does not depend on the thread count. */
#define FB_PARALLEL_CHUNKS(NAME, COUNT, PER, LO, HI, PASS)                                                  \
    do {                                                                                                    \
        const int64_t per_ = (PER), count_ = (COUNT), nchunks_ = (count_ + per_ - 1) / per_;              \
        __typeof__(&NAME##_scalar) const run_ = FB_PICK(NAME);                                              \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                 \
        for (int64_t c_ = 0; c_ < nchunks_; ++c_) {                                                         \
            const int64_t LO = c_ * per_, HI = LO + per_ < count_ ? LO + per_ : count_;                     \
            run_(PASS);                                                                                     \
        }                                                                                                   \
    } while (0)

/* ------------------------------------------------------------------------------------- exported kernels */

/*
 * Block scales: plain float32 absmax, or double-quantized (QLoRA section 3): 8-bit codes of absmax - offset
 * with their own float32 absmax per blocksize2 codes. absmax = code2[q] * absmax2[b / blocksize2] + offset,
 * in float32 and in that order, as the PyTorch reference computes it. Mirrored by cpu.py's _Scales.
 */
typedef struct {
    const float *absmax;    /* plain scales, or NULL when nested */
    const uint8_t *qabsmax; /* nested codes */
    const float *code2;     /* 256-entry code of the nested quantization */
    const float *absmax2;   /* nested block scales */
    int64_t blocksize2;
    float offset;
} fb_scales;

int fb_abi_version(void);
int fb_set_isa(int level);
int fb_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                     const uint8_t *order, uint8_t *packed, float *absmax, int nthreads);
int fb_dequantize_4bit(const uint8_t *packed, const fb_scales *scales, const float *code, int64_t n,
                       int64_t blocksize, void *out, int dtype, int nthreads);
int fb_gemv_4bit(const float *x, const uint8_t *packed, const fb_scales *scales, const float *code,
                 int64_t m_rows, int64_t rows, int64_t cols, int64_t blocksize, float *out, int nthreads);
int fb_softmax_xent(void *logits, int dtype, int64_t rows, int64_t vocab, const int64_t *targets, float *losses,
                    int write_grad, int nthreads);
int fb_swiglu(const void *gate, const void *up, const void *grad, void *out, void *d_up, int dtype, int64_t n,
              int nthreads);
int fb_rmsnorm(const void *x, const void *w, const void *dy, float *rstd, void *out, int dtype, int64_t rows,
               int64_t cols, float eps, int nthreads);
int fb_dropout(const void *x, void *out, int dtype, int64_t n, uint64_t seed, uint32_t threshold, float scale,
               int nthreads);
/* llama.cpp's block types for GGUF export (ggml_quants.c): type 0 Q8_0, 1 Q4_0, 2 Q4_K, 3 Q6_K, 4 Q5_0. */
int fb_quantize_ggml(const float *x, int type, int64_t n, int64_t cols, const float *importance, float *row_ms,
                     uint8_t *out, int nthreads);

/* ------------------------------------------------------------------------------------------- scalars */

FB_INLINE float block_scale(const fb_scales *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    const float v = s->code2[s->qabsmax[b]] * s->absmax2[b / s->blocksize2];
    return v + s->offset;
}

/* A nested form needs blocksize2 >= 1 (it divides the block index). */
FB_INLINE int scales_ok(const fb_scales *s) { return s->absmax != NULL || s->blocksize2 >= 1; }

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

/* ------------------------------------------------------------------------------ decoding (decode.c) */

/* One linear layer of a decoder: 4-bit (packed != NULL; bitsandbytes' layout) or dense [rows, cols]. */
typedef struct {
    const uint8_t *packed;
    fb_scales scales;
    const float *code;      /* the 16-entry 4-bit codebook */
    int64_t blocksize;
    const void *dense;      /* when packed == NULL: float32/float16/bfloat16 weight [rows, cols] */
    int64_t dense_dtype;
    const float *bias;      /* float32 [rows] or NULL */
    int64_t rows, cols;
} fb_dlinear;

typedef struct {
    const float *attn_norm, *mlp_norm;  /* float32 [hidden] */
    const float *q_norm, *k_norm;       /* Qwen3's per-head norms, float32 [head_dim], or NULL */
    fb_dlinear q, k, v, o, gate, up, down;
    float *k_cache, *v_cache;           /* float32 [n_kv_heads, max_len, head_dim], keys after RoPE */
} fb_dlayer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab, max_len, embed_rows;
    float eps, attn_scale;
    const void *embed;                  /* [embed_rows, hidden] */
    int64_t embed_dtype;
    const float *final_norm;
    fb_dlinear head;
    const int8_t *screen_q;             /* optional int8 copy of a dense head, blocks of 32 along hidden */
    const float *screen_scale;          /* [vocab, hidden / 32] */
    const float *screen_err;            /* [vocab]: bound on |w_r - w~_r|_2 with rounding slack */
    const float *code4;                 /* the codebook of the 4-bit layers that the vector code takes */
    const float *rope_cos, *rope_sin;   /* float32 [max_len, head_dim] */
    const fb_dlayer *layers;
} fb_dmodel;

int64_t fb_decode_work_floats(const fb_dmodel *m);
int fb_decode_step(const fb_dmodel *m, int64_t token, int64_t pos, float *logits, int64_t *next, float *work,
                   int64_t work_floats, int nthreads);
/* The 4-bit rows of fb_decode_step (FB_ROWS_*; mode < 0 asks only); returns the mode now in effect: the one
 * set, or FB_ROWS_FLOAT where the CPU cannot run the int8 rows (no AVX512_VNNI, or the ISA capped). */
#define FB_ROWS_FLOAT 0 /* float32 rows for every 4-bit layer */
#define FB_ROWS_INT8 1  /* int8 activations (AVX512_VNNI) for every 4-bit layer they take */
#define FB_ROWS_AUTO 2  /* the default: int8 for layers of at least FB_INT8_AUTO_COLS columns, float below */
#define FB_INT8_AUTO_COLS 2048 /* cpu.py's INT8_AUTO_COLS */
int fb_set_decode_rows(int mode);
/* One layer's rows as fb_decode_step computes them, and which row kernel it took (tests). */
int fb_decode_rows(const fb_dlinear *l, const float *code4, const float *x, float *out, int *path);

#define FB_F32_LOAD(v) (v)
#define FB_F32_STORE(v) (v)

#endif /* FOURBIT_CPU_H */
