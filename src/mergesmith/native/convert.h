/*
 * What both kernel files (kernels.c, whole.c) share: the dtype codes, the build attributes, and
 * the conversions between the stored dtypes and float32, rounding as torch rounds.
 */
#ifndef MERGESMITH_CONVERT_H
#define MERGESMITH_CONVERT_H

#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* Each kernel is compiled three times: for AVX-512 CPUs (whose 64-bit vector multiply halves
 * the cost of the random stream's draws), for AVX2-class ones (twice the baseline's vector
 * width) and for any x86-64; the loader picks one at run time. Every clone does the same
 * operations in the same order, so the bytes do not depend on which runs. Other platforms get
 * one portable build. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KERNEL
#endif
#define HELPER static inline __attribute__((always_inline))

#ifdef __FLT16_MAX__
#define MS_HAVE_F16 1
#else
#define MS_HAVE_F16 0
#endif

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* dst[i] = float32 value of element (offset + i) of src */
HELPER void load_f32(const void *src, int dtype, int64_t offset, int64_t count, float *dst) {
    if (dtype == DT_F32) {
        memcpy(dst, (const float *)src + offset, (size_t)count * sizeof(float));
    } else if (dtype == DT_BF16) {
        const uint16_t *p = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < count; i++) dst[i] = bits_to_float((uint32_t)p[i] << 16);
    } else {
#if MS_HAVE_F16
        const _Float16 *p = (const _Float16 *)src + offset;
        for (int64_t i = 0; i < count; i++) dst[i] = (float)p[i];
#endif
    }
}

/* Rounds to nearest even, as torch does; NaN becomes torch's canonical NaN of each type. */
HELPER void store_from_f32(const float *values, int64_t count, void *dst, int dtype,
                           int64_t offset) {
    if (dtype == DT_F32) {
        memcpy((float *)dst + offset, values, (size_t)count * sizeof(float));
    } else if (dtype == DT_BF16) {
        uint16_t *p = (uint16_t *)dst + offset;
        for (int64_t i = 0; i < count; i++) {
            uint32_t u = float_to_bits(values[i]);
            uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            p[i] = values[i] != values[i] ? (uint16_t)0x7FC0 : rounded;
        }
    } else {
#if MS_HAVE_F16
        uint16_t *p = (uint16_t *)dst + offset;
        for (int64_t i = 0; i < count; i++) {
            _Float16 h = (_Float16)values[i];
            uint16_t u;
            memcpy(&u, &h, sizeof u);
            uint16_t nan = (uint16_t)(((float_to_bits(values[i]) >> 16) & 0x8000u) | 0x7E00u);
            p[i] = values[i] != values[i] ? nan : u;
        }
#endif
    }
}

#endif
