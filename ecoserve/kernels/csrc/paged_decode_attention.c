/* Paged decode attention on the CPU, reading K/V blocks in place (no gather, no padding).
 *
 * One query token per sequence. Each sequence walks its block table once for the scores (K) and
 * once for the values (V), block by block; a block holds every KV head of its tokens in one
 * contiguous run, read in order, and the next block is prefetched. Math in float32 (bf16 data
 * widened; products of two bf16 values are exact in float32), softmax with the max subtracted,
 * as paged_decode_attention_ref in kernels/reference.py specifies. head_dim a multiple of 16
 * (64, 128, ...) runs on 16-lane vectors (GCC/Clang vector extensions: the compiler maps them to
 * the unit -march names); where the CPU has AVX512-BF16, bf16 scores use its dot-product
 * instruction instead of widening K (the one intrinsic, behind #ifdef; a test builds and checks
 * the portable path too); other head sizes take a plain loop with the same arithmetic. The
 * exponential is a vectorised polynomial (relative error about 2e-7, the order of float32
 * rounding).
 *
 * query  [batch, num_q_heads, head_dim]; q head h reads KV head h / (num_q_heads / num_kv_heads)
 * k/v    [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 * tables [batch, max_blocks] int32; lens [batch] int32, each >= 1
 * out    [batch, num_q_heads, head_dim], the query's dtype
 */
#include <stdlib.h>

#include "cpu_common.h"

#define MAX_HEAD_DIM 512 /* 32 vectors of 16 lanes */

/* Sixteen dot products at once: `p[s]` holds the 16 partial sums of token REV4[s]'s dot
 * product; four rounds of pairwise folds (each lane of one vector added to another) leave one
 * vector whose lane j is token j's full sum. A bit-reversed input order makes the output order
 * the natural one. __builtin_shuffle is GCC's form, __builtin_shufflevector Clang's. */
#ifdef __clang__
#define SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUFFLE(x, y, ...) __builtin_shuffle(x, y, (i32x16){__VA_ARGS__})
#endif
static const int REV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline f32x16 transpose_sum16(f32x16 *p) {
    for (int i = 0; i < 8; i++) /* 16 vectors -> 8: lanes 0-7 one token's partials, 8-15 the next's */
        p[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++) /* -> 4 vectors, four lanes per token */
        p[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               SHUFFLE(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++) /* -> 2 vectors, two lanes per token */
        p[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               SHUFFLE(p[2 * i], p[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    return SHUFFLE(p[0], p[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           SHUFFLE(p[0], p[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

/* `count` elements from `base + index` as float32: bf16 is widened into `tmp`, float32 is read in place. */
static inline const float *as_f32(const void *base, int64_t index, int bf16, int64_t count, float *tmp) {
    if (!bf16) return (const float *)base + index;
    const uint16_t *p = (const uint16_t *)base + index;
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) store16(tmp + i, load16_bf16(p + i));
    for (; i < count; i++) tmp[i] = bf16_to_f32(p[i]);
    return tmp;
}

/* sr[t] = exp(sr[t] - m) for t < len; returns their sum. */
static float exp_shifted(float *sr, int len, float m) {
    f32x16 sum = {0};
    int t = 0;
    for (; t + 16 <= len; t += 16) {
        const f32x16 x = exp16(load16(sr + t) - m);
        store16(sr + t, x);
        sum += x;
    }
    float total = 0.0f;
    for (int i = 0; i < 16; i++) total += sum[i];
    if (t < len) { /* the last partial vector, through a padded copy */
        f32x16 x = {0};
        memcpy(&x, sr + t, (size_t)(len - t) * sizeof(float));
        x = exp16(x - m);
        memcpy(sr + t, &x, (size_t)(len - t) * sizeof(float));
        for (int i = 0; i < len - t; i++) total += x[i];
    }
    return total;
}

/* Softmax of each query row's scores in place; returns nothing, writes 1 / sum (NaN when a score
 * is NaN or infinite, as the reference gives) into inv. */
static void softmax_rows(float *scores, int len, int nq, float *inv) {
    for (int r = 0; r < nq; r++) {
        float *sr = scores + (int64_t)r * len;
        float m = -INFINITY, poison = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : poison)
        for (int t = 0; t < len; t++) {
            m = sr[t] > m ? sr[t] : m;
            poison += sr[t] * 0.0f;
        }
        const float sum = exp_shifted(sr, len, m);
        inv[r] = poison == poison ? 1.0f / sum : NAN;
    }
}

/* Ask for the next block while this one is computed: a block's tokens are one contiguous run,
 * but blocks lie anywhere in the pool, where the hardware prefetcher cannot follow. */
static inline void prefetch_block(const void *cache, const int32_t *table, int j, int nblocks, int64_t block_stride,
                                  int bf16) {
    if (j >= nblocks) return;
    const size_t bytes = (size_t)block_stride * (bf16 ? 2 : 4);
    const char *p = (const char *)cache + (size_t)table[j] * bytes;
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

#ifdef __AVX512BF16__
#include <immintrin.h>
/* bf16 scores with the CPU's bf16 dot-product instruction (AVX512-BF16): 32 products of bf16
 * pairs summed into 16 float32 lanes per instruction, K never widened. Each product of two bf16
 * values is exact in float32, as in the widened path; the sums are float32, in another order.
 * `qb` is the raw bf16 query row (unscaled: `scale` multiplies the sums). */
static inline __attribute__((always_inline)) void scores_dpbf16(const uint16_t *qb, const uint16_t *k_cache, int64_t k0,
                                                                 int n, int h, const int nc, int64_t token_stride,
                                                                 float scale, float *out) {
    const int d = nc * 16;
    __m512bh qv[16];
    for (int c = 0; c < nc / 2; c++) memcpy(&qv[c], qb + c * 32, 64);
    for (int i0 = 0; i0 < n; i0 += 16) {
        const int m = n - i0 < 16 ? n - i0 : 16;
        f32x16 p[16];
        for (int s = 0; s < 16; s++) {
            if (REV4[s] >= m) {
                p[s] = (f32x16){0};
                continue;
            }
            const uint16_t *kh = k_cache + k0 + (i0 + REV4[s]) * token_stride + h * d;
            __m512 acc_s = _mm512_setzero_ps();
            for (int c = 0; c < nc / 2; c++) {
                __m512bh kv;
                memcpy(&kv, kh + c * 32, 64);
                acc_s = _mm512_dpbf16_ps(acc_s, qv[c], kv);
            }
            p[s] = (f32x16)acc_s;
        }
        const f32x16 sums = transpose_sum16(p) * scale;
        memcpy(out + i0, &sums, (size_t)m * sizeof(float));
    }
}
#endif

/* One sequence, head_dim = 16 * nc: all `nq` query rows `q` (already scaled; `qb` the raw bf16
 * rows, for the dot-product path) against `len` cached tokens. Always inlined, so a constant nc
 * gives fully unrolled loops whose accumulators stay in registers. `blk` is scratch for one
 * block widened to float32 (float32 K is read in place), `acc` [nq, d] the result. */
static inline __attribute__((always_inline)) void attend_vec(const float *q, const void *k_cache, const void *v_cache,
                                                              const int32_t *table, int len, int nq, int group,
                                                              const int nc, int block_size, int64_t block_stride,
                                                              int64_t token_stride, int bf16, const uint16_t *qb,
                                                              float scale, float *scores, float *inv, float *acc,
                                                              float *blk) {
    const int d = nc * 16, nkv = nq / group;
    const int nblocks = (len + block_size - 1) / block_size;
#ifdef __AVX512BF16__
    for (int j = 0, t0 = 0; bf16 && nc % 2 == 0 && j < nblocks; j++, t0 += block_size) { /* scores (bf16): K read once */
        const int n = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block(k_cache, table, j + 1, nblocks, block_stride, bf16);
        for (int r = 0; r < nq; r++)
            scores_dpbf16(qb + (int64_t)r * d, (const uint16_t *)k_cache, (int64_t)table[j] * block_stride, n, r / group, nc,
                          token_stride, scale, scores + (int64_t)r * len + t0);
    }
    const int widen_k = !(bf16 && nc % 2 == 0);
#else
    const int widen_k = 1;
#endif
    for (int j = 0, t0 = 0; widen_k && j < nblocks; j++, t0 += block_size) { /* scores: K read once */
        const int n = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block(k_cache, table, j + 1, nblocks, block_stride, bf16);
        const float *k = as_f32(k_cache, (int64_t)table[j] * block_stride, bf16, n * token_stride, blk);
        for (int h = 0, r = 0; h < nkv; h++) {
            for (int g = 0; g < group; g++, r++) {
                f32x16 qv[32];
                for (int c = 0; c < nc; c++) qv[c] = load16(q + (int64_t)r * d + c * 16);
                for (int i0 = 0; i0 < n; i0 += 16) { /* 16 tokens' scores per round */
                    const int m = n - i0 < 16 ? n - i0 : 16;
                    f32x16 p[16];
                    for (int s = 0; s < 16; s++) {
                        const int i = i0 + REV4[s];
                        if (REV4[s] >= m) {
                            p[s] = (f32x16){0};
                            continue;
                        }
                        const float *kh = k + i * token_stride + h * d;
                        f32x16 acc_s = qv[0] * load16(kh);
                        for (int c = 1; c < nc; c++) acc_s += qv[c] * load16(kh + c * 16);
                        p[s] = acc_s;
                    }
                    const f32x16 sums = transpose_sum16(p);
                    memcpy(scores + (int64_t)r * len + t0 + i0, &sums, (size_t)m * sizeof(float));
                }
            }
        }
    }
    softmax_rows(scores, len, nq, inv);
    memset(acc, 0, (size_t)nq * d * sizeof(float));
    for (int j = 0, t0 = 0; bf16 && j < nblocks; j++, t0 += block_size) { /* values (bf16): V read once */
        /* Head by head, each V row widened once in registers and added into the accumulators of
         * up to 16 / nc query heads of its group at a time, which stay in registers for the block. */
        const int n = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block(v_cache, table, j + 1, nblocks, block_stride, bf16);
        const int64_t v0 = (int64_t)table[j] * block_stride;
        const int gc = nc >= 16 ? 1 : 16 / nc;
        for (int h = 0; h < nkv; h++) {
            for (int g0 = 0; g0 < group; g0 += gc) {
                const int gn = group - g0 < gc ? group - g0 : gc, r0 = h * group + g0;
                f32x16 a[32]; /* gn * nc <= max(16, nc) <= 32 */
                for (int x = 0; x < gn * nc; x++) a[x] = load16(acc + (int64_t)r0 * d + x * 16);
                for (int i = 0; i < n; i++) {
                    const uint16_t *vh = (const uint16_t *)v_cache + v0 + i * token_stride + h * d;
                    f32x16 vv[32];
                    for (int c = 0; c < nc; c++) vv[c] = load16_bf16(vh + c * 16);
                    for (int gg = 0; gg < gn; gg++) {
                        const float pw = scores[(int64_t)(r0 + gg) * len + t0 + i];
                        for (int c = 0; c < nc; c++) a[gg * nc + c] += pw * vv[c];
                    }
                }
                for (int x = 0; x < gn * nc; x++) store16(acc + (int64_t)r0 * d + x * 16, a[x]);
            }
        }
    }
    for (int j = 0, t0 = 0; !bf16 && j < nblocks; j++, t0 += block_size) { /* values (float32): V read once */
        const int n = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block(v_cache, table, j + 1, nblocks, block_stride, bf16);
        const float *v = as_f32(v_cache, (int64_t)table[j] * block_stride, bf16, n * token_stride, blk);
        for (int h = 0, r = 0; h < nkv; h++) {
            for (int g = 0; g < group; g++, r++) {
                f32x16 a[32], b[32]; /* even and odd tokens: two chains of adds, not one */
                for (int c = 0; c < nc; c++) {
                    a[c] = load16(acc + (int64_t)r * d + c * 16);
                    b[c] = (f32x16){0};
                }
                const float *pr = scores + (int64_t)r * len + t0;
                int i = 0;
                for (; i + 2 <= n; i += 2) {
                    const float *vh = v + i * token_stride + h * d;
                    for (int c = 0; c < nc; c++) {
                        a[c] += pr[i] * load16(vh + c * 16);
                        b[c] += pr[i + 1] * load16(vh + token_stride + c * 16);
                    }
                }
                if (i < n)
                    for (int c = 0; c < nc; c++) a[c] += pr[i] * load16(v + i * token_stride + h * d + c * 16);
                for (int c = 0; c < nc; c++) store16(acc + (int64_t)r * d + c * 16, a[c] + b[c]);
            }
        }
    }
    for (int r = 0; r < nq; r++)
        for (int c = 0; c < nc; c++) store16(acc + (int64_t)r * d + c * 16, load16(acc + (int64_t)r * d + c * 16) * inv[r]);
}

/* The same for any head_dim, element by element. */
static void attend_any(const float *q, const void *k_cache, const void *v_cache, const int32_t *table, int len, int nq,
                       int group, int d, int block_size, int64_t block_stride, int64_t token_stride, int bf16,
                       float *scores, float *inv, float *acc, float *blk) {
    const int nkv = nq / group;
    const int nblocks = (len + block_size - 1) / block_size;
    for (int j = 0, t0 = 0; j < nblocks; j++, t0 += block_size) {
        const int n = len - t0 < block_size ? len - t0 : block_size;
        const float *k = as_f32(k_cache, (int64_t)table[j] * block_stride, bf16, n * token_stride, blk);
        for (int i = 0; i < n; i++)
            for (int h = 0, r = 0; h < nkv; h++)
                for (int g = 0; g < group; g++, r++) {
                    const float *qr = q + (int64_t)r * d, *kh = k + i * token_stride + h * d;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int e = 0; e < d; e++) s += qr[e] * kh[e];
                    scores[(int64_t)r * len + t0 + i] = s;
                }
    }
    softmax_rows(scores, len, nq, inv);
    memset(acc, 0, (size_t)nq * d * sizeof(float));
    for (int j = 0, t0 = 0; j < nblocks; j++, t0 += block_size) {
        const int n = len - t0 < block_size ? len - t0 : block_size;
        const float *v = as_f32(v_cache, (int64_t)table[j] * block_stride, bf16, n * token_stride, blk);
        for (int i = 0; i < n; i++)
            for (int h = 0, r = 0; h < nkv; h++)
                for (int g = 0; g < group; g++, r++) {
                    const float p = scores[(int64_t)r * len + t0 + i], *vh = v + i * token_stride + h * d;
                    float *a = acc + (int64_t)r * d;
#pragma omp simd
                    for (int e = 0; e < d; e++) a[e] += p * vh[e];
                }
    }
    for (int r = 0; r < nq; r++)
        for (int e = 0; e < d; e++) acc[(int64_t)r * d + e] *= inv[r];
}

/* Returns 0, or -1 if a size is beyond the limits (head_dim 512) or memory runs out. */
int paged_decode_attention(const void *query, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                           const int32_t *context_lens, void *out, int batch, int num_q_heads, int num_kv_heads,
                           int head_dim, int block_size, int max_blocks, float scale, int bf16) {
    const int group = num_q_heads / num_kv_heads, width = num_q_heads * head_dim;
    if (head_dim > MAX_HEAD_DIM) return -1;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int64_t block_stride = (int64_t)block_size * token_stride;
    float *q = (float *)malloc((size_t)width * sizeof(float));
    float *acc = (float *)malloc((size_t)width * sizeof(float));
    float *inv = (float *)malloc((size_t)num_q_heads * sizeof(float));
    float *blk = (float *)malloc((size_t)block_stride * sizeof(float));
    float *scores = NULL;
    int scores_cap = 0, rc = 0;
    if (!q || !acc || !inv || !blk) rc = -1;
    for (int b = 0; b < batch && rc == 0; b++) {
        const int len = context_lens[b];
        const int32_t *table = block_tables + (int64_t)b * max_blocks;
        if (len > scores_cap) {
            free(scores);
            scores_cap = len;
            scores = (float *)malloc((size_t)num_q_heads * len * sizeof(float));
            if (!scores) {
                rc = -1;
                break;
            }
        }
        const int64_t q_base = (int64_t)b * width;
        const float *src = as_f32(query, q_base, bf16, width, acc);
        for (int e = 0; e < width; e++) q[e] = src[e] * scale;
#define ATTEND(NC) attend_vec(q, k_cache, v_cache, table, len, num_q_heads, group, NC, block_size, block_stride, \
                              token_stride, bf16, (const uint16_t *)query + q_base, scale, scores, inv, acc, blk)
        if (head_dim == 64) ATTEND(4);
        else if (head_dim == 128) ATTEND(8);
        else if (head_dim % 16 == 0) ATTEND(head_dim / 16);
        else attend_any(q, k_cache, v_cache, table, len, num_q_heads, group, head_dim, block_size, block_stride,
                        token_stride, bf16, scores, inv, acc, blk);
#undef ATTEND
        if (bf16) {
            for (int e = 0; e < width; e++) ((uint16_t *)out)[q_base + e] = f32_to_bf16(acc[e]);
        } else {
            memcpy((float *)out + q_base, acc, (size_t)width * sizeof(float));
        }
    }
    free(scores);
    free(q);
    free(acc);
    free(inv);
    free(blk);
    return rc;
}
