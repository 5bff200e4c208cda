/* The CPU direction generator of zo2.optim.rng, compiled on first use by zo2.optim.native.
 *
 * Philox4x32-10 (the function zo2.optim.rng.philox4x32 defines): counter (m_lo, m_hi, 0, 0), key (k0, k1),
 * round keys bumped by the Weyl constants. Integer arithmetic, so the words are the reference's bits. The float
 * steps done here are the ones IEEE 754 rounds the same way everywhere: int -> float conversion, multiplication,
 * addition, max. log, sqrt, cos and sin stay in torch: its CPU kernels do not round them as the C library does
 * (measured: about 8% of logs, 5% of cosines and sines, 15% of square roots differ in the last bit), so a
 * Gaussian block is made in two C calls around torch's:
 *   zo2_gauss_prep    words -> u1 = max(u(x0|x2), 1e-7), theta = u(x1|x3) * 2pi   (pair j of counter i: 2i + j)
 *   (torch)           r = sqrt(-2 log u1), cos(theta), sin(theta)
 *   zo2_gauss_finish  out[2p] = r cos, out[2p + 1] = r sin
 * Built with -ffp-contract=off: no multiply-add is fused, so each product and sum is rounded as torch rounds it.
 * Loops are shared out in blocks to `threads` POSIX threads; counter-based, so every block is independent and
 * the bits do not depend on the thread count or on which thread did a block. x86-64 builds carry AVX-512 and
 * AVX2 clones of each loop, picked at load time.
 */
#include <pthread.h>
#include <stdint.h>

#define PHILOX_A 0xD2511F53u
#define PHILOX_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define U32_TO_UNIFORM 4.6566127342e-10f /* 2**-31 */
#define U1_MIN 1.0e-7f
#define MAX_THREADS 64
#define MIN_PER_THREAD 4096

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

typedef struct {
    int64_t m0, count;
    uint32_t k0, k1;
    float f0, f1, f2, f3;
    int flag;
    const float *in0, *in1, *in2;
    void *out0, *out1, *out2;
} args_t;

typedef void (*range_fn)(const args_t *, int64_t, int64_t);

typedef struct {
    range_fn fn;
    const args_t *args;
    int64_t n, block;
    int64_t next; /* first item not yet claimed, advanced atomically */
} job_t;

/* Claim blocks until none is left: a thread whose core is busy with other work takes fewer of them. */
static void *run_job(void *p) {
    job_t *job = (job_t *)p;
    for (;;) {
        int64_t lo = __atomic_fetch_add(&job->next, job->block, __ATOMIC_RELAXED);
        if (lo >= job->n) return 0;
        job->fn(job->args, lo, lo + job->block < job->n ? lo + job->block : job->n);
    }
}

/* fn over [0, n) in blocks shared by up to `threads` threads (the caller is one of them). */
static void parallel(range_fn fn, const args_t *args, int64_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / MIN_PER_THREAD) threads = (int)(n / MIN_PER_THREAD);
    if (threads <= 1) {
        fn(args, 0, n);
        return;
    }
    int64_t block = n / (4 * threads) > MIN_PER_THREAD / 4 ? n / (4 * threads) : MIN_PER_THREAD / 4;
    job_t job = {fn, args, n, block, 0};
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; ++t) started[t] = pthread_create(&ids[t], 0, run_job, &job) == 0;
    run_job(&job);
    for (int t = 1; t < threads; ++t)
        if (started[t]) pthread_join(ids[t], 0);
}

#define PHILOX_ROUNDS(m, k0, k1, c0, c1, c2, c3)                                  \
    uint32_t c0 = (uint32_t)(m), c1 = (uint32_t)((uint64_t)(m) >> 32), c2 = 0, c3 = 0; \
    {                                                                             \
        uint32_t a_ = (k0), b_ = (k1);                                            \
        for (int r_ = 0; r_ < 10; ++r_) {                                         \
            uint64_t pb_ = (uint64_t)PHILOX_B * c2, pa_ = (uint64_t)PHILOX_A * c0; \
            uint32_t n0_ = (uint32_t)(pb_ >> 32) ^ c1 ^ a_;                       \
            uint32_t n2_ = (uint32_t)(pa_ >> 32) ^ c3 ^ b_;                       \
            c1 = (uint32_t)pb_;                                                   \
            c3 = (uint32_t)pa_;                                                   \
            c0 = n0_;                                                             \
            c2 = n2_;                                                             \
            a_ += KEY_A;                                                          \
            b_ += KEY_B;                                                          \
        }                                                                         \
    }

/* uint32 -> uniform float in [0, 1): |int32(x)| folded (negatives as -x-1 = x ^ 0xFFFFFFFF), times 2**-31. */
static inline float uniform(uint32_t x) {
    uint32_t folded = (x & 0x80000000u) ? ~x : x;
    return (float)(int32_t)folded * U32_TO_UNIFORM;
}

CLONES static void words_range(const args_t *a, int64_t lo, int64_t hi) {
    int64_t *out = (int64_t *)a->out0, count = a->count;
    for (int64_t i = lo; i < hi; ++i) {
        PHILOX_ROUNDS(a->m0 + i, a->k0, a->k1, c0, c1, c2, c3)
        out[i] = c0;
        out[count + i] = c1;
        out[2 * count + i] = c2;
        out[3 * count + i] = c3;
    }
}

/* out[w * count + i] = word w of counter m0 + i, as int64 holding a uint32 value. */
void zo2_philox4x32_range(int64_t m0, int64_t count, uint32_t k0, uint32_t k1, int64_t *out, int threads) {
    args_t a = {.m0 = m0, .count = count, .k0 = k0, .k1 = k1, .out0 = out};
    parallel(words_range, &a, count, threads);
}

CLONES static void prep_range(const args_t *a, int64_t lo, int64_t hi) {
    float *u1 = (float *)a->out0, *theta = (float *)a->out1, two_pi = a->f0;
    for (int64_t i = lo; i < hi; ++i) {
        PHILOX_ROUNDS(a->m0 + i, a->k0, a->k1, c0, c1, c2, c3)
        float ua = uniform(c0), ub = uniform(c2);
        u1[2 * i] = ua < U1_MIN ? U1_MIN : ua;
        u1[2 * i + 1] = ub < U1_MIN ? U1_MIN : ub;
        theta[2 * i] = uniform(c1) * two_pi;
        theta[2 * i + 1] = uniform(c3) * two_pi;
    }
}

/* Box-Muller inputs of counters m0 .. m0+count: u1[2i + j], theta[2i + j] for the pairs j = 0 (words 0, 1) and
 * j = 1 (words 2, 3). two_pi is float32(2 pi), passed in so it is the reference's constant. */
void zo2_gauss_prep(int64_t m0, int64_t count, uint32_t k0, uint32_t k1, float two_pi, float *u1, float *theta,
                    int threads) {
    args_t a = {.m0 = m0, .k0 = k0, .k1 = k1, .f0 = two_pi, .out0 = u1, .out1 = theta};
    parallel(prep_range, &a, count, threads);
}

CLONES static void finish_range(const args_t *a, int64_t lo, int64_t hi) {
    const float *r = a->in0, *c = a->in1, *s = a->in2;
    float *out = (float *)a->out0;
    for (int64_t p = lo; p < hi; ++p) {
        out[2 * p] = r[p] * c[p];
        out[2 * p + 1] = r[p] * s[p];
    }
}

/* out[2p] = r[p] c[p], out[2p + 1] = r[p] s[p] for the `pairs` Box-Muller pairs. */
void zo2_gauss_finish(const float *r, const float *c, const float *s, int64_t pairs, float *out, int threads) {
    args_t a = {.in0 = r, .in1 = c, .in2 = s, .out0 = out};
    parallel(finish_range, &a, pairs, threads);
}

CLONES static void rademacher_range(const args_t *a, int64_t lo, int64_t hi) {
    float *out = (float *)a->out0;
    for (int64_t i = lo; i < hi; ++i) {
        PHILOX_ROUNDS(a->m0 + i, a->k0, a->k1, c0, c1, c2, c3)
        uint32_t w[4] = {c0, c1, c2, c3};
        for (int j = 0; j < 128; ++j) out[128 * i + j] = (w[j >> 5] >> (j & 31)) & 1u ? 1.0f : -1.0f;
    }
}

/* Rademacher signs of counters m0 .. m0+count: out[128 i + 32 w + b] = +1 if bit b of word w is set, else -1. */
void zo2_rademacher(int64_t m0, int64_t count, uint32_t k0, uint32_t k1, float *out, int threads) {
    args_t a = {.m0 = m0, .k0 = k0, .k1 = k1, .out0 = out};
    parallel(rademacher_range, &a, count, threads);
}

CLONES static void fused_range(const args_t *a, int64_t lo, int64_t hi) {
    const float *t = a->in0, *d = a->in1, *z = a->in2;
    float *out = (float *)a->out0, *plus = (float *)a->out1, *minus = (float *)a->out2;
    float wd = a->f0, lr = a->f1, ep = a->f2, em = a->f3;
    for (int64_t i = lo; i < hi; ++i) {
        float step = a->flag ? d[i] + t[i] * wd : d[i];
        float v = t[i] - step * lr;
        out[i] = v;
        plus[i] = v + z[i] * ep;
        minus[i] = v + z[i] * em;
    }
}

/* The deferred update and the dual perturbation in one pass over n float32 elements, the operations of
 * zo2.optim.update.updated then perturbed: v = t - (d [+ t wd]) lr; out = v, plus = v + z ep, minus = v + z em.
 * out may be t (in place). */
void zo2_update_perturb(const float *t, const float *d, const float *z, int64_t n, int use_wd, float wd, float lr,
                        float ep, float em, float *out, float *plus, float *minus, int threads) {
    args_t a = {.f0 = wd, .f1 = lr, .f2 = ep, .f3 = em, .flag = use_wd, .in0 = t, .in1 = d, .in2 = z,
                .out0 = out, .out1 = plus, .out2 = minus};
    parallel(fused_range, &a, n, threads);
}
