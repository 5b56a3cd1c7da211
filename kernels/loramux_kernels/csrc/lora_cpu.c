/* Fused multi-LoRA shrink-expand for few tokens (decode) on CPU, float32.
 *
 * Semantics (lmx_lora_add_f32): for every token t in [0, n) with s = slots[t] >= 0,
 *     out[t, :] += (x[t, :] @ A[s, :rank, :].T) @ BT[s, :rank, :]
 * A is [S, R, d_in] and BT is [S, R, d_out], contiguous, R the slot rank stride
 * (rank <= R; entries past a slot's own rank are zero). Rows of x and out are
 * `x_stride` / `out_stride` floats apart. Accumulation is float32 throughout.
 *
 * One call replaces the gather + bmm + bmm + add that torch needs per layer: at
 * decode sizes those ops cost more in dispatch than in arithmetic. At decode the
 * adapter weights arrive cold (the base weights streamed through the caches since
 * the last step), so the loops are laid out for memory streams: each token reads
 * its slot's A and BT front to back, four rows at a time (four independent FMA
 * chains, four prefetch streams), and with fewer than two tokens per thread a token's
 * rank rows and output columns are split so every core pulls its share of bytes.
 */
#include <omp.h>
#include <stdint.h>

#define ROWS 4 /* rows of A / BT read together */

/* sh[r] = x_t . a[r] for r in [r0, r1); a is [*, d_in]. */
static void shrink_rows(const float *restrict xt, const float *restrict a, int64_t d_in,
                        int64_t r0, int64_t r1, float *restrict sh)
{
    int64_t r = r0;
    for (; r + ROWS <= r1; r += ROWS) {
        const float *restrict a0 = a + r * d_in, *restrict a1 = a0 + d_in;
        const float *restrict a2 = a1 + d_in, *restrict a3 = a2 + d_in;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t j = 0; j < d_in; j++) {
            s0 += xt[j] * a0[j];
            s1 += xt[j] * a1[j];
            s2 += xt[j] * a2[j];
            s3 += xt[j] * a3[j];
        }
        sh[r] = s0, sh[r + 1] = s1, sh[r + 2] = s2, sh[r + 3] = s3;
    }
    for (; r < r1; r++) {
        const float *restrict ar = a + r * d_in;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d_in; j++)
            s += xt[j] * ar[j];
        sh[r] = s;
    }
}

/* ot[c] += sum_r sh[r] * bt[r, c] for c in [c0, c1); bt is [*, d_out]. */
static void expand_cols(float *restrict ot, const float *restrict bt, const float *restrict sh,
                        int64_t rank, int64_t d_out, int64_t c0, int64_t c1)
{
    int64_t r = 0;
    for (; r + ROWS <= rank; r += ROWS) {
        const float w0 = sh[r], w1 = sh[r + 1], w2 = sh[r + 2], w3 = sh[r + 3];
        const float *restrict b0 = bt + r * d_out, *restrict b1 = b0 + d_out;
        const float *restrict b2 = b1 + d_out, *restrict b3 = b2 + d_out;
#pragma omp simd
        for (int64_t c = c0; c < c1; c++)
            ot[c] += w0 * b0[c] + w1 * b1[c] + w2 * b2[c] + w3 * b3[c];
    }
    for (; r < rank; r++) {
        const float w = sh[r];
        const float *restrict br = bt + r * d_out;
#pragma omp simd
        for (int64_t c = c0; c < c1; c++)
            ot[c] += w * br[c];
    }
}

void lmx_lora_add_f32(float *out, int64_t out_stride, const float *x, int64_t x_stride,
                      const float *A, const float *BT, const int64_t *slots, int64_t n,
                      int64_t d_in, int64_t d_out, int64_t R, int64_t rank, int64_t threads)
{
    if (n <= 0 || rank <= 0)
        return;
    float shrunk[n * rank];
    /* Each token is cut into `split` pieces (rank rows in the shrink, output
     * columns in the expand) so there are at least two pieces per thread. */
    const int64_t split = threads > 1 && n < 2 * threads ? (2 * threads + n - 1) / n : 1;
    const int64_t cols = ((d_out + split - 1) / split + 15) / 16 * 16; /* 64-byte aligned pieces */
    if (split == 1) { /* whole tokens per thread: shrink then expand, no barrier between */
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (int64_t t = 0; t < n; t++) {
            const int64_t s = slots[t];
            if (s < 0)
                continue;
            shrink_rows(x + t * x_stride, A + s * R * d_in, d_in, 0, rank, shrunk + t * rank);
            expand_cols(out + t * out_stride, BT + s * R * d_out, shrunk + t * rank, rank, d_out, 0, d_out);
        }
        return;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n * split; i++) {
            const int64_t t = i / split, p = i % split, s = slots[t];
            const int64_t r0 = rank * p / split, r1 = rank * (p + 1) / split;
            if (s < 0) {
                for (int64_t r = r0; r < r1; r++)
                    shrunk[t * rank + r] = 0.0f;
            } else {
                shrink_rows(x + t * x_stride, A + s * R * d_in, d_in, r0, r1, shrunk + t * rank);
            }
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n * split; i++) {
            const int64_t t = i / split, p = i % split, s = slots[t];
            const int64_t c0 = p * cols, c1 = c0 + cols < d_out ? c0 + cols : d_out;
            if (s >= 0 && c0 < c1)
                expand_cols(out + t * out_stride, BT + s * R * d_out, shrunk + t * rank, rank, d_out, c0, c1);
        }
    }
}

/* The decode hot path: what is fixed per module and per step comes in two int64
 * arrays the caller fills once, so a layer's call passes only its rows.
 *   module: {A, BT, S, R, d_in, d_out}        (pointers as integers)
 *   step:   {slots, n, threads, parallel_work}
 * More threads than one only when n * R * (d_in + d_out) >= parallel_work. */
void lmx_lora_add_f32_step(const int64_t *module, const int64_t *step, float *out, int64_t out_stride,
                           const float *x, int64_t x_stride)
{
    const int64_t n = step[1], R = module[3], d_in = module[4], d_out = module[5];
    const int64_t threads = n * R * (d_in + d_out) >= step[3] ? step[2] : 1;
    lmx_lora_add_f32(out, out_stride, x, x_stride, (const float *)(intptr_t)module[0],
                     (const float *)(intptr_t)module[1], (const int64_t *)(intptr_t)step[0], n, d_in,
                     d_out, R, R, threads);
}

/* A whole LoRA-wrapped linear in one call: out = x @ W.T (+ bias), then the
 * step's LoRA deltas, so a decode layer goes from Python to C once.
 *   step:   as for lmx_lora_add_f32_step (read only when module is set)
 *   linear: {x, x_stride, n, d_in, d_out, W, bias (0: none), out, out_stride,
 *            module (0: no LoRA; else the array of lmx_lora_add_f32_step), threads}
 * W is [d_out, d_in] contiguous; x has n rows of d_in and out n rows of d_out,
 * each at its stride.
 *
 * The GEMM: up to 32 rows of x (decode), the small-M kernel below; more rows, or
 * a CPU without AVX-512, the BLAS sgemm that torch itself calls for F.linear
 * (handed in once through lmx_set_sgemm and checked against F.linear by the
 * caller). Results equal F.linear to float32 rounding (another summation order).
 *
 * Decode batches (1..32 tokens) on 2..4 threads take the GEMM in column chunks
 * handed out dynamically, one thread per chunk: this lets one core stream the
 * adapters' A (the shrink, memory-bound) while the others run the GEMM; then
 * every thread expands its share of the columns. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
static sgemm_fn sgemm;

void lmx_set_sgemm(void *fn) { sgemm = (sgemm_fn)fn; }

/* out[:, c0:c1] = x @ W[c0:c1].T (+ bias[c0:c1]) by the BLAS */
static void gemm_blas(const float *W, const float *bias, const float *x, int64_t x_stride, float *out,
                      int64_t out_stride, int64_t n, int64_t d_in, int64_t c0, int64_t c1)
{
    /* Column-major, as BLAS sees it: out.T [d_out, n] = (W.T [d_in, d_out]).T . x.T [d_in, n] */
    const int m = (int)(c1 - c0), cols = (int)n, k = (int)d_in, lda = (int)d_in, ldb = (int)x_stride,
              ldc = (int)out_stride;
    const float one = 1.0f;
    float beta = 0.0f;
    if (bias) { /* as addmm: the output starts as the bias and the product is added */
        for (int64_t t = 0; t < n; t++)
            for (int64_t c = c0; c < c1; c++)
                out[t * out_stride + c] = bias[c];
        beta = 1.0f;
    }
    sgemm("T", "N", &m, &cols, &k, &one, W + c0 * d_in, &lda, x, &ldb, &beta, out + c0, &ldc);
}

/* The small-M GEMM. At decode sizes MKL's sgemm reaches a fraction of a core's
 * FMA rate (about 27 GFLOP/s per core on 8 rows of the default model's layers,
 * where a Zen 5 core peaks near 190), and the step is compute-bound there; this
 * kernel takes the 210 layers in half the time on 2 cores at 2..32 rows (56 -> 114
 * GFLOP/s on 8 rows, 118 -> 236 on 32) and 1 row in 0.4x (memory-bound: 38 GB/s
 * of W against MKL's 15), the LM head in 0.4x. Here each output is a dot
 * product over d_in: a tile of MR rows of W by NR rows of x keeps MR * NR
 * accumulators of 16 floats in registers (MR + NR loads for MR * NR FMAs), and the
 * accumulators are summed at the end, four at a time by shuffles. A tile's W rows
 * are adjacent in memory, so the tiles of a column range stream W front to back,
 * once: it arrives cold from DRAM (the model's weights stream through the caches
 * every step), so the first block of x rows of each tile also prefetches W ahead,
 * into L1 and, further on, into L2 (measured: ~1.45x on 8 rows, ~1.15x on 32, a
 * ~5% loss on 1 row, which is memory-bound and left to the hardware prefetcher;
 * a prefetch past the end of W does not fault).
 * x (at most 32 rows) stays in L1/L2 and is re-read per tile. Tiles: 4 x NR, the
 * rows of x split into blocks of at most 6 (24 accumulators); 8 x 1 for one row. */
#ifdef __AVX512F__
#include <immintrin.h>

#define SMALL_N 32          /* most rows of x the kernel takes */
#define PF_NEAR (2048)      /* floats ahead of the tile that its first block prefetches to L1... */
#define PF_FAR (2048 + 8192) /* ...and to L2 */

/* {sum of a, sum of b, sum of c, sum of d} */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d)
{
    /* per 128-bit lane: {a0+a2, b0+b2, a1+a3, b1+b3}, then {a, b, c, d} */
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

#define UNROLL _Pragma("GCC unroll 8")
/* acc[i][j] += W row i . x row j over the 16 floats at k (LOAD: whole or masked) */
#define TILE_STEP(LOAD)                                                                                           \
    do {                                                                                                          \
        __m512 wv[8];                                                                                             \
        UNROLL for (int i = 0; i < MR; i++) wv[i] = LOAD(w + i * d_in + k);                                       \
        UNROLL for (int j = 0; j < NR; j++) {                                                                     \
            const __m512 xv = LOAD(x + j * x_stride + k);                                                         \
            UNROLL for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);                \
        }                                                                                                         \
    } while (0)
#define LOAD_ALL(p) _mm512_loadu_ps(p)
#define LOAD_TAIL(p) _mm512_maskz_loadu_ps(tail, p)

/* out[j * out_stride + i] = w_i . x_j (+ bias[i]) for i < MR (rows of W, d_in apart;
 * MR is 1 or a multiple of 4) and j < NR (rows of x). With PF, each step of 16
 * floats also prefetches MR lines of W from pf on (the W that follows the tile). */
static inline __attribute__((always_inline)) void tile(const float *restrict w, const float *restrict x,
                                                       int64_t x_stride, float *restrict out, int64_t out_stride,
                                                       const float *restrict bias, int64_t d_in, const float *pf,
                                                       const int MR, const int NR, const int PF)
{
    __m512 acc[8][8];
    UNROLL for (int i = 0; i < MR; i++) UNROLL for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d_in; k += 16) {
        if (PF) {
            UNROLL for (int i = 0; i < MR; i++) _mm_prefetch((const char *)(pf + PF_NEAR + 16 * i), _MM_HINT_T0);
            UNROLL for (int i = 0; i < MR; i++) _mm_prefetch((const char *)(pf + PF_FAR + 16 * i), _MM_HINT_T1);
            pf += 16 * MR;
        }
        TILE_STEP(LOAD_ALL);
    }
    if (k < d_in) {
        const __mmask16 tail = _cvtu32_mask16((1u << (d_in - k)) - 1);
        TILE_STEP(LOAD_TAIL);
    }
    if (MR == 1) {
        UNROLL for (int j = 0; j < NR; j++) out[j * out_stride] = _mm512_reduce_add_ps(acc[0][j]) + (bias ? *bias : 0.0f);
        return;
    }
    UNROLL for (int j = 0; j < NR; j++) UNROLL for (int i = 0; i < MR; i += 4) {
        __m128 s = sum4(acc[i][j], acc[i + 1][j], acc[i + 2][j], acc[i + 3][j]);
        if (bias)
            s = _mm_add_ps(s, _mm_loadu_ps(bias + i));
        _mm_storeu_ps(out + j * out_stride + i, s);
    }
}

/* tile() for a constant MR and each NR (and prefetch or not) */
#define TILE_ARGS const float *w, const float *x, int64_t x_stride, float *out, int64_t out_stride, \
                  const float *bias, int64_t d_in, const float *pf, int nr
#define TILE_NR(MR, NR)                                                                                           \
    case NR:                                                                                                      \
        if (pf)                                                                                                   \
            tile(w, x, x_stride, out, out_stride, bias, d_in, pf, MR, NR, 1);                                     \
        else                                                                                                      \
            tile(w, x, x_stride, out, out_stride, bias, d_in, 0, MR, NR, 0);                                      \
        break
static void tile8(TILE_ARGS)
{
    switch (nr) { TILE_NR(8, 1); }
}
static void tile4(TILE_ARGS)
{
    switch (nr) { TILE_NR(4, 1); TILE_NR(4, 2); TILE_NR(4, 3); TILE_NR(4, 4); TILE_NR(4, 5); TILE_NR(4, 6); }
}
static void tile1(TILE_ARGS)
{
    switch (nr) { TILE_NR(1, 1); TILE_NR(1, 2); TILE_NR(1, 3); TILE_NR(1, 4); TILE_NR(1, 5); TILE_NR(1, 6); }
}

/* out[:, c0:c1] = x @ W[c0:c1].T (+ bias[c0:c1]) for n <= SMALL_N rows of x */
static void gemm_small(const float *W, const float *bias, const float *x, int64_t x_stride, float *out,
                       int64_t out_stride, int64_t n, int64_t d_in, int64_t c0, int64_t c1)
{
    const int wide = n == 1; /* one row of x: 8 rows of W a tile, for 8 FMA chains */
    const int64_t blocks = wide ? 1 : (n + 5) / 6; /* blocks of x rows, as even as can be */
    int64_t c = c0;
    for (; c + (wide ? 8 : 4) <= c1; c += wide ? 8 : 4) {
        const float *w = W + c * d_in;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t t0 = n * b / blocks, t1 = n * (b + 1) / blocks;
            (wide ? tile8 : tile4)(w, x + t0 * x_stride, x_stride, out + t0 * out_stride + c, out_stride,
                                   bias ? bias + c : 0, d_in, wide || b ? 0 : w, (int)(t1 - t0));
        }
    }
    for (; c + 4 <= c1; c += 4) /* what is left: fewer than 8 (4) columns, 4 at a time, then 1 */
        for (int64_t b = 0, bl = (n + 5) / 6; b < bl; b++) {
            const int64_t t0 = n * b / bl, t1 = n * (b + 1) / bl;
            tile4(W + c * d_in, x + t0 * x_stride, x_stride, out + t0 * out_stride + c, out_stride,
                  bias ? bias + c : 0, d_in, 0, (int)(t1 - t0));
        }
    for (; c < c1; c++)
        for (int64_t t0 = 0; t0 < n; t0 += 6)
            tile1(W + c * d_in, x + t0 * x_stride, x_stride, out + t0 * out_stride + c, out_stride,
                  bias ? bias + c : 0, d_in, 0, (int)(n - t0 < 6 ? n - t0 : 6));
}
#else
#define SMALL_N 0
#define gemm_small gemm_blas
#endif

/* out[:, c0:c1] = x @ W[c0:c1].T (+ bias[c0:c1]) on one thread. More rows than
 * the small kernel takes (a prefill) go through it SMALL_N rows at a time: the
 * column chunk of W stays in L2 while the row blocks stream past, and that beats
 * the BLAS's own prefill GEMM on this CPU too (2 cores, the default model's 210
 * layers: 64 rows 1.9x, 256 rows 1.15x, 512 rows 1.07x, measured blocked from
 * Python; in C without the copies). */
static void gemm_cols(const float *W, const float *bias, const float *x, int64_t x_stride, float *out,
                      int64_t out_stride, int64_t n, int64_t d_in, int64_t c0, int64_t c1)
{
    if (SMALL_N == 0) {
        gemm_blas(W, bias, x, x_stride, out, out_stride, n, d_in, c0, c1);
        return;
    }
    for (int64_t r0 = 0; r0 < n; r0 += SMALL_N) {
        const int64_t rows = n - r0 < SMALL_N ? n - r0 : SMALL_N;
        gemm_small(W, bias, x + r0 * x_stride, x_stride, out + r0 * out_stride, out_stride, rows, d_in, c0, c1);
    }
}

/* Past this many rows (a prefill chunk) the BLAS's own blocked, packed GEMM wins,
 * on its own threads. Measured on 2 cores at the default model's shapes, own kernel
 * over MKL's: Zen 5 at 64 / 256 / 512 rows 1.9x / 1.15x / 1.07x faster, a Xeon
 * with AMX at 64 even, at 128 / 512 / 2,000 rows 0.7x / 0.75x / 0.75x. One fixed
 * crossover keeps a build's rounding the same on every run. */
#define BLAS_ROWS 64

void lmx_linear_lora_f32(const int64_t *step, const int64_t *linear)
{
    const float *x = (const float *)(intptr_t)linear[0], *W = (const float *)(intptr_t)linear[5];
    const float *bias = (const float *)(intptr_t)linear[6];
    float *out = (float *)(intptr_t)linear[7];
    const int64_t x_stride = linear[1], n = linear[2], d_in = linear[3], d_out = linear[4], out_stride = linear[8];
    const int64_t *module = (const int64_t *)(intptr_t)linear[9], threads = linear[10];
    if (n <= 0 || !sgemm)
        return;
    if (threads < 2 || threads > 4 || n > BLAS_ROWS || (module && n > 32)) { /* one thread, or the BLAS's own */
        (threads < 2 && n <= BLAS_ROWS ? gemm_cols : gemm_blas)(W, bias, x, x_stride, out, out_stride, n, d_in, 0,
                                                                d_out);
        if (module)
            lmx_lora_add_f32_step(module, step, out, out_stride, x, x_stride);
        return;
    }
    const int64_t R = module ? module[3] : 1;
    const int64_t *slots = module ? (const int64_t *)(intptr_t)step[0] : 0;
    const float *A = module ? (const float *)(intptr_t)module[0] : 0;
    const float *BT = module ? (const float *)(intptr_t)module[1] : 0;
    float shrunk[n * R];
    const int64_t chunks = 4 * threads, chunk = ((d_out + chunks - 1) / chunks + 15) / 16 * 16;
#pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num(); /* nt is 1 when nested */
        if (module && id == nt - 1) {
            for (int64_t t = 0; t < n; t++)
                if (slots[t] >= 0)
                    shrink_rows(x + t * x_stride, A + slots[t] * R * d_in, d_in, 0, R, shrunk + t * R);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c0 = 0; c0 < d_out; c0 += chunk)
            gemm_cols(W, bias, x, x_stride, out, out_stride, n, d_in, c0, c0 + chunk < d_out ? c0 + chunk : d_out);
        if (module) { /* after the loop's barrier: every shrink and every column of the GEMM are done */
            const int64_t piece = ((d_out + nt - 1) / nt + 15) / 16 * 16;
            const int64_t e0 = id * piece, e1 = e0 + piece < d_out ? e0 + piece : d_out;
            for (int64_t t = 0; t < n; t++)
                if (slots[t] >= 0 && e0 < e1)
                    expand_cols(out + t * out_stride, BT + slots[t] * R * d_out, shrunk + t * R, R, d_out, e0, e1);
        }
    }
}
