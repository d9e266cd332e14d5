/* Quantized weight matrices times bf16 activations on CPU, the way llama.cpp multiplies GGUF blocks: the
 * activations are rounded per group of 32 to int8 (absmax / 127) so that each group's products are one
 * integer dot product (VNNI's dpbusd, or AVX2's maddubs + madd), scaled in float32 afterwards. Integer
 * products make batch 1 bandwidth-bound and batch 8 cheap (the unpacked codes serve every row of a tile).
 *
 * int4_gemm: grouped 4-bit weights, semantics in plain PyTorch:
 *   W = scale.repeat_interleave(32, 1) * q - low.repeat_interleave(32, 1)    # [N, K], float32
 *   y = x @ W.T                                                               # [M, N]
 *   q: 4-bit codes 0..15 in groups of 32 along K, 16 bytes a group: byte j holds element j in its low nibble
 *   and element j + 16 in its high one (GGML's Q4_0 / Q4_1 / Q4_K sub-block order, so a GGUF block is copied,
 *   not re-packed); scale, low: float32 [N, K / 32]. W is exactly what gguf-py dequantizes.
 *   Computed as sum_g xs[g] * (scale[g] * (q . xq) - low[g] * sum(xq)): W times the rounded activations
 *   exactly (up to float sums). The low term must use the same rounded values, or the large scale * q and
 *   low terms stop cancelling (1.9% of the output's norm on a Q4_0 test matrix with the exact float sum, 0.57%
 *   with the rounded one).
 *
 * q4_k_gemm: GGUF Q4_K blocks as stored (4.5 bits a weight where int4_gemm's float32 scale and low take 6),
 *   144 bytes per 256 values: f16 d, f16 dmin, 12 bytes of 6-bit (sc, m) pairs for the eight 32-value
 *   sub-blocks, 128 bytes of nibbles (bytes 32j..32j+31: sub-block 2j in the low nibbles, 2j + 1 in the high);
 *   w = (d * sc) * q - (dmin * m), both products exact in float32.
 *
 * q8_0_gemm: GGUF Q8_0 blocks as stored, 34 bytes per 32 values: f16 d, 32 int8 codes; w = d * q. The
 *   products take |q| as the unsigned operand and the activation times sign(q) as the signed one (so
 *   AVX2's maddubs cannot saturate: 2 * 128 * 127 < 2^15).
 *
 * q6_k_gemm: GGUF Q6_K blocks as stored (no repacking, nothing lost), 210 bytes per 256 values:
 *   ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per 16 values), f16 d;
 *   w = d * scale[j] * (q - 32), q 0..63, laid out as ggml's dequantize_row_q6_K reads them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define GROUP 32
#define PAIR 64      /* two 4-bit groups: one 32-byte load of codes, one 8-lane vector of products */
#define ROW_TILE 8   /* activation rows that share one unpack of a weight row's codes */
#define QK_K 256
#define Q4_K_BYTES 144
#define Q6_K_BYTES 210
#define Q8_0_BYTES 34

const char *quant_gemm_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx512-vnni";
#elif defined(__AVXVNNI__)
    return "avx-vnni";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

static inline float f16_to_f32(uint16_t h) {  /* IEEE half, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) u = sign;
    else {
        float f = (float)man * 0x1p-24f;  /* exact: man < 2^10 */
        return (h & 0x8000u) ? -f : f;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void store(void *y, int y_bf16, int64_t at, float v) {
    if (y_bf16) ((uint16_t *)y)[at] = f32_to_bf16(v);
    else ((float *)y)[at] = v;
}

/* Activation row n of M -> int8 codes, and per group of 32 its scale xs and xs * sum(codes). The codes are
 * stored group-major, [group][row][32], so that the rows of a tile lie at constant offsets from one pointer.
 * `paired` stores each pair of groups as one 64-byte unit [pair][row][64] in the order 4-bit codes unpack to:
 * [g0 e0-15, g1 e0-15, g0 e16-31, g1 e16-31] (a lone last group keeps its own order). */
static void quantize_row(const void *x, int x_bf16, int64_t K, int64_t M, int64_t n, int paired, int8_t *q,
                         float *xs, float *sums) {
    int64_t G = K / GROUP;
    for (int64_t g = 0; g < G; g++) {
        float v[GROUP], amax = 0.0f;
        for (int j = 0; j < GROUP; j++) {
            int64_t i = g * GROUP + j;
            v[j] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
            amax = fmaxf(amax, fabsf(v[j]));
        }
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int in_pair = paired && g / 2 * 2 + 1 < G, second = g % 2;
        int8_t *dst = paired ? q + (g / 2 * M + n) * PAIR : q + (g * M + n) * GROUP;
        int32_t sum = 0;
        for (int j = 0; j < GROUP; j++) {
            float r = rintf(v[j] * inv);
            int8_t c = (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
            dst[in_pair ? (j < 16 ? j : j + 16) + 16 * second : j] = c;
            sum += c;
        }
        xs[g * M + n] = d;
        sums[n * G + g] = d * (float)sum;
    }
}

/* The activations of one call, rounded once for every weight row. */
typedef struct {
    int8_t *q;      /* [G, M, 32], or int4's [pairs, M, 64] */
    float *xs;      /* [G, M] */
    float *sums;    /* [M, G] */
    float *lanes;   /* int4: [pairs, M, 8], each pair's two scales spread over its 8 product lanes */
    int32_t *init;  /* q6_k: [G, M, 8], -32 * (sum of each 4 codes): dpbusd's start, for the "- 32" */
} Rounded;

static void free_rounded(Rounded *r) {
    free(r->q);  /* one allocation holds every array */
}

/* One allocation for every array: a decode step calls this ~100 times, and each malloc shows at batch 1. */
static int round_activations(int64_t M, int64_t K, const void *x, int64_t x_stride, int x_bf16, int paired,
                             int32_t zero_point, Rounded *r) {
    int64_t G = K / GROUP, pairs = (G + 1) / 2;
    size_t q_bytes = (size_t)((paired ? pairs * PAIR : K) * M), floats = (size_t)(M * G);
    size_t lane_floats = paired ? (size_t)(M * pairs * 8) : 0, init_ints = zero_point ? (size_t)(M * G * 8) : 0;
    size_t q_room = (q_bytes + 63) / 64 * 64;  /* keep the float arrays aligned */
    char *block = malloc(q_room + sizeof(float) * (2 * floats + lane_floats) + sizeof(int32_t) * init_ints);
    if (!block) return -1;
    r->q = (int8_t *)block;
    r->xs = (float *)(block + q_room);
    r->sums = r->xs + floats;
    r->lanes = paired ? r->sums + floats : NULL;
    r->init = zero_point ? (int32_t *)(r->sums + floats + lane_floats) : NULL;
    size_t item = x_bf16 ? 2 : 4;
    /* a decode step's few rows are rounded in microseconds: a thread team would cost more than it saves */
    #pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t n = 0; n < M; n++) {
        quantize_row((const char *)x + n * x_stride * item, x_bf16, K, M, n, paired, r->q, r->xs, r->sums);
        for (int64_t p = 0; paired && p < pairs; p++)
            for (int l = 0; l < 8; l++) {
                int64_t g = 2 * p + l / 4 < G ? 2 * p + l / 4 : 2 * p;
                r->lanes[(p * M + n) * 8 + l] = r->xs[g * M + n];
            }
        for (int64_t g = 0; zero_point && g < G; g++) {
            const int8_t *q = r->q + (g * M + n) * GROUP;
            for (int l = 0; l < 8; l++)
                r->init[(g * M + n) * 8 + l] = -zero_point * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
        }
    }
    return 0;
}

static inline int row_tile(int64_t left) {
    return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

/* Q4_K: a block's d and dmin, and its eight 6-bit sub-block scales (sc) and mins (m) as bytes. The 12 bytes hold, per
 * 32-bit word: w0 = sc0-3 low 6 bits (+ sc4-7's top 2), w1 = m0-3 (+ m4-7's top 2), w2 = sc4-7 low 4 bits and
 * m4-7 low 4 bits in the high nibbles (gguf-py's Q4_K.get_scale_min, 32 bits at a time). */
static inline void q4_k_header(const uint8_t *blk, uint8_t sc[8], uint8_t m[8], float *d, float *dmin) {
    uint16_t d_bits[2];
    memcpy(d_bits, blk, 4);
    *d = f16_to_f32(d_bits[0]);
    *dmin = f16_to_f32(d_bits[1]);
    uint32_t w[3], out[4];
    memcpy(w, blk + 4, 12);
    out[0] = w[0] & 0x3f3f3f3fu;
    out[1] = (w[2] & 0x0f0f0f0fu) | (((w[0] >> 6) & 0x03030303u) << 4);
    out[2] = w[1] & 0x3f3f3f3fu;
    out[3] = ((w[2] >> 4) & 0x0f0f0f0fu) | (((w[1] >> 6) & 0x03030303u) << 4);
    memcpy(sc, out, 8);
    memcpy(m, out + 2, 8);
}

#if defined(__AVX2__)
static inline __m256i dpbusd(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    /* pairs of (u6, or Q8_0's |q| <= 128) * s8 stay within int16 (2 * 128 * 127), so maddubs never saturates */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc[t] += the products of one pair of 4-bit groups (codes `first`, `second` in pair order) with R rows of
 * paired activations, scaled by the weights' and each row's lane scales. */
static inline __attribute__((always_inline)) void pair_rows(int R, __m256i first, __m256i second, __m256 w_scale,
                                                           const int8_t *x, const float *lane_scale, __m256 *acc) {
    for (int t = 0; t < R; t++) {
        __m256i prod = dpbusd(_mm256_setzero_si256(), first, _mm256_loadu_si256((const __m256i *)(x + t * PAIR)));
        prod = dpbusd(prod, second, _mm256_loadu_si256((const __m256i *)(x + t * PAIR + 32)));
        __m256 s = _mm256_mul_ps(w_scale, _mm256_loadu_ps(lane_scale + t * 8));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), s, acc[t]);
    }
}

/* dots[t] = sum_g xs[t][g] * scale[g] * (q_g . xq[t]_g) for R activation rows against one weight row. xq and
 * lane_scale point at the tile's first row in the group-major layouts (Rounded); M is the rows of the call. */
static inline __attribute__((always_inline)) void int4_dots(int R, int64_t G, const uint8_t *codes,
                                                           const float *scale, const int8_t *xq, int64_t M,
                                                           const float *lane_scale, float *dots) {
    const __m256i mask = _mm256_set1_epi8(0x0F), spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc[ROW_TILE];
    for (int t = 0; t < R; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t p = 0; p < G / 2; p++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(codes + p * (PAIR / 2)));
        __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        __m128 two = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(scale + 2 * p)));
        __m256 w_scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), spread);
        const int8_t *x = xq + p * M * PAIR;
        const float *ls = lane_scale + p * M * 8;
        pair_rows(R, lo, hi, w_scale, x, ls, acc);
    }
    for (int t = 0; t < R; t++) dots[t] = hsum(acc[t]);
    if (G % 2) {  /* a lone last group, in element order */
        int64_t g = G - 1;
        __m128i v = _mm_loadu_si128((const __m128i *)(codes + g * (GROUP / 2))), m = _mm_set1_epi8(0x0F);
        __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
        for (int t = 0; t < R; t++) {
            __m256i prod = dpbusd(_mm256_setzero_si256(), w,
                                  _mm256_loadu_si256((const __m256i *)(xq + (g / 2 * M + t) * PAIR)));
            dots[t] += hsum(_mm256_cvtepi32_ps(prod)) * (scale[g] * lane_scale[(g / 2 * M + t) * 8]);
        }
    }
}

/* Q6_K: the 32 codes (0..63) of part i (0..3) of a 128-value half-block, in element order. */
static inline __m256i q6_k_codes(int i, __m256i ql0, __m256i ql1, __m256i qh) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), high2 = _mm256_set1_epi8(0x30);
    __m256i ql = i % 2 ? ql1 : ql0;
    __m256i lo = i < 2 ? _mm256_and_si256(ql, low4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4);
    __m256i hi = i == 0 ? _mm256_slli_epi16(qh, 4) : i == 1 ? _mm256_slli_epi16(qh, 2)
               : i == 2 ? qh : _mm256_srli_epi16(qh, 2);
    return _mm256_or_si256(lo, _mm256_and_si256(hi, high2));
}

/* dots[t] = W_row . x[t] for R activation rows against one row of Q6_K blocks (layouts as in int4_dots). */
static inline __attribute__((always_inline)) void q6_k_dots(int R, int64_t K, const uint8_t *blocks,
                                                           const int8_t *xq, const float *xs, const int32_t *init,
                                                           int64_t M, float *dots) {
    __m256 acc[ROW_TILE];
    for (int t = 0; t < R; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK_K; b++) {
        const uint8_t *blk = blocks + b * Q6_K_BYTES;
        uint16_t d_bits;
        memcpy(&d_bits, blk + 208, 2);
        __m256 d = _mm256_set1_ps(_cvtsh_ss(d_bits));
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            /* d * scale for the half's eight 16-value groups (exact in float32: 11 + 8 bits) */
            __m256 scales = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64((const __m128i *)(blk + 192 + 8 * h)))));
            #pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {  /* unrolled: each part's shifts and lane pattern are constants */
                __m256i w = q6_k_codes(i, ql0, ql1, qh);
                /* part i's lanes 0-3 hold its first 16 values (scale 2i), lanes 4-7 the next 16 (2i + 1) */
                __m256 w_scale = _mm256_permutevar8x32_ps(
                    scales, _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1));
                int64_t g = b * (QK_K / GROUP) + h * 4 + i;
                const int8_t *x = xq + g * M * GROUP;
                const int32_t *start = init + g * M * 8;
                const float *x_scale = xs + g * M;
                for (int t = 0; t < R; t++) {
                    __m256i prod = dpbusd(_mm256_loadu_si256((const __m256i *)(start + t * 8)), w,
                                          _mm256_loadu_si256((const __m256i *)(x + t * GROUP)));
                    __m256 s = _mm256_mul_ps(w_scale, _mm256_set1_ps(x_scale[t]));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), s, acc[t]);
                }
            }
        }
    }
    for (int t = 0; t < R; t++) dots[t] = hsum(acc[t]);
}
/* dots[t] = W_row . x[t] for R activation rows against one row of Q4_K blocks: activations in int4's paired
 * layout; sums row-major [M, G] from the tile's first row. */
static inline __attribute__((always_inline)) void q4_k_dots(int R, int64_t K, const uint8_t *blocks,
                                                           const int8_t *xq, const float *lane_scale,
                                                           const float *sums, int64_t M, float *dots) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    int64_t G = K / GROUP;
    __m256 acc[ROW_TILE], minus[ROW_TILE];
    for (int t = 0; t < R; t++) acc[t] = minus[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK_K; b++) {
        const uint8_t *blk = blocks + b * Q4_K_BYTES;
        uint8_t sc[8], m[8];
        float d, dmin;
        q4_k_header(blk, sc, m, &d, &dmin);
        /* d * sc and dmin * m for the eight sub-blocks: exact in float32 (11 + 6 bits) */
        __m256 scales = _mm256_mul_ps(_mm256_set1_ps(d),
                                      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc))));
        __m256 lows = _mm256_mul_ps(_mm256_set1_ps(dmin),
                                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)m))));
        for (int t = 0; t < R; t++)
            minus[t] = _mm256_fmadd_ps(lows, _mm256_loadu_ps(sums + t * G + b * 8), minus[t]);
        #pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {  /* sub-blocks 2j (low nibbles) and 2j + 1 (high), as one pair */
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
            __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            /* to int4's pair order: [2j e0-15, 2j+1 e0-15] and [2j e16-31, 2j+1 e16-31] */
            __m256i first = _mm256_permute2x128_si256(lo, hi, 0x20), second = _mm256_permute2x128_si256(lo, hi, 0x31);
            __m256 w_scale = _mm256_permutevar8x32_ps(
                scales, _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1));
            int64_t pair = b * 4 + j;
            const int8_t *x = xq + pair * M * PAIR;
            const float *ls = lane_scale + pair * M * 8;
            pair_rows(R, first, second, w_scale, x, ls, acc);
        }
    }
    for (int t = 0; t < R; t++) dots[t] = hsum(acc[t]) - hsum(minus[t]);
}
/* dots[t] = W_row . x[t] for R activation rows against one row of Q8_0 blocks (activations in element order). */
static inline __attribute__((always_inline)) void q8_0_dots(int R, int64_t K, const uint8_t *blocks,
                                                           const int8_t *xq, const float *xs, int64_t M, float *dots) {
    __m256 acc[ROW_TILE];
    for (int t = 0; t < R; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / GROUP; g++) {
        const uint8_t *blk = blocks + g * Q8_0_BYTES;
        uint16_t d_bits;
        memcpy(&d_bits, blk, 2);
        float d = _cvtsh_ss(d_bits);
        __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2)), magnitude = _mm256_sign_epi8(w, w);
        const int8_t *x = xq + g * M * GROUP;
        const float *x_scale = xs + g * M;
        for (int t = 0; t < R; t++) {
            __m256i signed_x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x + t * GROUP)), w);
            __m256i prod = dpbusd(_mm256_setzero_si256(), magnitude, signed_x);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(d * x_scale[t]), acc[t]);
        }
    }
    for (int t = 0; t < R; t++) dots[t] = hsum(acc[t]);
}
#else
static inline void int4_dots(int R, int64_t G, const uint8_t *codes, const float *scale, const int8_t *xq,
                             int64_t M, const float *lane_scale, float *dots) {
    for (int t = 0; t < R; t++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *c = codes + g * (GROUP / 2);
            const int8_t *x = xq + (g / 2 * M + t) * PAIR;
            int in_pair = g / 2 * 2 + 1 < G, second = g % 2;
            int32_t isum = 0;
            for (int j = 0; j < GROUP; j++) {
                int code = j < 16 ? c[j] & 0x0F : c[j - 16] >> 4;
                isum += code * x[in_pair ? (j < 16 ? j : j + 16) + 16 * second : j];
            }
            acc += (float)isum * (scale[g] * lane_scale[(g / 2 * M + t) * 8 + 4 * second]);
        }
        dots[t] = acc;
    }
}

static inline void q6_k_dots(int R, int64_t K, const uint8_t *blocks, const int8_t *xq, const float *xs,
                             const int32_t *init, int64_t M, float *dots) {
    (void)init;
    for (int t = 0; t < R; t++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < K / QK_K; b++) {
            const uint8_t *blk = blocks + b * Q6_K_BYTES;
            uint16_t d_bits;
            memcpy(&d_bits, blk + 208, 2);
            float d = f16_to_f32(d_bits);
            for (int64_t e = 0; e < QK_K; e += 16) {  /* one 16-value group */
                int h = (int)(e / 128), i = (int)(e % 128) / 32, l0 = (int)(e % 32);
                int32_t isum = 0;
                for (int l = l0; l < l0 + 16; l++) {
                    int ql = blk[64 * h + l + 32 * (i % 2)], qh = blk[128 + 32 * h + l];
                    int code = (i < 2 ? ql & 0x0F : ql >> 4) | (((qh >> (2 * i)) & 3) << 4);
                    int64_t at = b * QK_K + e + (l - l0);  /* element index; its group is at / 32 */
                    isum += (code - 32) * xq[(at / GROUP * M + t) * GROUP + at % GROUP];
                }
                float scale = d * (float)(int8_t)blk[192 + 8 * h + 2 * i + l0 / 16];
                acc += (float)isum * (scale * xs[(b * QK_K + e) / GROUP * M + t]);
            }
        }
        dots[t] = acc;
    }
}
static inline void q4_k_dots(int R, int64_t K, const uint8_t *blocks, const int8_t *xq, const float *lane_scale,
                             const float *sums, int64_t M, float *dots) {
    int64_t G = K / GROUP;
    for (int t = 0; t < R; t++) {
        float acc = 0.0f, minus = 0.0f;
        for (int64_t b = 0; b < K / QK_K; b++) {
            const uint8_t *blk = blocks + b * Q4_K_BYTES;
            uint8_t sc[8], m[8];
            float d, dmin, scale[8], low[8];
            q4_k_header(blk, sc, m, &d, &dmin);
            for (int g = 0; g < 8; g++) scale[g] = d * (float)sc[g], low[g] = dmin * (float)m[g];
            for (int g = 0; g < 8; g++) {
                int64_t pair = b * 4 + g / 2, second = g % 2;
                const int8_t *x = xq + (pair * M + t) * PAIR;
                int32_t isum = 0;
                for (int e = 0; e < GROUP; e++) {
                    int code = (blk[16 + 32 * (g / 2) + e] >> (4 * second)) & 0x0F;
                    isum += code * x[(e < 16 ? e : e + 16) + 16 * second];
                }
                acc += (float)isum * (scale[g] * lane_scale[(pair * M + t) * 8 + 4 * second]);
                minus += low[g] * sums[t * G + b * 8 + g];
            }
        }
        dots[t] = acc - minus;
    }
}
static inline void q8_0_dots(int R, int64_t K, const uint8_t *blocks, const int8_t *xq, const float *xs,
                             int64_t M, float *dots) {
    for (int t = 0; t < R; t++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < K / GROUP; g++) {
            const uint8_t *blk = blocks + g * Q8_0_BYTES;
            uint16_t d_bits;
            memcpy(&d_bits, blk, 2);
            int32_t isum = 0;
            for (int j = 0; j < GROUP; j++) isum += (int8_t)blk[2 + j] * xq[(g * M + t) * GROUP + j];
            acc += (float)isum * (f16_to_f32(d_bits) * xs[g * M + t]);
        }
        dots[t] = acc;
    }
}
#endif

typedef enum { INT4_GROUPS, Q4_K_BLOCKS, Q6_K_BLOCKS, Q8_0_BLOCKS } Kind;

/* One weight row against R activation rows (R a constant where this expands, so the loops unroll). */
#define ROW_DOTS(R)                                                                                         \
    do {                                                                                                    \
        if (kind == INT4_GROUPS) int4_dots(R, G, w + o * (K / 2), scale + o * G, xq, M, lanes, dots);       \
        else if (kind == Q4_K_BLOCKS) q4_k_dots(R, K, w + o * row_bytes, xq, lanes, sums, M, dots);         \
        else if (kind == Q6_K_BLOCKS) q6_k_dots(R, K, w + o * row_bytes, xq, r.xs + n0, r.init + n0 * 8, M, dots); \
        else q8_0_dots(R, K, w + o * row_bytes, xq, r.xs + n0, M, dots);                                     \
    } while (0)

/* y [M, N] = x [M, K] @ W.T. x and y are bf16 (or float32 where x_bf16 / y_bf16 is 0), rows `*_stride`
 * elements apart. Each thread takes a contiguous band of weight rows; each weight row is unpacked once per
 * tile of up to 8 activation rows. Returns 0, or -1 when K does not fit the kind or scratch memory is short. */
static int gemm(Kind kind, int64_t M, int64_t K, int64_t N, const void *x, int64_t x_stride, int x_bf16,
                const uint8_t *w, const float *scale, const float *low, void *y, int64_t y_stride, int y_bf16) {
    int paired = kind == INT4_GROUPS || kind == Q4_K_BLOCKS;  /* 4-bit codes: activations in pair order */
    if (K % (kind == INT4_GROUPS || kind == Q8_0_BLOCKS ? GROUP : QK_K) != 0) return -1;
    int64_t G = K / GROUP;
    int64_t row_bytes = kind == Q8_0_BLOCKS ? G * Q8_0_BYTES
                      : K / QK_K * (kind == Q4_K_BLOCKS ? Q4_K_BYTES : Q6_K_BYTES);
    Rounded r;
    if (round_activations(M, K, x, x_stride, x_bf16, paired, kind == Q6_K_BLOCKS ? 32 : 0, &r) != 0) return -1;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < N; o++) {
        for (int64_t n0 = 0; n0 < M;) {
            float dots[ROW_TILE];
            int tile = row_tile(M - n0);
            const int8_t *xq = r.q + n0 * (paired ? PAIR : GROUP);
            const float *lanes = paired ? r.lanes + n0 * 8 : NULL, *sums = r.sums + n0 * G;
            if (tile == 8) ROW_DOTS(8);
            else if (tile == 4) ROW_DOTS(4);
            else if (tile == 2) ROW_DOTS(2);
            else ROW_DOTS(1);
            for (int t = 0; t < tile; t++) {
                float minus = 0.0f;  /* int4 groups: each group's low times the rounded activations' sum */
                for (int64_t g = 0; kind == INT4_GROUPS && g < G; g++) minus += low[o * G + g] * sums[t * G + g];
                store(y, y_bf16, (n0 + t) * y_stride + o, dots[t] - minus);
            }
            n0 += tile;
        }
    }
    free_rounded(&r);
    return 0;
}

/* 4-bit groups: codes uint8 [N, K / 2], scale and low float32 [N, K / 32]. */
int int4_gemm(int64_t M, int64_t K, int64_t N, const void *x, int64_t x_stride, int x_bf16,
              const uint8_t *codes, const float *scale, const float *low, void *y, int64_t y_stride, int y_bf16) {
    return gemm(INT4_GROUPS, M, K, N, x, x_stride, x_bf16, codes, scale, low, y, y_stride, y_bf16);
}

/* Q4_K blocks, uint8 [N, K / 256 * 144]. */
int q4_k_gemm(int64_t M, int64_t K, int64_t N, const void *x, int64_t x_stride, int x_bf16,
              const uint8_t *blocks, void *y, int64_t y_stride, int y_bf16) {
    return gemm(Q4_K_BLOCKS, M, K, N, x, x_stride, x_bf16, blocks, NULL, NULL, y, y_stride, y_bf16);
}

/* Q6_K blocks, uint8 [N, K / 256 * 210]. */
int q6_k_gemm(int64_t M, int64_t K, int64_t N, const void *x, int64_t x_stride, int x_bf16,
              const uint8_t *blocks, void *y, int64_t y_stride, int y_bf16) {
    return gemm(Q6_K_BLOCKS, M, K, N, x, x_stride, x_bf16, blocks, NULL, NULL, y, y_stride, y_bf16);
}

/* Q8_0 blocks, uint8 [N, K / 32 * 34]. */
int q8_0_gemm(int64_t M, int64_t K, int64_t N, const void *x, int64_t x_stride, int x_bf16,
              const uint8_t *blocks, void *y, int64_t y_stride, int y_bf16) {
    return gemm(Q8_0_BLOCKS, M, K, N, x, x_stride, x_bf16, blocks, NULL, NULL, y, y_stride, y_bf16);
}
