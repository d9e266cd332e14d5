/* Multi-LoRA decode delta on CPU: each batch row reads only its own adapter (BGMV), where the
 * adapter lies: no stacked copy of the resident adapters.
 *
 * Semantics (plain PyTorch; the adapters as sidecar/model/lora.LoraAdapter holds them):
 *   for n in range(N):
 *       s = row_slot[n]
 *       if s < 0: continue
 *       for j in range(parts):
 *           r = rank[s, j]                                     # 0: part j is not targeted
 *           a = A[s][first[s, j] : first[s, j] + r]            # [r, in]: the slot's stacked A rows
 *           b = B[s, j]                                        # [r, out_j]: B_j transposed
 *           y[n, lo_j : lo_j + out_j] += (a @ x[n]) @ b
 * x, y, A and B are bfloat16; products and sums are float32; y is rounded back once.
 * Eager PyTorch has no gather-free kernel for this: it either multiplies every row by every
 * resident adapter and masks, or copies each row's weights. Here the arithmetic and the weight
 * reads are exactly one adapter per row, at its own rank.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_PARTS 3
#define MAX_RANK 256
#define MAX_OUT 65536

/* Returns 0, or -1 when a size is beyond the fixed scratch limits (the caller falls back). */
int lora_bgmv_bf16(int64_t n_rows, int64_t in, const uint16_t *x, int64_t x_stride,
                   uint16_t *y, int64_t y_stride, const int64_t *row_slot, int64_t num_slots,
                   int64_t parts, const uint16_t *const *A, const int64_t *first, const int64_t *rank,
                   const uint16_t *const *B, const int64_t *part_out) {
    if (parts > MAX_PARTS) return -1;
    for (int64_t i = 0; i < num_slots * parts; i++)
        if (rank[i] > MAX_RANK) return -1;
    int64_t lo[MAX_PARTS], total = 0;
    for (int64_t j = 0; j < parts; j++) {
        lo[j] = total;
        total += part_out[j];
    }
    if (total > MAX_OUT) return -1;

    /* One work item per (row, part): shrink the row through the part's A, then expand into y.
     * Items of different parts write disjoint columns, so they run in parallel safely. */
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_rows * parts; item++) {
        int64_t n = item / parts, j = item % parts, s = row_slot[n];
        if (s < 0) continue;
        int64_t r = rank[s * parts + j];
        if (r == 0) continue;  /* a part this adapter does not target */
        float xf[in], t[MAX_RANK], acc[part_out[j]];
        const uint16_t *xr = x + n * x_stride;
        for (int64_t i = 0; i < in; i++) xf[i] = bf16_to_f32(xr[i]);

        const uint16_t *a = A[s] + first[s * parts + j] * in;
        for (int64_t k = 0; k < r; k++) {
            const uint16_t *ak = a + k * in;
            float sum = 0.0f;
            for (int64_t i = 0; i < in; i++) sum += bf16_to_f32(ak[i]) * xf[i];
            t[k] = sum;
        }

        int64_t out = part_out[j];
        uint16_t *yr = y + n * y_stride + lo[j];
        for (int64_t c = 0; c < out; c++) acc[c] = bf16_to_f32(yr[c]);
        const uint16_t *b = B[s * parts + j];
        for (int64_t k = 0; k < r; k++) {
            const uint16_t *bk = b + k * out;
            float tk = t[k];
            for (int64_t c = 0; c < out; c++) acc[c] += tk * bf16_to_f32(bk[c]);
        }
        for (int64_t c = 0; c < out; c++) yr[c] = f32_to_bf16(acc[c]);
    }
    return 0;
}
