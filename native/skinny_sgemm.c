// A cblas_sgemm for decoding's skinny products, loaded in front of the system BLAS (see
// daemon/blas.py): C = A * B^T with A a few rows (the tokens of one pass) and B a weight matrix
// (row-major, out x in). Each weight row is read from memory once for all rows of A (OpenBLAS
// packs all of B for every product), and the work is split over threads by weight rows; the
// helper threads spin briefly between products, since a pass issues them back to back.
// Everything else goes to the BLAS's own cblas_sgemm. Only the kernel is AVX2/FMA code, so the
// library loads anywhere and skinny_supported() says whether to enable it.
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
enum {
    MAX_ROWS = 64,          // skinny_enable caps what it is given at this
    PREFETCH_AHEAD = 256,   // floats of a weight row fetched ahead (1 KiB)
    MAX_THREADS = 16,
    MIN_WEIGHTS = 65536,    // smaller products (attention's) stay with the BLAS
    SPIN = 4000,            // pauses (~0.1 ms) a helper waits awake for the next product
};
#define KERNEL __attribute__((target("avx2,fma")))
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

static sgemm_fn fallback;
static int max_rows;        // 0 until skinny_enable: every call goes to the fallback
static int n_threads = 1;
static atomic_long fast_calls, fallback_calls;

long skinny_fast_calls(void) { return fast_calls; }
long skinny_fallback_calls(void) { return fallback_calls; }
int skinny_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

KERNEL static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

typedef struct {
    int M, N, K, lda, ldb, ldc;
    const float *A, *B;
    float *C;
} Job;

// A tile: rows [m0, m0 + MC) of A against rows [n0, n0 + TILE_N) of B (only the first nb are
// real and stored), one 8-lane accumulator per (m, n), so each load of A feeds TILE_N FMAs and
// each load of B feeds MC. Every (m, n) sums in one order fixed by K alone (lane by lane over k,
// the lanes' fixed reduction, then the tail), so a row of A gets the same bits whatever the
// other rows, the tiling, the split or the thread count are.
// 3 x 3: the best of 2x4, 3x2, 3x3, 4x2 and 4x3 on the embedded model's shapes at 1-32 rows
// (bigger tiles leave the compiler too few of the 16 vector registers).
enum { TILE_M = 3, TILE_N = 3 };
KERNEL static inline __attribute__((always_inline)) void tile(const Job *j, int m0, const int MC,
                                                              int n0, int nb) {
    const int K = j->K;
    const float *a[TILE_M], *b[TILE_N];
    __m256 acc[TILE_M][TILE_N];
    for (int m = 0; m < MC; m++) a[m] = j->A + (size_t)(m0 + m) * j->lda;
    for (int n = 0; n < TILE_N; n++) b[n] = j->B + (size_t)(n0 + (n < nb ? n : 0)) * j->ldb;
    for (int m = 0; m < MC; m++)
        for (int n = 0; n < TILE_N; n++) acc[m][n] = _mm256_setzero_ps();
#define STEP(kk)                                                                  \
    do {                                                                          \
        __m256 bv[TILE_N];                                                        \
        for (int n = 0; n < TILE_N; n++) bv[n] = _mm256_loadu_ps(b[n] + (kk));    \
        for (int m = 0; m < MC; m++) {                                            \
            __m256 av = _mm256_loadu_ps(a[m] + (kk));                             \
            for (int n = 0; n < TILE_N; n++)                                      \
                acc[m][n] = _mm256_fmadd_ps(av, bv[n], acc[m][n]);                \
        }                                                                         \
    } while (0)
    int k = 0;
    for (; k + 16 <= K; k += 16) {  // a cache line of each B row per iteration
        for (int n = 0; n < TILE_N; n++)
            _mm_prefetch((const char *)(b[n] + k + PREFETCH_AHEAD), _MM_HINT_T0);
        STEP(k);
        STEP(k + 8);
    }
    for (; k + 8 <= K; k += 8) STEP(k);
#undef STEP
    for (int m = 0; m < MC; m++)
        for (int n = 0; n < nb; n++) {
            float s = hsum(acc[m][n]);
            for (int kk = k; kk < K; kk++) s += a[m][kk] * b[n][kk];
            j->C[(size_t)(m0 + m) * j->ldc + n0 + n] = s;
        }
}

KERNEL static void run_rows(const Job *j, int n0, int n1) {
    for (int n = n0; n < n1; n += TILE_N) {  // the tile's rows of B stay in L1 across A's rows
        int nb = n1 - n < TILE_N ? n1 - n : TILE_N;
        for (int m0 = 0; m0 < j->M; m0 += TILE_M) {
            switch (j->M - m0 < TILE_M ? j->M - m0 : TILE_M) {  // constant MC: all in registers
            case 1: tile(j, m0, 1, n, nb); break;
            case 2: tile(j, m0, 2, n, nb); break;
            default: tile(j, m0, 3, n, nb); break;
            }
        }
    }
}

// One product at a time is shared out (job_lock; a second thread's product runs on that thread
// alone). Its weight rows are cut into chunks that every thread, the caller included, claims
// from one counter, so a helper the OS has not scheduled only means the others do more: the
// caller never waits for a thread that is not running, only for chunks being computed. The
// counter carries the product's generation in its high half, so a helper that wakes late finds
// its product gone and cannot claim a chunk of the next one.
enum { CHUNK_ROWS = 48, YIELD_EVERY = 256 };  // 48: whole tiles, whole cache lines of C
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static Job job;                   // written only while no chunk of it is unclaimed or running
static atomic_int n_chunks;
static _Atomic unsigned long ticket;  // generation << 32 | next chunk
static atomic_int chunks_done, sleepers;
static int helpers_started;

static void work(unsigned long generation) {
    unsigned long t = atomic_load(&ticket);
    while ((t >> 32) == generation && (int)(t & 0xffffffffUL) < atomic_load(&n_chunks)) {
        if (!atomic_compare_exchange_weak(&ticket, &t, t + 1)) continue;  // t reloaded
        int n0 = (int)(t & 0xffffffffUL) * CHUNK_ROWS;
        run_rows(&job, n0, n0 + CHUNK_ROWS < job.N ? n0 + CHUNK_ROWS : job.N);
        atomic_fetch_add(&chunks_done, 1);
        t = atomic_load(&ticket);
    }
}

static inline void relax(int spin) {
    if (spin % YIELD_EVERY == YIELD_EVERY - 1)
        sched_yield();  // an oversubscribed CPU: let the thread we wait on run
    else
        _mm_pause();
}

// Helpers spin a little after each product, since a pass issues them back to back, then sleep.
static void *helper_main(void *arg) {
    unsigned long seen = (unsigned long)arg;
    for (;;) {
        unsigned long gen;
        for (int spin = 0; (gen = atomic_load(&ticket) >> 32) == seen && spin < SPIN; spin++)
            relax(spin);
        if (gen == seen) {
            pthread_mutex_lock(&wake_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((gen = atomic_load(&ticket) >> 32) == seen) pthread_cond_wait(&wake, &wake_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&wake_lock);
        }
        seen = gen;
        work(gen);
    }
    return NULL;
}

static void forget_helpers(void) {  // a forked child has none of the parent's threads
    helpers_started = 0;
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&job_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake, NULL);
}

static int start_helpers(void) {
    unsigned long gen = atomic_load(&ticket) >> 32;
    for (int t = 1; t < n_threads; t++) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper_main, (void *)gen) != 0) return t > 1;
        pthread_detach(thread);
    }
    return 1;
}

static void run_job(const Job *j) {
    if (n_threads == 1 || j->N <= CHUNK_ROWS || pthread_mutex_trylock(&job_lock) != 0) {
        run_rows(j, 0, j->N);  // single-threaded, or another thread's product is running
        return;
    }
    if (!helpers_started) {
        helpers_started = 1;
        if (!start_helpers()) n_threads = 1;
    }
    job = *j;
    atomic_store(&n_chunks, (j->N + CHUNK_ROWS - 1) / CHUNK_ROWS);
    atomic_store(&chunks_done, 0);
    unsigned long gen = (atomic_load(&ticket) >> 32) + 1;
    atomic_store(&ticket, gen << 32);  // publishes job and n_chunks
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&wake_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&wake_lock);
    }
    work(gen);
    const int chunks = atomic_load(&n_chunks);
    for (int spin = 0; atomic_load(&chunks_done) < chunks; spin++) relax(spin);
    pthread_mutex_unlock(&job_lock);
}

// Take products of up to `rows` rows from now on; the rest go to `fn` (the loaded BLAS's
// cblas_sgemm), which runs them with its own threads.
void skinny_enable(void *fn, int rows, int threads) {
    static int registered;
    if (!registered) {
        registered = 1;
        pthread_atfork(NULL, NULL, forget_helpers);
    }
    fallback = (sgemm_fn)fn;
    n_threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    max_rows = rows > MAX_ROWS ? MAX_ROWS : rows;
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (order == RowMajor && ta == NoTrans && tb == Trans && alpha == 1.0f && beta == 0.0f &&
        M >= 1 && M <= max_rows && K >= 1 && (long)N * K >= MIN_WEIGHTS) {
        Job j = {M, N, K, lda, ldb, ldc, A, B, C};
        atomic_fetch_add(&fast_calls, 1);
        run_job(&j);
        return;
    }
    atomic_fetch_add(&fallback_calls, 1);
    fallback(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
