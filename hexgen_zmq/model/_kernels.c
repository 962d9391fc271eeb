/* CPU fast paths of a float32 or bfloat16 stage: paged decode attention, and the small per-layer ops around
 * the matrix products (RMSNorm, silu(gate) * up, rotary embedding with the KV-cache write), each one pass over
 * its rows instead of several torch ops.
 *
 * Paged decode attention: one query token per request attends to its cached keys and values
 * straight from the KV pool, through its slot table, without gathering them into a padded copy first.
 *
 * On a CPU the decode step is bound by memory traffic. The torch path gathers every request's keys and
 * values into a padded [B, L, KV, D] copy (read the pool, write the copy) and then scaled_dot_product_attention
 * reads the copy again; here each request's cache rows are read once, in slot order. Built as an optional
 * extension: where it is missing the stage uses the torch path (hexgen_zmq.model.kernels says which).
 *
 * Each kernel has one body, written over `ld`/`st`/`rnd` with a constant `bf`: 0 for float32 buffers, 1 for
 * bfloat16 ones (uint16 bit patterns). bfloat16 values are widened to float32, computed in float32, and
 * rounded back (to nearest even) where torch's bfloat16 ops round: after each elementwise op of RMSNorm,
 * silu * up and the rotary embedding, so that those match torch's bfloat16 results; attention accumulates in
 * float32 and rounds its output once, as torch's flash attention on a CPU does.
 *
 * The caller (hexgen_zmq/model/kernels.py) checks dtypes, shapes and strides; every slot index comes from the
 * stage's own block manager, never from a peer. The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_matmul.h"

/* x86-64-v4 (AVX-512 F, BW, DQ, VL, CD), not AVX-512 F alone: without BW's 16-bit lanes GCC vectorised the
 * bfloat16 loads and roundings half as wide or not at all (bf16 silu * up 1.62 -> 0.75 ns an element) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MULTIVERSION
#endif

#define INLINE static inline __attribute__((always_inline))

/* bfloat16 <-> float32: a bfloat16 is the top half of a float32's bits. Rounding is to nearest even; a NaN
 * stays a (quiet) NaN. */
INLINE float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded); /* a select, not a branch: vectorises */
}

/* Element i of a buffer of float32 (bf = 0) or bfloat16 (bf = 1); `rnd` rounds to what that dtype holds. */
INLINE float ld(const void *p, int64_t i, const int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

INLINE void st(void *p, int64_t i, float x, const int bf) {
    if (bf) ((uint16_t *)p)[i] = f32_to_bf16(x);
    else ((float *)p)[i] = x;
}

INLINE float rnd(float x, const int bf) { return bf ? bf16_to_f32(f32_to_bf16(x)) : x; }

INLINE float dot(const void *a, int64_t a_off, const void *b, int64_t b_off, int64_t n, const int bf) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += ld(a, a_off + i, bf) * ld(b, b_off + i, bf);
    return s;
}

/* exp(x), within about 2 ulp of expf, for x clamped to [-87, 88] (where float32 exp stays normal and finite):
 * x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial for exp(r), and 2^n built in the exponent
 * bits. Unlike a libm call it has no branches, so the compiler vectorises the loops that call it. */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* One request: its query row (heads q_stride_h elements apart, from element q_off of q) attends to the `len`
 * cache rows at slots sl[0..len) and writes its output row at element out_off of out. Inlined with head_dim
 * a constant (32, 64, 128) so the compiler unrolls the per-head loops into whole vector registers. */
INLINE void attend_one(const void *q, int64_t q_off, int64_t q_stride_h, const void *k_pool, const void *v_pool,
                       const int64_t *sl, int64_t len, void *out, int64_t out_off, int64_t heads, int64_t kv_heads,
                       const int64_t head_dim, float scale, float *scratch, const int bf) {
    const int64_t group = heads / kv_heads;
    const int64_t row_stride = kv_heads * head_dim;
    float *scores = scratch;            /* [heads, len] */
    float *acc = scratch + heads * len; /* [heads, head_dim] */
    for (int64_t l = 0; l < len; l++) { /* one pass over the keys: each row serves every head */
        const int64_t krow = sl[l] * row_stride;
        for (int64_t h = 0; h < heads; h++)
            scores[h * len + l] =
                dot(q, q_off + h * q_stride_h, k_pool, krow + (h / group) * head_dim, head_dim, bf) * scale;
    }
    /* softmax as torch's flash attention on a CPU computes it: the weights exp(s - max) unnormalised, in
     * bfloat16 rounded before they multiply the values (their float32 sum unrounded), and the weighted sum
     * times 1 / sum at the end. (Torch takes keys in blocks of 512 with a running max; for longer contexts
     * the rounding of a weight can differ in its last bit.) */
    float inverse[heads];
    for (int64_t h = 0; h < heads; h++) {
        float *sh = scores + h * len, top = -INFINITY, sum = 0.0f;
        for (int64_t l = 0; l < len; l++) top = sh[l] > top ? sh[l] : top;
        for (int64_t l = 0; l < len; l++) {
            sh[l] = exp_clamped(sh[l] - top);
            sum += sh[l];
        }
        inverse[h] = 1.0f / sum;
        if (bf)
            for (int64_t l = 0; l < len; l++) sh[l] = rnd(sh[l], bf);
    }
    memset(acc, 0, sizeof(float) * heads * head_dim);
    for (int64_t l = 0; l < len; l++) { /* one pass over the values */
        const int64_t vrow = sl[l] * row_stride;
        for (int64_t h = 0; h < heads; h++) {
            const float p = scores[h * len + l];
            const int64_t vp = vrow + (h / group) * head_dim;
            float *ah = acc + h * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ah[d] += p * ld(v_pool, vp + d, bf);
        }
    }
    for (int64_t h = 0; h < heads; h++)
        for (int64_t d = 0; d < head_dim; d++)
            st(out, out_off + h * head_dim + d, acc[h * head_dim + d] * inverse[h], bf);
}

/* The same for head_dim a multiple of 16, in GCC's vector types (16 floats: one AVX-512 register, two AVX2 ones,
 * four SSE ones, as the clone is built for). The heads that share a KV head go together (up to 4, or 2 of 128
 * dims, so that their queries and sums stay in registers): each key and value row is loaded and widened once
 * for all of them. Each dot product is 16-wide partial sums added in a tree, and the weighted sum of values
 * stays in registers; the caller prefetches the next request's rows while this one computes. Measured on
 * SmolLM2's shapes (9 heads, 3 KV heads, 64 dims; 32 requests of 96 tokens in blocks of 16 scattered over 30
 * layers' pools, bfloat16, one AVX-512 core): head by head, 15 ns per (key, head), against 27 ns for
 * attend_one; with the caches warm, 7.7 against 9.5. */
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef uint16_t vh16 __attribute__((vector_size(32)));
typedef uint32_t vu16 __attribute__((vector_size(64)));

/* 16 elements of a float32 (bf = 0) or bfloat16 (bf = 1) buffer from element i, as float32. */
INLINE vf16 ld16(const void *p, int64_t i, const int bf) {
    vf16 v;
    if (bf) {
        vh16 h;
        __builtin_memcpy(&h, (const uint16_t *)p + i, sizeof h);
        const vu16 u = __builtin_convertvector(h, vu16) << 16;
        __builtin_memcpy(&v, &u, sizeof v);
    } else {
        __builtin_memcpy(&v, (const float *)p + i, sizeof v);
    }
    return v;
}

INLINE float sum16(vf16 v) {
    const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* The first step of sum16 for two vectors at once: lanes 0-7 hold a's lane i + lane i + 8, lanes 8-15 b's. */
INLINE vf16 halves(vf16 a, vf16 b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

/* sum16 of 16 vectors at once, lane i the sum of vector i, each added in sum16's order (the same bits); `p`
 * holds `halves` of vectors (0, 1), (2, 3), ...: 15 additions and 30 two-vector shuffles for 16 sums,
 * against 16 dependent chains of shuffles, additions and an extraction. */
INLINE vf16 sum16_transposed(const vf16 p[8]) {
    vf16 q[4], r[2];
    for (int i = 0; i < 4; i++) /* each vector's 8 sums to 4: a[i] + a[i + 4] */
        q[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++) /* 4 to 2: b[0] + b[2], b[1] + b[3] */
        r[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(q[2 * i], q[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(r[0], r[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(r[0], r[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Heads h0 .. h0 + G of one request, which share the KV head at element koff of a cache row: each key and
 * value row is widened once for the G heads, not once per head. Per head, the same sums in the same order
 * as one head alone. */
INLINE void attend_heads(const void *q, int64_t q_off, int64_t q_stride_h, const void *k_pool, const void *v_pool,
                         const int64_t *sl, int64_t len, void *out, int64_t out_off, int64_t h0, const int G,
                         int64_t koff, int64_t row_stride, const int64_t head_dim, float scale, float *scores,
                         vf16 *keys, const int bf) {
    enum { W = 16 };
    const int64_t n = head_dim / W;
    vf16 qh[4][8]; /* fixed sizes (G <= 4, n <= 8): GCC keeps a variable-length array in memory */
    float top[4], inverse[4];
    for (int j = 0; j < G; j++) {
        top[j] = -INFINITY;
        for (int64_t c = 0; c < n; c++) qh[j][c] = ld16(q, q_off + (h0 + j) * q_stride_h + c * W, bf);
    }
    int64_t l = 0;
    for (; l + W <= len; l += W) { /* 16 keys at a time, widened once into `keys`, summed across lanes together */
        for (int64_t i = 0; i < W; i++)
            for (int64_t c = 0; c < n; c++) keys[i * n + c] = ld16(k_pool, sl[l + i] * row_stride + koff + c * W, bf);
        for (int j = 0; j < G; j++) {
            vf16 pairs[8];
            for (int64_t i = 0; i < W; i += 2) {
                vf16 a = qh[j][0] * keys[i * n], b = qh[j][0] * keys[(i + 1) * n];
                for (int64_t c = 1; c < n; c++) {
                    a += qh[j][c] * keys[i * n + c];
                    b += qh[j][c] * keys[(i + 1) * n + c];
                }
                pairs[i / 2] = halves(a, b);
            }
            const vf16 sums = sum16_transposed(pairs) * scale;
            __builtin_memcpy(scores + j * len + l, &sums, sizeof sums);
            for (int64_t i = 0; i < W; i++) top[j] = sums[i] > top[j] ? sums[i] : top[j];
        }
    }
    for (; l < len; l++) {
        const int64_t kr = sl[l] * row_stride + koff;
        vf16 kv[8];
        for (int64_t c = 0; c < n; c++) kv[c] = ld16(k_pool, kr + c * W, bf);
        for (int j = 0; j < G; j++) {
            vf16 acc = qh[j][0] * kv[0];
            for (int64_t c = 1; c < n; c++) acc += qh[j][c] * kv[c];
            const float score = sum16(acc) * scale;
            scores[j * len + l] = score;
            top[j] = score > top[j] ? score : top[j];
        }
    }
    /* softmax as attend_one computes it (torch's flash attention on a CPU) */
    for (int j = 0; j < G; j++) {
        float *sh = scores + j * len, sum = 0.0f;
        for (int64_t l = 0; l < len; l++) {
            sh[l] = exp_clamped(sh[l] - top[j]);
            sum += sh[l];
        }
        if (bf)
            for (int64_t l = 0; l < len; l++) sh[l] = rnd(sh[l], bf);
        inverse[j] = 1.0f / sum;
    }
    vf16 acc[4][8];
    for (int j = 0; j < G; j++)
        for (int64_t c = 0; c < n; c++) acc[j][c] = (vf16){0};
    for (int64_t l = 0; l < len; l++) {
        const int64_t vr = sl[l] * row_stride + koff;
        vf16 vv[8];
        for (int64_t c = 0; c < n; c++) vv[c] = ld16(v_pool, vr + c * W, bf);
        for (int j = 0; j < G; j++) {
            const float p = scores[j * len + l];
            for (int64_t c = 0; c < n; c++) acc[j][c] += p * vv[c];
        }
    }
    for (int j = 0; j < G; j++)
        for (int64_t c = 0; c < n; c++)
            for (int64_t i = 0; i < W; i++)
                st(out, out_off + (h0 + j) * head_dim + c * W + i, acc[j][c][i] * inverse[j], bf);
}

INLINE void attend_one_wide(const void *q, int64_t q_off, int64_t q_stride_h, const void *k_pool,
                            const void *v_pool, const int64_t *sl, int64_t len, void *out, int64_t out_off,
                            int64_t heads, int64_t kv_heads, const int64_t head_dim, float scale, float *scratch,
                            const int bf) {
    const int64_t group = heads / kv_heads, row_stride = kv_heads * head_dim;
    const int64_t most = head_dim <= 64 ? 4 : 2; /* heads at once: their queries and sums stay in registers */
    const int64_t row_bytes = row_stride * (bf ? 2 : 4);
    vf16 keys[16 * 8]; /* 16 keys of one KV head, widened */
    for (int64_t l = 0; l < len; l++) /* every line of the request's keys in flight at once, not one by one */
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch((const char *)k_pool + sl[l] * row_bytes + b);
    for (int64_t l = 0; l < len; l++)
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch((const char *)v_pool + sl[l] * row_bytes + b);
    for (int64_t h0 = 0; h0 < heads;) {
        const int64_t in_group = group - h0 % group, take = in_group < most ? in_group : most;
#define HEADS(G) attend_heads(q, q_off, q_stride_h, k_pool, v_pool, sl, len, out, out_off, h0, G, \
                              (h0 / group) * head_dim, row_stride, head_dim, scale, scratch + h0 * len, keys, bf)
        switch (take) {
            case 1: HEADS(1); break;
            case 2: HEADS(2); break;
            case 3: HEADS(3); break;
            default: HEADS(4);
        }
#undef HEADS
        h0 += take;
    }
}

/* q[t, h, :] at element t * q_stride_t + h * q_stride_h of q; pools are [slots, kv_heads, head_dim]
 * contiguous; request b reads slots[b * slots_stride + l] for l < lengths[b] and writes out[rows[b], h, :]
 * (a row of out holds all heads contiguously). scratch holds heads * (max length + head_dim) floats. */
INLINE void decode_attention_body(const void *q, int64_t q_stride_t, int64_t q_stride_h, const void *k_pool,
                                  const void *v_pool, const int64_t *slots, int64_t slots_stride,
                                  const int64_t *lengths, const int64_t *rows, void *out, int64_t out_stride_t,
                                  int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale,
                                  float *scratch, const int bf) {
    for (int64_t b = 0; b < batch; b++) {
        const int64_t *sl = slots + b * slots_stride;
#define ATTEND(how, D) how(q, rows[b] * q_stride_t, q_stride_h, k_pool, v_pool, sl, lengths[b], out, \
                           rows[b] * out_stride_t, heads, kv_heads, D, scale, scratch, bf)
        switch (head_dim) {
            case 32: ATTEND(attend_one_wide, 32); break;
            case 64: ATTEND(attend_one_wide, 64); break;
            case 128: ATTEND(attend_one_wide, 128); break;
            default: ATTEND(attend_one, head_dim);
        }
#undef ATTEND
    }
}

/* out[r, :] = w * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)), transformers' RMSNorm: in float32, and in
 * bfloat16 with the normalised row rounded before the weight multiplies it. */
INLINE void rms_norm_body(const void *x, int64_t rows, int64_t dim, int64_t x_stride, const void *w, float eps,
                          void *out, const int bf) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t xr = r * x_stride, o = r * dim;
        float squares = 0.0f;
        for (int64_t i = 0; i < dim; i++) squares += ld(x, xr + i, bf) * ld(x, xr + i, bf);
        const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) st(out, o + i, ld(w, i, bf) * rnd(ld(x, xr + i, bf) * inv, bf), bf);
    }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: the gate and up halves of a fused gate/up projection. */
INLINE void silu_mul_body(const void *restrict gu, int64_t rows, int64_t inter, int64_t gu_stride, void *restrict out,
                          const int bf) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = r * gu_stride, u = g + inter, o = r * inter;
        for (int64_t i = 0; i < inter; i++) {
            /* gate / (1 + exp(-gate)), with exp of -|gate| only: where exp(-gate) would be huge, GCC's
             * vectorised select computed gate / exp(88) in every vector, and its denormals cost a microcode
             * assist each (silu_mul took 3.5 ns an element instead of under 1) */
            const float gate = ld(gu, g + i, bf), e = exp_clamped(gate < 0.0f ? gate : -gate);
            st(out, o + i, rnd((gate < 0.0f ? gate * e : gate) / (1.0f + e), bf) * ld(gu, u + i, bf), bf);
        }
    }
}

/* y = x * cos + rotate_half(x) * sin over one head, rotate_half(x) = (-x[half:], x[:half]); each product
 * rounded in bfloat16 before the sum, as torch's bfloat16 ops do. */
INLINE void rotate_into(const void *x, int64_t xo, const void *c, const void *s, int64_t cs, void *y, int64_t yo,
                        int64_t half, const int bf) {
    for (int64_t i = 0; i < half; i++)
        st(y, yo + i, rnd(ld(x, xo + i, bf) * ld(c, cs + i, bf), bf) -
                      rnd(ld(x, xo + i + half, bf) * ld(s, cs + i, bf), bf), bf);
    for (int64_t i = 0; i < half; i++)
        st(y, yo + i + half, rnd(ld(x, xo + i + half, bf) * ld(c, cs + i + half, bf), bf) +
                             rnd(ld(x, xo + i, bf) * ld(s, cs + i + half, bf), bf), bf);
}

/* qkv [tokens, q_heads + 2 kv_heads, D] (rows qkv_stride elements apart), cos and sin [tokens, D]: rotates
 * the q heads into q_out [tokens, q_heads, D], and writes each token's rotated k heads and its v heads into
 * the pools' slot slots[t] ([slots, kv_heads, D] each). */
INLINE void rope_store_body(const void *qkv, int64_t tokens, int64_t qkv_stride, int64_t q_heads, int64_t kv_heads,
                            int64_t head_dim, const void *cos, const void *sin, void *k_pool, void *v_pool,
                            const int64_t *slots, void *q_out, const int bf) {
    const int64_t half = head_dim / 2, kv_row = kv_heads * head_dim, size = bf ? 2 : 4;
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t row = t * qkv_stride, cs = t * head_dim;
        for (int64_t h = 0; h < q_heads; h++)
            rotate_into(qkv, row + h * head_dim, cos, sin, cs, q_out, (t * q_heads + h) * head_dim, half, bf);
        for (int64_t g = 0; g < kv_heads; g++)
            rotate_into(qkv, row + (q_heads + g) * head_dim, cos, sin, cs, k_pool, slots[t] * kv_row + g * head_dim,
                        half, bf);
        memcpy((char *)v_pool + slots[t] * kv_row * size, (const char *)qkv + (row + (q_heads + kv_heads) * head_dim) * size,
               size * kv_row);
    }
}

typedef int32_t vi16 __attribute__((vector_size(64)));

/* out[r] = the index of the first largest value of row r of x [rows, cols] (rows `stride` apart), or -1 where
 * the row holds a NaN or an infinity: greedy sampling's argmax and its check in one pass over the logits.
 * Each of 16 lanes keeps its largest value and where it first saw it; the first of the lanes' maxima wins. */
INLINE void greedy_body(const void *x, int64_t rows, int64_t cols, int64_t stride, int64_t *out, const int bf) {
    enum { W = 16 };
    vi16 lane_index;
    for (int i = 0; i < W; i++) lane_index[i] = i;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t o = r * stride, whole = cols / W * W;
        vf16 top;
        vi16 at = lane_index, special = (vi16){0}; /* special: a lane saw exponent bits all ones (inf, NaN) */
        for (int i = 0; i < W; i++) top[i] = -INFINITY;
        for (int64_t i = 0; i < whole; i += W) {
            const vf16 v = ld16(x, o + i, bf);
            const vi16 bits = (vi16)v, higher = v > top; /* all ones where this value is larger */
            special |= (bits & 0x7f800000) == 0x7f800000;
            top = (vf16)(((vi16)v & higher) | ((vi16)top & ~higher));
            at = ((lane_index + (int32_t)i) & higher) | (at & ~higher);
        }
        float best = -INFINITY;
        int64_t best_at = -1, bad = 0;
        for (int i = 0; i < W; i++) {
            bad |= special[i];
            if (top[i] > best || (top[i] == best && at[i] < best_at)) {
                best = top[i];
                best_at = at[i];
            }
        }
        for (int64_t i = whole; i < cols; i++) {
            const float v = ld(x, o + i, bf);
            uint32_t bits;
            __builtin_memcpy(&bits, &v, sizeof bits);
            bad |= (bits & 0x7f800000u) == 0x7f800000u;
            if (v > best || best_at < 0) {
                best = v;
                best_at = i;
            }
        }
        out[r] = bad ? -1 : best_at;
    }
}

/* The entry points: each body compiled for float32 and for bfloat16 (and per instruction set). */
#define INSTANTIATE(name, params, ...)                                          \
    MULTIVERSION static void name##_f32 params { name##_body(__VA_ARGS__, 0); } \
    MULTIVERSION static void name##_bf16 params { name##_body(__VA_ARGS__, 1); }

INSTANTIATE(decode_attention,
            (const void *q, int64_t q_stride_t, int64_t q_stride_h, const void *k_pool, const void *v_pool,
             const int64_t *slots, int64_t slots_stride, const int64_t *lengths, const int64_t *rows, void *out,
             int64_t out_stride_t, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale,
             float *scratch),
            q, q_stride_t, q_stride_h, k_pool, v_pool, slots, slots_stride, lengths, rows, out, out_stride_t, batch,
            heads, kv_heads, head_dim, scale, scratch)
INSTANTIATE(greedy, (const void *x, int64_t rows, int64_t cols, int64_t stride, int64_t *out), x, rows, cols, stride, out)
INSTANTIATE(rms_norm, (const void *x, int64_t rows, int64_t dim, int64_t x_stride, const void *w, float eps, void *out),
            x, rows, dim, x_stride, w, eps, out)
INSTANTIATE(silu_mul, (const void *gu, int64_t rows, int64_t inter, int64_t gu_stride, void *out),
            gu, rows, inter, gu_stride, out)
INSTANTIATE(rope_store,
            (const void *qkv, int64_t tokens, int64_t qkv_stride, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
             const void *cos, const void *sin, void *k_pool, void *v_pool, const int64_t *slots, void *q_out),
            qkv, tokens, qkv_stride, q_heads, kv_heads, head_dim, cos, sin, k_pool, v_pool, slots, q_out)

static PyObject *py_greedy(PyObject *self, PyObject *args) {
    unsigned long long x, out;
    long long rows, cols, stride;
    int bf;
    if (!PyArg_ParseTuple(args, "KLLLKp", &x, &rows, &cols, &stride, &out, &bf)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    (bf ? greedy_bf16 : greedy_f32)((const void *)x, rows, cols, stride, (int64_t *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long x, w, out;
    long long rows, dim, x_stride;
    double eps;
    int bf;
    if (!PyArg_ParseTuple(args, "KLLLKdKp", &x, &rows, &dim, &x_stride, &w, &eps, &out, &bf)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    (bf ? rms_norm_bf16 : rms_norm_f32)((const void *)x, rows, dim, x_stride, (const void *)w, (float)eps, (void *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* silu * up over the pool's threads: a few rows per chunk. */
typedef struct {
    const char *gu;
    char *out;
    int64_t rows, inter, gu_stride, per_chunk, size;
    int bf;
} silu_job_t;

static void silu_chunk(void *ctx, int64_t c) {
    const silu_job_t *j = ctx;
    const int64_t r0 = c * j->per_chunk, n = j->rows - r0 < j->per_chunk ? j->rows - r0 : j->per_chunk;
    (j->bf ? silu_mul_bf16 : silu_mul_f32)(j->gu + r0 * j->gu_stride * j->size, n, j->inter, j->gu_stride,
                                           j->out + r0 * j->inter * j->size);
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    unsigned long long gu, out;
    long long rows, inter, gu_stride;
    int bf, threads = 1;
    if (!PyArg_ParseTuple(args, "KLLLKp|i", &gu, &rows, &inter, &gu_stride, &out, &bf, &threads)) return NULL;
    if (rows < 0 || inter < 1 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "silu_mul: bad sizes");
        return NULL;
    }
    const int64_t per_chunk = inter >= 8192 ? 1 : 8192 / inter; /* about 8192 outputs per chunk */
    silu_job_t job = {(const char *)gu, (char *)out, rows, inter, gu_stride, per_chunk, bf ? 2 : 4, bf};
    Py_BEGIN_ALLOW_THREADS
    pool_run(silu_chunk, &job, (rows + per_chunk - 1) / per_chunk, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rope_store(PyObject *self, PyObject *args) {
    unsigned long long qkv, cos, sin, k_pool, v_pool, slots, q_out;
    long long tokens, qkv_stride, q_heads, kv_heads, head_dim;
    int bf;
    if (!PyArg_ParseTuple(args, "KLLLLLKKKKKKp", &qkv, &tokens, &qkv_stride, &q_heads, &kv_heads, &head_dim, &cos,
                          &sin, &k_pool, &v_pool, &slots, &q_out, &bf))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    (bf ? rope_store_bf16 : rope_store_f32)((const void *)qkv, tokens, qkv_stride, q_heads, kv_heads, head_dim,
                                            (const void *)cos, (const void *)sin, (void *)k_pool, (void *)v_pool,
                                            (const int64_t *)slots, (void *)q_out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Decode attention over the pool's threads: one request per chunk, each with its own scratch. */
typedef struct {
    const void *q, *k_pool, *v_pool;
    const int64_t *slots, *lengths, *rows;
    void *out;
    float *scratch;
    int64_t q_stride_t, q_stride_h, slots_stride, out_stride_t, heads, kv_heads, head_dim, scratch_per, batch;
    float scale;
    int bf;
} attention_job_t;

static void attention_chunk(void *ctx, int64_t b) {
    const attention_job_t *j = ctx;
    if (b + 1 < j->batch) { /* the next request's cache, scattered over the pool, on its way while this one computes */
        const int64_t *sl = j->slots + (b + 1) * j->slots_stride;
        const int64_t row_bytes = j->kv_heads * j->head_dim * (j->bf ? 2 : 4);
        for (int64_t l = 0; l < j->lengths[b + 1]; l++)
            for (int64_t o = 0; o < row_bytes; o += 64) {
                __builtin_prefetch((const char *)j->k_pool + sl[l] * row_bytes + o, 0, 2);
                __builtin_prefetch((const char *)j->v_pool + sl[l] * row_bytes + o, 0, 2);
            }
    }
    (j->bf ? decode_attention_bf16 : decode_attention_f32)(
        j->q, j->q_stride_t, j->q_stride_h, j->k_pool, j->v_pool, j->slots + b * j->slots_stride, j->slots_stride,
        j->lengths + b, j->rows + b, j->out, j->out_stride_t, 1, j->heads, j->kv_heads, j->head_dim, j->scale,
        j->scratch + b * j->scratch_per);
}

static PyObject *py_decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, k_pool, v_pool, slots, lengths, rows, out, scratch;
    long long q_stride_t, q_stride_h, slots_stride, out_stride_t, batch, heads, kv_heads, head_dim, scratch_per;
    double scale;
    int bf, threads;
    if (!PyArg_ParseTuple(args, "KLLKKKLKKKLLLLLdKLpi", &q, &q_stride_t, &q_stride_h, &k_pool, &v_pool, &slots,
                          &slots_stride, &lengths, &rows, &out, &out_stride_t, &batch, &heads, &kv_heads,
                          &head_dim, &scale, &scratch, &scratch_per, &bf, &threads))
        return NULL;
    if (batch < 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || heads % kv_heads || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: bad sizes");
        return NULL;
    }
    attention_job_t job = {(const void *)q, (const void *)k_pool, (const void *)v_pool, (const int64_t *)slots,
                           (const int64_t *)lengths, (const int64_t *)rows, (void *)out, (float *)scratch,
                           q_stride_t, q_stride_h, slots_stride, out_stride_t, heads, kv_heads, head_dim,
                           scratch_per, batch, (float)scale, bf};
    Py_BEGIN_ALLOW_THREADS
    pool_run(attention_chunk, &job, batch, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, bias, out;
    long long rows, x_stride, n, k, out_stride;
    int bf, threads, out_f32;
    if (!PyArg_ParseTuple(args, "KLLKLLKKLpip", &x, &rows, &x_stride, &w, &n, &k, &bias, &out, &out_stride, &bf,
                          &threads, &out_f32))
        return NULL;
    if (rows < 1 || n < 1 || k < 1 || threads < 1 || w % 64 || !matmul_supported(bf)) {
        PyErr_SetString(PyExc_ValueError, "matmul: bad sizes, an unaligned weight, or not supported on this CPU");
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = matmul((const void *)x, rows, x_stride, (const void *)w, n, k, (const void *)bias, (void *)out,
                    out_stride, bf, out_f32, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_matmul_blocked_size(PyObject *self, PyObject *args) {
    long long n, k;
    int bf;
    if (!PyArg_ParseTuple(args, "LLp", &n, &k, &bf)) return NULL;
    if (n < 1 || k < 1) {
        PyErr_SetString(PyExc_ValueError, "matmul_blocked_size: bad sizes");
        return NULL;
    }
    return PyLong_FromLongLong(matmul_blocked_size(n, k, bf));
}

static PyObject *py_matmul_block_weight(PyObject *self, PyObject *args) {
    unsigned long long w, blocked;
    long long n, k;
    int bf;
    if (!PyArg_ParseTuple(args, "KLLpK", &w, &n, &k, &bf, &blocked)) return NULL;
    if (n < 1 || k < 1 || blocked % 64) {
        PyErr_SetString(PyExc_ValueError, "matmul_block_weight: bad sizes, or an unaligned buffer");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    matmul_block_weight((const void *)w, n, k, bf, (void *)blocked);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_matmul_supported(PyObject *self, PyObject *args) {
    int bf;
    if (!PyArg_ParseTuple(args, "p", &bf)) return NULL;
    return PyBool_FromLong(matmul_supported(bf));
}

static PyObject *py_matmul_amx(PyObject *self, PyObject *args) {
    int min_rows;
    if (!PyArg_ParseTuple(args, "i", &min_rows)) return NULL;
    return PyLong_FromLong(matmul_amx(min_rows));
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS,
     "x @ w.T (+ bias), w blocked, float32 or bfloat16, on AVX-512 (use hexgen_zmq.model.kernels)."},
    {"matmul_blocked_size", py_matmul_blocked_size, METH_VARARGS, "Bytes of a [n, k] weight in matmul's layout."},
    {"matmul_block_weight", py_matmul_block_weight, METH_VARARGS, "Copy a [n, k] weight into matmul's layout."},
    {"matmul_amx", py_matmul_amx, METH_VARARGS,
     "bfloat16 products of at least this many rows on AMX (0: never, -1: unchanged); the setting before, or -1."},
    {"matmul_supported", py_matmul_supported, METH_VARARGS, "Whether this CPU runs matmul for float32 (False) or bfloat16 (True)."},

    {"decode_attention", py_decode_attention, METH_VARARGS,
     "Paged decode attention over raw float32 or bfloat16 buffers (use hexgen_zmq.model.kernels, which checks the arguments)."},
    {"greedy", py_greedy, METH_VARARGS, "Argmax of float32 or bfloat16 rows, -1 where not finite (use hexgen_zmq.model.kernels)."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of float32 or bfloat16 rows (use hexgen_zmq.model.kernels)."},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu(gate) * up of fused gate/up rows (use hexgen_zmq.model.kernels)."},
    {"rope_store", py_rope_store, METH_VARARGS,
     "Rotary embedding of q and k, k and v written to the KV pool (use hexgen_zmq.model.kernels)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
