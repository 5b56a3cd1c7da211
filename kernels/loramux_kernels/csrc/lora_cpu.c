/* Fused multi-LoRA shrink-expand for few tokens (decode) on CPU, float32.
 *
 * Semantics (lmx_lora_add_f32): for every token t in [0, n) with s = slots[t] >= 0,
 *     out[t, :] += (x[t, :] @ A[s, :rank, :].T) @ BT[s, :rank, :]
 * A is [S, R, d_in] and BT is [S, R, d_out], contiguous, R the slot rank stride
 * (rank <= R; entries past a slot's own rank are zero). Rows of x and out are
 * `x_stride` / `out_stride` floats apart. Accumulation is float32 throughout.
 *
 * One call replaces the gather + bmm + bmm + add that torch needs per layer: at
 * decode sizes those ops cost more in dispatch than in arithmetic, and this loop
 * reads each slot's weights once per token from memory or cache.
 */
#include <stdint.h>

#define EXPAND_BLOCK 256  /* output columns per work item in the expand */

static void shrink_one(const float *restrict xt, const float *restrict a, int64_t d_in, float *restrict dst)
{
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d_in; j++)
        acc += xt[j] * a[j];
    *dst = acc;
}

static void expand_block(float *restrict ot, const float *restrict bt, const float *restrict sh,
                         int64_t rank, int64_t d_out, int64_t c0, int64_t c1)
{
    for (int64_t r = 0; r < rank; r++) {
        const float w = sh[r];
        const float *restrict row = bt + r * d_out;
#pragma omp simd
        for (int64_t c = c0; c < c1; c++)
            ot[c] += w * row[c];
    }
}

void lmx_lora_add_f32(float *out, int64_t out_stride, const float *x, int64_t x_stride,
                      const float *A, const float *BT, const int64_t *slots, int64_t n,
                      int64_t d_in, int64_t d_out, int64_t R, int64_t rank, int64_t threads)
{
    float shrunk[n * rank > 0 ? n * rank : 1];
    const int64_t blocks = (d_out + EXPAND_BLOCK - 1) / EXPAND_BLOCK;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n * rank; i++) {
            const int64_t t = i / rank, r = i % rank, s = slots[t];
            if (s < 0)
                shrunk[i] = 0.0f;
            else
                shrink_one(x + t * x_stride, A + (s * R + r) * d_in, d_in, shrunk + i);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n * blocks; i++) {
            const int64_t t = i / blocks, b = i % blocks, s = slots[t];
            if (s < 0)
                continue;
            const int64_t c0 = b * EXPAND_BLOCK;
            const int64_t c1 = c0 + EXPAND_BLOCK < d_out ? c0 + EXPAND_BLOCK : d_out;
            expand_block(out + t * out_stride, BT + s * R * d_out, shrunk + t * rank, rank, d_out, c0, c1);
        }
    }
}

/* lmx_lora_add_f32 with its 13 arguments in one int64 array, in the same order
 * (pointers as integers): one argument is far cheaper to pass through ctypes. */
void lmx_lora_add_f32_packed(const int64_t *a)
{
    lmx_lora_add_f32((float *)(intptr_t)a[0], a[1], (const float *)(intptr_t)a[2], a[3],
                     (const float *)(intptr_t)a[4], (const float *)(intptr_t)a[5],
                     (const int64_t *)(intptr_t)a[6], a[7], a[8], a[9], a[10], a[11], a[12]);
}
