/* Matrix products against a weight in a blocked layout, on AVX-512 or AVX2, over a pool of threads (_matmul.c). */
#pragma once
#include <stdint.h>

/* Whether this CPU runs matmul for float32 (bf = 0) or bfloat16 (bf = 1) buffers. */
int matmul_supported(int bf);

/* bfloat16 products of at least `min_rows` rows run on AMX tiles (0: never; below 0: leave it); returns the
 * setting before, or -1 where this CPU or kernel has no AMX. */
int matmul_amx(int min_rows);

/* The bytes of a [n, k] weight in matmul's blocked layout (64-byte aligned, as matmul reads it). */
int64_t matmul_blocked_size(int64_t n, int64_t k, int bf);

/* Copy a contiguous [n, k] weight into matmul's blocked layout. */
void matmul_block_weight(const void *w, int64_t n, int64_t k, int bf, void *blocked);

/* out[m, :n] = x[m, :k] . w[:n, :k]^T (+ bias[:n]) for m < rows, with w blocked by matmul_block_weight (and
 * 64-byte aligned); all float32 or all bfloat16; bias contiguous, x and out with unit last strides; on up to
 * `threads` threads. With `out_f32`, bfloat16 products are written as their float32 sums, not rounded (out
 * is then float32). Returns 0, or -1 when out of memory (nothing computed). */
int matmul(const void *x, int64_t rows, int64_t x_stride, const void *w, int64_t n, int64_t k, const void *bias,
           void *out, int64_t out_stride, int bf, int out_f32, int threads);

/* Run fn(ctx, c) for every c in 0 .. chunks-1, on this thread and up to threads - 1 of the pool's workers,
 * which take chunks as they come free; returns when all are done. One job at a time per process. */
void pool_run(void (*fn)(void *, int64_t), void *ctx, int64_t chunks, int threads);
