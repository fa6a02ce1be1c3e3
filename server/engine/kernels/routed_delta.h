/* Shared by the kernel's two translation units: the routed delta (routed_delta.c, the math)
 * and the overlap helper thread that runs it beside the base matmul (overlap_helper.c).
 * Hidden: the shared object exports only the smolora_* entry points. */
#ifndef SMOLORA_ROUTED_DELTA_H
#define SMOLORA_ROUTED_DELTA_H

#include <stdint.h>

#define MAX_RANK 256

typedef uint16_t bf16_t;

#define SMOLORA_INTERNAL __attribute__((visibility("hidden")))

/* The routed delta of n_tok tokens (the arguments of smolora_routed_delta_f32/_bf16, with
 * bf16 choosing the dtype). delta_out non-NULL: the delta is written there (float32
 * [n_tok, delta_cols(...)], zeroed first) instead of being added to y_out. */
SMOLORA_INTERNAL int routed_delta(
    int bf16, int64_t n_tok, int64_t n_slot, int64_t n_sub, int64_t n_exp, int64_t rp, int64_t d_in, int64_t d_out,
    const int64_t *sub_row, const void *lora_a, const void *lora_b, const float *fuse_r,
    const int64_t *tok_slot, const float *tok_scale, const int64_t *tok_vu, const int64_t *tok_if,
    float *fusion, int64_t fusion_stride, int64_t min_parallel_work,
    const void *x_in, int64_t x_stride, void *y_out, int64_t y_stride, float *delta_out);

/* Columns of a token's delta row: the adapted sublayers' output rows, up to the last one. */
SMOLORA_INTERNAL int64_t delta_cols(int64_t n_sub, const int64_t *sub_row, int64_t d_out);

/* y[t, sub j] += delta[t, sub j] for the tokens with an adapter (bf16: rounded once). */
SMOLORA_INTERNAL void add_delta_rows(int bf16, int64_t n_tok, int64_t n_sub, int64_t d_out, const int64_t *sub_row,
                                     const float *tok_scale, const float *delta, int64_t y_cols, void *y_out,
                                     int64_t y_stride, int parallel);

#endif
