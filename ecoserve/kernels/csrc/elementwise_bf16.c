/* The decoder layer's elementwise steps for bfloat16 activations, one pass each.
 *
 * In bfloat16 each of these is several torch ops (RMSNorm alone: widen, square, mean, add,
 * rsqrt, multiply, narrow, multiply by the weight), each a pass over the activations and a
 * dispatch. Here each is one pass, float32 math, rounded to bf16 exactly where the torch
 * sequence rounds (the tests compare with the model's own torch code in model/llama.py and
 * model/rope.py). Only the
 * order of the sums (RMSNorm's mean of squares) and the exponential (cpu_common.h) differ from
 * torch's, by float32 rounding. float32 models never come here: they keep torch's ops and
 * transformers' exact tokens.
 */
#include "cpu_common.h"

/* out[r] = w * bf16(x[r] * rsqrt(mean(x[r]^2) + eps)), x and out [rows, dim] (out may be x).
 * As transformers' LlamaRMSNorm: normalise in float32, narrow, then the bf16 product. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int rows, int dim, float eps) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + (int64_t)r * dim;
        uint16_t *o = out + (int64_t)r * dim;
        f32x16 acc = {0};
        int e = 0;
        for (; e + 16 <= dim; e += 16) {
            const f32x16 v = load16_bf16(xr + e);
            acc += v * v;
        }
        float ss = 0.0f;
        for (int i = 0; i < 16; i++) ss += acc[i];
        for (; e < dim; e++) ss += bf16_to_f32(xr[e]) * bf16_to_f32(xr[e]);
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (e = 0; e + 16 <= dim; e += 16)
            store16_bf16(o + e, load16_bf16(w + e) * round16_bf16(load16_bf16(xr + e) * inv));
        for (; e < dim; e++) o[e] = f32_to_bf16(bf16_to_f32(w[e]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[e]) * inv)));
    }
}

/* out[r] = bf16(silu(gate)) * up, rounded, for gate_up [rows, 2 * inter] (gate first, as the
 * fused gate_up projection lays them out) and out [rows, inter]. As F.silu(gate) * up in bf16. */
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int rows, int inter) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + (int64_t)r * 2 * inter, *u = g + inter;
        uint16_t *o = out + (int64_t)r * inter;
        int e = 0;
        for (; e + 16 <= inter; e += 16) {
            const f32x16 x = load16_bf16(g + e);
            store16_bf16(o + e, round16_bf16(x / (1.0f + exp16(-x))) * load16_bf16(u + e));
        }
        for (; e < inter; e++) {
            const float x = bf16_to_f32(g[e]);
            const float s = bf16_to_f32(f32_to_bf16(x / (1.0f + expf(-x))));
            o[e] = f32_to_bf16(s * bf16_to_f32(u[e]));
        }
    }
}

/* Rotary embedding in place on the first `heads` heads of each token's row: x [tokens, ...] with
 * `row_stride` elements per token, heads of head_dim (even, at most 512) side by side;
 * cos/signed_sin [tokens, head_dim] bf16 (the first half of sin negated, as model/rope.py builds
 * it). Each element becomes bf16(bf16(x * cos) + bf16(rolled * sin)), rolled = x's halves
 * swapped: what apply_rope computes in bf16. */
int rope_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *signed_sin, int tokens, int heads, int head_dim,
              int64_t row_stride) {
    if (head_dim > 512 || head_dim % 2) return -1;
    const int half = head_dim / 2;
    for (int t = 0; t < tokens; t++) {
        const uint16_t *c = cos + (int64_t)t * head_dim, *s = signed_sin + (int64_t)t * head_dim;
        for (int h = 0; h < heads; h++) {
            uint16_t *xh = x + (int64_t)t * row_stride + (int64_t)h * head_dim;
            uint16_t v[512]; /* the head before rotation: it is rewritten in place */
            memcpy(v, xh, (size_t)head_dim * sizeof(uint16_t));
            int e = 0;
            if (half % 16 == 0) /* 16 lanes never straddle the halves */
                for (; e < head_dim; e += 16) {
                    const f32x16 a = round16_bf16(load16_bf16(v + e) * load16_bf16(c + e));
                    const f32x16 b = round16_bf16(load16_bf16(v + (e < half ? e + half : e - half)) * load16_bf16(s + e));
                    store16_bf16(xh + e, a + b);
                }
            for (; e < head_dim; e++) {
                const float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(v[e]) * bf16_to_f32(c[e])));
                const float b = bf16_to_f32(f32_to_bf16(bf16_to_f32(v[e < half ? e + half : e - half]) * bf16_to_f32(s[e])));
                xh[e] = f32_to_bf16(a + b);
            }
        }
    }
    return 0;
}
