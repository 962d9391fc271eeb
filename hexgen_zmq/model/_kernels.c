/* CPU fast paths of a float32 stage: paged decode attention, and the small per-layer ops around the matrix
 * products (RMSNorm, silu(gate) * up, rotary embedding with the KV-cache write), each one pass over its rows
 * instead of several torch ops.
 *
 * Paged decode attention: one query token per request attends to its cached keys and values
 * straight from the KV pool, through its slot table, without gathering them into a padded copy first.
 *
 * On a CPU the decode step is bound by memory traffic. The torch path gathers every request's keys and
 * values into a padded [B, L, KV, D] copy (read the pool, write the copy) and then scaled_dot_product_attention
 * reads the copy again; here each request's cache rows are read once, in slot order. Built as an optional
 * extension: where it is missing the stage uses the torch path (hexgen_zmq.model.kernels says which).
 *
 * float32 only. The caller (hexgen_zmq/model/kernels.py) checks dtypes, shapes and strides; every slot index
 * comes from the stage's own block manager, never from a peer. The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
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

/* One request: its query row qt (heads of q_stride_h floats apart) attends to the `len` cache rows at slots
 * sl[0..len) and writes out_row. Inlined with head_dim a constant (32, 64, 128) so the compiler unrolls the
 * per-head loops into whole vector registers. */
static inline __attribute__((always_inline)) void attend_one(
        const float *qt, int64_t q_stride_h, const float *k_pool, const float *v_pool, const int64_t *sl,
        int64_t len, float *out_row, int64_t heads, int64_t kv_heads, const int64_t head_dim, float scale,
        float *scratch) {
    const int64_t group = heads / kv_heads;
    const int64_t row_stride = kv_heads * head_dim;
    float *scores = scratch;            /* [heads, len] */
    float *acc = scratch + heads * len; /* [heads, head_dim] */
    for (int64_t l = 0; l < len; l++) { /* one pass over the keys: each row serves every head */
        const float *krow = k_pool + sl[l] * row_stride;
        for (int64_t h = 0; h < heads; h++)
            scores[h * len + l] = dot(qt + h * q_stride_h, krow + (h / group) * head_dim, head_dim) * scale;
    }
    for (int64_t h = 0; h < heads; h++) {
        float *sh = scores + h * len, top = -INFINITY, sum = 0.0f;
        for (int64_t l = 0; l < len; l++) top = sh[l] > top ? sh[l] : top;
        for (int64_t l = 0; l < len; l++) {
            sh[l] = exp_clamped(sh[l] - top);
            sum += sh[l];
        }
        const float inv = 1.0f / sum;
        for (int64_t l = 0; l < len; l++) sh[l] *= inv;
    }
    memset(acc, 0, sizeof(float) * heads * head_dim);
    for (int64_t l = 0; l < len; l++) { /* one pass over the values */
        const float *vrow = v_pool + sl[l] * row_stride;
        for (int64_t h = 0; h < heads; h++) {
            const float p = scores[h * len + l];
            const float *vp = vrow + (h / group) * head_dim;
            float *ah = acc + h * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ah[d] += p * vp[d];
        }
    }
    memcpy(out_row, acc, sizeof(float) * heads * head_dim);
}

/* q[t, h, :] at q + t * q_stride_t + h * q_stride_h; pools are [slots, kv_heads, head_dim] contiguous;
 * request b reads slots[b * slots_stride + l] for l < lengths[b] and writes out[rows[b], h, :] (a row of
 * out holds all heads contiguously). scratch holds heads * (max length + head_dim) floats. */
MULTIVERSION
static void decode_attention(const float *q, int64_t q_stride_t, int64_t q_stride_h, const float *k_pool,
                             const float *v_pool, const int64_t *slots, int64_t slots_stride,
                             const int64_t *lengths, const int64_t *rows, float *out, int64_t out_stride_t,
                             int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale,
                             float *scratch) {
    for (int64_t b = 0; b < batch; b++) {
        const float *qt = q + rows[b] * q_stride_t;
        const int64_t *sl = slots + b * slots_stride;
        float *out_row = out + rows[b] * out_stride_t;
#define ATTEND(D) attend_one(qt, q_stride_h, k_pool, v_pool, sl, lengths[b], out_row, heads, kv_heads, D, scale, scratch)
        switch (head_dim) {
            case 32: ATTEND(32); break;
            case 64: ATTEND(64); break;
            case 128: ATTEND(128); break;
            default: ATTEND(head_dim);
        }
#undef ATTEND
    }
}

/* out[r, :] = w * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)), transformers' RMSNorm in float32. */
MULTIVERSION
static void rms_norm(const float *x, int64_t rows, int64_t dim, int64_t x_stride, const float *w, float eps,
                     float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * dim, squares = 0.0f;
        for (int64_t i = 0; i < dim; i++) squares += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: the gate and up halves of a fused gate/up projection. */
MULTIVERSION
static void silu_mul(const float *gu, int64_t rows, int64_t inter, int64_t gu_stride, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * gu_stride, *u = g + inter;
        float *o = out + r * inter;
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + exp_clamped(-g[i])) * u[i];
    }
}

/* y = x * cos + rotate_half(x) * sin over one head, rotate_half(x) = (-x[half:], x[:half]). */
static inline void rotate_into(const float *x, const float *c, const float *s, float *y, int64_t half) {
    for (int64_t i = 0; i < half; i++) y[i] = x[i] * c[i] - x[i + half] * s[i];
    for (int64_t i = 0; i < half; i++) y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
}

/* qkv [tokens, q_heads + 2 kv_heads, D] (rows qkv_stride floats apart), cos and sin [tokens, D]: rotates the
 * q heads into q_out [tokens, q_heads, D], and writes each token's rotated k heads and its v heads into the
 * pools' slot slots[t] ([slots, kv_heads, D] each). */
MULTIVERSION
static void rope_store(const float *qkv, int64_t tokens, int64_t qkv_stride, int64_t q_heads, int64_t kv_heads,
                       int64_t head_dim, const float *cos, const float *sin, float *k_pool, float *v_pool,
                       const int64_t *slots, float *q_out) {
    const int64_t half = head_dim / 2, kv_row = kv_heads * head_dim;
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = qkv + t * qkv_stride, *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < q_heads; h++)
            rotate_into(row + h * head_dim, c, s, q_out + (t * q_heads + h) * head_dim, half);
        float *k = k_pool + slots[t] * kv_row;
        for (int64_t g = 0; g < kv_heads; g++)
            rotate_into(row + (q_heads + g) * head_dim, c, s, k + g * head_dim, half);
        memcpy(v_pool + slots[t] * kv_row, row + (q_heads + kv_heads) * head_dim, sizeof(float) * kv_row);
    }
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long x, w, out;
    long long rows, dim, x_stride;
    double eps;
    if (!PyArg_ParseTuple(args, "KLLLKdK", &x, &rows, &dim, &x_stride, &w, &eps, &out)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rms_norm((const float *)x, rows, dim, x_stride, (const float *)w, (float)eps, (float *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    unsigned long long gu, out;
    long long rows, inter, gu_stride;
    if (!PyArg_ParseTuple(args, "KLLLK", &gu, &rows, &inter, &gu_stride, &out)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    silu_mul((const float *)gu, rows, inter, gu_stride, (float *)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rope_store(PyObject *self, PyObject *args) {
    unsigned long long qkv, cos, sin, k_pool, v_pool, slots, q_out;
    long long tokens, qkv_stride, q_heads, kv_heads, head_dim;
    if (!PyArg_ParseTuple(args, "KLLLLLKKKKKK", &qkv, &tokens, &qkv_stride, &q_heads, &kv_heads, &head_dim, &cos,
                          &sin, &k_pool, &v_pool, &slots, &q_out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rope_store((const float *)qkv, tokens, qkv_stride, q_heads, kv_heads, head_dim, (const float *)cos,
               (const float *)sin, (float *)k_pool, (float *)v_pool, (const int64_t *)slots, (float *)q_out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, k_pool, v_pool, slots, lengths, rows, out, scratch;
    long long q_stride_t, q_stride_h, slots_stride, out_stride_t, batch, heads, kv_heads, head_dim;
    double scale;
    if (!PyArg_ParseTuple(args, "KLLKKKLKKKLLLLLdK", &q, &q_stride_t, &q_stride_h, &k_pool, &v_pool, &slots,
                          &slots_stride, &lengths, &rows, &out, &out_stride_t, &batch, &heads, &kv_heads,
                          &head_dim, &scale, &scratch))
        return NULL;
    if (batch < 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || heads % kv_heads) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: bad sizes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    decode_attention((const float *)q, q_stride_t, q_stride_h, (const float *)k_pool, (const float *)v_pool,
                     (const int64_t *)slots, slots_stride, (const int64_t *)lengths, (const int64_t *)rows,
                     (float *)out, out_stride_t, batch, heads, kv_heads, head_dim, (float)scale, (float *)scratch);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_attention", py_decode_attention, METH_VARARGS,
     "Paged decode attention over raw float32 buffers (use hexgen_zmq.model.kernels, which checks the arguments)."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of float32 rows (use hexgen_zmq.model.kernels)."},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu(gate) * up of fused gate/up rows (use hexgen_zmq.model.kernels)."},
    {"rope_store", py_rope_store, METH_VARARGS,
     "Rotary embedding of q and k, k and v written to the KV pool (use hexgen_zmq.model.kernels)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
