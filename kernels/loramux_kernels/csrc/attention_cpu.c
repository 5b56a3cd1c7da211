/* Paged attention over a block-table KV cache on CPU, float32: one call per layer
 * writes the step's new keys and values into the pools and attends for the
 * sequences with few query tokens (decode, chunked-prefill tails).
 *
 * Semantics (lmx_paged_attention_f32), pools viewed as rows [num_blocks * block_size, Hkv, D]:
 *     first, for every token t in [0, n) and kv head g:
 *         k_pool[slot_mapping[t], g, :] = key[t, g, :];  v_pool[slot_mapping[t], g, :] = value[t, g, :]
 *     then for every s in short_seqs, with q_len = query_start[s + 1] - query_start[s],
 *     every j in [0, q_len) (token t = query_start[s] + j at position p = context_lens[s] - q_len + j)
 *     and every query head h (kv head g = h / (Hq / Hkv)):
 *         row(i)   = block_tables[s, i / block_size] * block_size + i % block_size
 *         score[i] = scale * q[t, h, :] . k_pool[row(i), g, :]            for i in [0, p]
 *         score    = softcap * tanh(score / softcap)                       if softcap > 0
 *         out[t, h, :] = softmax(score) @ v_pool[row(0..p), g, :]
 * q, key and value rows are their token and head strides apart (unit stride within
 * a row); out is [n, Hq, D] contiguous. Float32 throughout.
 *
 * One task per (sequence, kv head): the group's query heads (and a chunk's tokens,
 * up to QROWS rows) share every key and value row it loads, so a decode step reads
 * each row of the cache from memory once.
 * Keys are taken TILE at a time wherever their blocks lie (any block_size), with an
 * online softmax per tile: running max and sum, the accumulator rescaled when the
 * max grows, so nothing is kept per key beyond the tile.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 64  /* keys scored per softmax update */
#define QROWS 16 /* query rows (token, head) a task holds at once */

struct args {
    const int64_t *slot_mapping, *query_start, *context_lens, *block_tables, *short_seqs;
    int64_t n, n_short, max_blocks, block_size, hkv, d, hq, q_tok, q_head, key_tok, key_head, value_tok, value_head;
    const float *q, *key, *value;
    float *k_pool, *v_pool, *out, scale, softcap;
};

/* e^x for x <= 0, vectorizable (libm's expf is not, without -ffast-math): 2^(x log2 e)
 * as 2^n (exponent bits) times a degree-6 polynomial of 2^f, f in [-0.5, 0.5];
 * relative error below (1 + |x|) * 2e-7 (from rounding x log2 e). Below -87, 0. */
#pragma omp declare simd
static inline float exp_neg(float x)
{
    const float y = x * 1.44269504f, t = y < -126.0f ? -126.0f : y, n = rintf(t), f = t - n;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    union { float f; int32_t i; } s = {.i = ((int32_t)n + 127) << 23};
    return x < -87.0f ? 0.0f : p * s.f;
}

/* sc[i] = q . k[i] for i in [0, nk), four keys per pass (four independent sums). */
static void score_keys(const float *restrict q, const float *const *k, int64_t nk, int64_t d, float *restrict sc)
{
    int64_t i = 0;
    for (; i + 4 <= nk; i += 4) {
        const float *restrict k0 = k[i], *restrict k1 = k[i + 1], *restrict k2 = k[i + 2], *restrict k3 = k[i + 3];
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t c = 0; c < d; c++) {
            s0 = fmaf(q[c], k0[c], s0);
            s1 = fmaf(q[c], k1[c], s1);
            s2 = fmaf(q[c], k2[c], s2);
            s3 = fmaf(q[c], k3[c], s3);
        }
        sc[i] = s0, sc[i + 1] = s1, sc[i + 2] = s2, sc[i + 3] = s3;
    }
    for (; i < nk; i++) {
        const float *restrict ki = k[i];
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < d; c++)
            s = fmaf(q[c], ki[c], s);
        sc[i] = s;
    }
}

/* acc += sum_i p[i] * v[i] for i in [0, nv). */
static void add_values(float *restrict acc, const float *restrict p, const float *const *v, int64_t nv, int64_t d)
{
    int64_t i = 0;
    for (; i + 4 <= nv; i += 4) {
        const float p0 = p[i], p1 = p[i + 1], p2 = p[i + 2], p3 = p[i + 3];
        const float *restrict v0 = v[i], *restrict v1 = v[i + 1], *restrict v2 = v[i + 2], *restrict v3 = v[i + 3];
#pragma omp simd
        for (int64_t c = 0; c < d; c++)
            acc[c] = fmaf(p3, v3[c], fmaf(p2, v2[c], fmaf(p1, v1[c], fmaf(p0, v0[c], acc[c]))));
    }
    for (; i < nv; i++) {
        const float pi = p[i], *restrict vi = v[i];
#pragma omp simd
        for (int64_t c = 0; c < d; c++)
            acc[c] = fmaf(pi, vi[c], acc[c]);
    }
}

static inline int64_t pool_row(const int64_t *table, int64_t p, int64_t bs) { return table[p / bs] * bs + p % bs; }

/* Sequence s, kv head g: its query rows r = j * G + (h - g * G), QROWS at a time. */
static void attend(const struct args *a, int64_t s, int64_t g)
{
    const int64_t t0 = a->query_start[s], q_len = a->query_start[s + 1] - t0, ctx = a->context_lens[s];
    const int64_t G = a->hq / a->hkv, rows = q_len * G, d = a->d, bs = a->block_size;
    const int64_t *table = a->block_tables + s * a->max_blocks;
    for (int64_t r0 = 0; r0 < rows; r0 += QROWS) {
        const int64_t nr = rows - r0 < QROWS ? rows - r0 : QROWS;
        float q[nr * d], acc[nr * d], sc[TILE], mx[nr], sum[nr];
        int64_t last[nr]; /* the last key position row r sees */
        for (int64_t r = 0; r < nr; r++) {
            const int64_t j = (r0 + r) / G, h = g * G + (r0 + r) % G;
            const float *qr = a->q + (t0 + j) * a->q_tok + h * a->q_head;
            for (int64_t c = 0; c < d; c++)
                q[r * d + c] = a->scale * qr[c], acc[r * d + c] = 0.0f;
            last[r] = ctx - q_len + j, mx[r] = -INFINITY, sum[r] = 0.0f;
        }
        const int64_t keys = last[nr - 1] + 1; /* rows are in position order */
        for (int64_t k0 = 0; k0 < keys; k0 += TILE) {
            const int64_t nk = keys - k0 < TILE ? keys - k0 : TILE;
            const float *kr[TILE], *vr[TILE];
            for (int64_t i = 0; i < nk; i++) {
                const int64_t p = k0 + i, row = pool_row(table, p, bs) * a->hkv + g;
                kr[i] = a->k_pool + row * d, vr[i] = a->v_pool + row * d;
                /* The next tile's rows: the blocks lie anywhere, beyond what the
                 * hardware prefetchers guess (measured 25% faster from DRAM). */
                if (p + TILE < keys) {
                    const int64_t next = pool_row(table, p + TILE, bs) * a->hkv + g;
                    for (int64_t c = 0; c < d; c += 16) {
                        __builtin_prefetch(a->k_pool + next * d + c);
                        __builtin_prefetch(a->v_pool + next * d + c);
                    }
                }
            }
            for (int64_t r = 0; r < nr; r++) {
                const int64_t nv = last[r] + 1 - k0 < nk ? last[r] + 1 - k0 : nk; /* causal */
                if (nv <= 0)
                    continue;
                score_keys(q + r * d, kr, nv, d, sc);
                if (a->softcap > 0.0f)
                    for (int64_t i = 0; i < nv; i++)
                        sc[i] = a->softcap * tanhf(sc[i] / a->softcap);
                float m = mx[r], total = 0.0f;
#pragma omp simd reduction(max : m)
                for (int64_t i = 0; i < nv; i++)
                    m = sc[i] > m ? sc[i] : m;
#pragma omp simd reduction(+ : total)
                for (int64_t i = 0; i < nv; i++) {
                    sc[i] = exp_neg(sc[i] - m);
                    total += sc[i];
                }
                const float rescale = exp_neg(mx[r] - m); /* 0 on the first tile */
                float *restrict ar = acc + r * d;
                if (rescale != 1.0f) {
#pragma omp simd
                    for (int64_t c = 0; c < d; c++)
                        ar[c] *= rescale;
                }
                add_values(ar, sc, vr, nv, d);
                mx[r] = m, sum[r] = sum[r] * rescale + total;
            }
        }
        for (int64_t r = 0; r < nr; r++) {
            const int64_t j = (r0 + r) / G, h = g * G + (r0 + r) % G;
            float *restrict o = a->out + ((t0 + j) * a->hq + h) * d;
            const float inv = 1.0f / sum[r];
            for (int64_t c = 0; c < d; c++)
                o[c] = acc[r * d + c] * inv;
        }
    }
}

/* Every new row written, then (after the loop's barrier) every short sequence's
 * attention: worksharing loops for the calling team, which outside a parallel
 * region is this thread alone (no fork: ~1.5 us saved per call). */
static void step_work(const struct args *a)
{
    const int64_t hkv = a->hkv, d = a->d;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a->n; t++)
        for (int64_t g = 0; g < hkv; g++) {
            const int64_t dst = (a->slot_mapping[t] * hkv + g) * d;
            memcpy(a->k_pool + dst, a->key + t * a->key_tok + g * a->key_head, d * sizeof(float));
            memcpy(a->v_pool + dst, a->value + t * a->value_tok + g * a->value_head, d * sizeof(float));
        }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < a->n_short * hkv; i++)
        attend(a, a->short_seqs[i / hkv], i % hkv);
}

/* What is fixed per step and per pool pair comes in int64 arrays the caller fills
 * once, so a layer's call only fills `call`:
 *   step:  {slot_mapping, query_start, context_lens, block_tables, max_blocks, block_size, n,
 *           n_short, short_seqs, threads, work, parallel_work}    (pointers as integers)
 *   pools: {k_pool, v_pool, Hkv, D}
 *   call:  {q, q_tok, q_head, Hq, key, key_tok, key_head, value, value_tok, value_head, out}
 * work is sum(q_len * context_len) over short_seqs; more threads than one only when
 * work * Hq * D >= parallel_work. */
void lmx_paged_attention_f32(const int64_t *step, const int64_t *pools, const int64_t *call, double scale,
                             double softcap)
{
    const struct args a = {
        .slot_mapping = (const int64_t *)(intptr_t)step[0], .query_start = (const int64_t *)(intptr_t)step[1],
        .context_lens = (const int64_t *)(intptr_t)step[2], .block_tables = (const int64_t *)(intptr_t)step[3],
        .max_blocks = step[4], .block_size = step[5], .n = step[6], .n_short = step[7],
        .short_seqs = (const int64_t *)(intptr_t)step[8],
        .k_pool = (float *)(intptr_t)pools[0], .v_pool = (float *)(intptr_t)pools[1], .hkv = pools[2], .d = pools[3],
        .q = (const float *)(intptr_t)call[0], .q_tok = call[1], .q_head = call[2], .hq = call[3],
        .key = (const float *)(intptr_t)call[4], .key_tok = call[5], .key_head = call[6],
        .value = (const float *)(intptr_t)call[7], .value_tok = call[8], .value_head = call[9],
        .out = (float *)(intptr_t)call[10], .scale = (float)scale, .softcap = (float)softcap,
    };
    const int64_t threads = step[10] * a.hq * a.d >= step[11] ? step[9] : 1;
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        step_work(&a);
    } else {
        step_work(&a);
    }
}
