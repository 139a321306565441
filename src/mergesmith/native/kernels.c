/*
 * Fused CPU kernels for the merge hot loops, called through ctypes (which releases the GIL, so
 * worker threads run them in parallel).
 *
 * Each kernel reproduces, operation for operation, the float32 arithmetic of the torch code it
 * replaces (mergesmith.methods.task_arithmetic, methods.linear, ops.rank_cut): the same
 * operations in the same order, each rounded to float32, with fused multiply-adds only where
 * torch fuses them too (written as fmaf; the compiler fuses nothing itself: -ffp-contract=off). The output bytes are therefore the same on both paths; the test suite
 * checks this. The gain is that one pass reads each input once and writes the output once,
 * where the torch code makes a dozen passes over block-sized temporaries.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Bumped whenever a signature or a struct below changes; the loader refuses a stale build. */
#define MS_ABI 11

/* Elements converted per step: the float32 scratch of every input stays in L1/L2. */
#define CHUNK 1024

#include "convert.h"
#include "exact_sum.h"

/* torch.sign on float32: NaN gives 0. */
static inline float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

/* ------------------------------------------------------------------ trimming, one model */

enum {
    TRIM_KEEP_ALL = 0,  /* no sparsifier, or density 1 */
    TRIM_TIMES_ZERO = 1, /* nothing kept: delta * 0, so NaN stays NaN */
    TRIM_SHRINK = 2,     /* hardshrink-style cuts, in blocks no tie run is split in */
    TRIM_MASK = 3,       /* exact cuts, in blocks holding a tie run that a cut splits */
    TRIM_GIVEN = 4,      /* delta * keep[i], a 0/1 mask drawn by torch (DARE, DELLA) */
    TRIM_GIVEN_BITS = 5, /* the same mask as bits: entry i is bit i % 8 of byte i / 8 */
    TRIM_RANDOM = 6,     /* DARE: keep entry i when draw24(stream_key, i) < threshold */
};

enum { SMALL_NONE = 0, SMALL_SHRINK = 1, SMALL_ZEROS = 2 };

/* Mirrors ctypes.Structure `Trim` in native/__init__.py, field for field. */
typedef struct {
    int32_t mode;
    int32_t has_large;   /* TRIM_SHRINK: delta = hardshrink(delta, large) */
    float large;
    int32_t small_mode;  /* TRIM_SHRINK then: delta - hardshrink(delta, small), or zeros */
    float small;
    int32_t descending;  /* TRIM_MASK: key = -|delta| (else |delta|) */
    int32_t has_lower;   /* keep key > lower_key, and of the keys equal to it ... */
    float lower_key;
    int64_t lower_need;  /* ... `need` of the `tied`, spread evenly (see spread_cut) */
    int64_t lower_tied;
    int64_t lower_phase; /* (tied entries before this block * need) mod tied */
    int32_t has_upper;   /* keep key < upper_key, and the spread share of those equal to it */
    float upper_key;
    int64_t upper_need;
    int64_t upper_tied;
    int64_t upper_phase;
    int32_t has_factor;  /* rescale */
    float factor;
    float weight;
    const void *keep;    /* TRIM_GIVEN(_BITS): the block's mask, indexed from its start */
    uint64_t stream_key; /* TRIM_RANDOM: the model's stream (ops/stream.py) ... */
    int64_t threshold;   /* ... and ceil(density * 2^24) */
} Trim;

/* Element `index` of the random stream `key`: the top 24 bits of SplitMix64's output number
 * index + 1 (its last step, z ^ (z >> 31), leaves them alone). ops/stream.py is the spec. */
static inline uint32_t draw24(uint64_t key, uint64_t index) {
    uint64_t z = key + (index + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (uint32_t)(z >> 40);
}

typedef float v8f __attribute__((vector_size(32)));

/* Entry j of row b is bit j of b, as 0.0f or 1.0f. Filled when the library is loaded. */
static float byte_as_floats[256][8];

__attribute__((constructor)) static void fill_byte_as_floats(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++) byte_as_floats[b][j] = (float)((b >> j) & 1);
}

/* Entry `at` of a mask packed as bits (bit at % 8 of byte at / 8), as 0.0f or 1.0f. */
static inline float bit_as_float(const uint8_t *bits, int64_t at) {
    return (float)((bits[at >> 3] >> (at & 7)) & 1);
}

/* Eight 0/1 bytes (entry j in byte j, little-endian) as one byte's bits (entry j at bit j).
 * The multiplier's byte k is 2^(7 - k), so byte j times it puts a copy of entry j at bit
 * 8j + 8k + 7 - k: for k = 7 - j that is bit 56 + j, and every other copy lands at a bit
 * of its own below 56 or above 63, so no sum carries into the top byte. */
static inline uint8_t gather_bits(const uint8_t *flags) {
    uint64_t word;
    memcpy(&word, flags, sizeof word);
    return (uint8_t)((word * 0x0102040810204080ULL) >> 56);
}

static inline float hardshrink(float x, float limit) {
    return (x >= -limit && x <= limit) ? 0.0f : x;
}

/*
 * The spread rule of SEMANTICS.md 3 over one chunk: of a cut's `tied` entries equal to `key`
 * in flat-index order, the j-th is kept when floor((j+1) need / tied) > floor(j need / tied),
 * i.e. when (j need mod tied) + need >= tied. `*phase` holds j need mod tied for the next tied
 * entry and is carried from chunk to chunk. Sets keep[i] = 1 for the tied entries kept (the
 * others are left as they are). The entries are compared 32 at a time into a bit mask, and
 * the rule's carried state steps only over the set bits: ties are often a fifth of a chunk.
 */
HELPER void spread_cut(const float *restrict keys, float key, int64_t need, int64_t tied,
                       int64_t *phase, float *restrict keep, int64_t count) {
    int64_t r = *phase;
    for (int64_t group = 0; group < count; group += 32) {
        int64_t m = count - group < 32 ? count - group : 32;
        const float *restrict k = keys + group;
        uint32_t bits = 0;
        for (int64_t i = 0; i < m; i++) bits |= (uint32_t)(k[i] == key) << i;
        while (bits != 0) {
            int i = __builtin_ctz(bits);
            bits &= bits - 1;
            r += need;
            int take = r >= tied;
            r -= take ? tied : 0;
            keep[group + i] = take ? 1.0f : keep[group + i];
        }
    }
    *phase = r;
}

/* `t` is the kernel's own copy: TRIM_MASK carries the spread rule's state in it from chunk to
 * chunk. `keys` and `keep` are CHUNK-sized scratch. */
HELPER void trim_chunk(Trim *t, float *restrict d, int64_t count, int64_t into_block,
                       int64_t offset, float *restrict keys, float *restrict keep) {
    switch (t->mode) {
    case TRIM_RANDOM: {
        const uint64_t key = t->stream_key;
        const int64_t threshold = t->threshold;
        for (int64_t i = 0; i < count; i++)
            d[i] = d[i] * (float)((int64_t)draw24(key, (uint64_t)(offset + i)) < threshold);
        break;
    }
    case TRIM_GIVEN: {
        const float *restrict keep = (const float *)t->keep + into_block;
        for (int64_t i = 0; i < count; i++) d[i] = d[i] * keep[i];
        break;
    }
    case TRIM_GIVEN_BITS: {
        /* Whole bytes through a table of their eight 0/1 floats: one vector multiply per
         * byte, where a shift per entry does not vectorize. */
        const uint8_t *restrict bits = (const uint8_t *)t->keep;
        int64_t i = 0;
        for (; i < count && ((into_block + i) & 7) != 0; i++)
            d[i] = d[i] * bit_as_float(bits, into_block + i);
        for (; i + 8 <= count; i += 8) {
            /* In a vector type: written as a loop of eight, gcc compiled eight scalar
             * multiplies. */
            v8f x, ones;
            memcpy(&x, d + i, sizeof x);
            memcpy(&ones, byte_as_floats[bits[(into_block + i) >> 3]], sizeof ones);
            x *= ones;
            memcpy(d + i, &x, sizeof x);
        }
        for (; i < count; i++) d[i] = d[i] * bit_as_float(bits, into_block + i);
        break;
    }
    case TRIM_KEEP_ALL:
        break;
    case TRIM_TIMES_ZERO:
        for (int64_t i = 0; i < count; i++) d[i] = d[i] * 0.0f;
        break;
    case TRIM_SHRINK: {
        const float large = t->large, small = t->small;
        if (t->has_large)
            for (int64_t i = 0; i < count; i++) d[i] = hardshrink(d[i], large);
        if (t->small_mode == SMALL_SHRINK)
            for (int64_t i = 0; i < count; i++) d[i] = d[i] - hardshrink(d[i], small);
        else if (t->small_mode == SMALL_ZEROS)
            for (int64_t i = 0; i < count; i++) d[i] = 0.0f;
        break;
    }
    case TRIM_MASK: {
        /* Strictly inside both cuts, branch-free; then the tied entries each cut keeps. */
        const float sign = t->descending ? -1.0f : 1.0f;
        const int has_lower = t->has_lower, has_upper = t->has_upper;
        const float lower_key = t->lower_key, upper_key = t->upper_key;
        for (int64_t i = 0; i < count; i++) keys[i] = sign * fabsf(d[i]);
        if (has_lower) {
            for (int64_t i = 0; i < count; i++) keep[i] = (float)(keys[i] > lower_key);
            spread_cut(keys, lower_key, t->lower_need, t->lower_tied, &t->lower_phase, keep,
                       count);
            for (int64_t i = 0; i < count; i++) d[i] = d[i] * keep[i];
        }
        if (has_upper) {
            for (int64_t i = 0; i < count; i++) keep[i] = (float)(keys[i] < upper_key);
            spread_cut(keys, upper_key, t->upper_need, t->upper_tied, &t->upper_phase, keep,
                       count);
            for (int64_t i = 0; i < count; i++) d[i] = d[i] * keep[i];
        }
        break;
    }
    }
    const float factor = t->factor, weight = t->weight;
    if (t->has_factor)
        for (int64_t i = 0; i < count; i++) d[i] = d[i] * factor;
    for (int64_t i = 0; i < count; i++) d[i] = d[i] * weight;
}

/* ------------------------------------------------------------------ the family combine */

/* The deltas that agree with the elected sign, and their weights: stored (first model) or
 * added (the others). */
HELPER void agree_into(float *restrict d, const float *restrict elected, float weight,
                       float *restrict mixed, float *restrict divisor, int64_t n, int add) {
    if (!add) {
        for (int64_t i = 0; i < n; i++) {
            float agree = sign_of(d[i]) == elected[i] ? 1.0f : 0.0f;
            mixed[i] = d[i] * agree;
            divisor[i] = agree * weight;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            float agree = sign_of(d[i]) == elected[i] ? 1.0f : 0.0f;
            mixed[i] = mixed[i] + d[i] * agree;
            divisor[i] = divisor[i] + agree * weight;
        }
    }
}

enum { CONSENSUS_NONE = 0, CONSENSUS_SUM = 1, CONSENSUS_COUNT = 2 };

/*
 * One block of merge_task_vectors: out = base + lambda * combine(trim(model_j - base) * w_j).
 * Returns 0, or -1 when scratch memory cannot be had.
 */
KERNEL int ms_family_block(const void *base, int32_t base_dtype, const void *const *models,
                    const int32_t *model_dtypes, int32_t k, const Trim *trims, int64_t start,
                    int64_t count, int32_t consensus, int32_t normalize, float plain_divisor,
                    int32_t has_lambda, float lambda, void *out, int32_t out_dtype) {
    /* Floats: base, mixed, total, divisor, keys, keep, one delta per model; then the kernel's
     * own copy of the trims. */
    size_t floats = (size_t)CHUNK * (size_t)(k + 6);
    size_t bytes = sizeof(float) * floats + sizeof(Trim) * (size_t)k;
    float *scratch = malloc(bytes + _Alignof(Trim));
    if (scratch == NULL) return -1;
    float *b = scratch;
    float *mixed = scratch + CHUNK;
    float *total = scratch + 2 * CHUNK;
    float *divisor = scratch + 3 * CHUNK;
    float *keys = scratch + 4 * CHUNK;
    float *keep = scratch + 5 * CHUNK;
    float *deltas = scratch + 6 * CHUNK;
    uintptr_t after = (uintptr_t)(scratch + floats);
    Trim *own = (Trim *)((after + _Alignof(Trim) - 1) / _Alignof(Trim) * _Alignof(Trim));
    memcpy(own, trims, sizeof(Trim) * (size_t)k);
    for (int64_t at = 0; at < count; at += CHUNK) {
        int64_t n = count - at < CHUNK ? count - at : CHUNK;
        int64_t offset = start + at;
        load_f32(base, base_dtype, offset, n, b);
        for (int32_t j = 0; j < k; j++) {
            float *d = deltas + (size_t)j * CHUNK;
            load_f32(models[j], model_dtypes[j], offset, n, d);
            for (int64_t i = 0; i < n; i++) d[i] = d[i] - b[i];
            trim_chunk(&own[j], d, n, at, offset, keys, keep);
        }
        if (consensus == CONSENSUS_NONE) {
            memcpy(mixed, deltas, sizeof(float) * (size_t)n);
            for (int32_t j = 1; j < k; j++) {
                const float *d = deltas + (size_t)j * CHUNK;
                for (int64_t i = 0; i < n; i++) mixed[i] = mixed[i] + d[i];
            }
            for (int64_t i = 0; i < n; i++) divisor[i] = plain_divisor;
        } else {
            /* Elect a sign per entry: of the sum (TIES) or of the vote of signs. */
            for (int64_t i = 0; i < n; i++)
                total[i] = consensus == CONSENSUS_SUM ? deltas[i] : sign_of(deltas[i]);
            for (int32_t j = 1; j < k; j++) {
                const float *d = deltas + (size_t)j * CHUNK;
                if (consensus == CONSENSUS_SUM)
                    for (int64_t i = 0; i < n; i++) total[i] = total[i] + d[i];
                else
                    for (int64_t i = 0; i < n; i++) total[i] = total[i] + sign_of(d[i]);
            }
            for (int64_t i = 0; i < n; i++) total[i] = sign_of(sign_of(total[i]) + 0.5f);
            /* Only the models that agree with it count, in the sum and in the divisor. */
            agree_into(deltas, total, trims[0].weight, mixed, divisor, n, 0);
            for (int32_t j = 1; j < k; j++)
                agree_into(deltas + (size_t)j * CHUNK, total, trims[j].weight, mixed, divisor,
                           n, 1);
            for (int64_t i = 0; i < n; i++)
                divisor[i] = divisor[i] + (fabsf(divisor[i]) > 0.0f ? 0.0f : 1.0f);
        }
        if (normalize)
            for (int64_t i = 0; i < n; i++) mixed[i] = mixed[i] / divisor[i];
        if (has_lambda)
            for (int64_t i = 0; i < n; i++) mixed[i] = mixed[i] * lambda;
        for (int64_t i = 0; i < n; i++) mixed[i] = mixed[i] + b[i];
        store_from_f32(mixed, n, out, out_dtype, offset);
    }
    free(scratch);
    return 0;
}

/* ------------------------------------------------------------------ linear */

/* One block of methods.linear: sum_j w_j x_j, divided by `total` when normalising. Each term is
 * a fused multiply-add onto a sum that starts at +0, as torch's add(alpha=) and mergekit's
 * addcmul_ compute it on FMA-capable CPUs; fmaf rounds once on every CPU. */
KERNEL int ms_linear_block(const void *const *models, const int32_t *model_dtypes,
                           const float *weights, int32_t k, int64_t start, int64_t count,
                           int32_t normalize, float total, void *out, int32_t out_dtype) {
    float *scratch = malloc(sizeof(float) * CHUNK * 2);
    if (scratch == NULL) return -1;
    float *acc = scratch;
    float *x = scratch + CHUNK;
    for (int64_t at = 0; at < count; at += CHUNK) {
        int64_t n = count - at < CHUNK ? count - at : CHUNK;
        int64_t offset = start + at;
        for (int64_t i = 0; i < n; i++) acc[i] = 0.0f;
        for (int32_t j = 0; j < k; j++) {
            const float weight = weights[j];
            load_f32(models[j], model_dtypes[j], offset, n, x);
            for (int64_t i = 0; i < n; i++) acc[i] = fmaf(x[i], weight, acc[i]);
        }
        if (normalize)
            for (int64_t i = 0; i < n; i++) acc[i] = acc[i] / total;
        store_from_f32(acc, n, out, out_dtype, offset);
    }
    free(scratch);
    return 0;
}

/* ------------------------------------------------------------------ rank-cut sweeps */

HELPER void keys_of(const void *base, int32_t base_dtype, const void *model, int32_t model_dtype,
                    int64_t at, int64_t m, int32_t descending, float *restrict b,
                    float *restrict keys) {
    load_f32(base, base_dtype, at, m, b);
    load_f32(model, model_dtype, at, m, keys);
    const float sign = descending ? -1.0f : 1.0f;
    for (int64_t i = 0; i < m; i++) keys[i] = sign * fabsf(keys[i] - b[i]);
}

/*
 * Keys are |model - base| (negated when `descending`), as float32. For the bracket [lo, hi]
 * counts the keys below lo, equal to lo and (when lo != hi) equal to hi, and collects the keys
 * strictly between, with their flat indices, in index order, up to `capacity` of them (the
 * buffers hold capacity + 1: stores are unconditional). *found is the number strictly between,
 * even past capacity. The keys equal to lo and to hi are also counted per block of `block`
 * entries, into lo_blocks and hi_blocks (zeroed by the caller): a cut inside such a run keeps
 * a share of it spread over the blocks. Returns 0, or 1 when a key is NaN (no order).
 */
KERNEL int ms_bracket_sweep(const void *base, int32_t base_dtype, const void *model,
                     int32_t model_dtype, int64_t n, int32_t descending, float lo, float hi,
                     int64_t *tally, float *values, int64_t *indices, int64_t capacity,
                     int64_t *found, int64_t block, int64_t *lo_blocks, int64_t *hi_blocks) {
    float b[CHUNK], keys[CHUNK];
    int64_t below = 0, equal_lo = 0, equal_hi = 0, inside = 0;
    int64_t at = 0;
    while (at < n) {
        /* A chunk never straddles two blocks. */
        int64_t m = n - at < CHUNK ? n - at : CHUNK;
        if (m > block - at % block) m = block - at % block;
        keys_of(base, base_dtype, model, model_dtype, at, m, descending, b, keys);
        int32_t chunk_below = 0, chunk_equal = 0, unordered = 0;
        for (int64_t i = 0; i < m; i++) {
            unordered |= keys[i] != keys[i];
            chunk_below += keys[i] < lo;
            chunk_equal += keys[i] == lo;
        }
        below += chunk_below;
        equal_lo += chunk_equal;
        lo_blocks[at / block] += chunk_equal;
        if (lo != hi) {
            int32_t chunk_inside = 0;
            chunk_equal = 0;
            for (int64_t i = 0; i < m; i++) {
                chunk_equal += keys[i] == hi;
                chunk_inside += (keys[i] > lo) & (keys[i] < hi);
            }
            equal_hi += chunk_equal;
            hi_blocks[at / block] += chunk_equal;
            if (chunk_inside > 0 && inside + chunk_inside <= capacity) {
                int64_t at_slot = inside;
                for (int64_t i = 0; i < m; i++) {
                    values[at_slot] = keys[i];
                    indices[at_slot] = at + i;
                    at_slot += (keys[i] > lo) & (keys[i] < hi);
                }
            }
            inside += chunk_inside;
        }
        if (unordered) return 1;
        at += m;
    }
    tally[0] = below;
    tally[1] = equal_lo;
    tally[2] = equal_hi;
    *found = inside;
    return 0;
}

/* Keys at `count` evenly spaced positions, i * n / count (rank_cut.sample_positions). */
KERNEL void ms_sample_keys(const void *base, int32_t base_dtype, const void *model, int32_t model_dtype,
                    int64_t n, int32_t descending, int64_t count, float *out) {
    const float sign = descending ? -1.0f : 1.0f;
    for (int64_t i = 0; i < count; i++) {
        float b, m;
        int64_t at = i * n / count;
        load_f32(base, base_dtype, at, 1, &b);
        load_f32(model, model_dtype, at, 1, &m);
        out[i] = sign * fabsf(m - b);
    }
}

/* keep[i] = 1 where element start + i of stream `key` is kept: with probability threshold / 2^24
 * (DARE, has_p = 0), or with probability p[i] (DELLA: draw / 2^24 < p[i] in float32). */
KERNEL void ms_stream_keep(uint64_t key, int64_t start, int64_t count, int64_t threshold,
                           const float *p, float *keep) {
    if (p == NULL) {
        for (int64_t i = 0; i < count; i++)
            keep[i] = (float)((int64_t)draw24(key, (uint64_t)(start + i)) < threshold);
    } else {
        for (int64_t i = 0; i < count; i++)
            keep[i] = (float)((float)draw24(key, (uint64_t)(start + i)) * 0x1p-24f < p[i]);
    }
}

/* Sorts `count` (key << 32 | index) items by key: least significant byte first, with the four
 * byte histograms counted in one pass, skipping the bytes all keys share. `tmp` has room for
 * `count` items; the result may end in either. */
static uint64_t *radix_sort_keys(uint64_t *items, uint64_t *tmp, int64_t count) {
    uint32_t bucket[4][256];
    memset(bucket, 0, sizeof bucket);
    for (int64_t i = 0; i < count; i++) {
        const uint32_t key = (uint32_t)(items[i] >> 32);
        bucket[0][key & 255]++;
        bucket[1][(key >> 8) & 255]++;
        bucket[2][(key >> 16) & 255]++;
        bucket[3][key >> 24]++;
    }
    for (int digit = 0; digit < 4; digit++) {
        const int shift = 32 + 8 * digit;
        uint32_t *b = bucket[digit];
        if (b[(items[0] >> shift) & 255] == (uint32_t)count) continue;
        uint32_t at = 0;
        for (int v = 0; v < 256; v++) {
            const uint32_t c = b[v];
            b[v] = at;
            at += c;
        }
        for (int64_t i = 0; i < count; i++) tmp[b[(items[i] >> shift) & 255]++] = items[i];
        uint64_t *swap = items;
        items = tmp;
        tmp = swap;
    }
    return items;
}

/* DELLA's keep probability at tie-averaged rank (first + last) / 2, each step rounded to float32
 * as the torch code rounds it (ops.select.tie_averaged_ranks, then the sparsifier). */
static inline float della_p(int64_t first, int64_t last, float spread, float scale,
                            float offset) {
    return (float)(first + last) / 2.0f / spread * scale + offset;
}

/* The keep mask of one row from its exact ranks: sorts (key << 32 | index) items by radix. */
static void della_row_sorted(const uint32_t *keys, const float *u, int64_t width, float spread,
                             float scale, float offset, uint64_t *scratch, float *k) {
    for (int64_t i = 0; i < width; i++) scratch[i] = (uint64_t)keys[i] << 32 | (uint64_t)i;
    uint64_t *sorted = radix_sort_keys(scratch, scratch + width, width);
    /* Each sorted position's run of equal keys, without branching on it (runs are short and of
     * any length, so branches would mispredict): its first position on the way forward, its
     * last on the way back, where the item's column takes the run's keep decision. */
    int32_t *firsts = (int32_t *)(sorted == scratch ? scratch + width : scratch);
    int64_t run = 0;
    for (int64_t j = 0; j < width; j++) {
        run = j > 0 && (sorted[j] >> 32) == (sorted[j - 1] >> 32) ? run : j;
        firsts[j] = (int32_t)run;
    }
    for (int64_t j = width - 1; j >= 0; j--) {
        run = j < width - 1 && (sorted[j] >> 32) == (sorted[j + 1] >> 32) ? run : j;
        const int64_t i = (int64_t)(sorted[j] & 0xFFFFFFFFu);
        k[i] = (float)(u[i] < della_p(firsts[j], run, spread, scale, offset));
    }
}

/* A row with more entries than this that their bucket does not settle is sorted instead. */
#define DELLA_UNSETTLED 16

/* Scratch for della_row: per entry two radix buffers (for a row that is sorted), key and draw;
 * per bucket its count, least and greatest key, and the bounds of p. */
typedef struct {
    int64_t width, buckets;
    float spread;
    uint64_t *sort_items;
    uint32_t *keys, *count, *lowest, *highest;
    float *u, *p_low, *p_high;
} DellaScratch;

/* One allocation, starting at sort_items: free(s->sort_items) releases all of it. */
static int della_scratch(DellaScratch *s, int64_t width) {
    int64_t buckets = 64;
    while (buckets < width / 2 && buckets < 4096) buckets *= 2;
    uint8_t *at = malloc((size_t)width * (16 + 4 + 4) + (size_t)buckets * (3 * 4 + 2 * 4));
    if (at == NULL) return -1;
    s->width = width;
    s->buckets = buckets;
    s->spread = (float)(width - 1);
    s->sort_items = (uint64_t *)at;
    s->keys = (uint32_t *)(s->sort_items + 2 * width);
    s->u = (float *)(s->keys + width);
    s->count = (uint32_t *)(s->u + width);
    s->lowest = s->count + buckets;
    s->highest = s->lowest + buckets;
    s->p_low = (float *)(s->highest + buckets);
    s->p_high = s->p_low + buckets;
    return 0;
}

/*
 * DELLA's keep mask for one row of `width` > 1 magnitudes starting at flat index `row_start`:
 * entry i is kept (k[i] = 1) when draw / 2^24 < (rank / (width - 1)) * scale + offset, rank
 * being its tie-averaged ascending rank in the row (ops.select.tie_averaged_ranks). Magnitudes
 * are >= 0 and not NaN, so their bit patterns order as they compare.
 *
 * Most entries need no exact rank. The keys are counted into buckets by their leading bits (a
 * map that never reverses order), so an entry's run of equal keys lies within its bucket's
 * span of ranks [first, last], and its probability p within [p(first), p(last)]: p only grows
 * with the rank (or only falls, for a negative scale), each float32 step being monotone. A draw
 * outside that interval decides the entry; a bucket whose keys are all equal gives its exact
 * rank. The few entries left (about scale times the entries per bucket, per row) get their rank
 * by counting the row's smaller and equal keys; a row with many of them is sorted.
 */
HELPER void della_row(const DellaScratch *s, const float *m, uint64_t key, int64_t row_start,
                      float scale, float offset, float *k) {
    const int64_t width = s->width, buckets = s->buckets;
    const float spread = s->spread;
    uint32_t *keys = s->keys, *count = s->count, *lowest = s->lowest, *highest = s->highest;
    float *u = s->u, *p_low = s->p_low, *p_high = s->p_high;
    /* The least nonzero key, as the least key - 1 (which wraps 0 to the top); 0 when every key
     * is. */
    uint32_t below_low = UINT32_MAX, high = 0;
    for (int64_t i = 0; i < width; i++) {
        const uint32_t b = float_to_bits(m[i]);
        keys[i] = b;
        below_low = b - 1 < below_low ? b - 1 : below_low;
        high = b > high ? b : high;
    }
    const uint32_t low = below_low + 1;
    for (int64_t i = 0; i < width; i++)
        u[i] = (float)draw24(key, (uint64_t)(row_start + i)) * 0x1p-24f;
    /* Bucket 0 holds the zeros (unchanged entries are common); the others split the range of
     * nonzero keys by their leading bits. */
    int shift = 0;
    while (shift < 31 && (high >> shift) - (low >> shift) >= (uint32_t)(buckets - 1)) shift++;
    const uint32_t origin = low >> shift;
#define DELLA_BUCKET(b) ((1u + ((b) >> shift) - origin) * (uint32_t)((b) != 0))
    memset(count, 0, sizeof(uint32_t) * (size_t)buckets);
    memset(lowest, 0xFF, sizeof(uint32_t) * (size_t)buckets);
    memset(highest, 0, sizeof(uint32_t) * (size_t)buckets);
    for (int64_t i = 0; i < width; i++) {
        const uint32_t b = keys[i], at = DELLA_BUCKET(b);
        count[at]++;
        lowest[at] = b < lowest[at] ? b : lowest[at];
        highest[at] = b > highest[at] ? b : highest[at];
    }
    uint32_t at_rank = 0;
    for (int64_t b = 0; b < buckets; b++) {
        if (count[b] == 0) continue;
        const uint32_t last = at_rank + count[b] - 1;
        if (lowest[b] == highest[b]) {
            /* One run: its rank is exact. */
            p_low[b] = p_high[b] = della_p(at_rank, last, spread, scale, offset);
        } else {
            const float a = della_p(at_rank, at_rank, spread, scale, offset);
            const float z = della_p(last, last, spread, scale, offset);
            p_low[b] = a < z ? a : z;
            p_high[b] = a < z ? z : a;
        }
        at_rank += count[b];
    }
    /* Kept below p_low, dropped from p_high up; between them the bucket does not decide.
     * Counted without branching (whether a draw falls below p_low is a coin toss). */
    int64_t open = 0;
    for (int64_t i = 0; i < width; i++) {
        const uint32_t at = DELLA_BUCKET(keys[i]);
        /* u < p as the sign of u - p (never -0 for u != p), spread into a mask of 1.0f:
         * compilers turn a comparison's 0/1 here into a branch, which mispredicts. */
        const int32_t below = (int32_t)float_to_bits(u[i] - p_low[at]) >> 31;
        k[i] = bits_to_float((uint32_t)below & 0x3F800000u);
        open += (u[i] >= p_low[at]) & (u[i] < p_high[at]);
    }
    if (open > DELLA_UNSETTLED) {
        della_row_sorted(keys, u, width, spread, scale, offset, s->sort_items, k);
        return;
    }
    for (int64_t i = 0; open > 0 && i < width; i++) {
        const uint32_t at = DELLA_BUCKET(keys[i]), b = keys[i];
        if (u[i] < p_low[at] || u[i] >= p_high[at]) continue;
        open--;
        /* 32-bit counts (rows are narrower than 2^31) let the loop run 8 keys a step. */
        int32_t below = 0, equal = 0;
        for (int64_t c = 0; c < width; c++) {
            below += keys[c] < b;
            equal += keys[c] == b;
        }
        k[i] = (float)(u[i] < della_p(below, below + equal - 1, spread, scale, offset));
    }
#undef DELLA_BUCKET
}

/* DELLA's keep mask (della_row) for `rows` rows of `width` > 1 magnitudes, flat index `start`
 * onwards. Returns 0, or -1 when scratch memory cannot be had. */
KERNEL int ms_della_keep(const float *magnitude, int64_t rows, int64_t width, uint64_t key,
                         int64_t start, float scale, float offset, float *keep) {
    DellaScratch s;
    if (della_scratch(&s, width)) return -1;
    for (int64_t r = 0; r < rows; r++)
        della_row(&s, magnitude + r * width, key, start + r * width, scale, offset,
                  keep + r * width);
    free(s.sort_items);
    return 0;
}

/* DELLA's `rescale` measuring pass over `rows` rows of `width` > 1 entries of flat inputs from
 * `start`: adds the magnitudes |model - base| (float32) to `all` and the same times the keep
 * mask to `kept`, exactly (exact_sum.h), and writes the mask as bits (entry i of the block is
 * bit i % 8 of byte i / 8, as TRIM_GIVEN_BITS reads them). One pass instead of the torch code's
 * conversion, subtraction, two absolute values, product, sums and packing. Returns 0, or -1
 * when scratch memory cannot be had. */
KERNEL int ms_della_measure(const void *base, int32_t base_dtype, const void *model,
                            int32_t model_dtype, int64_t start, int64_t rows, int64_t width,
                            uint64_t key, float scale, float offset, ExactSum *all,
                            ExactSum *kept, uint8_t *bits) {
    DellaScratch s;
    if (della_scratch(&s, width)) return -1;
    float *row = malloc(sizeof(float) * (size_t)width * 2);
    if (row == NULL) {
        free(s.sort_items);
        return -1;
    }
    float *k = row + width;
    memset(bits, 0, (size_t)((rows * width + 7) / 8));
    for (int64_t r = 0; r < rows; r++) {
        const int64_t at = r * width;
        float b[CHUNK];
        /* The magnitudes replace the model's values in `row`, a chunk at a time. */
        for (int64_t c = 0; c < width; c += CHUNK) {
            const int64_t n = width - c < CHUNK ? width - c : CHUNK;
            load_f32(base, base_dtype, start + at + c, n, b);
            load_f32(model, model_dtype, start + at + c, n, row + c);
            for (int64_t i = 0; i < n; i++) row[c + i] = fabsf(row[c + i] - b[i]);
        }
        della_row(&s, row, key, start + at, scale, offset, k);
        for (int64_t c = 0; c < width; c += EXACT_SPAN) {
            const int64_t n = width - c < EXACT_SPAN ? width - c : EXACT_SPAN;
            exact_add_pair(all, kept, row + c, k + c, n);
        }
        /* Bits gathered a byte at a time in a register: or-ing each into memory would chain
         * eight dependent stores per byte. A row's first and last bytes may be shared with
         * its neighbours. */
        int64_t i = 0;
        for (; i < width && ((at + i) & 7) != 0; i++)
            bits[(at + i) >> 3] |= (uint8_t)((k[i] != 0.0f) << ((at + i) & 7));
        for (; i + 8 <= width; i += 8) {
            uint32_t byte = 0;
            for (int j = 0; j < 8; j++) byte |= (uint32_t)(k[i + j] != 0.0f) << j;
            bits[(at + i) >> 3] = (uint8_t)byte;
        }
        for (; i < width; i++)
            bits[(at + i) >> 3] |= (uint8_t)((k[i] != 0.0f) << ((at + i) & 7));
    }
    free(row);
    free(s.sort_items);
    return 0;
}

/* DARE's rescale measures two L1 norms per block: of delta = model - base, and of what the
 * stream keeps of it. This adds both to `all` and `kept` exactly (exact_sum.h) in one pass, and
 * writes the keep mask as bits (entry i of the block is bit i % 8 of byte i / 8, as
 * TRIM_GIVEN_BITS reads them): the combining pass reads those back instead of drawing again,
 * which costs several times more. */
KERNEL void ms_stream_measure(const void *base, int32_t base_dtype, const void *model,
                              int32_t model_dtype, int64_t start, int64_t count, uint64_t key,
                              int64_t threshold, ExactSum *all, ExactSum *kept, uint8_t *bits) {
    float b[CHUNK], d[CHUNK], ones[CHUNK];
    uint8_t keep[CHUNK];
    for (int64_t at = 0; at < count; at += CHUNK) {
        int64_t n = count - at < CHUNK ? count - at : CHUNK;
        load_f32(base, base_dtype, start + at, n, b);
        load_f32(model, model_dtype, start + at, n, d);
        for (int64_t i = 0; i < n; i++)
            keep[i] = (uint8_t)((int64_t)draw24(key, (uint64_t)(start + at + i)) < threshold);
        for (int64_t i = 0; i < n; i++) {
            d[i] = fabsf(d[i] - b[i]);
            ones[i] = (float)keep[i];
        }
        exact_add_pair(all, kept, d, ones, n);
        /* CHUNK is a multiple of 8, so each chunk starts on a byte; the last may end inside
         * one, whose missing entries count as dropped. */
        for (int64_t i = n; i < CHUNK && (i & 7) != 0; i++) keep[i] = 0;
        for (int64_t i = 0; i < n; i += 8) bits[(at + i) >> 3] = gather_bits(keep + i);
    }
}

/* Adds x[0..n) to `all` exactly (exact_sum.h) through the general rounds alone, without the
 * fused passes' shortcut: the tests hold its counts to Python's math.fsum. */
KERNEL void ms_exact_sum(const float *x, int64_t n, ExactSum *all) {
    for (int64_t at = 0; at < n; at += EXACT_SPAN)
        exact_add_slowly(all, x + at, n - at < EXACT_SPAN ? n - at : EXACT_SPAN);
}

/* How many of the `count` values at `src` (dtype) are NaN or infinite: those whose exponent
 * bits are all set. The kernel route's check of a merged tensor (mergesmith.kernel_route). */
KERNEL int64_t ms_count_nonfinite(const void *src, int32_t dtype, int64_t count) {
    int64_t found = 0;
    if (dtype == DT_F32) {
        const uint32_t *p = (const uint32_t *)src;
        for (int64_t i = 0; i < count; i++) found += (p[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *p = (const uint16_t *)src;
        const uint16_t exponent = dtype == DT_BF16 ? 0x7F80u : 0x7C00u;
        for (int64_t i = 0; i < count; i++) found += (p[i] & exponent) == exponent;
    }
    return found;
}

/* ------------------------------------------------------------------ CRC-32 of written bytes */

/*
 * zlib's CRC-32, for the writer's progress journal: ms_crc32(crc, data, n) returns what
 * zlib.crc32(data, crc) does, so a journal reads the same whichever path wrote it, and calls
 * chain: ms_crc32(ms_crc32(0, a), b) is the CRC of a then b.
 *
 * The arithmetic, which the constants below follow from: bits are polynomials over GF(2), read
 * reflected (a byte's lowest bit is its highest power of x, and the first byte comes first),
 * and P = x^32 + x^26 + x^23 + x^22 + x^16 + x^12 + x^11 + x^10 + x^8 + x^7 + x^5 + x^4 + x^2 +
 * x + 1 (0xEDB88320 reflected). After a message M the register holds M x^32 mod P, with the
 * register's starting value xored into M's first 32 bits; zlib inverts the register on the way
 * in and out, and so does ms_crc32. Since only M mod P matters, any stretch of M may be replaced
 * by a shorter one congruent to it: that is what both implementations do.
 */

#define CRC_POLY 0xEDB88320u

/* crc_table[t][b]: what byte b, followed by t zero bytes, does to a zero register. */
static uint32_t crc_table[8][256];

__attribute__((constructor)) static void fill_crc_table(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int bit = 0; bit < 8; bit++) c = (c >> 1) ^ (CRC_POLY & (0u - (c & 1u)));
        crc_table[0][b] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int b = 0; b < 256; b++) {
            const uint32_t c = crc_table[t - 1][b];
            crc_table[t][b] = (c >> 8) ^ crc_table[0][c & 0xFFu];
        }
}

static inline uint32_t load_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The register `c` (inverted, as kept between bytes) advanced over p[0..n): eight bytes a step
 * ("slicing by 8"), each through the table of the number of bytes that follow it in the step,
 * so the eight lookups are independent; the last n % 8 bytes one at a time. */
static uint32_t crc_bytes(uint32_t c, const uint8_t *p, int64_t n) {
    for (; n >= 8; p += 8, n -= 8) {
        const uint32_t lo = c ^ load_le32(p), hi = load_le32(p + 4);
        c = crc_table[7][lo & 0xFFu] ^ crc_table[6][(lo >> 8) & 0xFFu] ^
            crc_table[5][(lo >> 16) & 0xFFu] ^ crc_table[4][lo >> 24] ^
            crc_table[3][hi & 0xFFu] ^ crc_table[2][(hi >> 8) & 0xFFu] ^
            crc_table[1][(hi >> 16) & 0xFFu] ^ crc_table[0][hi >> 24];
    }
    for (; n > 0; p++, n--) c = (c >> 8) ^ crc_table[0][(c ^ *p) & 0xFFu];
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MS_HAVE_CLMUL 1
#include <immintrin.h>

/*
 * Carry-less multiplication folds the message 64 bytes a step (Gopal et al., "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ", Intel, 2009), at several times the speed
 * of the tables. PCLMULQDQ is in none of the x86-64 levels that KERNEL's clones target, so this
 * is compiled for it alone and chosen at run time.
 *
 * A 128-bit lane X, loaded little-endian, is two 64-bit halves: X = H x^64 + L, H the first
 * eight bytes. Moving X forward over d more bits of message replaces X x^d by H (x^(64+d) mod
 * P) + L (x^d mod P), which has under 96 bits and so fits in the lane d bits on; the data there
 * is xored on top. A product of two reflected operands comes out one power of x low, and the
 * multipliers are kept as 33-bit reflected values (bit i is the coefficient of x^(32 - i)), so
 * multiplying a half by the constant for x^(n - 32) mod P puts H x^n where it belongs. Each
 * constant is therefore k(n) = bitreverse32(x^(n - 32) mod P) << 1, computed (and checked by
 * tests/test_native_kernels.py, which holds every length and alignment to zlib) from P.
 */
#define CRC_K1 0x154442BD4ull /* k(64 + 512): H, four lanes (512 bits) on */
#define CRC_K2 0x1C6E41596ull /* k(512): L, four lanes on */
#define CRC_K3 0x1751997D0ull /* k(64 + 128): H, one lane on */
#define CRC_K4 0x0CCAA009Eull /* k(128): L, one lane on; also H when ending */
#define CRC_K5 0x163CD6124ull /* k(96): from 96 bits to 64, when ending */
#define CRC_MU 0x1F7011641ull /* floor(x^64 / P), 33 bits reflected: Barrett's quotient */
#define CRC_P 0x1DB710641ull  /* P itself, 33 bits reflected */

#define CLMUL __attribute__((target("pclmul,sse4.1")))

/* `x` moved on over the distance of `k`'s pair of constants, onto `next`. */
CLMUL static inline __m128i crc_fold(__m128i x, __m128i k, __m128i next) {
    const __m128i h = _mm_clmulepi64_si128(x, k, 0x00), l = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(h, l), next);
}

/* The register `c` advanced over p[0..n), n >= 64 and a multiple of 16. */
CLMUL static uint32_t crc_clmul(uint32_t c, const uint8_t *p, int64_t n) {
    const __m128i k1k2 = _mm_set_epi64x((long long)CRC_K2, (long long)CRC_K1);
    const __m128i k3k4 = _mm_set_epi64x((long long)CRC_K4, (long long)CRC_K3);
    const __m128i k5 = _mm_set_epi64x(0, (long long)CRC_K5);
    const __m128i mu_p = _mm_set_epi64x((long long)CRC_MU, (long long)CRC_P);
    const __m128i low32 = _mm_setr_epi32(-1, 0, 0, 0);
    /* Four lanes, 64 bytes a step: each lane's two multiplies do not wait on the others'. The
     * register goes into the message's first 32 bits. */
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)c));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    for (p += 64, n -= 64; n >= 64; p += 64, n -= 64) {
        x0 = crc_fold(x0, k1k2, _mm_loadu_si128((const __m128i *)p));
        x1 = crc_fold(x1, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = crc_fold(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = crc_fold(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    /* The four lanes into one, then any 16-byte blocks left. */
    x1 = crc_fold(x0, k3k4, x1);
    x2 = crc_fold(x1, k3k4, x2);
    x3 = crc_fold(x2, k3k4, x3);
    for (; n >= 16; p += 16, n -= 16) x3 = crc_fold(x3, k3k4, _mm_loadu_si128((const __m128i *)p));
    /* The register is now X x^32 mod P, for the 128 bits X = H x^64 + L in x3. x^32 (X x^32) =
     * H x^128 + L x^64: H times k(128), plus L shifted down half a lane, fill the lane's first
     * 96 bits with Z x^32, Z congruent to X x^32 (x does not divide P). */
    x3 = _mm_xor_si128(_mm_clmulepi64_si128(x3, k3k4, 0x10), _mm_srli_si128(x3, 8));
    /* Z = A x^64 + B, A its first 32 bits. x^64 Z = A x^128 + B x^64: A (as a half, A x^32)
     * times k(96), plus B shifted down 32 bits, fill the lane's first half with V x^64, V a
     * 64-bit value congruent to Z. */
    x3 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x3, low32), k5, 0x00),
                       _mm_srli_si128(x3, 4));
    /* Barrett reduction of V = A x^32 + B (A its first 32 bits): the quotient V / P is the first
     * 32 bits of A floor(x^64 / P) (exact over GF(2) for V below x^64), and V - (V / P) P, the
     * remainder, is left in bits 32..63. */
    __m128i q = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x3, low32), mu_p, 0x10), low32);
    x3 = _mm_xor_si128(x3, _mm_clmulepi64_si128(q, mu_p, 0x00));
    return (uint32_t)_mm_extract_epi32(x3, 1);
}
#else
#define MS_HAVE_CLMUL 0
#endif

/* The folds take 64 bytes or more, from a 16-byte boundary (up to 15 bytes of table steps
 * away); from there on they beat the tables (64 bytes: 18 ns against 40 on an EPYC 7003). */
#define CRC_FOLD_MIN (64 + 15)

int ms_crc32_uses_clmul(void) {
#if MS_HAVE_CLMUL
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#else
    return 0;
#endif
}

/* zlib.crc32(data[0..length), crc) through the tables alone: the tests hold this path to zlib
 * too, on machines where ms_crc32 would fold. */
uint32_t ms_crc32_portable(uint32_t crc, const void *data, int64_t length) {
    return ~crc_bytes(~crc, (const uint8_t *)data, length);
}

/* zlib.crc32(data[0..length), crc). */
uint32_t ms_crc32(uint32_t crc, const void *data, int64_t length) {
    const uint8_t *p = (const uint8_t *)data;
    uint32_t c = ~crc;
#if MS_HAVE_CLMUL
    if (length >= CRC_FOLD_MIN && ms_crc32_uses_clmul()) {
        /* The tables up to a 16-byte boundary, so no load straddles two cache lines, and for
         * the last n % 16 bytes. */
        const int64_t head = (int64_t)((16 - ((uintptr_t)p & 15u)) & 15u);
        c = crc_bytes(c, p, head);
        p += head;
        length -= head;
        const int64_t body = length & ~(int64_t)15;
        c = crc_clmul(c, p, body);
        p += body;
        length -= body;
    }
#endif
    return ~crc_bytes(c, p, length);
}

int ms_abi(void) { return MS_ABI; }

/* setup.py defines it as native.status.source_hash of the sources it compiles. */
#ifndef MS_SOURCE_HASH
#define MS_SOURCE_HASH "unknown"
#endif
const char *ms_source_hash(void) { return MS_SOURCE_HASH; }

int ms_has_f16(void) { return MS_HAVE_F16; }

/* A real (empty) extension module, so the build and import machinery treat it as one. */
static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels, loaded through ctypes.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
