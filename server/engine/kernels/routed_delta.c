/* SMoLoRA routed delta for a batch of tokens, float32, one CPU thread.
 *
 * For every token t (scale s_t; 0 means "no adapter": the token is skipped) and every fused
 * sublayer j, with the token's VU expert v and IF expert f in its checkpoint slot:
 *
 *   z_v = A_v x_t, z_f = A_f x_t                  (rank space, rp floats each)
 *   l_v = s_t (B_v^T fuse_vu) . z_v, l_f likewise (the fusion logits, read in rank space)
 *   (w_v, w_f) = softmax(l_v, l_f)
 *   y_t[sub j] += s_t (w_v B_v z_v + w_f B_f z_f)
 *
 * Only the two routed experts are touched, so per token the work is 2 (d_in + d_out) rp
 * multiply-adds and no weight is gathered or copied. Layouts are RoutedAdapter's buffers:
 *   lora_a [S, n_sub, E, d_in, rp]   (column r of A_e^T is contiguous per input row)
 *   lora_b [S, n_sub, E, rp, d_out]
 *   fuse_r [S, n_sub, E, rp]          (B_e^T fuse of the expert's group)
 * Fusion weights (w_vu, w_if) of token t, sublayer j go to fusion[t * fusion_stride + 2 j + {0,1}]
 * (0.5 each for tokens without adapter). The caller checks shapes, dtypes and contiguity
 * (server/engine/cpu_kernel.py).
 */
#include <math.h>
#include <stdint.h>

#define MAX_RANK 256

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }
static inline v8f splat8(float s) { return (v8f){s, s, s, s, s, s, s, s}; }

typedef float v16f __attribute__((vector_size(64)));

static inline v16f load16(const float *p) { v16f v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16f v) { __builtin_memcpy(p, &v, sizeof v); }
static inline v16f splat16(float s) { return (v16f){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

/* z = A^T x for one expert, A [d_in, rp] (row i holds the rp weights x_i meets), for rp a
 * multiple of 8 up to 32: the rp accumulators live in NV vector registers, four sets of
 * them to break the add dependency chain along d_in. */
#define DEFINE_SHRINK(NV)                                                                     \
    static void shrink_v##NV(const float *restrict x, const float *restrict a, int64_t d_in,  \
                             float *restrict z) {                                             \
        const int64_t rp = 8 * NV;                                                            \
        v8f acc[4][NV];                                                                       \
        for (int u = 0; u < 4; ++u)                                                           \
            for (int k = 0; k < NV; ++k) acc[u][k] = splat8(0.0f);                            \
        int64_t i = 0;                                                                        \
        for (; i + 4 <= d_in; i += 4)                                                         \
            for (int u = 0; u < 4; ++u) {                                                     \
                const v8f xi = splat8(x[i + u]);                                              \
                for (int k = 0; k < NV; ++k) acc[u][k] += xi * load8(a + (i + u) * rp + 8 * k); \
            }                                                                                 \
        for (; i < d_in; ++i) {                                                               \
            const v8f xi = splat8(x[i]);                                                      \
            for (int k = 0; k < NV; ++k) acc[0][k] += xi * load8(a + i * rp + 8 * k);         \
        }                                                                                     \
        for (int k = 0; k < NV; ++k) store8(z + 8 * k, (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k])); \
    }

/* out += B0^T u + B1^T v over the two routed experts, B [rp, d_out]: eight outputs at a
 * time are loaded once, get all 2 rp products in registers, and are stored once. */
#define DEFINE_EXPAND(RP)                                                                     \
    static void expand_##RP(float *restrict out, const float *restrict b0,                    \
                            const float *restrict b1, const float *restrict u,                \
                            const float *restrict v, int64_t d_out) {                         \
        int64_t o = 0;                                                                        \
        for (; o + 16 <= d_out; o += 16) {                                                    \
            v16f acc0 = load16(out + o), acc1 = splat16(0.0f);                                \
            for (int r = 0; r < RP; ++r) {                                                    \
                acc0 += splat16(u[r]) * load16(b0 + r * d_out + o);                           \
                acc1 += splat16(v[r]) * load16(b1 + r * d_out + o);                           \
            }                                                                                 \
            store16(out + o, acc0 + acc1);                                                    \
        }                                                                                     \
        for (; o + 8 <= d_out; o += 8) {                                                      \
            v8f acc0 = load8(out + o), acc1 = splat8(0.0f);                                   \
            for (int r = 0; r < RP; ++r) {                                                    \
                acc0 += splat8(u[r]) * load8(b0 + r * d_out + o);                             \
                acc1 += splat8(v[r]) * load8(b1 + r * d_out + o);                             \
            }                                                                                 \
            store8(out + o, acc0 + acc1);                                                     \
        }                                                                                     \
        for (; o < d_out; ++o) {                                                              \
            float acc = out[o];                                                               \
            for (int r = 0; r < RP; ++r) acc += u[r] * b0[r * d_out + o] + v[r] * b1[r * d_out + o]; \
            out[o] = acc;                                                                     \
        }                                                                                     \
    }

DEFINE_SHRINK(1)
DEFINE_SHRINK(2)
DEFINE_SHRINK(4)
DEFINE_EXPAND(8)
DEFINE_EXPAND(16)
DEFINE_EXPAND(32)

static void shrink_any(const float *restrict x, const float *restrict a, int64_t d_in, int64_t rp,
                       float *restrict z) {
    for (int64_t r = 0; r < rp; ++r) z[r] = 0.0f;
    for (int64_t i = 0; i < d_in; ++i) {
        const float xi = x[i];
        const float *restrict ai = a + i * rp;
        for (int64_t r = 0; r < rp; ++r) z[r] += xi * ai[r];
    }
}

static void expand_any(float *restrict out, const float *restrict b0, const float *restrict b1,
                       const float *restrict u, const float *restrict v, int64_t rp, int64_t d_out) {
    for (int64_t r = 0; r < rp; ++r) {
        const float *restrict p = b0 + r * d_out;
        const float *restrict q = b1 + r * d_out;
        for (int64_t o = 0; o < d_out; ++o) out[o] += u[r] * p[o] + v[r] * q[o];
    }
}

static void shrink(const float *restrict x, const float *restrict a, int64_t d_in, int64_t rp, float *restrict z) {
    switch (rp) {
        case 8: shrink_v1(x, a, d_in, z); break;
        case 16: shrink_v2(x, a, d_in, z); break;
        case 32: shrink_v4(x, a, d_in, z); break;
        default: shrink_any(x, a, d_in, rp, z);
    }
}

static void expand2(float *restrict out, const float *restrict b0, const float *restrict b1,
                    const float *restrict u, const float *restrict v, int64_t rp, int64_t d_out) {
    switch (rp) {
        case 8: expand_8(out, b0, b1, u, v, d_out); break;
        case 16: expand_16(out, b0, b1, u, v, d_out); break;
        case 32: expand_32(out, b0, b1, u, v, d_out); break;
        default: expand_any(out, b0, b1, u, v, rp, d_out);
    }
}

int smolora_routed_delta_f32(
    int64_t n_tok, int64_t n_sub, int64_t n_exp, int64_t rp, int64_t d_in, int64_t d_out,
    const int64_t *sub_row, const float *lora_a, const float *lora_b, const float *fuse_r,
    const float *x, int64_t x_stride, float *y, int64_t y_stride,
    const int64_t *tok_slot, const float *tok_scale, const int64_t *tok_vu, const int64_t *tok_if,
    float *fusion, int64_t fusion_stride)
{
    if (rp > MAX_RANK) return 1;
    float z[2][MAX_RANK];
    for (int64_t t = 0; t < n_tok; ++t) {
        const float s = tok_scale[t];
        float *fus = fusion + t * fusion_stride;
        if (s == 0.0f) {
            for (int64_t j = 0; j < n_sub; ++j) { fus[2 * j] = 0.5f; fus[2 * j + 1] = 0.5f; }
            continue;
        }
        const float *xt = x + t * x_stride;
        const int64_t slot = tok_slot[t];
        for (int64_t j = 0; j < n_sub; ++j) {
            const int64_t group0 = (slot * n_sub + j) * n_exp;
            const int64_t g[2] = {group0 + tok_vu[t * n_sub + j], group0 + tok_if[t * n_sub + j]};
            float logit[2];
            for (int k = 0; k < 2; ++k) {
                shrink(xt, lora_a + g[k] * d_in * rp, d_in, rp, z[k]);
                const float *f = fuse_r + g[k] * rp;
                float acc = 0.0f;
                for (int64_t r = 0; r < rp; ++r) acc += f[r] * z[k][r];
                logit[k] = s * acc;
            }
            const float w_vu = 1.0f / (1.0f + expf(logit[1] - logit[0]));
            fus[2 * j] = w_vu;
            fus[2 * j + 1] = 1.0f - w_vu;
            const float c0 = s * w_vu, c1 = s * (1.0f - w_vu);
            for (int64_t r = 0; r < rp; ++r) { z[0][r] *= c0; z[1][r] *= c1; }
            expand2(y + t * y_stride + sub_row[j] * d_out, lora_b + g[0] * rp * d_out, lora_b + g[1] * rp * d_out,
                    z[0], z[1], rp, d_out);
        }
    }
    return 0;
}
