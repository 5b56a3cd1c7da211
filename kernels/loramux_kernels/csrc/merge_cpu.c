/* Merge kernels on dense float32 task vectors, CPU, OpenMP.
 *
 * lmx_kth_largest_abs_f32: the k-th largest |x| exactly (radix select on the
 *   float bits, two histogram passes, no sort and no copy), and how many |x| are
 *   >= it. For finite, non-negative floats the bit pattern orders like the value.
 *
 * lmx_ties_merge_f32: TIES trim + elect + disjoint mean in one pass over the
 *   inputs, never materializing the trimmed [N, D] tensor. Semantics, per entry j:
 *     v_i = |d_i[j]| >= t_i ? d_i[j] * w_i : 0          (trim, then weight)
 *     score = sum_i v_i ("total") or sum_i sign(v_i) ("frequency"), in order i = 0..N-1
 *     e = score >= 0 ? +1 : -1                          (a tie elects +)
 *     out[j] = sum over i with v_i * e > 0 of v_i / max(#such i, 1)
 *   Sums run in input order in float32. torch's reduction over dim 0 may group
 *   the terms differently, so results equal the torch formulation to float32
 *   rounding (a few ulps of the largest term), with the same trim and election.
 *   With t_i = 0 and w_i = 1 it is the elect + mean of already-prepared rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HI_BINS (1 << 15) /* |x| bits >> 16: the sign bit is clear */
#define LO_BINS (1 << 16)
#define BLOCK 1024

static inline uint32_t abs_bits(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x7fffffffu;
}

/* The bin holding the k-th largest (1-based) of `hist`, and the count above it. */
static int64_t find_bin(const int64_t *hist, int64_t bins, int64_t k, int64_t *above)
{
    int64_t cum = 0;
    for (int64_t b = bins - 1; b >= 0; b--) {
        if (cum + hist[b] >= k) {
            *above = cum;
            return b;
        }
        cum += hist[b];
    }
    *above = cum;
    return 0;
}

/* Histogram of key(x) over x[0, n) where filter(x) holds, summed over threads. */
#define HISTOGRAM(hist, bins, n, threads, FILTER, KEY)                                 \
    do {                                                                               \
        memset(hist, 0, sizeof(int64_t) * (bins));                                     \
        _Pragma("omp parallel num_threads(threads)")                                   \
        {                                                                              \
            int64_t *local = calloc((bins), sizeof(int64_t));                          \
            _Pragma("omp for schedule(static) nowait")                                 \
            for (int64_t i = 0; i < (n); i++) {                                        \
                const uint32_t u = abs_bits(x[i]);                                     \
                if (FILTER)                                                            \
                    local[KEY]++;                                                      \
            }                                                                          \
            _Pragma("omp critical")                                                    \
            for (int64_t b = 0; b < (bins); b++)                                       \
                hist[b] += local[b];                                                   \
            free(local);                                                               \
        }                                                                              \
    } while (0)

/* 1 <= k <= n; x finite. Writes t = the k-th largest |x| and n_ge = #{|x| >= t}. */
void lmx_kth_largest_abs_f32(const float *x, int64_t n, int64_t k, int64_t threads, float *t, int64_t *n_ge)
{
    int64_t *hi = malloc(sizeof(int64_t) * HI_BINS);
    int64_t *lo = malloc(sizeof(int64_t) * LO_BINS);
    int64_t above_hi, above_lo;
    HISTOGRAM(hi, HI_BINS, n, threads, 1, u >> 16);
    const uint32_t b_hi = (uint32_t)find_bin(hi, HI_BINS, k, &above_hi);
    HISTOGRAM(lo, LO_BINS, n, threads, (u >> 16) == b_hi, u & 0xffffu);
    const uint32_t b_lo = (uint32_t)find_bin(lo, LO_BINS, k - above_hi, &above_lo);
    const uint32_t bits = (b_hi << 16) | b_lo;
    memcpy(t, &bits, sizeof bits);
    *n_ge = above_hi + above_lo + lo[b_lo];
    free(hi);
    free(lo);
}

static inline float trimmed(const float *d, int64_t j, float t, float w)
{
    const float v = d[j];
    return (v >= t || -v >= t) ? v * w : 0.0f;
}

void lmx_ties_merge_f32(const int64_t *ptrs, const float *thresholds, const float *weights, int64_t n,
                        int64_t D, int64_t frequency, int64_t threads, float *out)
{
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j0 = 0; j0 < D; j0 += BLOCK) {
        const int64_t m = D - j0 < BLOCK ? D - j0 : BLOCK;
        float score[BLOCK], sum[BLOCK], count[BLOCK];
        for (int64_t j = 0; j < m; j++)
            score[j] = sum[j] = count[j] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float *d = (const float *)(intptr_t)ptrs[i] + j0;
            const float t = thresholds[i], w = weights[i];
            if (frequency) {
                for (int64_t j = 0; j < m; j++) {
                    const float v = trimmed(d, j, t, w);
                    score[j] += (float)(v > 0.0f) - (float)(v < 0.0f);
                }
            } else {
                for (int64_t j = 0; j < m; j++)
                    score[j] += trimmed(d, j, t, w);
            }
        }
        for (int64_t j = 0; j < m; j++)
            score[j] = score[j] >= 0.0f ? 1.0f : -1.0f;
        for (int64_t i = 0; i < n; i++) {
            const float *d = (const float *)(intptr_t)ptrs[i] + j0;
            const float t = thresholds[i], w = weights[i];
            for (int64_t j = 0; j < m; j++) {
                const float v = trimmed(d, j, t, w);
                const int agree = v * score[j] > 0.0f;
                sum[j] += agree ? v : 0.0f;
                count[j] += agree ? 1.0f : 0.0f;
            }
        }
        float *o = out + j0;
        for (int64_t j = 0; j < m; j++)
            o[j] = sum[j] / (count[j] > 1.0f ? count[j] : 1.0f);
    }
}
