/* What the CPU kernels share: bf16 <-> float32, 16-lane vectors, a vectorised exp.
 *
 * GCC/Clang vector extensions, not intrinsics: 16 float lanes compile to whatever vector unit
 * -march names (one AVX-512 register, two AVX2 ones, four SSE or NEON ones); casts between
 * vector types of one size reinterpret bits.
 */
#ifndef ECOSERVE_CPU_COMMON_H
#define ECOSERVE_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)x << 16};
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    union { float f; uint32_t u; } v = {.f = f};
    uint32_t u = v.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }

/* 16 bf16 values widened to float32 (exact). */
static inline f32x16 load16_bf16(const uint16_t *p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    return (f32x16)(__builtin_convertvector(h, i32x16) << 16);
}

/* 16 float32 values rounded to bf16 precision as f32_to_bf16 does (nearest even, NaN kept NaN
 * and quiet), still as float32. */
static inline f32x16 round16_bf16(f32x16 f) {
    const u32x16 u = (u32x16)f;
    const i32x16 nan = (i32x16)((u & 0x7fffffffu) > 0x7f800000u);
    const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return (f32x16)(((i32x16)rounded & ~nan) | ((i32x16)(u | 0x400000u) & nan));
}

/* 16 float32 values stored as bf16, rounded as f32_to_bf16 does. */
static inline void store16_bf16(uint16_t *p, f32x16 f) {
    const u16x16 h = __builtin_convertvector((u32x16)round16_bf16(f) >> 16, u16x16);
    memcpy(p, &h, sizeof h);
}

/* Lane by lane: a where mask is set, else b. */
static inline f32x16 select16(i32x16 mask, f32x16 a, f32x16 b) {
    return (f32x16)(((i32x16)a & mask) | ((i32x16)b & ~mask));
}

/* exp(x), 16 at a time: 2^n * p(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2], p the
 * degree-6 Taylor polynomial (truncation error below 3e-8 relative, the order of float32
 * rounding). x is clamped to [-87, 88] (e^-87 ~ 2e-38, e^88 ~ 2e38: the float32 range); NaN
 * stays NaN. */
static inline f32x16 exp16(f32x16 x) {
    const f32x16 zero = x - x; /* NaN where x is NaN: the clamps keep it */
    x = select16(x > zero - 87.0f, x, zero - 87.0f);
    x = select16(x < zero + 88.0f, x, zero + 88.0f);
    const f32x16 y = x * 1.44269504088896341f;
    const f32x16 half = (f32x16)(((i32x16)y & (int32_t)0x80000000) | 0x3f000000); /* copysign(0.5, y) */
    const i32x16 ni = __builtin_convertvector(y + half, i32x16);                  /* truncation: nearest */
    const f32x16 n = __builtin_convertvector(ni, f32x16);
    const f32x16 r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    f32x16 p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (f32x16)((ni + 127) << 23); /* 2^n, built in the exponent field */
}

#endif
