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
 * cost down. For ranks 16 and 32, A is applied to blocks of up to four rows at once in the
 * build's native vectors (below), with as many independent multiply-add chains as the
 * registers hold. No software prefetching: the hardware prefetchers follow each expert's
 * contiguous weights.
 * Layouts are RoutedAdapter's buffers:
 *   lora_a [S, n_sub, E, d_in, rp]   (row i of A_e^T holds the rp weights x_i meets)
 *   lora_b [S, n_sub, E, rp, d_out]
 *   fuse_r [S, n_sub, E, rp]          (B_e^T fuse of the expert's group)
 * The arguments are ordered layer (shapes, weights), then step (routes, fusion buffer), then
 * call (x, y), so the caller binds the first two once per step (routed_kernel.py).
 * bfloat16 models (smolora_routed_delta_bf16): x, y, lora_a and lora_b hold bfloat16; the
 * experts are widened exactly to float32 as they are read, all arithmetic is float32 as
 * for float32 models, and each output element is rounded to bfloat16 once, after both
 * experts' contributions are summed (y = bf16(y + delta), round to nearest even). That sum
 * lives in a float32 buffer of n_tok x (max(sub_row) + 1) x d_out; routed_kernel.py splits
 * large steps into token chunks to bound it.
 * The build is ISO C11, so the compiler does not fuse multiply-adds (results do not depend
 * on whether the CPU has FMA).
 * Fusion weights (w_vu, w_if) of token t, sublayer j go to fusion[t * fusion_stride + 2 j + {0,1}]
 * (0.5 each for tokens without adapter). Calls with at least min_parallel_work multiply-adds
 * (rows x (d_in + d_out) x rp) run on the OpenMP threads: experts split over threads for
 * A, output columns for B. Built against the libgomp torch has loaded (same soname), they
 * are torch's own intra-op threads. Returns 0, or 1 for a rank above MAX_RANK, 2 for an
 * expert or slot out of range, 3 when out of memory. The caller checks shapes, dtypes and
 * contiguity (server/engine/routed_kernel.py). The overlap helper thread is overlap_helper.c.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "routed_delta.h"

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

/* The native vector `vf`: VW floats, the widest the build's instruction set has (16 with
 * AVX-512, else 8). GCC splits a generic vector wider than the hardware's into halves that
 * pass through the stack, so every loop is written in native vectors; the blockings below
 * are chosen per width so that a loop's accumulators and weights fit the register file
 * (32 vector registers with AVX-512, 16 with AVX2):
 *   SHRINK_SPLIT: independent partial sums per row along d_in in the A pass;
 *   EXPAND_RANKS: B vectors held in registers per block of output columns in the B pass
 *                 (a rank above it is applied in chunks of it; the order of the additions
 *                 into an output element is the same either way). */
#ifdef __AVX512F__
#define VW 16
#define SHRINK_SPLIT 4
#define EXPAND_RANKS 32
#else
#define VW 8
#define SHRINK_SPLIT 1
#define EXPAND_RANKS 8
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline v8f load8(const float *p) { v8f v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }
static inline v8f splat8(float s) { return (v8f){s, s, s, s, s, s, s, s}; }
static inline vf loadv(const float *p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void storev(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
static inline vf splatv(float s) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(s);
#elif defined(__AVX2__)
    return (vf)_mm256_set1_ps(s);
#else
    vf v;
    for (int k = 0; k < VW; ++k) v[k] = s;
    return v;
#endif
}

/* bfloat16: the top 16 bits of a float32. Widening is exact (a shift); narrowing rounds to
 * nearest even and keeps NaNs quiet NaNs (as torch does). */
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

static inline float widen1(bf16_t h) { const uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, sizeof f); return f; }
static inline vf widenv(const bf16_t *p) {
    /* one zero-extending load and a shift (a generic conversion splits it in halves) */
#if defined(__AVX512F__)
    const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__)
    const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    vh h; memcpy(&h, p, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
#endif
    vf f; memcpy(&f, &u, sizeof f); return f;
}
static inline vu splatv_u32(uint32_t s) {
    vu v;
    for (int k = 0; k < VW; ++k) v[k] = s;
    return v;
}
static inline void narrowv(bf16_t *p, vf v) {
    vu u; memcpy(&u, &v, sizeof u);
    const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vu nan = (vu)((vi)(u & 0x7fffffffu) > (vi)splatv_u32(0x7f800000u));
    const vu out = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    const vh h = __builtin_convertvector(out, vh);
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
static inline vf wloadv_f32(const float *p) { return loadv(p); }
static inline vf wloadv_bf16(const bf16_t *p) { return widenv(p); }
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

#if SHRINK_SPLIT == 4
#define SPLIT_SUM(p) (((p)[0] + (p)[1]) + ((p)[2] + (p)[3]))
#elif SHRINK_SPLIT == 2
#define SPLIT_SUM(p) ((p)[0] + (p)[1])
#else
#define SPLIT_SUM(p) ((p)[0])
#endif

/* z = A^T x for TB rows of one group at once, for rank RANK (RANK / VW vectors per row of
 * A): A is read once per block of rows. Each row keeps the same SHRINK_SPLIT partial sums
 * along d_in whatever TB is (bit-identical), so the block size only changes how many
 * independent multiply-add chains are in flight. */
#define DEFINE_SHRINK_ROWS(W, RANK, TB)                                                       \
    static void shrink_r##RANK##_##W##_##TB(const float *const *xs, const wt_##W *restrict a, \
                                            int64_t d_in, float *const *zs) {                 \
        enum { NV = RANK / VW };                                                              \
        vf acc[TB][NV][SHRINK_SPLIT];                                                         \
        for (int t = 0; t < TB; ++t)                                                          \
            for (int k = 0; k < NV; ++k)                                                      \
                for (int u = 0; u < SHRINK_SPLIT; ++u) acc[t][k][u] = splatv(0.0f);           \
        int64_t i = 0;                                                                        \
        for (; i + SHRINK_SPLIT <= d_in; i += SHRINK_SPLIT)                                   \
            for (int u = 0; u < SHRINK_SPLIT; ++u) {                                          \
                vf ak[NV];                                                                    \
                for (int k = 0; k < NV; ++k) ak[k] = wloadv_##W(a + (i + u) * RANK + VW * k); \
                for (int t = 0; t < TB; ++t) {                                                \
                    const vf xi = splatv(xs[t][i + u]);                                       \
                    for (int k = 0; k < NV; ++k) acc[t][k][u] += xi * ak[k];                  \
                }                                                                             \
            }                                                                                 \
        for (; i < d_in; ++i) {                                                               \
            vf ak[NV];                                                                        \
            for (int k = 0; k < NV; ++k) ak[k] = wloadv_##W(a + i * RANK + VW * k);           \
            for (int t = 0; t < TB; ++t) {                                                    \
                const vf xi = splatv(xs[t][i]);                                               \
                for (int k = 0; k < NV; ++k) acc[t][k][0] += xi * ak[k];                      \
            }                                                                                 \
        }                                                                                     \
        for (int t = 0; t < TB; ++t)                                                          \
            for (int k = 0; k < NV; ++k) storev(zs[t] + VW * k, SPLIT_SUM(acc[t][k]));        \
    }

/* For the rows of one expert group: out_i += B^T c_i, B [rp, d_out], c_i the row's scaled
 * z. VW outputs at a time; up to EXPAND_RANKS B vectors of that block stay in registers
 * across the group's rows, so B is read once per call. */
#define DEFINE_EXPAND_ROWS(W, RP)                                                             \
    static void expand_rows_##W##_##RP(float *const *outs, const float *const *cs, int64_t nrows, \
                                       const wt_##W *restrict b, int64_t d_out, int64_t o0, int64_t o1) { \
        enum { RC = RP < EXPAND_RANKS ? RP : EXPAND_RANKS };                                  \
        int64_t o = o0;                                                                       \
        for (; o + VW <= o1; o += VW)                                                         \
            for (int r0 = 0; r0 < RP; r0 += RC) {                                             \
                vf bb[RC];                                                                    \
                for (int r = 0; r < RC; ++r) bb[r] = wloadv_##W(b + (r0 + r) * d_out + o);    \
                for (int64_t i = 0; i < nrows; ++i) {                                         \
                    const float *c = cs[i] + r0;                                              \
                    vf acc = loadv(outs[i] + o);                                              \
                    for (int r = 0; r < RC; ++r) acc += splatv(c[r]) * bb[r];                 \
                    storev(outs[i] + o, acc);                                                 \
                }                                                                             \
            }                                                                                 \
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
            for (; i + 4 <= n; i += 4) shrink_r16_##W##_4(xs + i, a, d_in, zs + i);           \
            switch (n - i) {                                                                  \
                case 3: shrink_r16_##W##_3(xs + i, a, d_in, zs + i); break;                   \
                case 2: shrink_r16_##W##_2(xs + i, a, d_in, zs + i); break;                   \
                case 1: shrink_r16_##W##_1(xs + i, a, d_in, zs + i); break;                   \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        if (rp == 32) {                                                                       \
            for (; i + 2 <= n; i += 2) shrink_r32_##W##_2(xs + i, a, d_in, zs + i);           \
            if (i < n) shrink_r32_##W##_1(xs + i, a, d_in, zs + i);                           \
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
    DEFINE_SHRINK_ROWS(W, 16, 1)                                                              \
    DEFINE_SHRINK_ROWS(W, 16, 2)                                                              \
    DEFINE_SHRINK_ROWS(W, 16, 3)                                                              \
    DEFINE_SHRINK_ROWS(W, 16, 4)                                                              \
    DEFINE_SHRINK_ROWS(W, 32, 1)                                                              \
    DEFINE_SHRINK_ROWS(W, 32, 2)                                                              \
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
        for (; i + VW <= d; i += VW) storev(ot + i, widenv(xt + i));
        for (; i < d; ++i) ot[i] = widen1(xt[i]);
    }
}

/* Columns of a token's delta row: the adapted sublayers' output rows, up to the last one. */
int64_t delta_cols(int64_t n_sub, const int64_t *sub_row, int64_t d_out) {
    int64_t rows = 0;
    for (int64_t j = 0; j < n_sub; ++j) rows = sub_row[j] + 1 > rows ? sub_row[j] + 1 : rows;
    return rows * d_out;
}

/* y[t, sub j] += delta[t, sub j] for the tokens with an adapter, delta float32 [n_tok, y_cols]
 * (bf16: y = bf16(y + delta), rounded once, to nearest even). */
void add_delta_rows(int bf16, int64_t n_tok, int64_t n_sub, int64_t d_out, const int64_t *sub_row,
                           const float *tok_scale, const float *delta, int64_t y_cols, void *y_out, int64_t y_stride,
                           int parallel) {
    PFOR(parallel, "omp parallel for", t, n_tok,
        if (tok_scale[t] == 0.0f) continue;
        for (int64_t j = 0; j < n_sub; ++j) {
            const float *dt = delta + t * y_cols + sub_row[j] * d_out;
            int64_t o = 0;
            if (bf16) {
                bf16_t *yt = (bf16_t *)y_out + t * y_stride + sub_row[j] * d_out;
                for (; o + VW <= d_out; o += VW) narrowv(yt + o, widenv(yt + o) + loadv(dt + o));
                for (; o < d_out; ++o) yt[o] = narrow1(widen1(yt[o]) + dt[o]);
            } else {
                float *yt = (float *)y_out + t * y_stride + sub_row[j] * d_out;
                for (; o + VW <= d_out; o += VW) storev(yt + o, loadv(yt + o) + loadv(dt + o));
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

int routed_delta(
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

