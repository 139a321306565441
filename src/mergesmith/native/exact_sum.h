/*
 * Exact sums of float32 values, whatever their order: the L1 norms behind `rescale`.
 *
 * A float32 sum rounds after every addition, so its last bits depend on the order of the
 * additions, which torch chooses per CPU instruction set and per device. Summed exactly, the
 * norms (and so the rescale factor, their ratio rounded once) are the same on every machine,
 * device, block size and thread count.
 *
 * Every float32 is a multiple of 2^-149, so a sum of them is an integer number of units of
 * 2^-201 (the 53-bit significand of a double of that magnitude counts in those units). The
 * accumulator keeps, per power of two of those units, a 128-bit count; the Python side
 * (ops.exact_sum) folds the counts into one integer.
 *
 * Values reach the counts a span of up to EXACT_SPAN at a time, split as in Rump, Ogita and
 * Oishi's AccSum: with every |x| < 2^e and sigma = 2^(e + 11), h = (x + sigma) - sigma is x
 * rounded to a multiple of 2^(e - 42) (the spacing of doubles just below sigma), exactly, and
 * x - h is exact too. The h of a span are multiples of 2^(e - 42) adding up to less than
 * 2^(e + 11), so in a double their sum is exact in any order: 53 bits. The remainders, each
 * below 2^(e - 41), go through the same split again until none is left (they are multiples of
 * 2^-149, so that takes a few rounds at most; for inputs read from 16-bit checkpoints there is
 * almost never a second round).
 */

#define EXACT_SPAN 1024
#define EXACT_BINS 288
#define EXACT_LOW (-201) /* count b is in units of 2^(b + EXACT_LOW) */

typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

/* Mirrors ctypes.Structure `NativeSum` in native/__init__.py. */
typedef struct {
    uint64_t count[EXACT_BINS][2]; /* low and high words of a two's-complement 128-bit count */
    int64_t infinities, nans;      /* values summed that were +-inf, NaN */
} ExactSum;

/* Adds v, a multiple of 2^-149 below 2^139 in magnitude, to its count. */
static void exact_add_double(ExactSum *s, double v) {
    if (v == 0.0) return;
    int e;
    const double m = frexp(v, &e); /* v = m 2^e, 1/2 <= |m| < 1 */
    const int64_t units = (int64_t)ldexp(m, 53);
    uint64_t *c = s->count[e - 53 - EXACT_LOW];
    __int128 sum = (__int128)(((unsigned __int128)c[1] << 64) | c[0]);
    sum += units;
    c[0] = (uint64_t)sum;
    c[1] = (uint64_t)((unsigned __int128)sum >> 64);
}

/* Adds r[0..n) (n <= EXACT_SPAN, finite multiples of 2^-149) exactly; r is used up. */
static void exact_add_rounds(ExactSum *s, double *r, int64_t n) {
    for (;;) {
        double most = 0.0;
        for (int64_t i = 0; i < n; i++) most = fabs(r[i]) > most ? fabs(r[i]) : most;
        if (most == 0.0) return;
        int e;
        (void)frexp(most, &e); /* every |r[i]| < 2^e */
        const double sigma = ldexp(1.0, e + 11);
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) {
            const double h = (r[i] + sigma) - sigma;
            r[i] -= h;
            sum += h;
        }
        exact_add_double(s, sum);
    }
}

/* Adds x[0..n) (n <= EXACT_SPAN, any floats) to `s`, counting infinities and NaNs apart. */
static void exact_add_slowly(ExactSum *s, const float *x, int64_t n) {
    double r[EXACT_SPAN];
    for (int64_t i = 0; i < n; i++) {
        s->infinities += isinf(x[i]) != 0;
        s->nans += isnan(x[i]) != 0;
        r[i] = isfinite(x[i]) ? (double)x[i] : 0.0;
    }
    exact_add_rounds(s, r, n);
}

/* Adds x[i] to `all` and the float32 product x[i] * keep[i] to `kept`, for i < n. */
static void exact_add_pair_slowly(ExactSum *all, ExactSum *kept, const float *x,
                                  const float *keep, int64_t n) {
    float product[EXACT_SPAN];
    for (int64_t i = 0; i < n; i++) product[i] = x[i] * keep[i];
    exact_add_slowly(all, x, n);
    exact_add_slowly(kept, product, n);
}

/* The same for x >= 0 (and -0, never NaN or inf where the caller knows so) and keep 0 or 1:
 * one split of each value serves both sums, the kept one summing h * keep. */
HELPER void exact_add_pair(ExactSum *all, ExactSum *kept, const float *x, const float *keep,
                           int64_t n) {
    uint32_t top = 0; /* non-negative floats order as their bit patterns */
    for (int64_t i = 0; i < n; i++) {
        const uint32_t b = float_to_bits(x[i]) & 0x7FFFFFFFu;
        top = b > top ? b : top;
    }
    if (top == 0) return;
    if (top >= 0x7F800000u) {
        exact_add_pair_slowly(all, kept, x, keep, n);
        return;
    }
    int e;
    (void)frexpf(bits_to_float(top), &e);
    const double sigma = ldexp(1.0, e + 11);
    /* Doubles four a vector, in vector types: the compiler leaves a loop of double sums scalar
     * (it may not reorder them, not knowing they are exact). Two vectors a step, each with sums
     * of its own, so that no addition waits for the one before. */
    const v4d split = {sigma, sigma, sigma, sigma};
    v4d a = {0.0, 0.0, 0.0, 0.0}, k = a, a2 = a, k2 = a;
    v4l rounded = {0, 0, 0, 0}; /* lanes that had a remainder */
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        /* Built lane by lane, which gcc turns into one widening load a vector; a float
         * vector converted with __builtin_convertvector became two-lane pieces. */
        const v4d v = {x[i], x[i + 1], x[i + 2], x[i + 3]};
        const v4d v2 = {x[i + 4], x[i + 5], x[i + 6], x[i + 7]};
        const v4d ks = {keep[i], keep[i + 1], keep[i + 2], keep[i + 3]};
        const v4d ks2 = {keep[i + 4], keep[i + 5], keep[i + 6], keep[i + 7]};
        const v4d h = (v + split) - split, h2 = (v2 + split) - split;
        a += h;
        a2 += h2;
        k += h * ks;
        k2 += h2 * ks2;
        rounded |= (v != h) | (v2 != h2);
    }
    a += a2;
    k += k2;
    double tail_a = 0.0, tail_k = 0.0;
    int64_t left = (rounded[0] | rounded[1] | rounded[2] | rounded[3]) != 0;
    for (; i < n; i++) {
        const double v = (double)x[i];
        const double h = (v + sigma) - sigma;
        tail_a += h;
        tail_k += h * (double)keep[i];
        left |= v != h;
    }
    exact_add_double(all, ((a[0] + a[1]) + (a[2] + a[3])) + tail_a);
    exact_add_double(kept, ((k[0] + k[1]) + (k[2] + k[3])) + tail_k);
    if (left == 0) return;
    double r[EXACT_SPAN], q[EXACT_SPAN];
    for (i = 0; i < n; i++) {
        const double v = (double)x[i];
        r[i] = v - ((v + sigma) - sigma);
        q[i] = r[i] * (double)keep[i];
    }
    exact_add_rounds(all, r, n);
    exact_add_rounds(kept, q, n);
}
