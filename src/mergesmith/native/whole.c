/*
 * One-pass CPU kernels for the whole-tensor methods (model_stock, karcher, multislerp, nuslerp,
 * nearswap, arcee_fusion), called through ctypes from mergesmith.native.whole.
 *
 * As in kernels.c, every kernel repeats, operation for operation, the arithmetic of the torch
 * code beside it (the same operations in the same order, each rounded to its type; no fused
 * multiply-adds: -ffp-contract=off), so both give the same bytes. Sums have one fixed order that
 * torch can also express with elementwise operations only (see msw_gram), so no reduction order
 * of torch's or of a BLAS is involved. The gain: the inputs are read once per pass and converted
 * in small steps that stay in cache, where the torch code makes a pass per operation over
 * block-sized temporaries.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"

/* Elements converted per step: every input's scratch stays in L1/L2. */
#define STEP 1024
/* The longest run summed as one halving tree; must equal ops.spherical.SUM_CHUNK. */
#define SUM_CHUNK 1024

static int64_t pow2_at_least(int64_t n) {
    int64_t p = 1;
    while (p < n) p <<= 1;
    return p;
}

/* v[0] + ... + v[w - 1] as a halving tree (v[k] += v[k + w/2], and again on the first half),
 * w a power of two; v is overwritten. */
HELPER double halve(double *v, int64_t w) {
    for (int64_t h = w / 2; h >= 1; h /= 2)
        for (int64_t k = 0; k < h; k++) v[k] = v[k] + v[k + h];
    return v[0];
}

/* sum of x[k] * y[k] over one chunk of w (a power of two) entries, as `halve` of the products.
 * From eight entries on, the first three levels of the tree are formed in registers (the same
 * additions in the same order), so only an eighth of the products is stored. */
HELPER double chunk_dot(const double *x, const double *y, int64_t w, double *scratch) {
    if (w == 1) return x[0] * y[0];
    if (w < 8) {
        int64_t h = w / 2;
        for (int64_t k = 0; k < h; k++) scratch[k] = x[k] * y[k] + x[k + h] * y[k + h];
        return halve(scratch, h);
    }
    int64_t e = w / 8;
    const double *x1 = x + e, *x2 = x + 2 * e, *x3 = x + 3 * e, *x4 = x + 4 * e;
    const double *x5 = x + 5 * e, *x6 = x + 6 * e, *x7 = x + 7 * e;
    const double *y1 = y + e, *y2 = y + 2 * e, *y3 = y + 3 * e, *y4 = y + 4 * e;
    const double *y5 = y + 5 * e, *y6 = y + 6 * e, *y7 = y + 7 * e;
    for (int64_t k = 0; k < e; k++) {
        /* level 1 pairs k with k + w/2, level 2 with k + w/4, level 3 with k + w/8 */
        double a0 = x[k] * y[k] + x4[k] * y4[k];
        double a1 = x1[k] * y1[k] + x5[k] * y5[k];
        double a2 = x2[k] * y2[k] + x6[k] * y6[k];
        double a3 = x3[k] * y3[k] + x7[k] * y7[k];
        scratch[k] = (a0 + a2) + (a1 + a3);
    }
    return halve(scratch, e);
}

/*
 * out[r * P + p] = <d_i, d_j> over row r for every pair p = (i, j), i <= j, in the order
 * (0,0), (0,1), ..., (0,n-1), (1,1), ...; P = n (n + 1) / 2. d_i is input i's row, minus the
 * base's in float32 when a base is given, widened to double (products are then exact).
 *
 * The order of the sum (ops.spherical.row_grams does the same in torch): a row is cut into
 * chunks of w = min(SUM_CHUNK, the power of two at least its length) entries, the last padded
 * with zeros; each chunk's products are summed by `halve`, and the chunk sums, padded with zeros
 * to a power of two, by `halve` again. Returns 0, or -1 when scratch cannot be allocated.
 */
KERNEL int msw_gram(const void *const *inputs, const int32_t *dtypes, int32_t n, const void *base,
                    int32_t base_dtype, int64_t rows, int64_t length, double *out) {
    int64_t pairs = (int64_t)n * (n + 1) / 2;
    int64_t w = length < SUM_CHUNK ? pow2_at_least(length > 0 ? length : 1) : SUM_CHUNK;
    int64_t chunks = (length + w - 1) / w;
    int64_t slots = pow2_at_least(chunks > 0 ? chunks : 1);
    double *d = malloc((size_t)(n * w) * sizeof(double));
    double *scratch = malloc((size_t)w * sizeof(double));
    double *sums = malloc((size_t)(pairs * slots) * sizeof(double));
    float *f = malloc((size_t)w * sizeof(float));
    float *fb = malloc((size_t)w * sizeof(float));
    int status = 0;
    if (!d || !scratch || !sums || !f || !fb) {
        status = -1;
        goto done;
    }
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t k = 0; k < chunks; k++) {
            int64_t offset = r * length + k * w;
            int64_t count = length - k * w < w ? length - k * w : w;
            if (base) load_f32(base, base_dtype, offset, count, fb);
            for (int32_t i = 0; i < n; i++) {
                double *di = d + (int64_t)i * w;
                load_f32(inputs[i], dtypes[i], offset, count, f);
                if (base) {
                    for (int64_t j = 0; j < count; j++) di[j] = (double)(f[j] - fb[j]);
                } else {
                    for (int64_t j = 0; j < count; j++) di[j] = (double)f[j];
                }
                for (int64_t j = count; j < w; j++) di[j] = 0.0;
            }
            int64_t p = 0;
            for (int32_t i = 0; i < n; i++)
                for (int32_t j = i; j < n; j++, p++)
                    sums[p * slots + k] = chunk_dot(d + (int64_t)i * w, d + (int64_t)j * w, w,
                                                    scratch);
        }
        for (int64_t p = 0; p < pairs; p++) {
            double *s = sums + p * slots;
            for (int64_t k = chunks; k < slots; k++) s[k] = 0.0;
            out[r * pairs + p] = halve(s, slots);
        }
    }
done:
    free(d);
    free(scratch);
    free(sums);
    free(f);
    free(fb);
    return status;
}

/*
 * Row r of the output = sum_i coef[r * n + i] * d_i (+ the base), in double: the first term,
 * then each next one added (product rounded, then the sum), then the base; rounded to float32
 * and then to the output dtype. d_i as in msw_gram.
 */
KERNEL void msw_combine(const void *const *inputs, const int32_t *dtypes, int32_t n,
                        const void *base, int32_t base_dtype, int64_t rows, int64_t length,
                        const double *coef, void *out, int32_t out_dtype) {
    float f[STEP], fb[STEP], o[STEP];
    double acc[STEP];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t start = 0; start < length; start += STEP) {
            int64_t offset = r * length + start;
            int64_t count = length - start < STEP ? length - start : STEP;
            if (base) load_f32(base, base_dtype, offset, count, fb);
            for (int32_t i = 0; i < n; i++) {
                double c = coef[r * n + i];
                load_f32(inputs[i], dtypes[i], offset, count, f);
                if (base) {
                    if (i == 0) {
                        for (int64_t j = 0; j < count; j++) acc[j] = (double)(f[j] - fb[j]) * c;
                    } else {
                        for (int64_t j = 0; j < count; j++)
                            acc[j] = acc[j] + (double)(f[j] - fb[j]) * c;
                    }
                } else {
                    if (i == 0) {
                        for (int64_t j = 0; j < count; j++) acc[j] = (double)f[j] * c;
                    } else {
                        for (int64_t j = 0; j < count; j++) acc[j] = acc[j] + (double)f[j] * c;
                    }
                }
            }
            if (base) {
                for (int64_t j = 0; j < count; j++) acc[j] = acc[j] + (double)fb[j];
            }
            for (int64_t j = 0; j < count; j++) o[j] = (float)acc[j];
            store_from_f32(o, count, out, out_dtype, offset);
        }
    }
}

/*
 * Model Stock's combination, in float32 as model_stock.stock_merge writes it: with t = ratio[r],
 * ((x_0 + x_1 + ... + x_{n-1}) / n) * t + base * (1 - t), n >= 2.
 */
KERNEL void msw_stock_combine(const void *const *inputs, const int32_t *dtypes, int32_t n,
                              const void *base, int32_t base_dtype, int64_t rows, int64_t length,
                              const float *ratio, void *out, int32_t out_dtype) {
    float f[STEP], acc[STEP];
    const float divisor = (float)n;
    for (int64_t r = 0; r < rows; r++) {
        const float t = ratio[r];
        const float keep = 1.0f - t;
        for (int64_t start = 0; start < length; start += STEP) {
            int64_t offset = r * length + start;
            int64_t count = length - start < STEP ? length - start : STEP;
            load_f32(inputs[0], dtypes[0], offset, count, acc);
            for (int32_t i = 1; i < n; i++) {
                load_f32(inputs[i], dtypes[i], offset, count, f);
                for (int64_t j = 0; j < count; j++) acc[j] = acc[j] + f[j];
            }
            load_f32(base, base_dtype, offset, count, f);
            for (int64_t j = 0; j < count; j++) acc[j] = acc[j] / divisor * t + f[j] * keep;
            store_from_f32(acc, count, out, out_dtype, offset);
        }
    }
}

/*
 * NearSwap, as methods.nearswap writes it in float32: w = clamp(t * (1 / max(|a - b|, eps)),
 * 0, 1), out = w * b + (1 - w) * a. NaN passes through each clamp, as in torch.
 */
KERNEL void msw_nearswap(const void *a, int32_t a_dtype, const void *b, int32_t b_dtype,
                         int64_t n, float t, float eps, void *out, int32_t out_dtype) {
    float fa[STEP], fb[STEP], o[STEP];
    for (int64_t start = 0; start < n; start += STEP) {
        int64_t count = n - start < STEP ? n - start : STEP;
        load_f32(a, a_dtype, start, count, fa);
        load_f32(b, b_dtype, start, count, fb);
        for (int64_t j = 0; j < count; j++) {
            float distance = fabsf(fa[j] - fb[j]);
            distance = distance < eps ? eps : distance;
            float w = 1.0f / distance * t;
            w = w < 0.0f ? 0.0f : w;
            w = w > 1.0f ? 1.0f : w;
            o[j] = w * fb[j] + (1.0f - w) * fa[j];
        }
        store_from_f32(o, count, out, out_dtype, start);
    }
}

/*
 * Arcee Fusion's combination, as methods.arcee_fusion writes it in float32: with change =
 * m - b, keep = (|change| * kl[r] >= threshold) as 0 or 1, out = change * keep + b.
 */
KERNEL void msw_fusion_apply(const void *m, int32_t m_dtype, const void *b, int32_t b_dtype,
                             int64_t rows, int64_t length, const float *kl, float threshold,
                             void *out, int32_t out_dtype) {
    float fm[STEP], fb[STEP], o[STEP];
    for (int64_t r = 0; r < rows; r++) {
        const float k = kl[r];
        for (int64_t start = 0; start < length; start += STEP) {
            int64_t offset = r * length + start;
            int64_t count = length - start < STEP ? length - start : STEP;
            load_f32(m, m_dtype, offset, count, fm);
            load_f32(b, b_dtype, offset, count, fb);
            for (int64_t j = 0; j < count; j++) {
                float change = fm[j] - fb[j];
                float keep = fabsf(change) * k >= threshold ? 1.0f : 0.0f;
                o[j] = change * keep + fb[j];
            }
            store_from_f32(o, count, out, out_dtype, offset);
        }
    }
}

/* A float's key in an unsigned order that agrees with the float order (NaN last, as torch's sort
 * puts it; -0 just below +0, which compare equal as floats, so no comparison can tell). */
HELPER uint32_t order_key(float x) {
    if (x != x) return UINT32_MAX;
    uint32_t u = float_to_bits(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

HELPER float from_key(uint32_t key) {
    if (key == UINT32_MAX) return NAN;
    return bits_to_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

/* Sorts keys[0..n) in place by their lowest `bits` bits (LSD radix, 11 bits a pass); scratch
 * holds n keys. */
static void radix_sort(uint32_t *keys, uint32_t *scratch, int64_t n, int bits) {
    int64_t counts[2048];
    uint32_t *from = keys, *to = scratch;
    for (int shift = 0; shift < bits; shift += 11) {
        memset(counts, 0, sizeof counts);
        for (int64_t i = 0; i < n; i++) counts[(from[i] >> shift) & 2047u]++;
        int64_t total = 0;
        for (int b = 0; b < 2048; b++) {
            int64_t c = counts[b];
            counts[b] = total;
            total += c;
        }
        for (int64_t i = 0; i < n; i++) to[counts[(from[i] >> shift) & 2047u]++] = from[i];
        uint32_t *swap = from;
        from = to;
        to = swap;
    }
    if (from != keys) memcpy(keys, from, (size_t)n * sizeof(uint32_t));
}

/*
 * Arcee Fusion's quartiles: the importances |m - b| * kl[row] (float32, as
 * methods.arcee_fusion.fusion_threshold computes them) of the entries at `drawn` (count flat
 * indices, each below 2^32), or of every entry when drawn is NULL (count = rows x length),
 * sorted; out[i] = the value at sorted position at[i], for i < 3. The drawn indices are visited
 * in increasing order (the order of a sample does not change its quartiles), which reads the
 * inputs front to back instead of at random. Returns 0, or -1 when scratch cannot be allocated.
 */
KERNEL int msw_fusion_quartiles(const void *m, int32_t m_dtype, const void *b, int32_t b_dtype,
                                int64_t length, const float *kl, const int64_t *drawn,
                                int64_t count, const int64_t *at, float *out) {
    size_t size = (size_t)(count > 0 ? count : 1) * sizeof(uint32_t);
    uint32_t *keys = malloc(size), *scratch = malloc(size), *order = NULL;
    int status = -1;
    if (!keys || !scratch) goto done;
    float fm[STEP], fb[STEP];
    if (drawn) {
        order = malloc(size);
        if (!order) goto done;
        uint32_t top = 0;
        for (int64_t i = 0; i < count; i++) {
            order[i] = (uint32_t)drawn[i];
            top |= order[i];
        }
        int bits = 0;
        while (bits < 32 && (top >> bits) != 0) bits++;
        radix_sort(order, scratch, count, bits);
        int64_t row = 0, row_end = length;
        for (int64_t i = 0; i < count; i++) {
            int64_t index = order[i];
            while (index >= row_end) {
                row++;
                row_end += length;
            }
            load_f32(m, m_dtype, index, 1, fm);
            load_f32(b, b_dtype, index, 1, fb);
            keys[i] = order_key(fabsf(fm[0] - fb[0]) * kl[row]);
        }
    } else {
        int64_t row = 0, column = 0;
        for (int64_t start = 0; start < count; start += STEP) {
            int64_t n = count - start < STEP ? count - start : STEP;
            load_f32(m, m_dtype, start, n, fm);
            load_f32(b, b_dtype, start, n, fb);
            for (int64_t j = 0; j < n; j++) {
                keys[start + j] = order_key(fabsf(fm[j] - fb[j]) * kl[row]);
                if (++column == length) {
                    column = 0;
                    row++;
                }
            }
        }
    }
    radix_sort(keys, scratch, count, 32);
    for (int i = 0; i < 3; i++) out[i] = from_key(keys[at[i]]);
    status = 0;
done:
    free(keys);
    free(scratch);
    free(order);
    return status;
}
