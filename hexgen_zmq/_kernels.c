/* Paged decode attention for CPU stages: one query token per request attends to its cached keys and values
 * straight from the KV pool, through its slot table, without gathering them into a padded copy first.
 *
 * On a CPU the decode step is bound by memory traffic. The torch path gathers every request's keys and
 * values into a padded [B, L, KV, D] copy (read the pool, write the copy) and then scaled_dot_product_attention
 * reads the copy again; here each request's cache rows are read once, in slot order. Built as an optional
 * extension: where it is missing the stage uses the torch path (hexgen_zmq.kernels says which).
 *
 * float32 only. The caller (hexgen_zmq/kernels.py) checks dtypes, shapes and strides; every slot index
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

/* exp(x) for x <= 0 (softmax after subtracting the maximum), within about 2 ulp of expf: x = n ln2 + r with
 * |r| <= ln2 / 2, a degree-7 Taylor polynomial for exp(r), and 2^n built in the exponent bits. Unlike a libm
 * call it has no branches, so the compiler vectorises the loops that call it. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x; /* exp(-87) ~ 1.6e-38: the smallest normal float, and n + 127 stays >= 1 */
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
            sh[l] = exp_nonpositive(sh[l] - top);
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
     "Paged decode attention over raw float32 buffers (use hexgen_zmq.kernels, which checks the arguments)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
