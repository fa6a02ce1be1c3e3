/* SMoLoRA routed delta for a batch of tokens, for float32 and bfloat16 models.
 *
 * For every token t (scale s_t; 0 means "no adapter": the token is skipped) and every fused
 * sublayer j, with the token's VU expert v and IF expert f in its checkpoint slot:
 *
 *   z_v = A_v x_t, z_f = A_f x_t                  (rank space, rp floats each)
 *   l_v = s_t (B_v^T fuse_vu) . z_v, l_f likewise (the fusion logits, read in rank space)
 *   (w_v, w_f) = softmax(l_v, l_f)
 *   y_t[sub j] += s_t (w_v B_v z_v + w_f B_f z_f)
 *
 * Only the two routed experts are touched. The (token, sublayer, kind) rows are bucketed by
 * expert group (a counting sort), and each group's A and B are read once for all of its rows:
 * inside a model forward the base weights evict the adapters from the core's caches between
 * calls, so reading an expert once per call instead of once per token is what keeps the
 * cost down. For ranks 16 and 32, A is applied to blocks of up to four rows at once, each
 * row in 16-wide vectors with its own four partial sums (as many independent multiply-add
 * chains as the core can run). Software prefetching was measured and dropped: the hardware
 * prefetchers follow each expert's contiguous weights better (10-15% faster without).
 * Layouts are RoutedAdapter's buffers:
 *   lora_a [S, n_sub, E, d_in, rp]   (row i of A_e^T holds the rp weights x_i meets)
 *   lora_b [S, n_sub, E, rp, d_out]
 *   fuse_r [S, n_sub, E, rp]          (B_e^T fuse of the expert's group)
 * The arguments are ordered layer (shapes, weights), then step (routes, fusion buffer), then
 * call (x, y), so the caller binds the first two once per step (cpu_kernel.py).
 * bfloat16 models (smolora_routed_delta_bf16): x, y, lora_a and lora_b hold bfloat16; the
 * experts are widened exactly to float32 as they are read, all arithmetic is float32 as
 * for float32 models, and each output element is rounded to bfloat16 once, after both
 * experts' contributions are summed (y = bf16(y + delta), round to nearest even). That sum
 * lives in a float32 buffer of n_tok x (max(sub_row) + 1) x d_out; cpu_kernel.py splits
 * large steps into token chunks to bound it.
 * The build is ISO C11, so the compiler does not fuse multiply-adds; fusing them
 * (-ffp-contract=fast) was measured and did not help inside the engine.
 * Fusion weights (w_vu, w_if) of token t, sublayer j go to fusion[t * fusion_stride + 2 j + {0,1}]
 * (0.5 each for tokens without adapter). Calls with at least min_parallel_work multiply-adds
 * (rows x (d_in + d_out) x rp) run on the OpenMP threads: experts split over threads for
 * A, output columns for B. Built against the libgomp torch has loaded (same soname), they
 * are torch's own intra-op threads. Returns 0, or 1 for a rank above MAX_RANK, 2 for an
 * expert or slot out of range, 3 when out of memory. The caller checks shapes, dtypes and
 * contiguity (server/engine/cpu_kernel.py).
 */
#define _GNU_SOURCE  /* pthread_setaffinity_np, CPU_SET: the overlap helper's pinning */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_RANK 256

/* for (int64_t I = 0; I < N; ++I) { BODY }: on the OpenMP threads when PAR, else in the
 * calling thread without entering OpenMP at all. The overlap helper must not enter it:
 * libgomp binds a thread that starts a parallel region to the OMP_PLACES vLLM sets, which
 * are the worker's own CPUs. */
#ifdef _OPENMP
#define PFOR(PAR, PRAGMA, I, N, ...)                                                          \
    do {                                                                                      \
        if (PAR) {                                                                            \
            _Pragma(PRAGMA) for (int64_t I = 0; I < (N); ++I) { __VA_ARGS__ }                 \
        } else {                                                                              \
            for (int64_t I = 0; I < (N); ++I) { __VA_ARGS__ }                                 \
        }                                                                                     \
    } while (0)
#else
#define PFOR(PAR, PRAGMA, I, N, ...) do { (void)(PAR); for (int64_t I = 0; I < (N); ++I) { __VA_ARGS__ } } while (0)
#endif

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }
static inline v8f splat8(float s) { return (v8f){s, s, s, s, s, s, s, s}; }

typedef float v16f __attribute__((vector_size(64)));

static inline v16f load16(const float *p) { v16f v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16f v) { __builtin_memcpy(p, &v, sizeof v); }
static inline v16f splat16(float s) { return (v16f){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

/* bfloat16: the top 16 bits of a float32. Widening is exact (a shift); narrowing rounds to
 * nearest even and keeps NaNs quiet NaNs (as torch does). */
typedef uint16_t bf16_t;
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline float widen1(bf16_t h) { const uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, sizeof f); return f; }
static inline v16f widen16(const bf16_t *p) {
#ifdef __AVX512F__  /* one zero-extending load and a shift (generic vectors split it in halves) */
    const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    v16f f; memcpy(&f, &u, sizeof f); return f;
#else
    v16h h; memcpy(&h, p, sizeof h);
    const v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f; memcpy(&f, &u, sizeof f); return f;
#endif
}
static inline void narrow16(bf16_t *p, v16f v) {
    v16u u; memcpy(&u, &v, sizeof u);
    const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const v16u nan = (v16u)((v16i)(u & 0x7fffffffu) > (v16i){0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000});
    const v16u out = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    const v16h h = __builtin_convertvector(out, v16h);
    memcpy(p, &h, sizeof h);
}
static inline bf16_t narrow1(float f) {
    uint32_t u; memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    return (bf16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Expert weights are read through these, per weight type W (f32: float, bf16: bf16_t). */
typedef float wt_f32;
typedef bf16_t wt_bf16;
static inline v16f wload16_f32(const float *p) { return load16(p); }
static inline v16f wload16_bf16(const bf16_t *p) { return widen16(p); }
static inline v8f wload8_f32(const float *p) { return load8(p); }
static inline v8f wload8_bf16(const bf16_t *p) {
    v8f v; for (int k = 0; k < 8; ++k) v[k] = widen1(p[k]); return v;
}
static inline float wload1_f32(const float *p) { return *p; }
static inline float wload1_bf16(const bf16_t *p) { return widen1(*p); }

/* z = A^T x for one expert, A [d_in, rp] (row i holds the rp weights x_i meets), for rp =
 * 8 NV (used for rank 8): the rp accumulators live in NV vector registers, four sets of them
 * to break the add dependency chain along d_in. W: the weights' type (f32 or bf16). */
#define DEFINE_SHRINK(W, NV)                                                                  \
    static void shrink_v##NV##_##W(const float *restrict x, const wt_##W *restrict a,         \
                                   int64_t d_in, float *restrict z) {                         \
        const int64_t rp = 8 * NV;                                                            \
        v8f acc[4][NV];                                                                       \
        for (int u = 0; u < 4; ++u)                                                           \
            for (int k = 0; k < NV; ++k) acc[u][k] = splat8(0.0f);                            \
        int64_t i = 0;                                                                        \
        for (; i + 4 <= d_in; i += 4)                                                         \
            for (int u = 0; u < 4; ++u) {                                                     \
                const v8f xi = splat8(x[i + u]);                                              \
                for (int k = 0; k < NV; ++k) acc[u][k] += xi * wload8_##W(a + (i + u) * rp + 8 * k); \
            }                                                                                 \
        for (; i < d_in; ++i) {                                                               \
            const v8f xi = splat8(x[i]);                                                      \
            for (int k = 0; k < NV; ++k) acc[0][k] += xi * wload8_##W(a + i * rp + 8 * k);   \
        }                                                                                     \
        for (int k = 0; k < NV; ++k) store8(z + 8 * k, (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k])); \
    }

/* z = A^T x for TB rows of one group at once, rp = 16 NV: A is read once per block of rows.
 * Each row keeps the same four partial sums along d_in as shrink_v* (bit-identical), so
 * the block size only changes how many independent FMA chains are in flight. */
#define DEFINE_SHRINK16_ROWS(W, NV, TB)                                                       \
    static void shrink16_##W##_##NV##_##TB(const float *const *xs, const wt_##W *restrict a,  \
                                           int64_t d_in, float *const *zs) {                  \
        const int64_t rp = 16 * NV;                                                           \
        v16f acc[TB][4][NV];                                                                  \
        for (int t = 0; t < TB; ++t)                                                          \
            for (int u = 0; u < 4; ++u)                                                       \
                for (int k = 0; k < NV; ++k) acc[t][u][k] = splat16(0.0f);                    \
        int64_t i = 0;                                                                        \
        for (; i + 4 <= d_in; i += 4)                                                         \
            for (int u = 0; u < 4; ++u) {                                                     \
                v16f ak[NV];                                                                  \
                for (int k = 0; k < NV; ++k) ak[k] = wload16_##W(a + (i + u) * rp + 16 * k);  \
                for (int t = 0; t < TB; ++t) {                                                \
                    const v16f xi = splat16(xs[t][i + u]);                                    \
                    for (int k = 0; k < NV; ++k) acc[t][u][k] += xi * ak[k];                  \
                }                                                                             \
            }                                                                                 \
        for (; i < d_in; ++i) {                                                               \
            v16f ak[NV];                                                                      \
            for (int k = 0; k < NV; ++k) ak[k] = wload16_##W(a + i * rp + 16 * k);            \
            for (int t = 0; t < TB; ++t) {                                                    \
                const v16f xi = splat16(xs[t][i]);                                            \
                for (int k = 0; k < NV; ++k) acc[t][0][k] += xi * ak[k];                      \
            }                                                                                 \
        }                                                                                     \
        for (int t = 0; t < TB; ++t)                                                          \
            for (int k = 0; k < NV; ++k)                                                      \
                store16(zs[t] + 16 * k, (acc[t][0][k] + acc[t][1][k]) + (acc[t][2][k] + acc[t][3][k])); \
    }

/* For the rows of one expert group: out_i += B^T c_i, B [rp, d_out], c_i the row's scaled
 * z. Sixteen outputs at a time, the rp B vectors of that block stay in registers across
 * the group's rows, so B is read once per call. */
#define DEFINE_EXPAND_ROWS(W, RP)                                                             \
    static void expand_rows_##W##_##RP(float *const *outs, const float *const *cs, int64_t nrows, \
                                       const wt_##W *restrict b, int64_t d_out, int64_t o0, int64_t o1) { \
        int64_t o = o0;                                                                       \
        for (; o + 16 <= o1; o += 16) {                                                       \
            v16f bb[RP];                                                                      \
            for (int r = 0; r < RP; ++r) bb[r] = wload16_##W(b + r * d_out + o);              \
            for (int64_t i = 0; i < nrows; ++i) {                                             \
                const float *c = cs[i];                                                       \
                v16f acc = load16(outs[i] + o);                                               \
                for (int r = 0; r < RP; ++r) acc += splat16(c[r]) * bb[r];                    \
                store16(outs[i] + o, acc);                                                    \
            }                                                                                 \
        }                                                                                     \
        for (; o < o1; ++o)                                                                   \
            for (int64_t i = 0; i < nrows; ++i) {                                             \
                float acc = outs[i][o];                                                       \
                for (int r = 0; r < RP; ++r) acc += cs[i][r] * wload1_##W(b + r * d_out + o); \
                outs[i][o] = acc;                                                             \
            }                                                                                 \
    }

/* Any rank, and the per-rank dispatch: shrink_rows_W computes z_t = A^T x_t for n rows
 * sharing one expert's A (`xs`, `zs`: the rows' inputs and outputs); expand_rows_W adds
 * B^T c_i to each row's output columns [o0, o1). */
#define DEFINE_DISPATCH(W)                                                                    \
    static void shrink_any_##W(const float *restrict x, const wt_##W *restrict a, int64_t d_in, \
                               int64_t rp, float *restrict z) {                               \
        for (int64_t r = 0; r < rp; ++r) z[r] = 0.0f;                                         \
        for (int64_t i = 0; i < d_in; ++i) {                                                  \
            const float xi = x[i];                                                            \
            const wt_##W *restrict ai = a + i * rp;                                           \
            for (int64_t r = 0; r < rp; ++r) z[r] += xi * wload1_##W(ai + r);                 \
        }                                                                                     \
    }                                                                                         \
    static void expand_rows_any_##W(float *const *outs, const float *const *cs, int64_t nrows, \
                                    const wt_##W *restrict b, int64_t rp, int64_t d_out,      \
                                    int64_t o0, int64_t o1) {                                 \
        for (int64_t i = 0; i < nrows; ++i)                                                   \
            for (int64_t r = 0; r < rp; ++r) {                                                \
                const float c = cs[i][r];                                                     \
                const wt_##W *restrict br = b + r * d_out;                                    \
                float *restrict out = outs[i];                                                \
                for (int64_t o = o0; o < o1; ++o) out[o] += c * wload1_##W(br + o);           \
            }                                                                                 \
    }                                                                                         \
    static void shrink_rows_##W(const float *const *xs, const wt_##W *restrict a, int64_t d_in, \
                                int64_t rp, float *const *zs, int64_t n) {                    \
        int64_t i = 0;                                                                        \
        if (rp == 16) {                                                                       \
            for (; i + 4 <= n; i += 4) shrink16_##W##_1_4(xs + i, a, d_in, zs + i);           \
            switch (n - i) {                                                                  \
                case 3: shrink16_##W##_1_3(xs + i, a, d_in, zs + i); break;                   \
                case 2: shrink16_##W##_1_2(xs + i, a, d_in, zs + i); break;                   \
                case 1: shrink16_##W##_1_1(xs + i, a, d_in, zs + i); break;                   \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        if (rp == 32) {                                                                       \
            for (; i + 2 <= n; i += 2) shrink16_##W##_2_2(xs + i, a, d_in, zs + i);           \
            if (i < n) shrink16_##W##_2_1(xs + i, a, d_in, zs + i);                           \
            return;                                                                           \
        }                                                                                     \
        for (; i < n; ++i) {                                                                  \
            if (rp == 8) shrink_v1_##W(xs[i], a, d_in, zs[i]);                                \
            else shrink_any_##W(xs[i], a, d_in, rp, zs[i]);                                   \
        }                                                                                     \
    }                                                                                         \
    static void expand_rows_##W(float *const *outs, const float *const *cs, int64_t nrows,    \
                                const wt_##W *restrict b, int64_t rp, int64_t d_out,          \
                                int64_t o0, int64_t o1) {                                     \
        switch (rp) {                                                                         \
            case 8: expand_rows_##W##_8(outs, cs, nrows, b, d_out, o0, o1); break;            \
            case 16: expand_rows_##W##_16(outs, cs, nrows, b, d_out, o0, o1); break;          \
            case 32: expand_rows_##W##_32(outs, cs, nrows, b, d_out, o0, o1); break;          \
            default: expand_rows_any_##W(outs, cs, nrows, b, rp, d_out, o0, o1);              \
        }                                                                                     \
    }

#define DEFINE_WEIGHT_TYPE(W)                                                                 \
    DEFINE_SHRINK(W, 1)                                                                       \
    DEFINE_SHRINK16_ROWS(W, 1, 1)                                                             \
    DEFINE_SHRINK16_ROWS(W, 1, 2)                                                             \
    DEFINE_SHRINK16_ROWS(W, 1, 3)                                                             \
    DEFINE_SHRINK16_ROWS(W, 1, 4)                                                             \
    DEFINE_SHRINK16_ROWS(W, 2, 1)                                                             \
    DEFINE_SHRINK16_ROWS(W, 2, 2)                                                             \
    DEFINE_EXPAND_ROWS(W, 8)                                                                  \
    DEFINE_EXPAND_ROWS(W, 16)                                                                 \
    DEFINE_EXPAND_ROWS(W, 32)                                                                 \
    DEFINE_DISPATCH(W)

DEFINE_WEIGHT_TYPE(f32)
DEFINE_WEIGHT_TYPE(bf16)

/* x [n_tok, >= d_in] with row stride x_stride (a token's d_in inputs contiguous), y
 * [n_tok, > max(sub_row) * d_out] with row stride y_stride, in the model dtype; strides in
 * elements. bfloat16 models widen x to a float32 copy and sum the delta in a float32 buffer
 * before the one rounding into y. */
static void widen_rows(const bf16_t *x, int64_t x_stride, int64_t n, int64_t d, float *out) {
    for (int64_t t = 0; t < n; ++t) {
        const bf16_t *xt = x + t * x_stride;
        float *ot = out + t * d;
        int64_t i = 0;
        for (; i + 16 <= d; i += 16) store16(ot + i, widen16(xt + i));
        for (; i < d; ++i) ot[i] = widen1(xt[i]);
    }
}

/* Columns of a token's delta row: the adapted sublayers' output rows, up to the last one. */
static int64_t delta_cols(int64_t n_sub, const int64_t *sub_row, int64_t d_out) {
    int64_t rows = 0;
    for (int64_t j = 0; j < n_sub; ++j) rows = sub_row[j] + 1 > rows ? sub_row[j] + 1 : rows;
    return rows * d_out;
}

/* y[t, sub j] += delta[t, sub j] for the tokens with an adapter, delta float32 [n_tok, y_cols]
 * (bf16: y = bf16(y + delta), rounded once, to nearest even). */
static void add_delta_rows(int bf16, int64_t n_tok, int64_t n_sub, int64_t d_out, const int64_t *sub_row,
                           const float *tok_scale, const float *delta, int64_t y_cols, void *y_out, int64_t y_stride,
                           int parallel) {
    PFOR(parallel, "omp parallel for", t, n_tok,
        if (tok_scale[t] == 0.0f) continue;
        for (int64_t j = 0; j < n_sub; ++j) {
            const float *dt = delta + t * y_cols + sub_row[j] * d_out;
            int64_t o = 0;
            if (bf16) {
                bf16_t *yt = (bf16_t *)y_out + t * y_stride + sub_row[j] * d_out;
                for (; o + 16 <= d_out; o += 16) narrow16(yt + o, widen16(yt + o) + load16(dt + o));
                for (; o < d_out; ++o) yt[o] = narrow1(widen1(yt[o]) + dt[o]);
            } else {
                float *yt = (float *)y_out + t * y_stride + sub_row[j] * d_out;
                for (; o + 16 <= d_out; o += 16) store16(yt + o, load16(yt + o) + load16(dt + o));
                for (; o < d_out; ++o) yt[o] += dt[o];
            }
        }
    );
}

/* The expand of every group, for output columns [o0, o1). */
static void expand_groups(int bf16, int64_t n_groups, const int64_t *start, float **outs, const float **cs,
                          const void *lora_b, int64_t rp, int64_t d_out, int64_t o0, int64_t o1) {
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t n = start[g + 1] - start[g];
        if (n == 0 || o0 >= o1) continue;
        if (bf16) expand_rows_bf16(outs + start[g], cs + start[g], n, (const bf16_t *)lora_b + g * rp * d_out, rp, d_out, o0, o1);
        else expand_rows_f32(outs + start[g], cs + start[g], n, (const float *)lora_b + g * rp * d_out, rp, d_out, o0, o1);
    }
}

static int routed_delta(
    int bf16, int64_t n_tok, int64_t n_slot, int64_t n_sub, int64_t n_exp, int64_t rp, int64_t d_in, int64_t d_out,
    const int64_t *sub_row, const void *lora_a, const void *lora_b, const float *fuse_r,
    const int64_t *tok_slot, const float *tok_scale, const int64_t *tok_vu, const int64_t *tok_if,
    float *fusion, int64_t fusion_stride, int64_t min_parallel_work,
    const void *x_in, int64_t x_stride, void *y_out, int64_t y_stride, float *delta_out)
{
    if (rp > MAX_RANK) return 1;
    if (n_tok <= 0) return 0;
    const int64_t n_groups = n_slot * n_sub * n_exp;
    const int64_t n_rows = n_tok * n_sub * 2;    /* row r = (t * n_sub + j) * 2 + kind */
    int64_t *start = calloc((size_t)(n_groups + 1), sizeof *start);
    int64_t *group = malloc((size_t)n_rows * sizeof *group);
    int64_t *order = malloc((size_t)n_rows * sizeof *order);
    float *z = malloc((size_t)(n_rows * rp) * sizeof *z);
    float *logit = malloc((size_t)n_rows * sizeof *logit);
    float **outs = malloc((size_t)n_rows * sizeof *outs);
    const float **cs = malloc((size_t)n_rows * sizeof *cs);
    /* float32 views of x and y: the tensors themselves, or (bf16) a widened copy of x and a
     * zeroed delta buffer of y's adapted columns. */
    const int64_t y_cols = delta_cols(n_sub, sub_row, d_out);
    const int buffered = bf16 || delta_out;
    float *xw = bf16 ? malloc((size_t)(n_tok * d_in) * sizeof *xw) : NULL;
    float *yd = delta_out ? delta_out : bf16 ? malloc((size_t)(n_tok * y_cols) * sizeof *yd) : NULL;
    int rc = 0;
    if (!start || !group || !order || !z || !logit || !outs || !cs || (bf16 && !xw) || (buffered && !yd)) { rc = 3; goto done; }
    if (buffered) memset(yd, 0, (size_t)(n_tok * y_cols) * sizeof *yd);
    if (bf16) widen_rows((const bf16_t *)x_in, x_stride, n_tok, d_in, xw);
    const float *x = bf16 ? xw : (const float *)x_in;
    const int64_t xs_ = bf16 ? d_in : x_stride;
    float *y = buffered ? yd : (float *)y_out;
    const int64_t ys_ = buffered ? y_cols : y_stride;

    /* Bucket the rows of tokens with an adapter by expert group (counting sort). */
    for (int64_t t = 0; t < n_tok; ++t) {
        float *fus = fusion + t * fusion_stride;
        const int64_t slot = tok_slot[t];
        for (int64_t j = 0; j < n_sub; ++j) {
            const int64_t r = (t * n_sub + j) * 2;
            group[r] = group[r + 1] = -1;
            if (tok_scale[t] == 0.0f) { fus[2 * j] = 0.5f; fus[2 * j + 1] = 0.5f; continue; }
            const int64_t e[2] = {tok_vu[t * n_sub + j], tok_if[t * n_sub + j]};
            for (int k = 0; k < 2; ++k) {
                if (slot < 0 || slot >= n_slot || e[k] < 0 || e[k] >= n_exp) { rc = 2; goto done; }
                group[r + k] = (slot * n_sub + j) * n_exp + e[k];
                start[group[r + k] + 1] += 1;
            }
        }
    }
    for (int64_t g = 0; g < n_groups; ++g) start[g + 1] += start[g];
    {
        int64_t *fill = malloc((size_t)n_groups * sizeof *fill);
        if (!fill) { rc = 3; goto done; }
        for (int64_t g = 0; g < n_groups; ++g) fill[g] = start[g];
        for (int64_t r = 0; r < n_rows; ++r)
            if (group[r] >= 0) order[fill[group[r]]++] = r;
        free(fill);
    }

    /* Shrink: z_r = A_g^T x_t and the fusion logit, group by group (A_g read once). */
    const int parallel = n_rows * (d_in + d_out) * rp >= min_parallel_work;
    PFOR(parallel, "omp parallel for schedule(dynamic, 1)", g, n_groups,
        if (start[g] == start[g + 1]) continue;
        const float *f = fuse_r + g * rp;
        enum { CHUNK = 16 };
        for (int64_t i0 = start[g]; i0 < start[g + 1]; i0 += CHUNK) {
            const int64_t n = start[g + 1] - i0 < CHUNK ? start[g + 1] - i0 : CHUNK;
            const float *xs[CHUNK];
            float *zs[CHUNK];
            for (int64_t k = 0; k < n; ++k) {
                const int64_t r = order[i0 + k];
                xs[k] = x + (r / (2 * n_sub)) * xs_;
                zs[k] = z + r * rp;
            }
            if (bf16) shrink_rows_bf16(xs, (const bf16_t *)lora_a + g * d_in * rp, d_in, rp, zs, n);
            else shrink_rows_f32(xs, (const float *)lora_a + g * d_in * rp, d_in, rp, zs, n);
            for (int64_t k = 0; k < n; ++k) {
                const int64_t r = order[i0 + k];
                float acc = 0.0f;
                for (int64_t q = 0; q < rp; ++q) acc += f[q] * zs[k][q];
                logit[r] = tok_scale[r / (2 * n_sub)] * acc;
            }
        }
    );

    /* Fusion: the 2-way softmax per (token, sublayer); z is scaled by s w. */
    PFOR(parallel, "omp parallel for", t, n_tok,
        const float s = tok_scale[t];
        if (s == 0.0f) continue;
        float *fus = fusion + t * fusion_stride;
        for (int64_t j = 0; j < n_sub; ++j) {
            const int64_t r = (t * n_sub + j) * 2;
            const float w_vu = 1.0f / (1.0f + expf(logit[r + 1] - logit[r]));
            fus[2 * j] = w_vu;
            fus[2 * j + 1] = 1.0f - w_vu;
            const float c0 = s * w_vu, c1 = s * (1.0f - w_vu);
            for (int64_t q = 0; q < rp; ++q) { z[r * rp + q] *= c0; z[(r + 1) * rp + q] *= c1; }
        }
    );

    /* Expand: y_t[sub j] += B_g^T (s w z_r), group by group (B_g read once). Threads split
     * the output columns (blocks of 16), so no two write the same element: a token's VU and
     * IF rows sit in different groups but add into the same output row. */
    for (int64_t i = 0; i < start[n_groups]; ++i) {
        const int64_t r = order[i], t = r / (2 * n_sub), j = (r / 2) % n_sub;
        outs[i] = y + t * ys_ + sub_row[j] * d_out;
        cs[i] = z + r * rp;
    }
#ifdef _OPENMP
    if (parallel) {
        #pragma omp parallel
        {
            const int nt = omp_get_num_threads(), me = omp_get_thread_num();
            const int64_t blocks = d_out / 16;
            const int64_t o0 = 16 * (blocks * me / nt);
            const int64_t o1 = me == nt - 1 ? d_out : 16 * (blocks * (me + 1) / nt);
            expand_groups(bf16, n_groups, start, outs, cs, lora_b, rp, d_out, o0, o1);
        }
    } else
#endif
    expand_groups(bf16, n_groups, start, outs, cs, lora_b, rp, d_out, 0, d_out);

    /* bf16: y = bf16(y + delta), once per adapted output element (unless the caller keeps
     * the delta: the overlap helper adds it after the base matmul). */
    if (bf16 && !delta_out) add_delta_rows(1, n_tok, n_sub, d_out, sub_row, tok_scale, yd, y_cols, y_out, y_stride, parallel);

done:
    free(start); free(group); free(order); free(z); free(logit); free(outs); free(cs); free(xw);
    if (yd != delta_out) free(yd);
    return rc;
}

int smolora_routed_delta_f32(
    int64_t n_tok, int64_t n_slot, int64_t n_sub, int64_t n_exp, int64_t rp, int64_t d_in, int64_t d_out,
    const int64_t *sub_row, const float *lora_a, const float *lora_b, const float *fuse_r,
    const int64_t *tok_slot, const float *tok_scale, const int64_t *tok_vu, const int64_t *tok_if,
    float *fusion, int64_t fusion_stride, int64_t min_parallel_work,
    const float *x, int64_t x_stride, float *y, int64_t y_stride)
{
    return routed_delta(0, n_tok, n_slot, n_sub, n_exp, rp, d_in, d_out, sub_row, lora_a, lora_b, fuse_r,
                        tok_slot, tok_scale, tok_vu, tok_if, fusion, fusion_stride, min_parallel_work,
                        x, x_stride, y, y_stride, NULL);
}

/* The same for bfloat16 models: lora_a, lora_b, x and y hold bfloat16 (fuse_r, tok_scale
 * and fusion stay float32). */
int smolora_routed_delta_bf16(
    int64_t n_tok, int64_t n_slot, int64_t n_sub, int64_t n_exp, int64_t rp, int64_t d_in, int64_t d_out,
    const int64_t *sub_row, const bf16_t *lora_a, const bf16_t *lora_b, const float *fuse_r,
    const int64_t *tok_slot, const float *tok_scale, const int64_t *tok_vu, const int64_t *tok_if,
    float *fusion, int64_t fusion_stride, int64_t min_parallel_work,
    const bf16_t *x, int64_t x_stride, bf16_t *y, int64_t y_stride)
{
    return routed_delta(1, n_tok, n_slot, n_sub, n_exp, rp, d_in, d_out, sub_row, lora_a, lora_b, fuse_r,
                        tok_slot, tok_scale, tok_vu, tok_if, fusion, fusion_stride, min_parallel_work,
                        x, x_stride, y, y_stride, NULL);
}

/* Weighted row sums for the prompt means: sums[row[t]] += w[t] x_t for every token t with
 * w[t] != 0 (sums [n_rows, d] is zeroed first). One pass over x without temporaries; tokens
 * are added in order, as torch's index_add_ does. Returns 0, or 2 for a row out of range. */
int smolora_row_sums_f32(int64_t n_tok, int64_t d, const float *x, int64_t x_stride,
                         const int64_t *row, const float *w, int64_t n_rows, float *sums)
{
    for (int64_t i = 0; i < n_rows * d; ++i) sums[i] = 0.0f;
    for (int64_t t = 0; t < n_tok; ++t) {
        const float wt = w[t];
        if (wt == 0.0f) continue;
        if (row[t] < 0 || row[t] >= n_rows) return 2;
        float *restrict s = sums + row[t] * d;
        const float *restrict xt = x + t * x_stride;
        for (int64_t i = 0; i < d; ++i) s[i] += wt * xt[i];
    }
    return 0;
}

/* ---- Overlap helper ---------------------------------------------------------------------
 * One thread, pinned to CPUs the caller does not compute on, that runs a layer's routed
 * delta while the caller runs the layer's base matmul:
 *
 *   smolora_helper_submit(h, ..., x)   post the job (the helper picks it up at once)
 *   <base matmul into y>               the caller's own work
 *   smolora_helper_finish(h, y)        wait for the job, then y += delta
 *
 * The helper writes the delta to its own float32 buffer, so it never touches y while the
 * caller writes it; finish adds it (bfloat16: y = bf16(y + delta), as the in-place call does).
 * If the helper has not started the job when finish is called (it was asleep or descheduled),
 * the caller runs the job itself: waiting is never longer than doing the work. Either way the
 * arithmetic is the same, so the result does not depend on which thread ran it.
 * One job at a time. The helper sleeps on a condition variable until a job is posted, so it
 * uses its CPU only while it computes (polling through a forward instead was no faster, and
 * it delayed the engine core and API process that share that CPU). It never enters OpenMP
 * (PFOR above): libgomp would bind it to the worker's CPUs.
 * The handle belongs to the process that created it (threads do not survive fork). */

enum { JOB_EMPTY, JOB_POSTED, JOB_RUNNING, JOB_DONE };

typedef struct {
    int bf16;
    int64_t n_tok, n_slot, n_sub, n_exp, rp, d_in, d_out;
    const int64_t *sub_row; const void *lora_a, *lora_b; const float *fuse_r;
    const int64_t *tok_slot; const float *tok_scale; const int64_t *tok_vu, *tok_if;
    float *fusion; int64_t fusion_stride;
    const void *x; int64_t x_stride;
    int64_t y_cols;
    int rc;
} helper_job;

typedef struct smolora_helper {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int state;
    _Atomic int sleeping;
    _Atomic int stop;
    _Atomic int64_t jobs_helper, jobs_caller;
    int64_t wait_ns, caller_ns;   /* caller side only: time finish waited for the helper / ran jobs itself */
    helper_job job;
    float *delta;
    size_t delta_cap;   /* floats */
} smolora_helper;

static void run_job(smolora_helper *h) {
    helper_job *j = &h->job;
    j->rc = routed_delta(j->bf16, j->n_tok, j->n_slot, j->n_sub, j->n_exp, j->rp, j->d_in, j->d_out, j->sub_row,
                         j->lora_a, j->lora_b, j->fuse_r, j->tok_slot, j->tok_scale, j->tok_vu, j->tok_if,
                         j->fusion, j->fusion_stride, INT64_MAX, j->x, j->x_stride, NULL, 0, h->delta);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *helper_main(void *arg) {
    smolora_helper *h = arg;
    for (;;) {
        pthread_mutex_lock(&h->mu);
        atomic_store(&h->sleeping, 1);
        while (atomic_load(&h->state) != JOB_POSTED && !atomic_load(&h->stop)) pthread_cond_wait(&h->cv, &h->mu);
        atomic_store(&h->sleeping, 0);
        pthread_mutex_unlock(&h->mu);
        if (atomic_load(&h->stop)) return NULL;
        int expected = JOB_POSTED;
        if (atomic_compare_exchange_strong(&h->state, &expected, JOB_RUNNING)) {
            run_job(h);
            atomic_fetch_add(&h->jobs_helper, 1);
            atomic_store(&h->state, JOB_DONE);
        }
    }
}

static void wake(smolora_helper *h) {
    if (atomic_load(&h->sleeping)) {
        pthread_mutex_lock(&h->mu);
        pthread_cond_signal(&h->cv);
        pthread_mutex_unlock(&h->mu);
    }
}

/* Start a helper pinned to cpus[0..n_cpus) (n_cpus 0: not pinned). NULL if it cannot start. */
smolora_helper *smolora_helper_start(const int64_t *cpus, int64_t n_cpus) {
    smolora_helper *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    if (n_cpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int64_t i = 0; i < n_cpus; ++i)
            if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET((int)cpus[i], &set);
        pthread_attr_setaffinity_np(&attr, sizeof set, &set);
    }
    const int err = pthread_create(&h->thread, &attr, helper_main, h);
    pthread_attr_destroy(&attr);
    if (err) { free(h); return NULL; }
    return h;
}

void smolora_helper_stop(smolora_helper *h) {
    if (!h) return;
    pthread_mutex_lock(&h->mu);
    atomic_store(&h->stop, 1);
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->thread, NULL);
    free(h->delta);
    free(h);
}

/* out[0..4): jobs run so far by the helper thread, jobs callers ran (finish found them not
 * started), nanoseconds callers waited in finish for the helper, nanoseconds they ran jobs. */
void smolora_helper_counts(smolora_helper *h, int64_t *out) {
    out[0] = atomic_load(&h->jobs_helper);
    out[1] = atomic_load(&h->jobs_caller);
    out[2] = h->wait_ns;
    out[3] = h->caller_ns;
}

/* Post one routed-delta job (the arguments of smolora_routed_delta_*, without y). The tensors
 * must stay alive and unchanged until smolora_helper_finish returns. Returns 0, 1 for a rank
 * above MAX_RANK, 3 when out of memory, 4 when a job is already pending. */
int smolora_helper_submit(
    smolora_helper *h, int64_t bf16, int64_t n_tok, int64_t n_slot, int64_t n_sub, int64_t n_exp, int64_t rp,
    int64_t d_in, int64_t d_out, const int64_t *sub_row, const void *lora_a, const void *lora_b, const float *fuse_r,
    const int64_t *tok_slot, const float *tok_scale, const int64_t *tok_vu, const int64_t *tok_if,
    float *fusion, int64_t fusion_stride, int64_t min_parallel_work, const void *x, int64_t x_stride)
{
    (void)min_parallel_work;  /* the helper runs single-threaded */
    if (atomic_load(&h->state) != JOB_EMPTY) return 4;
    if (rp > MAX_RANK) return 1;
    const int64_t y_cols = delta_cols(n_sub, sub_row, d_out);
    const size_t need = (size_t)(n_tok * y_cols);
    if (need > h->delta_cap) {
        float *grown = realloc(h->delta, need * sizeof *grown);
        if (!grown) return 3;
        h->delta = grown;
        h->delta_cap = need;
    }
    h->job = (helper_job){(int)bf16, n_tok, n_slot, n_sub, n_exp, rp, d_in, d_out, sub_row, lora_a, lora_b, fuse_r,
                          tok_slot, tok_scale, tok_vu, tok_if, fusion, fusion_stride, x, x_stride, y_cols, 0};
    atomic_store(&h->state, JOB_POSTED);
    wake(h);
    return 0;
}

/* Wait for the pending job (or run it here if the helper has not started it) and add its
 * delta to y (the model dtype; row stride y_stride elements). y NULL: only wait (a caller
 * abandoning the job). Returns the job's code (0 ok, see smolora_routed_delta_*), 5 if no job
 * was pending. */
int smolora_helper_finish(smolora_helper *h, void *y, int64_t y_stride) {
    int expected = JOB_POSTED;
    const int64_t t0 = now_ns();
    if (atomic_compare_exchange_strong(&h->state, &expected, JOB_RUNNING)) {
        run_job(h);
        atomic_fetch_add(&h->jobs_caller, 1);
        h->caller_ns += now_ns() - t0;
    } else if (expected == JOB_EMPTY) {
        return 5;
    } else {
        while (atomic_load_explicit(&h->state, memory_order_acquire) != JOB_DONE) {
#ifdef __x86_64__
            __builtin_ia32_pause();
#endif
        }
        h->wait_ns += now_ns() - t0;
    }
    const helper_job *j = &h->job;
    const int rc = j->rc;
    if (rc == 0 && y) add_delta_rows(j->bf16, j->n_tok, j->n_sub, j->d_out, j->sub_row, j->tok_scale, h->delta, j->y_cols, y, y_stride, 0);
    atomic_store(&h->state, JOB_EMPTY);
    return rc;
}
