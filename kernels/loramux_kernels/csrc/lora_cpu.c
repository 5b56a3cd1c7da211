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
 * step's LoRA deltas, so a decode layer goes from Python to C once. The GEMM is
 * the BLAS sgemm that torch itself calls for F.linear (handed in once through
 * lmx_set_sgemm and checked against F.linear by the caller).
 *   step:   as for lmx_lora_add_f32_step (read only when module is set)
 *   linear: {x, x_stride, n, d_in, d_out, W, bias (0: none), out, out_stride,
 *            module (0: no LoRA; else the array of lmx_lora_add_f32_step), threads}
 * W is [d_out, d_in] contiguous; x has n rows of d_in and out n rows of d_out,
 * each at its stride.
 *
 * Decode batches (2..32 tokens) on 2..4 threads take the GEMM in column chunks,
 * one single-threaded sgemm per chunk handed out dynamically: at these shapes
 * that beats the BLAS's own threading (an 8-row decode step of the default model
 * takes 0.90x the time with F.linear; results equal to float32 rounding, the
 * BLAS's blocking of a narrower GEMM may differ in the last bits), and it lets
 * one core stream the adapters' A
 * (the shrink, memory-bound) while the others run the GEMM (compute-bound); then
 * every thread expands its share of the columns. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
static sgemm_fn sgemm;

void lmx_set_sgemm(void *fn) { sgemm = (sgemm_fn)fn; }

/* out[:, c0:c1] = x @ W[c0:c1].T (+ bias[c0:c1]) */
static void gemm_cols(const float *W, const float *bias, const float *x, int64_t x_stride, float *out,
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

void lmx_linear_lora_f32(const int64_t *step, const int64_t *linear)
{
    const float *x = (const float *)(intptr_t)linear[0], *W = (const float *)(intptr_t)linear[5];
    const float *bias = (const float *)(intptr_t)linear[6];
    float *out = (float *)(intptr_t)linear[7];
    const int64_t x_stride = linear[1], n = linear[2], d_in = linear[3], d_out = linear[4], out_stride = linear[8];
    const int64_t *module = (const int64_t *)(intptr_t)linear[9], threads = linear[10];
    if (n <= 0 || !sgemm)
        return;
    if (threads < 2 || threads > 4 || n < 2 || n > 32) {
        gemm_cols(W, bias, x, x_stride, out, out_stride, n, d_in, 0, d_out);
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
