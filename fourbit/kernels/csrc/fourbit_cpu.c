/*
 * The library's functions about itself (see fourbit_cpu.h): its ABI version, and which vector code the
 * kernels run.
 */
#include "fourbit_cpu.h"

/* FB_ABI_VERSION of this build: cpu.py calls nothing else before it has checked this. */
int fb_abi_version(void) { return FB_ABI_VERSION; }

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

/* The vector code in use: 0 plain C, 1 AVX2, 2 AVX-512 (the best this CPU has, unless fb_set_isa lowered it). */
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
