/*
 * The fused training rows (see fourbit_cpu.h): softmax cross-entropy, SwiGLU and RMSNorm, forward and
 * backward, one pass (or three, for the cross-entropy) over each row where PyTorch makes six to ten over the
 * whole tensor. float32 arithmetic throughout; float32 or bf16 tensors, bf16 read and written in bf16
 * (round to nearest even).
 *
 * Threads: each kernel splits its rows (or, for SwiGLU, chunks of 16384 elements) over ``nthreads`` OpenMP
 * threads; cpu.py asks for torch's thread count from 2^18 elements up, one thread below. Each element is
 * computed by one thread from its own row, so the results do not depend on the thread count.
 */
#include "fourbit_cpu.h"

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

FB_ISA_VARIANTS(xent, xent_rows, FB_XENT_ARGS, FB_XENT_PASS, FB_AVX512_WIDE)

/* Per-row losses of ``rows`` x ``vocab`` logits (float32 or bf16, contiguous); with ``write_grad`` the
 * logits are overwritten by softmax - onehot(target). Targets must lie in [0, vocab) (checked by the caller). */
int fb_softmax_xent(void *logits, int dtype, int64_t rows, int64_t vocab, const int64_t *targets, float *losses,
                    int write_grad, int nthreads) {
    if (dtype != FB_F32 && dtype != FB_BF16) return FB_ERR_DTYPE;
    __typeof__(&xent_scalar) const run = FB_PICK(xent);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t r0 = r, r1 = r + 1;
        run(FB_XENT_PASS);
    }
    return FB_OK;
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

FB_ISA_VARIANTS(swiglu, swiglu_range, FB_SWIGLU_ARGS, FB_SWIGLU_PASS, FB_AVX512_WIDE)

int fb_swiglu(const void *gate, const void *up, const void *grad, void *out, void *d_up, int dtype, int64_t n,
              int nthreads) {
    if (dtype != FB_F32 && dtype != FB_BF16) return FB_ERR_DTYPE;
    FB_PARALLEL_CHUNKS(swiglu, n, 16384, i0, i1, FB_SWIGLU_PASS);
    return FB_OK;
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

FB_ISA_VARIANTS(rmsnorm, rmsnorm_range, FB_RMS_ARGS, FB_RMS_PASS, FB_AVX512_WIDE)

int fb_rmsnorm(const void *x, const void *w, const void *dy, float *rstd, void *out, int dtype, int64_t rows,
               int64_t cols, float eps, int nthreads) {
    if (dtype != FB_F32 && dtype != FB_BF16) return FB_ERR_DTYPE;
    const int64_t per = cols >= 4096 ? 1 : 4096 / cols;  /* rows per unit of parallel work */
    const int64_t nchunks = (rows + per - 1) / per;
    __typeof__(&rmsnorm_scalar) const run = FB_PICK(rmsnorm);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t r0 = c * per, r1 = r0 + per < rows ? r0 + per : rows;
        run(FB_RMS_PASS);
    }
    return FB_OK;
}

/* ------------------------------------------------------------------ dropout with a counter-based mask
 *
 * LoRA's dropout on the adapter input (QLoRA: p = 0.1 up to 13B). PyTorch draws a Bernoulli mask from its
 * Mersenne Twister and multiplies in two more passes (about 15 ns per value on two cores, a third of a LoRA
 * training step at 135M); and autograd keeps the mask. Here the mask is a hash of (element index, seed), so one
 * pass writes x * mask / (1 - p), and backward -- or a recomputation -- makes the same mask again from the seed
 * instead of keeping it: element i is kept when mix(mix(i ^ seed_lo) ^ seed_hi ^ (i >> 32)) >= threshold, with
 * mix the MurmurHash3 finalizer (full avalanche, vectorizes with 32-bit multiplies) and threshold = p * 2^32. */

FB_INLINE uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

FB_INLINE uint32_t dropout_hash(int64_t i, uint64_t seed) {
    const uint32_t h = fmix32((uint32_t)i ^ (uint32_t)seed);
    return fmix32(h ^ (uint32_t)(seed >> 32) ^ (uint32_t)((uint64_t)i >> 32));
}

#define FB_DROPOUT(NAME, T, LOAD, STORE)                                                                    \
    FB_INLINE void NAME(const T *x, T *out, uint64_t seed, uint32_t threshold, float scale, int64_t i0,     \
                        int64_t i1) {                                                                       \
        _Pragma("omp simd")                                                                                 \
        for (int64_t i = i0; i < i1; ++i) {                                                                 \
            const float keep = dropout_hash(i, seed) >= threshold ? scale : 0.0f;                           \
            out[i] = STORE(LOAD(x[i]) * keep);                                                              \
        }                                                                                                   \
    }

FB_DROPOUT(dropout_f32, float, FB_F32_LOAD, FB_F32_STORE)
FB_DROPOUT(dropout_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

#define FB_DROPOUT_ARGS const void *x, void *out, int dtype, uint64_t seed, uint32_t threshold, float scale, \
                        int64_t i0, int64_t i1
#define FB_DROPOUT_PASS x, out, dtype, seed, threshold, scale, i0, i1

FB_INLINE void dropout_range(FB_DROPOUT_ARGS) {
    if (dtype == FB_BF16) dropout_bf16(x, out, seed, threshold, scale, i0, i1);
    else dropout_f32(x, out, seed, threshold, scale, i0, i1);
}

FB_ISA_VARIANTS(dropout, dropout_range, FB_DROPOUT_ARGS, FB_DROPOUT_PASS, FB_AVX512_WIDE)

int fb_dropout(const void *x, void *out, int dtype, int64_t n, uint64_t seed, uint32_t threshold, float scale,
               int nthreads) {
    if (dtype != FB_F32 && dtype != FB_BF16) return FB_ERR_DTYPE;
    FB_PARALLEL_CHUNKS(dropout, n, 16384, i0, i1, FB_DROPOUT_PASS);
    return FB_OK;
}
