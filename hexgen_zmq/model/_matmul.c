/* The matrix products of a CPU stage, x [rows, k] times a weight [n, k] transposed, float32 or bfloat16, on the
 * CPU's AVX-512 units (AVX2 and FMA where there is no AVX-512), over a small pool of threads of our own.
 *
 * Why: a decode step of one or a few rows reads every weight once and does little arithmetic on it, so its
 * speed is how fast the weights stream from memory. oneDNN's packed products stream about 10-14 GB/s at one
 * row on this project's 2-core machine (llama.cpp's about 20): per-call setup and an OpenMP fork/join, paid
 * about 120 times per step of a 30-layer model. Here the weight is re-laid out once, at load, so that each
 * block of 64 output features is one contiguous stream, and the blocks are cut into chunks that the threads
 * take from a shared counter: a thread the OS preempts delays only the chunk it holds, not a static share.
 * Larger row counts (batches, prompts) reuse each block from the cache, six rows per pass.
 *
 * The pool: up to (CPUs - 1) worker threads, started on first use. A call publishes a job in one 64-bit
 * word (generation, how many threads may join, chunks left); workers take chunks by compare-and-swap on that
 * word, so a late worker can never take a chunk of a later job. A worker that helped with the last job spins
 * for a short while (the gap between two products of a step), then sleeps on a futex; a worker the caller
 * did not ask for sleeps at once, so a stage told to use one thread leaves the other cores alone.
 *
 * Accuracy: float32 products are fused multiply-adds in float32; bfloat16 products use VDPBF16PS (products
 * of two bfloat16 values are exact in float32, summed in float32) and round the result once, to nearest
 * even, as oneDNN's bfloat16 product does. Only the order of the float32 sums differs, and for bfloat16
 * denormal inputs and results count as zero (VDPBF16PS and VCVTNEPS2BF16 flush them), far below anything
 * an activation or weight holds.
 *
 * Without AVX-512 (or without its bfloat16 dot products, for bfloat16) the same products run on AVX2 and
 * FMA: blocks of 16 output features, six rows of two 8-float accumulators each in 16 registers. bfloat16
 * weights stay bfloat16 in memory (half the bytes to stream, which is what a decode step waits for) and are
 * widened to float32 as they are loaded, the inputs once per call; the products are float32 FMAs (exact for
 * bfloat16 factors), and the sum is rounded once to nearest even as above, denormals kept. Where torch's
 * oneDNN has no bfloat16 dot products, this is what makes bfloat16 weights worth having on such a CPU.
 */
#include "_matmul.h"

#include <stdlib.h>
#include <string.h>

#if !(defined(__x86_64__) && defined(__GNUC__) && defined(__linux__))
/* elsewhere: no products here; the stage uses oneDNN's or torch's */
int matmul_supported(int bf) { return 0; }
int matmul_amx(int min_rows) { return -1; }
int64_t matmul_blocked_size(int64_t n, int64_t k, int bf) { return 0; }
void matmul_block_weight(const void *w, int64_t n, int64_t k, int bf, void *blocked) {}
int matmul(const void *x, int64_t rows, int64_t x_stride, const void *w, int64_t n, int64_t k, const void *bias,
           void *out, int64_t out_stride, int bf, int out_f32, int threads) { return -1; }
void pool_run(void (*fn)(void *, int64_t), void *ctx, int64_t chunks, int threads) {
    for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
}
#else

#include <cpuid.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* One target for every kernel: the float32 ones use no bfloat16 instruction, and only run where
 * matmul_supported says so. */
#define TARGETS "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"
#define AVX512BF16 __attribute__((target(TARGETS)))
#define INLINE_AVX512 static inline __attribute__((always_inline, target(TARGETS)))

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))

enum { ISA_NONE, ISA_AVX2, ISA_AVX512 };

/* Which kernels run products of this dtype here: AVX-512 where it has what the dtype needs, else AVX2. */
static int isa(int bf) {
    static int known = 0, f32, bf16;
    if (!known) {
        __builtin_cpu_init();
        const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
        const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        f32 = avx512 ? ISA_AVX512 : avx2 ? ISA_AVX2 : ISA_NONE;
        bf16 = avx512 && __builtin_cpu_supports("avx512bf16") ? ISA_AVX512 : avx2 ? ISA_AVX2 : ISA_NONE;
        known = 1;
    }
    return bf ? bf16 : f32;
}

int matmul_supported(int bf) { return isa(bf) != ISA_NONE; }

/* ---- the AVX-512 kernels ----
 *
 * The weight is copied once, at load, into blocks of 64 output features. A block is read front to back as
 * one stream: for bfloat16, for each pair of inputs (k, k + 1) the 64 features' two weights side by side
 * (the pairs VDPBF16PS multiplies); for float32, for each input k the 64 features' weights. Features past n
 * and inputs past k are zero. Each step of the loop loads 4 vectors of weights (64 features) and, for each
 * of up to ROW_GROUP rows, broadcasts that row's input (pair) and accumulates into 4 vectors of 16 outputs:
 * no horizontal sums, and every weight loaded serves all the rows of the group. */

#define ROW_GROUP 6 /* rows per pass over a block: 6 x 4 accumulators + 4 weights + 1 input in 32 registers */
#define BLOCK 64    /* output features per block */
#define BLOCK2 16   /* on AVX2: 6 x 2 accumulators + 2 weights + 1 input in 16 registers */

static int64_t steps(int64_t k, int bf) { return bf ? (k + 1) / 2 : k; } /* loop steps over the input axis */

static int amx_usable(void);
#define AMX_ROWS 16  /* rows of an AMX tile: 16 rows of input, or of 16 float32 sums */
#define AMX_PAIRS 16 /* input pairs per tile: a row of 64 bytes holds 32 bfloat16 inputs */

/* Steps per block: on an AMX CPU the bfloat16 blocks are padded with zeros to whole tiles (16 steps), so
 * that both the AVX-512 kernels (which stop at the last real step) and the AMX ones read the same copy. */
static int64_t block_steps(int64_t k, int bf) {
    const int64_t count = steps(k, bf);
    return bf && amx_usable() ? (count + AMX_PAIRS - 1) / AMX_PAIRS * AMX_PAIRS : count;
}

/* Output features per block, and bytes per block, of the layout this CPU's kernels read. */
static int64_t block_features(int bf) { return isa(bf) == ISA_AVX512 ? BLOCK : BLOCK2; }
static int64_t block_bytes(int64_t k, int bf) {
    return isa(bf) == ISA_AVX512 ? block_steps(k, bf) * 256 : k * BLOCK2 * (bf ? 2 : 4);
}

int64_t matmul_blocked_size(int64_t n, int64_t k, int bf) {
    const int64_t features = block_features(bf);
    return (n + features - 1) / features * block_bytes(k, bf);
}

void matmul_block_weight(const void *w, int64_t n, int64_t k, int bf, void *blocked) {
    memset(blocked, 0, (size_t)matmul_blocked_size(n, k, bf));
    const int64_t count = block_steps(k, bf);
    const int pairs = isa(bf) == ISA_AVX512 && bf; /* VDPBF16PS multiplies pairs of inputs */
    const int64_t features = block_features(bf);
    for (int64_t f = 0; f < n; f++) {
        const int64_t lane = f % features;
        if (pairs) { /* step i holds the pairs (2i, 2i + 1) of the block's 64 features side by side */
            const int64_t block = f / BLOCK * count * BLOCK; /* in steps of 4 bytes */
            const uint16_t *row = (const uint16_t *)w + f * k;
            uint16_t *out = blocked;
            for (int64_t i = 0; i < k; i++) out[2 * (block + (i / 2) * BLOCK + lane) + i % 2] = row[i];
        } else { /* step i holds input i of the block's features (float32, or bfloat16 on AVX2) */
            const int64_t block = f / features * k * features;
#define SCATTER(T) \
    for (int64_t i = 0; i < k; i++) ((T *)blocked)[block + i * features + lane] = ((const T *)w)[f * k + i]
            if (bf) SCATTER(uint16_t);
            else SCATTER(float);
#undef SCATTER
        }
    }
}

typedef struct {
    const void *x, *w, *bias;
    void *out;
    const float *xf; /* AVX2 bfloat16: the rows widened to float32, `k` apart */
    const uint16_t *xa; /* AMX: the rows padded with zeros to whole tiles, [rows rounded up to 16, ka] */
    int64_t rows, n, k, ka, x_stride, out_stride, chunk, bytes; /* chunk: blocks per chunk; bytes: per block */
    int bf, isa, amx, out_f32; /* out_f32: bfloat16 products written as float32 sums, unrounded */
} product_t;

typedef int32_t __attribute__((may_alias, aligned(2))) pair_t; /* two bfloat16 inputs, read as one word */

/* One step of the loop: acc[m][j] += weights (4 vectors at ws) times row m's input (pair) number i. */
INLINE_AVX512 void step(__m512 acc[ROW_GROUP][4], const char *ws, const void *x, int64_t xs, int64_t i, const int R,
                        const int bf, const int odd_end) {
    const __m512 w0 = _mm512_load_ps(ws), w1 = _mm512_load_ps(ws + 64), w2 = _mm512_load_ps(ws + 128),
                 w3 = _mm512_load_ps(ws + 192);
    for (int m = 0; m < R; m++) {
        if (bf) {
            const uint16_t *xr = (const uint16_t *)x + m * xs + 2 * i;
            /* a whole pair, broadcast straight from memory; at an odd k's end, the last input alone */
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(odd_end ? (int32_t)xr[0] : *(const pair_t *)xr);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)w0, xv);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)w1, xv);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], (__m512bh)w2, xv);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], (__m512bh)w3, xv);
        } else {
            const __m512 xv = _mm512_set1_ps(((const float *)x)[m * xs + i]);
            acc[m][0] = _mm512_fmadd_ps(w0, xv, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, xv, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(w2, xv, acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(w3, xv, acc[m][3]);
        }
    }
}

/* out[r0 + m, f0 .. f0 + 16) = acc[m][j] + bias for m < R, the features past n left alone; bfloat16 rounded
 * once to nearest even (or float32 sums with out_f32). */
INLINE_AVX512 void store_sums(const product_t *p, int64_t f0, int64_t r0, int R, __m512 acc[][4], int j,
                              const int bf) {
    const int64_t valid = p->n - f0;
    if (valid <= 0) return;
    const __mmask16 mask = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
    __m512 bias = _mm512_setzero_ps();
    if (p->bias && bf)
        bias = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p->bias + f0)), 16));
    else if (p->bias)
        bias = _mm512_maskz_loadu_ps(mask, (const float *)p->bias + f0);
    for (int m = 0; m < R; m++) {
        const __m512 sum = _mm512_add_ps(acc[m][j], bias);
        if (bf && !p->out_f32)
            _mm256_mask_storeu_epi16((uint16_t *)p->out + (r0 + m) * p->out_stride + f0, mask,
                                     (__m256i)_mm512_cvtneps_pbh(sum)); /* rounded to nearest even */
        else
            _mm512_mask_storeu_ps((float *)p->out + (r0 + m) * p->out_stride + f0, mask, sum);
    }
}

/* Block `b` of the product for rows [r0, r0 + R), float32 (bf = 0) or bfloat16 (bf = 1). */
INLINE_AVX512 void block_rows(const product_t *p, int64_t b, int64_t r0, const int R, const int bf) {
    const int64_t k = p->k, count = steps(k, bf), xs = p->x_stride;
    const char *wb = (const char *)p->w + b * p->bytes;
    const void *x = (const char *)p->x + r0 * xs * (bf ? 2 : 4);
    __m512 acc[ROW_GROUP][4];
    for (int m = 0; m < R; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    /* bfloat16 with an odd k: the last step's pair would read one input past the row; it is done apart */
    const int64_t whole = bf && (k & 1) ? count - 1 : count;
    for (int64_t i = 0; i < whole; i++) {
        for (int line = 0; line < 4; line++) /* each line of the step 2 KiB ahead: 22% faster from huge pages */
            _mm_prefetch(wb + i * 256 + 2048 + 64 * line, _MM_HINT_T0);
        step(acc, wb + i * 256, x, xs, i, R, bf, 0);
    }
    if (whole < count) step(acc, wb + whole * 256, x, xs, whole, R, bf, 1);
    for (int j = 0; j < 4; j++) store_sums(p, b * BLOCK + 16 * j, r0, R, acc, j, bf);
}

#define KERNEL(R, bf, name) \
    AVX512BF16 static void name(const product_t *p, int64_t b, int64_t r0) { block_rows(p, b, r0, R, bf); }
KERNEL(1, 0, f32_1) KERNEL(2, 0, f32_2) KERNEL(3, 0, f32_3) KERNEL(4, 0, f32_4) KERNEL(5, 0, f32_5) KERNEL(6, 0, f32_6)
KERNEL(1, 1, bf16_1) KERNEL(2, 1, bf16_2) KERNEL(3, 1, bf16_3) KERNEL(4, 1, bf16_4) KERNEL(5, 1, bf16_5)
KERNEL(6, 1, bf16_6)
static void (*const kernels[2][ROW_GROUP])(const product_t *, int64_t, int64_t) = {
    {f32_1, f32_2, f32_3, f32_4, f32_5, f32_6}, {bf16_1, bf16_2, bf16_3, bf16_4, bf16_5, bf16_6}};

/* ---- the AMX kernels (bfloat16) ----
 *
 * Where the CPU has AMX (tiles of 16 rows of 64 bytes, and TDPBF16PS: a 16 x 32 bfloat16 tile times a
 * 32 x 16 one, in pairs, into 16 x 16 float32 sums, the same products and float32 sums as VDPBF16PS), a
 * product of several rows runs on the tiles instead: one instruction does the work of 16 rows of the
 * AVX-512 loop, so a decode step of tens of rows or a prompt chunk is no longer bound by the vector
 * units (about 6x at 32 rows, measured against these kernels on an AMX machine). The B tiles are read
 * straight from the blocked weight: 16 steps of a block (64 features, pairs side by side) are four tiles
 * of 16 features, 256 bytes apart. The rows are copied first, once per call, into zero-padded whole
 * tiles (16 rows, 32 inputs), so that no tile reads past a row. A one- or two-row product stays on the
 * AVX-512 loop: a tile would compute 16 rows for it. */

#define AMX __attribute__((target("amx-tile,amx-bf16," TARGETS)))
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_min_rows = 3; /* fewer rows stay on the AVX-512 loop; 0: never AMX */

/* Whether this CPU has AMX with bfloat16 and the kernel lets this process use it (asked for once). */
static int amx_usable(void) {
    static int known = 0, usable = 0;
    if (!known) {
        unsigned a, b, c, d;
        if (isa(1) == ISA_AVX512 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 22 & 1)) {
            unsigned long perm = 0;
            usable = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 &&
                     syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm) == 0 && (perm >> XFEATURE_XTILEDATA & 1);
        }
        known = 1;
    }
    return usable;
}

int matmul_amx(int min_rows) {
    if (!amx_usable()) return -1;
    const int before = amx_min_rows;
    if (min_rows >= 0) amx_min_rows = min_rows;
    return before;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

/* Blocks of one chunk on the tiles: for each group of 16 rows, tiles 0-3 hold the sums of the block's four
 * groups of 16 features, tile 4 the rows' inputs, tiles 5-7 the weights. */
AMX static void amx_chunk(void *ctx, int64_t chunk) {
    const product_t *p = ctx;
    tile_config_t config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = AMX_ROWS;
    }
    _tile_loadconfig(&config); /* per chunk: oneDNN, on this thread, may have loaded its own */
    const int64_t blocks_total = (p->n + BLOCK - 1) / BLOCK, b0 = chunk * p->chunk, ka = p->ka;
    const int64_t b1 = b0 + p->chunk < blocks_total ? b0 + p->chunk : blocks_total, bytes = p->bytes;
    __m512 sums[AMX_ROWS][4];
    for (int64_t b = b0; b < b1; b++) {
        const char *wb = (const char *)p->w + b * bytes;
        for (int64_t r0 = 0; r0 < p->rows; r0 += AMX_ROWS) {
            const uint16_t *a = p->xa + r0 * ka;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t i = 0; i < ka; i += 2 * AMX_PAIRS) {
                const char *ws = wb + i / 2 * 256;
                if (r0 == 0) /* the first group streams the block from memory: the next step's 4 KiB on its way */
                    for (int line = 0; line < 64; line++) _mm_prefetch(ws + 4096 + line * 64, _MM_HINT_T0);
                _tile_loadd(4, a + i, ka * 2);
                _tile_loadd(5, ws, 256);
                _tile_dpbf16ps(0, 4, 5);
                _tile_loadd(6, ws + 64, 256);
                _tile_dpbf16ps(1, 4, 6);
                _tile_loadd(7, ws + 128, 256);
                _tile_dpbf16ps(2, 4, 7);
                _tile_loadd(5, ws + 192, 256);
                _tile_dpbf16ps(3, 4, 5);
            }
            _tile_stored(0, &sums[0][0], sizeof(sums[0]));
            _tile_stored(1, &sums[0][1], sizeof(sums[0]));
            _tile_stored(2, &sums[0][2], sizeof(sums[0]));
            _tile_stored(3, &sums[0][3], sizeof(sums[0]));
            const int R = p->rows - r0 < AMX_ROWS ? (int)(p->rows - r0) : AMX_ROWS;
            for (int j = 0; j < 4; j++) store_sums(p, b * BLOCK + 16 * j, r0, R, sums, j, 1);
        }
    }
    _tile_release(); /* the tiles' state need not be saved at the next context switch */
}

/* The rows, bfloat16, copied into [rows rounded up to 16, ka] with zeros past them (ka: k rounded up to 32). */
static uint16_t *amx_rows(const uint16_t *x, int64_t rows, int64_t x_stride, int64_t k, int64_t ka) {
    const int64_t padded = (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
    uint16_t *xa = aligned_alloc(64, (size_t)(padded * ka * 2));
    if (!xa) return NULL;
    for (int64_t m = 0; m < padded; m++) {
        uint16_t *row = xa + m * ka;
        const int64_t real = m < rows ? k : 0;
        if (real) memcpy(row, x + m * x_stride, (size_t)real * 2);
        memset(row + real, 0, (size_t)(ka - real) * 2);
    }
    return xa;
}

/* ---- the AVX2 kernels ----
 *
 * Blocks of 16 output features; step i of a block holds input i of its 16 features (float32, or bfloat16
 * widened on load). Each step loads 2 vectors of 8 weights and, for each of up to ROW_GROUP rows,
 * broadcasts that row's input (in float32) and accumulates into 2 vectors of 8 outputs. */

/* 8 float32 to bfloat16, rounded to nearest even (a NaN stays a quiet NaN), in the low 128 bits. */
INLINE_AVX2 __m128i bf16_round(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    /* 16-bit values in 32-bit lanes: pack (within each 128-bit lane), then bring the two low halves together */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

INLINE_AVX2 __m256 bf16_widen(__m128i h) { /* 8 bfloat16 to float32: their bits in the top half */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* bias[f0 .. f0 + 8) in float32, zero past n or without a bias. */
INLINE_AVX2 __m256 bias8(const product_t *p, int64_t f0, const int bf) {
    float b32[8] = {0};
    for (int64_t f = 0; p->bias && f < 8 && f0 + f < p->n; f++) {
        if (bf) {
            const uint32_t bits = (uint32_t)((const uint16_t *)p->bias)[f0 + f] << 16;
            memcpy(&b32[f], &bits, 4);
        } else
            b32[f] = ((const float *)p->bias)[f0 + f];
    }
    return _mm256_loadu_ps(b32);
}

/* out[row, f0 .. f0 + 8) = sum, the features past n left alone. */
INLINE_AVX2 void store8(const product_t *p, int64_t row, int64_t f0, __m256 sum, const int bf) {
    const int64_t valid = p->n - f0 < 8 ? p->n - f0 : 8;
    if (valid <= 0) return;
    if (bf && !p->out_f32) {
        uint16_t *o = (uint16_t *)p->out + row * p->out_stride + f0, tmp[8];
        const __m128i h = bf16_round(sum);
        if (valid == 8) _mm_storeu_si128((__m128i *)o, h);
        else {
            _mm_storeu_si128((__m128i *)tmp, h);
            memcpy(o, tmp, (size_t)valid * 2);
        }
    } else {
        float *o = (float *)p->out + row * p->out_stride + f0, tmp[8];
        if (valid == 8) _mm256_storeu_ps(o, sum);
        else {
            _mm256_storeu_ps(tmp, sum);
            memcpy(o, tmp, (size_t)valid * 4);
        }
    }
}

/* Block `b` of the product for rows [r0, r0 + R), float32 (bf = 0) or bfloat16 (bf = 1). */
INLINE_AVX2 void block_rows2(const product_t *p, int64_t b, int64_t r0, const int R, const int bf) {
    const int64_t k = p->k, step_bytes = BLOCK2 * (bf ? 2 : 4);
    const char *wb = (const char *)p->w + b * k * step_bytes;
    const int64_t xs = bf ? k : p->x_stride;
    const float *x = bf ? p->xf + r0 * k : (const float *)p->x + r0 * xs;
    /* the accumulators as named variables: GCC keeps an array of them in memory too, a store per FMA */
#define ACC(m) __m256 c##m##0 = _mm256_setzero_ps(), c##m##1 = _mm256_setzero_ps();
    ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5)
#undef ACC
    for (int64_t i = 0; i < k; i++) {
        const char *ws = wb + i * step_bytes;
        _mm_prefetch(ws + 4096, _MM_HINT_T0);
        __m256 w0, w1;
        if (bf) {
            w0 = bf16_widen(_mm_load_si128((const __m128i *)ws));
            w1 = bf16_widen(_mm_load_si128((const __m128i *)(ws + 16)));
        } else {
            w0 = _mm256_load_ps((const float *)ws);
            w1 = _mm256_load_ps((const float *)(ws + 32));
        }
#define FMA(m)                                                   \
    if (R > m) {                                                 \
        const __m256 xv = _mm256_broadcast_ss(x + m * xs + i);   \
        c##m##0 = _mm256_fmadd_ps(w0, xv, c##m##0);              \
        c##m##1 = _mm256_fmadd_ps(w1, xv, c##m##1);              \
    }
        FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5)
#undef FMA
    }
    const int64_t f0 = b * BLOCK2;
    const __m256 bias0 = bias8(p, f0, bf), bias1 = bias8(p, f0 + 8, bf); /* read once for all the rows */
#define OUT(m)                                                          \
    if (R > m) {                                                        \
        store8(p, r0 + m, f0, _mm256_add_ps(c##m##0, bias0), bf);       \
        store8(p, r0 + m, f0 + 8, _mm256_add_ps(c##m##1, bias1), bf);   \
    }
    OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5)
#undef OUT
}

#define KERNEL2(R, bf, name) \
    AVX2 static void name(const product_t *p, int64_t b, int64_t r0) { block_rows2(p, b, r0, R, bf); }
KERNEL2(1, 0, f32x2_1) KERNEL2(2, 0, f32x2_2) KERNEL2(3, 0, f32x2_3) KERNEL2(4, 0, f32x2_4) KERNEL2(5, 0, f32x2_5)
KERNEL2(6, 0, f32x2_6) KERNEL2(1, 1, bf16x2_1) KERNEL2(2, 1, bf16x2_2) KERNEL2(3, 1, bf16x2_3)
KERNEL2(4, 1, bf16x2_4) KERNEL2(5, 1, bf16x2_5) KERNEL2(6, 1, bf16x2_6)
static void (*const kernels2[2][ROW_GROUP])(const product_t *, int64_t, int64_t) = {
    {f32x2_1, f32x2_2, f32x2_3, f32x2_4, f32x2_5, f32x2_6},
    {bf16x2_1, bf16x2_2, bf16x2_3, bf16x2_4, bf16x2_5, bf16x2_6}};

/* bfloat16 rows [rows, k] (x_stride apart) widened to float32 [rows, k], for the AVX2 kernels */
AVX2 static void widen_rows(const uint16_t *x, int64_t rows, int64_t x_stride, int64_t k, float *out) {
    for (int64_t m = 0; m < rows; m++) {
        const uint16_t *row = x + m * x_stride;
        float *o = out + m * k;
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) _mm256_storeu_ps(o + i, bf16_widen(_mm_loadu_si128((const __m128i *)(row + i))));
        for (; i < k; i++) {
            const uint32_t bits = (uint32_t)row[i] << 16;
            memcpy(o + i, &bits, 4);
        }
    }
}

static void run_chunk(void *ctx, int64_t chunk) {
    const product_t *p = ctx;
    const int64_t features = block_features(p->bf);
    const int64_t blocks_total = (p->n + features - 1) / features, b0 = chunk * p->chunk;
    const int64_t b1 = b0 + p->chunk < blocks_total ? b0 + p->chunk : blocks_total;
    /* a block's weights come from memory for the first group of rows, from the cache for the others */
    for (int64_t b = b0; b < b1; b++)
        for (int64_t r0 = 0; r0 < p->rows; r0 += ROW_GROUP) {
            const int64_t rows = p->rows - r0 < ROW_GROUP ? p->rows - r0 : ROW_GROUP;
            if (p->isa == ISA_AVX512) kernels[p->bf][rows - 1](p, b, r0);
            else kernels2[p->bf][rows - 1](p, b, r0);
        }
}

/* ---- the pool ---- */

#define MAX_WORKERS 63
#define SPIN_NS 200000 /* how long a worker that just helped waits awake for the next product: 0.2 ms */

typedef struct {
    _Atomic uint32_t generation; /* its futex word: the latest job's generation (low 32 bits) */
    _Atomic int sleeping;
    uint64_t started_at; /* the generation before the job that started it, so that it joins that job */
} worker_t;

static _Atomic uint64_t job_word; /* generation << 40 | threads << 32 | chunks left */
static _Atomic int64_t chunks_done;
static void (*job_fn)(void *, int64_t);
static void *job_ctx;
static int64_t job_chunks;
static worker_t workers[MAX_WORKERS + 1]; /* index 1 .. worker_count */
static int worker_count, worker_limit = -1;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

#define GEN(word) ((word) >> 40)
#define THREADS(word) (((word) >> 32) & 0xff)
#define LEFT(word) ((word) & 0xffffffffu)

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Take and run chunks of the job of generation `gen` until none is left. */
static void take_chunks(uint64_t gen) {
    uint64_t word = atomic_load(&job_word);
    while (GEN(word) == gen && LEFT(word) > 0) {
        if (!atomic_compare_exchange_weak(&job_word, &word, word - 1)) continue;
        /* the chunk is ours, and the job cannot change before it is done: its parameters are current */
        job_fn(job_ctx, job_chunks - (int64_t)LEFT(word));
        atomic_fetch_add(&chunks_done, 1);
        word = atomic_load(&job_word);
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg; /* joins the jobs that allow more than `index` threads */
    worker_t *self = &workers[index];
    uint64_t seen = self->started_at;
    int helped = 0;
    for (;;) {
        uint64_t word = atomic_load(&job_word);
        if (GEN(word) == seen) {
            if (helped) { /* the next product of a step is usually microseconds away */
                const int64_t until = now_ns() + SPIN_NS;
                while (GEN(atomic_load_explicit(&job_word, memory_order_relaxed)) == seen && now_ns() < until)
                    _mm_pause();
                helped = 0;
                continue;
            }
            /* sleep until the caller of a job that wants this worker changes its word (and wakes it) */
            const uint32_t mine = atomic_load(&self->generation);
            atomic_store(&self->sleeping, 1);
            if (GEN(atomic_load(&job_word)) == seen) /* else a job came while we were getting ready to sleep */
                syscall(SYS_futex, &self->generation, FUTEX_WAIT_PRIVATE, mine, NULL, NULL, 0);
            atomic_store(&self->sleeping, 0);
            continue;
        }
        seen = GEN(word);
        helped = index < (int)THREADS(word);
        if (helped) take_chunks(seen);
    }
    return NULL;
}

/* fork: no job may be under way (the pool's lock is taken around it), and the child starts without workers */
static void lock_pool(void) { pthread_mutex_lock(&pool_lock); }
static void unlock_pool(void) { pthread_mutex_unlock(&pool_lock); }
static void forked_child(void) {
    worker_count = 0; /* the threads did not come along; new ones start on the next product */
    pthread_mutex_init(&pool_lock, NULL);
}

/* Start workers until there are `wanted` (at most one fewer than the CPUs); returns how many there are. */
static int start_workers(int wanted) {
    if (worker_limit < 0) {
        pthread_atfork(lock_pool, unlock_pool, forked_child);
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        worker_limit = cpus - 1 < MAX_WORKERS ? (int)(cpus > 1 ? cpus - 1 : 0) : MAX_WORKERS;
    }
    if (wanted > worker_limit) wanted = worker_limit;
    while (worker_count < wanted) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int index = worker_count + 1;
        atomic_store(&workers[index].sleeping, 0);
        workers[index].started_at = GEN(atomic_load(&job_word));
        const int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)index);
        pthread_attr_destroy(&attr);
        if (failed) {
            worker_limit = worker_count;
            break;
        }
        worker_count = index;
    }
    return worker_count;
}

/* Run fn(ctx, 0 .. chunks-1) on this thread and up to threads - 1 workers; returns when all are done. */
void pool_run(void (*fn)(void *, int64_t), void *ctx, int64_t chunks, int threads) {
    pthread_mutex_lock(&pool_lock); /* one job at a time per process */
    if (threads > worker_count + 1) threads = start_workers(threads - 1) + 1;
    if (threads <= 1 || chunks <= 1 || chunks > 0xffffffffLL) {
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
        pthread_mutex_unlock(&pool_lock);
        return;
    }
    job_fn = fn;
    job_ctx = ctx;
    job_chunks = chunks;
    atomic_store(&chunks_done, 0);
    const uint64_t gen = (GEN(atomic_load(&job_word)) + 1) & 0xffffffu;
    atomic_store(&job_word, gen << 40 | (uint64_t)threads << 32 | (uint64_t)chunks);
    for (int i = 1; i < threads; i++) {
        atomic_store(&workers[i].generation, (uint32_t)gen);
        if (atomic_load(&workers[i].sleeping))
            syscall(SYS_futex, &workers[i].generation, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    take_chunks(gen);
    /* the last chunks are the workers'; a worker the OS preempted holds one until it runs again, so after
     * a while give way (it may be waiting for this core) */
    for (int spins = 0; atomic_load(&chunks_done) < chunks; spins++) {
        if (spins < 20000) _mm_pause();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool_lock);
}

int matmul(const void *x, int64_t rows, int64_t x_stride, const void *w, int64_t n, int64_t k, const void *bias,
           void *out, int64_t out_stride, int bf, int out_f32, int threads) {
    product_t p = {.x = x, .w = w, .bias = bias, .out = out, .rows = rows, .n = n, .k = k, .x_stride = x_stride,
                   .out_stride = out_stride, .bf = bf, .isa = isa(bf), .out_f32 = bf && out_f32};
    float *widened = NULL;
    uint16_t *padded = NULL;
    if (p.isa == ISA_AVX2 && bf) {
        widened = malloc((size_t)(rows * k) * sizeof(float));
        if (!widened) return -1;
        widen_rows(x, rows, x_stride, k, widened);
        p.xf = widened;
    }
    if (p.isa == ISA_AVX512 && bf && amx_usable() && amx_min_rows && rows >= amx_min_rows) {
        p.ka = block_steps(k, 1) * 2;
        padded = amx_rows(x, rows, x_stride, k, p.ka);
        if (!padded) return -1;
        p.xa = padded;
        p.amx = 1;
    }
    /* chunks of at least about 64 KiB of weights, to pay for taking one; small enough that a thread that
     * runs late leaves little for the others to wait for */
    const int64_t bytes = block_bytes(k, bf), features = block_features(bf);
    const int64_t blocks_total = (n + features - 1) / features;
    p.chunk = 65536 / bytes > 1 ? 65536 / bytes : 1;
    p.bytes = bytes;
    pool_run(p.amx ? amx_chunk : run_chunk, &p, (blocks_total + p.chunk - 1) / p.chunk, threads);
    free(widened);
    free(padded);
    return 0;
}

#endif
