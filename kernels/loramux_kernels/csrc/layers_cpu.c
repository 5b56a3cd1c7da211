/* The small per-layer ops of a Llama-family decoder layer on CPU, float32:
 * RMSNorm (optionally with the residual add fused in), RoPE in place, SiLU(gate) * up.
 *
 * At decode sizes each of these is a handful of torch ops whose dispatch costs more
 * than their arithmetic (an RMSNorm is six ops over 576 floats); one C call each
 * replaces them (server/loramux/model/fast_layers.py). The results follow
 * transformers' formulas step by step in float32:
 *   RMSNorm  (LlamaRMSNorm): var = sum(h * h) / d; r = 1 / sqrt(var + eps);
 *            out = w * (h * r)     (only the order of the sum differs from torch)
 *   RoPE     (apply_rotary_pos_emb): x * cos + rotate_half(x) * sin,
 *            rotate_half(x) = cat(-x2, x1)  (exact: same products, same sums)
 *   SiLU*mul (F.silu(g) * u): (g / (1 + exp(-g))) * u  (exp to ~1 ulp, vectorized)
 * Built with -std=c11, which keeps GCC from contracting a * b + c into an FMA, so
 * the elementwise ops round as torch's do. Rows are `*_stride` floats apart; the
 * columns of a row are contiguous. OpenMP over rows only past a work threshold
 * (prefill): a decode row is far too small to split.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_WORK (1 << 16) /* floats touched below which one thread does it all */

static int64_t threads_for(int64_t work, int64_t threads)
{
    return threads > 1 && work >= PARALLEL_WORK ? threads : 1;
}

/* ---------------------------------------------------------------- RMSNorm */

/* out = w * (h * rsqrt(sum(h * h) / d + eps)) for one row h. */
static inline void norm_row(float *restrict out, const float *restrict h, const float *restrict w, int64_t d,
                            float eps)
{
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < d; j++)
        s += h[j] * h[j];
    const float r = 1.0f / sqrtf(s / (float)d + eps);
#pragma omp simd
    for (int64_t j = 0; j < d; j++)
        out[j] = w[j] * (h[j] * r);
}

/* out[t] = RMSNorm(x[t]) * w for t in [0, n); out and x may not overlap. */
void lmx_rmsnorm_f32(float *out, int64_t out_stride, const float *x, int64_t x_stride, const float *w, int64_t n,
                     int64_t d, double eps, int64_t threads)
{
    const float e = (float)eps; /* torch adds a Python float to a float32 tensor in float32 */
    const int64_t nt = threads_for(n * d, threads);
    if (nt > 1) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < n; t++)
            norm_row(out + t * out_stride, x + t * x_stride, w, d, e);
    } else {
        for (int64_t t = 0; t < n; t++)
            norm_row(out + t * out_stride, x + t * x_stride, w, d, e);
    }
}

static inline void add_norm_row(float *restrict out, float *restrict res, const float *restrict x,
                                const float *restrict w, int64_t d, float eps)
{
#pragma omp simd
    for (int64_t j = 0; j < d; j++)
        res[j] = x[j] + res[j];
    norm_row(out, res, w, d, eps);
}

/* The residual add fused in: h = x + res is written back to res (the new residual),
 * out = RMSNorm(h) * w. out overlaps neither x nor res. */
void lmx_add_rmsnorm_f32(float *out, int64_t out_stride, float *res, int64_t res_stride, const float *x,
                         int64_t x_stride, const float *w, int64_t n, int64_t d, double eps, int64_t threads)
{
    const float e = (float)eps;
    const int64_t nt = threads_for(n * d, threads);
    if (nt > 1) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < n; t++)
            add_norm_row(out + t * out_stride, res + t * res_stride, x + t * x_stride, w, d, e);
    } else {
        for (int64_t t = 0; t < n; t++)
            add_norm_row(out + t * out_stride, res + t * res_stride, x + t * x_stride, w, d, e);
    }
}

/* ------------------------------------------------------------------- RoPE */

/* One token's heads in place: x is [heads, d] contiguous, c and s are [d]. */
static inline void rope_heads(float *restrict x, int64_t heads, const float *restrict c, const float *restrict s,
                              int64_t d)
{
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *restrict x1 = x + h * d, *restrict x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; i++) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * c[i] - b * s[i];               /* x1 * cos + (-x2) * sin */
            x2[i] = b * c[half + i] + a * s[half + i]; /* x2 * cos + x1 * sin */
        }
    }
}

/* q: n rows of [hq, d] (row stride q_stride), k: n rows of [hkv, d]; cos, sin: n
 * rows of [d]. Rotates both in place. d is even. */
void lmx_rope_f32(float *q, int64_t q_stride, int64_t hq, float *k, int64_t k_stride, int64_t hkv,
                  const float *cos, int64_t cos_stride, const float *sin, int64_t sin_stride, int64_t n, int64_t d,
                  int64_t threads)
{
    const int64_t nt = threads_for(n * (hq + hkv) * d, threads);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const float *c = cos + t * cos_stride, *s = sin + t * sin_stride;
        rope_heads(q + t * q_stride, hq, c, s, d);
        rope_heads(k + t * k_stride, hkv, c, s, d);
    }
}

/* --------------------------------------------------------------- SiLU * up */

/* expf, vectorizable: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, Cephes'
 * degree-6 polynomial (relative error ~1e-7), 2^n built in the exponent bits.
 * Below -87.3 it returns ~1e-38 instead of a subnormal (only ever added to 1 here). */
static inline float exp_f32(float x)
{
    const float hi = 88.3762626647949f, lo = -87.3365447504019f;
    const float xc = x > hi ? hi : (x < lo ? lo : x);
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float t = xc * 1.44269504088896341f + shifter;
    const float n = t - shifter;
    float r = xc - n * 0.693359375f; /* exact: ln2's high part has 9 bits */
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * z + r + 1.0f;
    int32_t ti, bias;
    memcpy(&ti, &t, sizeof ti);
    memcpy(&bias, &shifter, sizeof bias);
    const int32_t bits = (ti - bias + 127) << 23; /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float e = y * scale;
    return x > 88.7228390f ? INFINITY : e; /* NaN propagates through the polynomial */
}

static inline void silu_mul_row(float *out, const float *g, const float *u, int64_t m) /* out may be g or u */
{
#pragma omp simd
    for (int64_t j = 0; j < m; j++) {
        const float gj = g[j];
        out[j] = (gj / (1.0f + exp_f32(-gj))) * u[j];
    }
}

/* out[t] = silu(gate[t]) * up[t] for n rows of m; out may be gate or up itself. */
void lmx_silu_mul_f32(float *out, int64_t out_stride, const float *gate, int64_t gate_stride, const float *up,
                      int64_t up_stride, int64_t n, int64_t m, int64_t threads)
{
    const int64_t nt = threads_for(n * m * 4, threads); /* exp costs a few flops more than a copy */
    if (nt > 1) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < n; t++)
            silu_mul_row(out + t * out_stride, gate + t * gate_stride, up + t * up_stride, m);
    } else {
        for (int64_t t = 0; t < n; t++)
            silu_mul_row(out + t * out_stride, gate + t * gate_stride, up + t * up_stride, m);
    }
}
