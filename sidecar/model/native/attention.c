/* Decode attention on CPU: each row's one new query against that row's own keys and values in the K/V cache,
 * the CPU twin of the CUDA path's Triton kernel (model/cuda/decode_attention.py). torch's SDPA reads every row
 * up to the batch's longest (a mask hides the rest) and its flash kernel is built for long queries: at batch 8
 * and ~330 keys it took ~290 us a layer on the embedded model, where the K/V bytes take a fifth of that.
 *
 * Semantics (plain PyTorch):
 *   for b in range(B):
 *       r, n = rows[b], lens[b]
 *       for h in range(H):
 *           g = h // (H // KVH)                                  # the K/V head query head h reads (GQA)
 *           s = (q[b, h] @ k[r, g, :n].T) * scale                # float32
 *           out[b, h] = softmax(s) @ v[r, g, :n]                 # float32, rounded to bf16 once
 * q, k, v and out are bf16. A row's result depends only on its own query, keys and values, never on the batch
 * beside it. Each (row, K/V head) is one work item: its keys and values are read once for all the query heads
 * that share them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_GROUP 16  /* query heads per K/V head */
#define MAX_DIM 256   /* head dimension */

/* e^x for x <= 0 (scores less their maximum), to ~2 float32 ulps: Cody-Waite reduction x = n ln2 + r, a
 * degree-6 polynomial for e^r (Cephes' expf), 2^n from the exponent bits. Plain C so that it vectorizes
 * (libm's expf does not without -ffast-math). Below -87 the result is held at e^-87 ~ 1.6e-38 (never a
 * denormal): its weight beside the maximum's 1 is nothing in float32. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float r2 = r * r;
    float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
               + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* 1 when the kernel takes H query heads over KVH K/V heads of dimension D (else the caller keeps torch's path). */
int decode_attention_takes(int64_t H, int64_t KVH, int64_t D) {
    return KVH >= 1 && H % KVH == 0 && H / KVH <= MAX_GROUP && D <= MAX_DIM;
}

/* One (row, K/V head) item: the `group` query heads at q (D apart) against n keys and values at kb, vb (D apart);
 * results to out (D apart). always_inline, so that a constant D (64, 128) unrolls the per-key loops. */
static inline __attribute__((always_inline)) void attend(int64_t D, int64_t group, int64_t n, const uint16_t *q,
                                                         const uint16_t *kb, const uint16_t *vb, float scale,
                                                         float *scores, uint16_t *out) {
    float qf[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM], top[MAX_GROUP], total[MAX_GROUP];
    for (int64_t j = 0; j < group; j++) {
        top[j] = -INFINITY;
        for (int64_t d = 0; d < D; d++) qf[j][d] = bf16_to_f32(q[j * D + d]);
    }
    for (int64_t p = 0; p < n; p++) {  /* scores: each key read once for the group's query heads */
        float kf[MAX_DIM];
        for (int64_t d = 0; d < D; d++) kf[d] = bf16_to_f32(kb[p * D + d]);
        for (int64_t j = 0; j < group; j++) {
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) s += qf[j][d] * kf[d];
            scores[j * n + p] = s * scale;
            top[j] = fmaxf(top[j], s * scale);
        }
    }
    for (int64_t j = 0; j < group; j++) {  /* softmax weights, unnormalized */
        float *s = scores + j * n, sum = 0.0f;
        for (int64_t p = 0; p < n; p++) {
            s[p] = exp_nonpositive(s[p] - top[j]);
            sum += s[p];
        }
        total[j] = sum;
        for (int64_t d = 0; d < D; d++) acc[j][d] = 0.0f;
    }
    for (int64_t p = 0; p < n; p++) {  /* the weighted values: each value read once */
        float vf[MAX_DIM];
        for (int64_t d = 0; d < D; d++) vf[d] = bf16_to_f32(vb[p * D + d]);
        for (int64_t j = 0; j < group; j++) {
            float w = scores[j * n + p];
            for (int64_t d = 0; d < D; d++) acc[j][d] += w * vf[d];
        }
    }
    for (int64_t j = 0; j < group; j++)
        for (int64_t d = 0; d < D; d++) out[j * D + d] = f32_to_bf16(acc[j][d] / total[j]);
}

/* q: [B, H, D] at q + b * q_row_stride + h * D; k, v: element (r, g, p, d) at r * row_stride + g * head_stride
 * + p * D + d; rows, lens: int64 [B] (lens >= 1); out: [B, H, D] contiguous. Returns 0, or -1 when the shapes
 * are not ones it takes, a length is below 1, or scratch memory is short. */
int decode_attention_bf16(int64_t B, int64_t H, int64_t KVH, int64_t D, const uint16_t *q, int64_t q_row_stride,
                          const uint16_t *k, const uint16_t *v, int64_t row_stride, int64_t head_stride,
                          const int64_t *rows, const int64_t *lens, float scale, uint16_t *out) {
    if (!decode_attention_takes(H, KVH, D)) return -1;
    int64_t group = H / KVH, longest = 0;
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1) return -1;
        longest = lens[b] > longest ? lens[b] : longest;
    }
    int failed = 0;
    #pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * group * longest);  /* one item's scores, per thread */
        if (scores == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * KVH; item++) {
            if (scores == NULL) continue;
            int64_t b = item / KVH, g = item % KVH, n = lens[b];
            const uint16_t *qi = q + b * q_row_stride + g * group * D;
            const uint16_t *kb = k + rows[b] * row_stride + g * head_stride;
            const uint16_t *vb = v + rows[b] * row_stride + g * head_stride;
            uint16_t *oi = out + (b * H + g * group) * D;
            if (D == 64) attend(64, group, n, qi, kb, vb, scale, scores, oi);  /* SmolLM2, Llama 3.2 1B */
            else if (D == 128) attend(128, group, n, qi, kb, vb, scale, scores, oi);
            else attend(D, group, n, qi, kb, vb, scale, scores, oi);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
