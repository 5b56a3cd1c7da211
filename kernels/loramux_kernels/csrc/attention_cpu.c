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
 *
 * Sequences with many new tokens (prefill chunks, in long_seqs) go through the
 * tiled form of the same loop (flash attention's): a task is one kv head and a
 * block of BR query rows (tokens x the group's heads), scores for BK keys at a
 * time as a register-tiled GEMM (S^T = K Q^T, rows of S^T along the vectors, so
 * the softmax's row max and sum are elementwise over key rows), then O += P V as
 * a second register-tiled GEMM. It reads the keys straight from their blocks, so a
 * chunk over a long cached context gathers nothing. It needs AVX-512 and D a
 * multiple of 16; elsewhere the long sequences take the per-row loop above.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 64  /* keys scored per softmax update */
#define QROWS 16 /* query rows (token, head) a task holds at once */

struct args {
    const int64_t *slot_mapping, *query_start, *context_lens, *block_tables, *short_seqs, *long_seqs;
    int64_t n, n_short, n_long, max_blocks, block_size, hkv, d, hq, q_tok, q_head, key_tok, key_head, value_tok,
        value_head;
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

/* kr[i], vr[i]: kv head g's key and value rows at positions k0 + i, i in [0, nk), and
 * a prefetch of the rows `ahead` positions on (below keys): the blocks lie anywhere,
 * beyond what the hardware prefetchers guess (measured 25% faster from DRAM). */
static void tile_rows(const struct args *a, const int64_t *table, int64_t g, int64_t k0, int64_t nk, int64_t keys,
                      int64_t ahead, const float **kr, const float **vr)
{
    const int64_t d = a->d, bs = a->block_size;
    for (int64_t i = 0; i < nk; i++) {
        const int64_t p = k0 + i, row = pool_row(table, p, bs) * a->hkv + g;
        kr[i] = a->k_pool + row * d, vr[i] = a->v_pool + row * d;
        if (p + ahead < keys) {
            const int64_t next = pool_row(table, p + ahead, bs) * a->hkv + g;
            for (int64_t c = 0; c < d; c += 16) {
                __builtin_prefetch(a->k_pool + next * d + c);
                __builtin_prefetch(a->v_pool + next * d + c);
            }
        }
    }
}

/* Sequence s, kv head g: its query rows r = j * G + (h - g * G), QROWS at a time. */
static void attend(const struct args *a, int64_t s, int64_t g)
{
    const int64_t t0 = a->query_start[s], q_len = a->query_start[s + 1] - t0, ctx = a->context_lens[s];
    const int64_t G = a->hq / a->hkv, rows = q_len * G, d = a->d;
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
            tile_rows(a, table, g, k0, nk, keys, TILE, kr, vr);
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

/* ------------------------------------------------------------- tiled (prefill) */

#ifdef __AVX512F__
#include <immintrin.h>

#define BR 48        /* query rows of a tiled task: three vectors of 16 */
#define RV (BR / 16)
#define BK 32        /* keys per tile */

int lmx_attention_tiled(void) { return 1; }

/* exp_neg on 16 lanes (the same polynomial): 2^n by scalef, 0 below -87. */
static inline __m512 exp_neg16(__m512 x)
{
    const __m512 y = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    return _mm512_maskz_mov_ps(~low, _mm512_scalef_ps(p, n));
}

/* st[i * BR + r] = qt[:, r] . k[i] for i in [0, nk), all BR rows; qt is [d][BR].
 * Eight keys by three row vectors a pass: 24 accumulators, 11 loads per 24 FMAs. */
static void score_tile(const float *restrict qt, const float *const *k, int64_t nk, int64_t d, float *restrict st)
{
    int64_t i = 0;
    for (; i + 8 <= nk; i += 8) {
        __m512 acc[8][RV];
        for (int a = 0; a < 8; a++)
            for (int v = 0; v < RV; v++)
                acc[a][v] = _mm512_setzero_ps();
        for (int64_t c = 0; c < d; c++) {
            const __m512 q0 = _mm512_loadu_ps(qt + c * BR), q1 = _mm512_loadu_ps(qt + c * BR + 16),
                         q2 = _mm512_loadu_ps(qt + c * BR + 32);
            for (int a = 0; a < 8; a++) {
                const __m512 kv = _mm512_set1_ps(k[i + a][c]);
                acc[a][0] = _mm512_fmadd_ps(kv, q0, acc[a][0]);
                acc[a][1] = _mm512_fmadd_ps(kv, q1, acc[a][1]);
                acc[a][2] = _mm512_fmadd_ps(kv, q2, acc[a][2]);
            }
        }
        for (int a = 0; a < 8; a++)
            for (int v = 0; v < RV; v++)
                _mm512_storeu_ps(st + (i + a) * BR + v * 16, acc[a][v]);
    }
    for (; i < nk; i++) {
        __m512 acc[RV] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < d; c++) {
            const __m512 kv = _mm512_set1_ps(k[i][c]);
            for (int v = 0; v < RV; v++)
                acc[v] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(qt + c * BR + v * 16), acc[v]);
        }
        for (int v = 0; v < RV; v++)
            _mm512_storeu_ps(st + i * BR + v * 16, acc[v]);
    }
}

/* o[r, c0 : c0 + 16 CV] = o[r, ...] * rescale[r] + sum_i p[i * BR + r] * v[i][c0 : ...] for rows
 * r0 .. r0 + 5: 6 rows by CV vectors of accumulators (24 at CV = 4). */
#define PV_ROWS 6
#define PV_KERNEL(CV)                                                                                          \
    static void pv_##CV(float *restrict o, int64_t d, int64_t r0, int64_t c0, const float *restrict rescale, \
                        const float *restrict p, const float *const *v, int64_t nk)                          \
    {                                                                                                          \
        __m512 acc[PV_ROWS][CV];                                                                               \
        for (int r = 0; r < PV_ROWS; r++) {                                                                    \
            const __m512 sc = _mm512_set1_ps(rescale[r0 + r]);                                                 \
            for (int j = 0; j < CV; j++)                                                                       \
                acc[r][j] = _mm512_mul_ps(sc, _mm512_loadu_ps(o + (r0 + r) * d + c0 + 16 * j));                \
        }                                                                                                      \
        for (int64_t i = 0; i < nk; i++) {                                                                     \
            __m512 vv[CV];                                                                                     \
            for (int j = 0; j < CV; j++)                                                                       \
                vv[j] = _mm512_loadu_ps(v[i] + c0 + 16 * j);                                                   \
            for (int r = 0; r < PV_ROWS; r++) {                                                                \
                const __m512 pr = _mm512_set1_ps(p[i * BR + r0 + r]);                                          \
                for (int j = 0; j < CV; j++)                                                                   \
                    acc[r][j] = _mm512_fmadd_ps(pr, vv[j], acc[r][j]);                                         \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < PV_ROWS; r++)                                                                      \
            for (int j = 0; j < CV; j++)                                                                       \
                _mm512_storeu_ps(o + (r0 + r) * d + c0 + 16 * j, acc[r][j]);                                   \
    }
PV_KERNEL(1)
PV_KERNEL(2)
PV_KERNEL(3)
PV_KERNEL(4)

/* Sequence s, kv head g, its tokens j0 .. j1 - 1 (at most BR / G): rows r = (j - j0) * G
 * + h - g * G, padded to BR with zero queries whose results are dropped. */
static void attend_tiled(const struct args *a, int64_t s, int64_t g, int64_t j0, int64_t j1)
{
    const int64_t t0 = a->query_start[s], q_len = a->query_start[s + 1] - t0, ctx = a->context_lens[s];
    const int64_t G = a->hq / a->hkv, nr = (j1 - j0) * G, d = a->d;
    const int64_t *table = a->block_tables + s * a->max_blocks;
    const int64_t first = ctx - q_len + j0, keys = ctx - q_len + j1; /* row 0 sees keys 0 .. first */
    float qt[d * BR], o[BR * d], st[BK * BR], rescale[BR];
    int64_t last[BR];
    for (int64_t r = 0; r < BR; r++) {
        const float *qr = r < nr ? a->q + (t0 + j0 + r / G) * a->q_tok + (g * G + r % G) * a->q_head : 0;
        for (int64_t c = 0; c < d; c++)
            qt[c * BR + r] = qr ? a->scale * qr[c] : 0.0f;
        last[r] = r < nr ? first + r / G : keys; /* padding sees every key: never all masked */
    }
    memset(o, 0, sizeof o);
    __m512 mx[RV], sum[RV];
    for (int v = 0; v < RV; v++)
        mx[v] = _mm512_set1_ps(-INFINITY), sum[v] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < keys; k0 += BK) {
        const int64_t nk = keys - k0 < BK ? keys - k0 : BK;
        const float *kr[BK], *vr[BK];
        tile_rows(a, table, g, k0, nk, keys, BK, kr, vr);
        score_tile(qt, kr, nk, d, st);
        if (a->softcap > 0.0f)
            for (int64_t i = 0; i < nk * BR; i++)
                st[i] = a->softcap * tanhf(st[i] / a->softcap);
        if (k0 + nk - 1 > first) /* the causal edge crosses this tile */
            for (int64_t i = 0; i < nk; i++)
                for (int64_t r = 0; r < BR; r++)
                    if (k0 + i > last[r])
                        st[i * BR + r] = -INFINITY;
        for (int v = 0; v < RV; v++) {
            __m512 m = mx[v], total = _mm512_setzero_ps();
            for (int64_t i = 0; i < nk; i++)
                m = _mm512_max_ps(m, _mm512_loadu_ps(st + i * BR + v * 16));
            for (int64_t i = 0; i < nk; i++) {
                const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(st + i * BR + v * 16), m));
                _mm512_storeu_ps(st + i * BR + v * 16, e);
                total = _mm512_add_ps(total, e);
            }
            const __m512 sc = exp_neg16(_mm512_sub_ps(mx[v], m)); /* 0 on the first tile */
            _mm512_storeu_ps(rescale + v * 16, sc);
            sum[v] = _mm512_fmadd_ps(sum[v], sc, total), mx[v] = m;
        }
        const int64_t rows = (nr + PV_ROWS - 1) / PV_ROWS * PV_ROWS; /* padding past them is not needed */
        for (int64_t r0 = 0; r0 < rows; r0 += PV_ROWS)
            for (int64_t c0 = 0; c0 < d; c0 += 64)
                switch (d - c0 >= 64 ? 4 : (d - c0) / 16) {
                case 4: pv_4(o, d, r0, c0, rescale, st, vr, nk); break;
                case 3: pv_3(o, d, r0, c0, rescale, st, vr, nk); break;
                case 2: pv_2(o, d, r0, c0, rescale, st, vr, nk); break;
                default: pv_1(o, d, r0, c0, rescale, st, vr, nk); break;
                }
    }
    float total[BR];
    for (int v = 0; v < RV; v++)
        _mm512_storeu_ps(total + v * 16, sum[v]);
    for (int64_t r = 0; r < nr; r++) {
        const int64_t j = j0 + r / G, h = g * G + r % G;
        float *restrict out = a->out + ((t0 + j) * a->hq + h) * d;
        const float inv = 1.0f / total[r];
        for (int64_t c = 0; c < d; c++)
            out[c] = o[r * d + c] * inv;
    }
}

static int tiled_takes(const struct args *a) { return a->d % 16 == 0 && a->hq / a->hkv <= BR; }
#else
#define BR 1
int lmx_attention_tiled(void) { return 0; }
static int tiled_takes(const struct args *a) { (void)a; return 0; }
static void attend_tiled(const struct args *a, int64_t s, int64_t g, int64_t j0, int64_t j1)
{
    (void)a, (void)s, (void)g, (void)j0, (void)j1;
}
#endif

static inline int64_t tiled_tokens(const struct args *a) { return BR / (a->hq / a->hkv); } /* per task */
static inline int64_t q_len_of(const struct args *a, int64_t s) { return a->query_start[s + 1] - a->query_start[s]; }

/* Tiled task i of the long sequences, the blocks nearest each chunk's end (most
 * keys) first, so the dynamic schedule ends on small tasks. */
static void tiled_task(const struct args *a, int64_t i)
{
    const int64_t T = tiled_tokens(a), hkv = a->hkv;
    for (int64_t l = 0; l < a->n_long; l++) {
        const int64_t s = a->long_seqs[l], q_len = q_len_of(a, s), nb = (q_len + T - 1) / T;
        if (i < nb * hkv) {
            const int64_t b = nb - 1 - i / hkv, j1 = (b + 1) * T;
            attend_tiled(a, s, i % hkv, b * T, j1 < q_len ? j1 : q_len);
            return;
        }
        i -= nb * hkv;
    }
}

/* Every new row written, then (after the loop's barrier) every sequence's
 * attention, the long ones' tasks first: worksharing loops for the calling team, which outside a parallel
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
    if (a->n_long && tiled_takes(a)) {
        const int64_t T = tiled_tokens(a);
        int64_t tasks = 0;
        for (int64_t l = 0; l < a->n_long; l++)
            tasks += (q_len_of(a, a->long_seqs[l]) + T - 1) / T * hkv;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t i = 0; i < tasks; i++)
            tiled_task(a, i);
    } else if (a->n_long) {
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t i = 0; i < a->n_long * hkv; i++)
            attend(a, a->long_seqs[i / hkv], i % hkv);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < a->n_short * hkv; i++)
        attend(a, a->short_seqs[i / hkv], i % hkv);
}

/* What is fixed per step and per pool pair comes in int64 arrays the caller fills
 * once, so a layer's call only fills `call`:
 *   step:  {slot_mapping, query_start, context_lens, block_tables, max_blocks, block_size, n,
 *           n_short, short_seqs, threads, work, parallel_work, n_long, long_seqs}  (pointers as integers)
 *   pools: {k_pool, v_pool, Hkv, D}
 *   call:  {q, q_tok, q_head, Hq, key, key_tok, key_head, value, value_tok, value_head, out}
 * short_seqs take the per-row loop, long_seqs the tiled one (where it is built);
 * either may be empty. work is sum(q_len * context_len) over both; more threads
 * than one only when work * Hq * D >= parallel_work. */
void lmx_paged_attention_f32(const int64_t *step, const int64_t *pools, const int64_t *call, double scale,
                             double softcap)
{
    const struct args a = {
        .slot_mapping = (const int64_t *)(intptr_t)step[0], .query_start = (const int64_t *)(intptr_t)step[1],
        .context_lens = (const int64_t *)(intptr_t)step[2], .block_tables = (const int64_t *)(intptr_t)step[3],
        .max_blocks = step[4], .block_size = step[5], .n = step[6], .n_short = step[7],
        .short_seqs = (const int64_t *)(intptr_t)step[8], .n_long = step[12],
        .long_seqs = (const int64_t *)(intptr_t)step[13],
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
