/* Fused CPU kernel for log_mix: out = log(sum_j w_j softmax(x_j)) over the rows of P
 * float32 logit matrices, built by modelcore/native/__init__.py with the system C compiler
 * (-O3 -march=native). Written with GCC/Clang vector extensions; a few x86 intrinsics
 * (min/max, the exp table lookup, streaming stores) where AVX/AVX2 is there, with portable
 * fallbacks.
 *
 * Per row, GROUP paths at a time: one pass per path computes e = exp(x) into a scratch row
 * (cache resident) with its sum s; then one pass over the row adds the group's (w_j / s_j)
 * e_j into the running sum, and after the last group takes the log and writes the output
 * row (streaming stores: no read of the output first). One exp per input element, one log
 * per output element, each input read from memory once, the output written once.
 *
 * exp and log are polynomials fitted at Chebyshev nodes, in the style of the Cephes
 * single-precision functions (S. L. Moshier, "Methods and Programs for Mathematical
 * Functions", 1989), evaluated on whole vectors; both are within a few float32 ulps over
 * the ranges used here (checked against float64 torch by
 * tests/modelcore/compose/test_native_logmix.py).
 *
 * The exp is taken unshifted (exp(x), not exp(x - max)) when that is exact enough:
 * 1 <= s < 1e38, i.e. no argument reached the clamp at 88 and whatever underflowed had a
 * probability below FLT_MIN, where the result is clamped anyway. Otherwise the row is
 * redone with the max subtracted. NaN anywhere in a row makes that row NaN; a row with
 * +inf or only -inf is NaN, as log_softmax gives.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define W 8
#define PREFETCH_FLOATS 1024 /* 4 KiB ahead */
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
/* the same vector, for loads and stores at any float's address */
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(4), may_alias));

static inline vf splat(float a) {
    vf v;
    for (int i = 0; i < W; i++) v[i] = a;
    return v;
}

static inline vf loadu(const float *p) { return *(const vf_unaligned *)p; }

static inline void storeu(float *p, vf v) { *(vf_unaligned *)p = v; }

/* A store that bypasses the caches (no read of the line first), for output rows that are
 * written once and not read again soon; p must be 32-byte aligned. */
static inline void store_stream(float *p, vf v) {
#if defined(__AVX__) && W == 8
    _mm256_stream_ps(p, (__m256)v);
#else
    *(vf *)p = v;
#endif
}

/* a where mask else b (mask lanes are all ones or all zeros) */
static inline vf vselect(vi mask, vf a, vf b) {
    return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

/* max(a, x) and min(a, x) lane by lane, NaN lanes of x kept as NaN */
#if defined(__AVX__) && W == 8
static inline vf vmax(vf a, vf x) { return (vf)_mm256_max_ps((__m256)a, (__m256)x); }
static inline vf vmin(vf a, vf x) { return (vf)_mm256_min_ps((__m256)a, (__m256)x); }
#else
static inline vf vmax(vf a, vf x) { return vselect(a > x, a, x); }
static inline vf vmin(vf a, vf x) { return vselect(a < x, a, x); }
#endif

/* exp(x) for every lane; NaN stays NaN. Arguments are clamped to [-87.34, 88]: below,
 * the result is FLT_MIN or less (callers only use values where anything under FLT_MIN is
 * clamped to FLT_MIN); above, exp(88) (callers reject sums that large).
 *
 * With AVX2: exp(x) = 2^(m / 8) e^r, m = round(8 x / ln 2), |r| <= ln 2 / 16; 2^(m mod 8 / 8)
 * comes from an 8-entry table in one register (vpermps), 2^floor(m / 8) is added to the
 * exponent field, and e^r = 1 + r + r^2 (c2 + c3 r) with c2, c3 fitted at Chebyshev nodes
 * (relative error 3e-8, table entries 3e-8, reduction 2.4e-10 m: under 3e-7 in all).
 * Otherwise: exp(x) = 2^n e^r, n = round(x / ln 2), e^r = 1 + r + r^2 P(r) on
 * [-ln 2 / 2, ln 2 / 2], P of degree 3 fitted at Chebyshev nodes (relative error 1.2e-7,
 * with the reduction's 1.9e-9 n under 4e-7). Both evaluate their polynomial by Estrin's
 * scheme for a short dependency chain. */
#if defined(__AVX2__) && W == 8
static inline __attribute__((always_inline)) vf vexp(vf x) {
    vf xc = vmin(splat(88.0f), vmax(splat(-87.33654f), x));
    /* t = 8 x / ln 2 + 1.5 * 2^23 rounds 8 x / ln 2 to the integer m held in t's low bits */
    const vf magic = splat(12582912.0f);
    vf t = xc * splat(11.541560173034668f) + magic;
    vf m = t - magic;
    vf r = xc - m * splat(0.08664339780807495f);
    const __m256 table = _mm256_setr_ps(1.0f, 1.0905077457427979f, 1.1892070770263672f,
                                        1.2968395948410034f, 1.4142135381698608f,
                                        1.5422108173370361f, 1.6817928552627563f,
                                        1.8340080976486206f);
    vf two_frac = (vf)_mm256_permutevar8x32_ps(table, (__m256i)t); /* low 3 bits of m */
    vf z = r * r;
    vf q = splat(0.5000651478767395f) + splat(0.16667382419109344f) * r;
    vf er1 = z * q + r;                                  /* e^r - 1 */
    vf y = two_frac * er1 + two_frac;
    /* times 2^floor(m / 8): t's bits shifted right by 3 then left by 23 are
     * floor(m / 8) << 23 (the magic's own bits shift out) */
    return (vf)((vi)y + (((vi)t >> 3) << 23));
}
#else
static inline __attribute__((always_inline)) vf vexp(vf x) {
    vf xc = vmin(splat(88.0f), vmax(splat(-87.33654f), x));
    /* t = x / ln 2 + 1.5 * 2^23 rounds x / ln 2 to the integer n held in t's low bits */
    const vf magic = splat(12582912.0f);
    vf t = xc * splat(1.44269504088896341f) + magic;
    vf n = t - magic;
    vf r = xc - n * splat(0.693147182464599609f);        /* one fused step: |n ln2 err| < 2e-7 */
    vf z = r * r;
    vf lo = splat(0.49999141693115234f) + splat(0.1666688621044159f) * r;
    vf hi = splat(0.04189857840538025f) + splat(0.008333837613463402f) * r;
    vf p = (lo + z * hi) * z + r + splat(1.0f);          /* e^r, in [0.7, 1.42] */
    /* times 2^n: n added to p's exponent field; t's bits shifted left by 23 are n << 23
     * (the magic's own bits shift out) */
    return (vf)((vi)p + ((vi)t << 23));
}
#endif

/* log(a) for a in [FLT_MIN, FLT_MAX] (NaN gives a finite value above 88: callers check).
 * a = m 2^k with m in [sqrt(1/2), sqrt(2)); log(m) = f - f^2 / 2 + f^3 Q(f), f = m - 1,
 * Q of degree 5 fitted at Chebyshev nodes (absolute error 7e-8 before float32 rounding). */
static inline __attribute__((always_inline)) vf vlog(vf a) {
    /* subtracting the bits of sqrt(1/2) moves m into [sqrt(1/2), sqrt(2)) in one step */
    vi off = (vi)a - 0x3f3504f3;
    vi k = off >> 23;                                    /* arithmetic shift: the exponent */
    vf f = (vf)((off & 0x007fffff) + 0x3f3504f3) - splat(1.0f);
    vf z = f * f;
    vf q0 = splat(0.3333475589752197f) + splat(-0.24979883432388306f) * f;
    vf q1 = splat(0.1991036832332611f) + splat(-0.17179910838603973f) * f;
    vf q2 = splat(0.16132502257823944f) + splat(-0.10157188773155212f) * f;
    vf q = q0 + z * (q1 + z * q2);
    vf base = __builtin_convertvector(k, vf) * splat(0.693147180559945309f) + f;
    return z * (f * q - splat(0.5f)) + base;
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < W; i++) s += v[i];
    return s;
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < W; i++) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
    return m;
}

/* The last V % W elements of a row, padded with `pad`. */
static inline vf load_tail(const float *p, int64_t n, float pad) {
    vf v = splat(pad);
    for (int64_t i = 0; i < n; i++) v[i] = p[i];
    return v;
}

static inline void store_tail(float *p, vf v, int64_t n) {
    for (int64_t i = 0; i < n; i++) p[i] = v[i];
}

/* One pass over a row: e = exp(x - shift); returns the sum of e (NaN if x has NaN).
 * Four vectors per step (independent chains for the scheduler), the input prefetched
 * PREFETCH_FLOATS ahead (it streams from memory once). */
static inline __attribute__((always_inline)) float exp_row(const float *x, float *e,
                                                           int64_t V, float shift) {
    const vf sh = splat(shift);
    vf s0 = splat(0.0f), s1 = splat(0.0f);
    int64_t i = 0;
    for (; i + 4 * W <= V; i += 4 * W) {
        __builtin_prefetch(x + i + PREFETCH_FLOATS);
        __builtin_prefetch(x + i + PREFETCH_FLOATS + 2 * W);
        vf e0 = vexp(loadu(x + i) - sh), e1 = vexp(loadu(x + i + W) - sh);
        vf e2 = vexp(loadu(x + i + 2 * W) - sh), e3 = vexp(loadu(x + i + 3 * W) - sh);
        storeu(e + i, e0);
        storeu(e + i + W, e1);
        storeu(e + i + 2 * W, e2);
        storeu(e + i + 3 * W, e3);
        s0 += e0 + e1; /* two accumulators: four would spill to the stack */
        s1 += e2 + e3;
    }
    for (; i < V; i += W) {
        int64_t n = V - i < W ? V - i : W;
        vf a = load_tail(x + i, n, -INFINITY);
        vf ea = vselect(a == splat(-INFINITY), splat(0.0f), vexp(a - sh));
        store_tail(e + i, ea, n);
        s0 += ea;
    }
    return hsum(s0 + s1);
}

/* The max of a row (NaN if it has NaN). */
static float row_max(const float *x, int64_t V) {
    vf m = splat(-INFINITY);
    int nan = 0;
    for (int64_t i = 0; i < V; i += W) {
        int64_t n = V - i < W ? V - i : W;
        vf a = load_tail(x + i, n, -INFINITY);
        m = vmax(m, a);
        for (int k = 0; k < n; k++) nan |= a[k] != a[k];
    }
    return nan ? NAN : hmax(m);
}

/* Paths mixed per pass over a row: their exp rows stay in this thread's cache (GROUP
 * rows of 4 V bytes) until one pass adds them all into the sum. */
#define GROUP 4

/* dst = (acc_in or 0) + sum_g cs[g] es[g], or (finish) log(max(that, FLT_MIN)); for
 * finite values (the caller sends rows with NaN or inf to mix_row_safe). acc_in may be
 * dst. G is a constant where this is inlined, so the loop over paths unrolls. */
static inline __attribute__((always_inline)) void mix_row(
    float *const *es, const float *cs, int G, const float *acc_in, float *dst, int64_t V,
    int finish) {
    vf cv[GROUP];
    for (int g = 0; g < G; g++) cv[g] = splat(cs[g]);
    const vf tiny = splat(FLT_MIN);
    int64_t i = 0;
    if (finish && ((uintptr_t)dst % sizeof(vf)) == 0) {
        /* two vectors a step: two independent log chains in flight */
        for (; i + 2 * W <= V; i += 2 * W) {
            vf a = acc_in ? loadu(acc_in + i) : splat(0.0f);
            vf b = acc_in ? loadu(acc_in + i + W) : splat(0.0f);
            for (int g = 0; g < G; g++) {
                a += cv[g] * loadu(es[g] + i);
                b += cv[g] * loadu(es[g] + i + W);
            }
            store_stream(dst + i, vlog(vmax(tiny, a)));
            store_stream(dst + i + W, vlog(vmax(tiny, b)));
        }
    }
    for (; i + W <= V; i += W) {
        vf a = acc_in ? loadu(acc_in + i) : splat(0.0f);
        for (int g = 0; g < G; g++) a += cv[g] * loadu(es[g] + i);
        if (finish) a = vlog(vmax(tiny, a));
        storeu(dst + i, a);
    }
    if (i < V) {
        int64_t n = V - i;
        vf a = acc_in ? load_tail(acc_in + i, n, 0.0f) : splat(0.0f);
        for (int g = 0; g < G; g++) a += cv[g] * load_tail(es[g] + i, n, 0.0f);
        if (finish) a = vlog(vmax(tiny, a));
        store_tail(dst + i, a, n);
    }
}

/* The finishing pass for rows with NaN or inf in them. */
static void mix_row_safe(float *const *es, const float *cs, int G, const float *acc_in,
                         float *dst, int64_t V) {
    const vf tiny = splat(FLT_MIN), inf = splat(INFINITY);
    for (int64_t i = 0; i < V; i += W) {
        int64_t n = V - i < W ? V - i : W;
        vf a = acc_in ? load_tail(acc_in + i, n, 0.0f) : splat(0.0f);
        for (int g = 0; g < G; g++) a += splat(cs[g]) * load_tail(es[g] + i, n, 0.0f);
        a = vmax(tiny, a);
        vf y = vselect(a == inf, inf, vlog(a));
        store_tail(dst + i, vselect(a == a, y, a), n);
    }
}

/* mix_row specialised on the number of paths, on finishing and on a running sum. */
#define MIX_FOR(G)                                                                         \
    case G:                                                                                \
        if (finish)                                                                        \
            acc_in ? mix_row(es, cs, G, acc_in, dst, V, 1) : mix_row(es, cs, G, NULL, dst, V, 1); \
        else                                                                               \
            acc_in ? mix_row(es, cs, G, acc_in, dst, V, 0) : mix_row(es, cs, G, NULL, dst, V, 0); \
        break;

static void mix_pass(float *const *es, const float *cs, int G, const float *acc_in, float *dst,
                     int64_t V, int finish, int finite) {
    if (finish && !finite) {
        mix_row_safe(es, cs, G, acc_in, dst, V);
        return;
    }
    switch (G) {
        MIX_FOR(1)
        MIX_FOR(2)
        MIX_FOR(3)
        MIX_FOR(4)
    }
}

/* Path j's exps of one row into e, unshifted, and when that is not exact enough with the
 * max subtracted; returns their sum, or NaN for a row with NaN, +inf, or nothing but -inf
 * (as log_softmax has it). */
static float path_exps(const float *x, float *e, int64_t V) {
    /* accepted unshifted when 1 <= s < 1e38: no argument reached the clamp at 88
     * (exp(88) > 1e38), and whatever underflowed had a probability under FLT_MIN */
    float s = exp_row(x, e, V, 0.0f);
    if (s >= 1.0f && s < 1e38f) return s;
    /* large values (the sum overflowed or might have) or small ones (s < 1: some exps
     * may have underflowed): redo with the max subtracted */
    float hi = row_max(x, V);
    if (!(hi > -INFINITY && hi < INFINITY)) return NAN;
    return exp_row(x, e, V, hi);
}

/* Rows r0..r1 of out (N x V, contiguous) from P logit matrices xs[j] (N x V, contiguous)
 * and weights w (N x P, row major; w[r * P + j] is path j's weight at row r).
 * accumulate: out already holds a partial sum (earlier paths) to add to.
 * finish: take the log (clamped at FLT_MIN) after the last path; else out holds the sum.
 * scratch: (GROUP + 1) * V floats owned by the caller's thread (exp rows, running sum). */
void agora_log_mix_rows(const float *const *xs, int64_t P, const float *w, float *out,
                        int64_t V, int64_t r0, int64_t r1, int accumulate, int finish,
                        float *scratch) {
    float *es[GROUP], *acc = scratch + GROUP * V;
    for (int g = 0; g < GROUP; g++) es[g] = scratch + g * V;
    for (int64_t r = r0; r < r1; r++) {
        float *o = out + r * V;
        /* a row with a NaN or infinite scale is NaN or inf everywhere (c times any exp) */
        int finite = !accumulate || (o[0] - o[0] == 0.0f);
        /* up to GROUP paths at a time: their exp rows, then one pass adds them all */
        for (int64_t j = 0; j < P; j += GROUP) {
            int G = P - j < GROUP ? (int)(P - j) : GROUP;
            float cs[GROUP];
            for (int g = 0; g < G; g++) {
                cs[g] = w[r * P + j + g] / path_exps(xs[j + g] + r * V, es[g], V);
                finite &= cs[g] - cs[g] == 0.0f;
            }
            /* the sum so far: in acc, or in out (accumulate, given by the caller) */
            const float *acc_in = j > 0 ? acc : (accumulate ? o : NULL);
            int last = j + GROUP >= P;
            mix_pass(es, cs, G, acc_in, last ? o : acc, V, last && finish, finite);
        }
    }
#if defined(__AVX__)
    _mm_sfence(); /* order the streamed stores before the caller reads the rows */
#endif
}
