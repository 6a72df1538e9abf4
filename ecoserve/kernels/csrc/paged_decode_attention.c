/* Paged decode attention on the CPU, reading K/V blocks in place (no gather, no padding).
 *
 * One query token per sequence; each (sequence, KV head) pair walks its block table once for
 * the scores and once for the values. Math in float32 (bf16 inputs are widened), softmax with
 * the max subtracted, as paged_decode_attention_ref in kernels/reference.py specifies.
 *
 * query  [batch, num_q_heads, head_dim]; q head h reads KV head h / (num_q_heads / num_kv_heads)
 * k/v    [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 * tables [batch, max_blocks] int32; lens [batch] int32, each >= 1
 * out    [batch, num_q_heads, head_dim], the query's dtype
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_HEAD_DIM 512

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void load_row(const void *base, int64_t index, int bf16, int d, float *dst) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)base + index;
#pragma omp simd
        for (int i = 0; i < d; i++) dst[i] = bf16_to_f32(p[i]);
    } else {
        memcpy(dst, (const float *)base + index, (size_t)d * sizeof(float));
    }
}

static inline float dot(const float *a, const float *b, int d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < d; i++) acc += a[i] * b[i];
    return acc;
}

/* Returns 0, or -1 if a size is beyond the fixed scratch limits. */
int paged_decode_attention(const void *query, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                           const int32_t *context_lens, void *out, int batch, int num_q_heads, int num_kv_heads,
                           int head_dim, int block_size, int max_blocks, float scale, int bf16) {
    const int group = num_q_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM) return -1;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int64_t block_stride = (int64_t)block_size * token_stride;
    float q[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float *scores = NULL;
    int scores_cap = 0;
    for (int b = 0; b < batch; b++) {
        const int len = context_lens[b];
        const int32_t *table = block_tables + (int64_t)b * max_blocks;
        if (len > scores_cap) {
            free(scores);
            scores_cap = len;
            scores = (float *)malloc((size_t)group * len * sizeof(float));
            if (!scores) return -1;
        }
        for (int h = 0; h < num_kv_heads; h++) {
            const int64_t q_base = ((int64_t)b * num_q_heads + (int64_t)h * group) * head_dim;
            for (int g = 0; g < group; g++) load_row(query, q_base + (int64_t)g * head_dim, bf16, head_dim, q + g * head_dim);
            float max_score[MAX_GROUP];
            for (int g = 0; g < group; g++) max_score[g] = -INFINITY;
            for (int t = 0; t < len; t++) { /* scores: K read once */
                const int64_t at = table[t / block_size] * block_stride + (t % block_size) * token_stride + (int64_t)h * head_dim;
                load_row(k_cache, at, bf16, head_dim, row);
                for (int g = 0; g < group; g++) {
                    float s = dot(q + g * head_dim, row, head_dim) * scale;
                    scores[(int64_t)g * len + t] = s;
                    if (s > max_score[g]) max_score[g] = s;
                }
            }
            float denom[MAX_GROUP];
            for (int g = 0; g < group; g++) {
                float sum = 0.0f;
                float *sg = scores + (int64_t)g * len;
                for (int t = 0; t < len; t++) {
                    sg[t] = expf(sg[t] - max_score[g]);
                    sum += sg[t];
                }
                denom[g] = sum;
            }
            memset(acc, 0, (size_t)group * head_dim * sizeof(float));
            for (int t = 0; t < len; t++) { /* values: V read once */
                const int64_t at = table[t / block_size] * block_stride + (t % block_size) * token_stride + (int64_t)h * head_dim;
                load_row(v_cache, at, bf16, head_dim, row);
                for (int g = 0; g < group; g++) {
                    const float p = scores[(int64_t)g * len + t];
                    float *a = acc + g * head_dim;
#pragma omp simd
                    for (int i = 0; i < head_dim; i++) a[i] += p * row[i];
                }
            }
            for (int g = 0; g < group; g++) {
                const float inv = 1.0f / denom[g];
                const int64_t o = q_base + (int64_t)g * head_dim;
                for (int i = 0; i < head_dim; i++) {
                    const float v = acc[g * head_dim + i] * inv;
                    if (bf16) ((uint16_t *)out)[o + i] = f32_to_bf16(v);
                    else ((float *)out)[o + i] = v;
                }
            }
        }
    }
    free(scores);
    return 0;
}
