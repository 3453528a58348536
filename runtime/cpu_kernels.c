/*
 * A layer's routed experts for a chunk of tokens (written for a decode step's few) in one call, on AVX-512
 * (F/BW/DQ/VNNI) CPUs, for Q4_K and Q6_K weights. Built and loaded by runtime/cpu_kernels.py; runtime/experts.py
 * uses it in place of its ggml graph.
 *
 * Why: ggml's Q4_K/Q6_K x Q8_K dot products have no AVX-512 path, and its AVX2 one is compute-bound on one core
 * below what the core can read from memory, so one token's experts ran below the memory bandwidth. Here each weight
 * block is unpacked once into 512-bit vectors and dotted (vpdpbusd, then vpdpwssd for the sub-block scales) against
 * every activation row routed to its expert, with the weights prefetched far ahead.
 *
 * Results are bit-identical to ggml's graph (gate, up: mul_mat_id; swiglu; * routing weight; down: mul_mat_id; sum
 * over k), so either path can serve any call: activations are rounded to Q8_K exactly as quantize_row_q8_K_ref
 * does, every dot product keeps the integer sums of ggml_vec_dot_q{4,6}_K_q8_K's AVX2 code in its 8 lanes (lane L
 * holds the values whose index mod 32 is in [4L, 4L + 4); a 64-value vector's 16 lanes fold onto them, M + 8 -> M)
 * and does its float steps in its order, silu(gate) * up is ggml's own function (called, not rewritten), and the
 * k results are summed in ggml's order. This needs -ffp-contract=off: a multiply and an add fused into one FMA
 * round differently.
 * Integer sums are exact: |q8| <= 127, weights <= 15 (Q4_K) or 63 (Q6_K); see dot2 for the one narrow step.
 *
 * Work split (one OpenMP parallel region; threads from libgomp, shared with torch and ggml):
 *   0. x rows -> Q8_K;
 *   a. the gate and up rows of the distinct experts, in 16-row groups: each row is read once and dotted with every
 *      x row routed to its expert; then per (token, slot) pair h = silu(gate) * up * routing weight, 16 rows at a
 *      time (a whole vector for silu);
 *   b. each h -> Q8_K;
 *   c. down: a range of output rows at a time, for each expert those rows dotted with the h of every pair routed
 *      to it, then summed over k. No two threads write the same row.
 * Threads take contiguous chunks of a and c as they come for them (about 8 per thread), so that one slowed by
 * others on its core (the GPU side's threads, other processes) holds up the rest less than an equal split would.
 * Written for this kernel: it follows ggml's block layouts and the order of its float operations, which
 * bit-identical results need.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__) || !defined(__AVX512VNNI__) \
    || !defined(__F16C__) || !defined(__FMA__)
#error "this CPU lacks AVX-512 F/BW/DQ/VNNI (or F16C/FMA)"
#endif

enum { TYPE_Q4_K = 12, TYPE_Q6_K = 14 };   /* ggml_type ids */
enum { QK = 256, MAXN = 8, GROUP = 16 };    /* values per block; activation rows per dot call; rows per group */

typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[QK / 2]; } block_q4_K;          /* 144 bytes */
typedef struct { uint8_t ql[QK / 2]; uint8_t qh[QK / 4]; int8_t scales[QK / 16]; uint16_t d; } block_q6_K; /* 210 */
/* ggml's block_q8_K (d, qs, bsums) plus the sums of 32 that Q4_K's mins need, padded to 5 cache lines. For Q4_K
 * weights qs holds the values in the order that block's nibbles come in 64-byte loads (q4_order, below). */
typedef struct { int8_t qs[QK]; int16_t bsums[QK / 16]; int16_t sums[QK / 32]; float d; char pad[12]; } block_q8_K;

/* Software prefetch, PREFETCH bytes ahead of the block being read, into L2: the hardware prefetchers alone keep too
 * few reads in flight for one core to stream at the memory's rate (and stop at each 4 KiB page); prefetching into
 * L1 instead fills its few miss buffers and slows the loads that need them now. */
#ifndef PREFETCH
#define PREFETCH 8192
#endif
#define PF(p) _mm_prefetch((const char *)(p) + PREFETCH, _MM_HINT_T1)

static inline float fp16(const uint16_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);   /* Q6_K blocks are 210 bytes: its d may sit at any even offset */
    return _cvtsh_ss(h);
}

static inline float hsum8(__m256 x) {   /* the 8 lanes summed in the order ggml's AVX2 dot products sum them */
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* 256 floats -> Q8_K, as quantize_row_q8_K_ref: max = the first value of largest |.|, q = min(127, the float
 * product x * (-127 / max) rounded half to even), d = 1 / (-127 / max). (Its bsums are left unset for an all-zero
 * block; they are then multiplied by d = 0, so zeroing them changes nothing.) q4_order: qs in the order 32-value
 * runs 0 2 1 3 4 6 5 7, that of a Q4_K block's nibbles: 64 bytes of its qs hold runs 0 and 2 in their low nibbles,
 * 1 and 3 in their high ones. */
static void quantize_q8_K(const float *x, block_q8_K *y, int q4_order) {
    __m512 vmax = _mm512_setzero_ps();
    for (int j = 0; j < QK; j += 16)   /* the abs first: max_ps returns its second operand for a NaN */
        vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + j)), vmax);
    const float amax = _mm512_reduce_max_ps(vmax);
    if (amax == 0) {
        memset(y, 0, sizeof *y);
        return;
    }
    int at = 0;
    while (at < QK - 1 && fabsf(x[at]) != amax)
        at++;
    const float iscale = -127.f / x[at];
    const __m512 vs = _mm512_set1_ps(iscale);
    for (int j = 0; j < QK; j += 16) {
        const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(vs, _mm512_loadu_ps(x + j))),
                                           _mm512_set1_epi32(127));
        const int run = j / 32, to = q4_order ? (run & 4) | ((run & 1) << 1) | ((run & 2) >> 1) : run;
        _mm_storeu_si128((__m128i *)(y->qs + 32 * to + j % 32), _mm512_cvtepi32_epi8(q));
        y->bsums[j / 16] = (int16_t)_mm512_reduce_add_epi32(q);
    }
    for (int j = 0; j < QK / 32; j++)
        y->sums[j] = (int16_t)(y->bsums[2 * j] + y->bsums[2 * j + 1]);
    y->d = 1 / iscale;
}

/* A Q4_K block's 12 bytes of 6-bit scales and mins -> int16 0-7: its 8 scales, 8-15: its 8 mins. (ggml unpacks
 * them with scalar code; here that and moving its result into vectors took longer than the block's dot products.)
 * Each int16 first gathers the two bytes its value comes from, x = lo | hi << 8, then
 * value = (x >> s1 & m1) | (x >> s2 & m2):
 *   scale j < 4: byte j & 63;    scale j >= 4: byte j + 4 & 15,       | bits 6-7 of byte j - 4 as bits 4-5
 *   min j < 4:   byte j + 4 & 63; min j >= 4:  byte j + 4 >> 4 & 15,  | bits 6-7 of byte j as bits 4-5 */
static inline __m256i q4_K_scales_mins(const block_q4_K *b) {
    const __m256i s = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b->scales));  /* +4 bytes of qs */
    const __m256i x = _mm256_shuffle_epi8(s, _mm256_setr_epi8(
        0, -1, 1, -1, 2, -1, 3, -1, 8, 0, 9, 1, 10, 2, 11, 3,       /* scales (lanes are 128-bit: both hold s) */
        4, -1, 5, -1, 6, -1, 7, -1, 8, 4, 9, 5, 10, 6, 11, 7));     /* mins */
    const __m256i s1 = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i m1 = _mm256_setr_epi16(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15);
    const __m256i s2 = _mm256_setr_epi16(0, 0, 0, 0, 10, 10, 10, 10, 0, 0, 0, 0, 10, 10, 10, 10);
    const __m256i m2 = _mm256_setr_epi16(0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0, 48, 48, 48, 48);
    return _mm256_ternarylogic_epi32(_mm256_and_si256(_mm256_srlv_epi16(x, s1), m1), _mm256_srlv_epi16(x, s2), m2,
                                     0xF8);   /* a | (b & c) */
}

/* Two vectors' integer dot products lane by lane (vpdpbusd: 4 weights x 4 activations per int32 lane, which
 * fits in int16: at most 4 x 63 x 127), paired into int16 pairs (d0 low, d1 high), then scaled by the int16 pairs
 * sc and added to acc (vpdpwssd): acc lane M += sc.lo * d0[M] + sc.hi * d1[M]. Three multiplies per 128 values
 * where vpmaddubsw + vpdpwssd per 64 take four, and one scale vector for two. */
static inline __m512i dot2(__m512i acc, __m512i w0, __m512i w1, const int8_t *y0, const int8_t *y1, __m512i sc) {
    const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_load_si512(y0));
    const __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_load_si512(y1));
    return _mm512_dpwssd_epi32(acc, _mm512_mask_blend_epi16(0xAAAAAAAAu, d0, _mm512_slli_epi32(d1, 16)), sc);
}

/* One Q4_K row of nb blocks . n Q8_K rows a[r] (in q4_order) -> *s[r], as ggml_vec_dot_q4_K_q8_K. Its two float
 * accumulators, 8 lanes for d * sums and 4 for dmin * the mins' products, share one vector here: lanes 0-7 and 8-11,
 * each lane doing the same fma as in ggml. */
static inline __attribute__((always_inline)) void dot_q4_K(const uint8_t *row, int nb, const block_q8_K *const *a,
                                                           float *const *s, const int n) {
    const __m512i m4 = _mm512_set1_epi8(0xF);
    /* int32 lanes of the scales widened to int16: 0 = (sc0, sc1), 1 = (sc2, sc3), ... */
    const __m512i pair01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(1), 1);
    const __m512i pair23 = _mm512_add_epi32(pair01, _mm512_set1_epi32(2));
    const __m512i dlanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2);   /* d x 8, dmin x 4 */
    __m512 acc[MAXN];
    for (int r = 0; r < n; r++)
        acc[r] = _mm512_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const block_q4_K *b = (const block_q4_K *)row + i;
        PF(b); PF((const char *)b + 64); PF((const char *)b + 128);   /* 144 bytes: 3 lines cover them */
        const __m256i sm16 = q4_K_scales_mins(b);   /* 8 scales, 8 mins */
        const __m128i mins = _mm256_extracti128_si256(sm16, 1);
        /* q0, q1: the low and high nibbles of qs[0..63] = runs of 32 values 0 | 2 and 1 | 3 (lower | upper 256
         * bits); q2, q3 the same of qs[64..127]: runs 4 | 6 and 5 | 7. Scales: (0, 1) | (2, 3); (4, 5) | (6, 7) */
        const __m512i bits0 = _mm512_loadu_si512(b->qs), bits1 = _mm512_loadu_si512(b->qs + 64);
        const __m512i q0 = _mm512_and_si512(bits0, m4), q1 = _mm512_and_si512(_mm512_srli_epi16(bits0, 4), m4);
        const __m512i q2 = _mm512_and_si512(bits1, m4), q3 = _mm512_and_si512(_mm512_srli_epi16(bits1, 4), m4);
        const __m512i sc01 = _mm512_permutexvar_epi32(pair01, _mm512_castsi256_si512(sm16));
        const __m512i sc23 = _mm512_permutexvar_epi32(pair23, _mm512_castsi256_si512(sm16));
        uint32_t dd;   /* d and dmin, as two fp16 */
        memcpy(&dd, &b->d, 4);
        const __m128 dw = _mm_xor_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dd)), _mm_setr_ps(0.f, -0.f, 0.f, 0.f));
        for (int r = 0; r < n; r++) {
            const block_q8_K *y = a[r] + i;
            __m512i isum = dot2(_mm512_setzero_si512(), q0, q1, y->qs, y->qs + 64, sc01);
            isum = dot2(isum, q2, q3, y->qs + 128, y->qs + 192, sc23);
            /* [sum of the two halves of isum (ggml's 8 lanes) | the mins' 4 products | 0] */
            const __m512i prod = _mm512_zextsi128_si512(_mm_madd_epi16(mins, _mm_load_si128((const __m128i *)y->sums)));
            const __m512i hi = _mm512_shuffle_i64x2(isum, prod, _MM_SHUFFLE(1, 0, 3, 2));
            const __m512i sums = _mm512_mask_add_epi32(hi, 0x00FF, isum, hi);
            /* y.d * (d, -dmin): ggml's d and dmin = -y.d * dmin (the same product) */
            const __m512 dv = _mm512_permutexvar_ps(dlanes, _mm512_castps128_ps512(_mm_mul_ps(_mm_set1_ps(y->d), dw)));
            acc[r] = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(sums), acc[r]);
        }
    }
    for (int r = 0; r < n; r++) {
        const __m128 am = _mm512_extractf32x4_ps(acc[r], 2);
        __m128 m = _mm_add_ps(am, _mm_movehl_ps(am, am));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        *s[r] = hsum8(_mm512_castps512_ps256(acc[r])) + _mm_cvtss_f32(m);
    }
}

/* One Q6_K row of nb blocks . n Q8_K rows a[r] -> *s[r], as ggml_vec_dot_q6_K_q8_K. */
static inline __attribute__((always_inline)) void dot_q6_K(const uint8_t *row, int nb, const block_q8_K *const *a,
                                                           float *const *s, const int n) {
    const __m512i m4 = _mm512_set1_epi8(0xF), m30 = _mm512_set1_epi8(0x30);
    const __m512i shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shr = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    /* int16 2M and 2M + 1 of the scale pairs for 128 values: scales M / 4 and 4 + M / 4 (M = 0..15) */
    const __m512i lane = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18,
                                           17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
    const __m512i pairs = _mm512_add_epi16(lane, _mm512_set1_epi32(0x00040000));
    __m256 acc[MAXN];
    for (int r = 0; r < n; r++)
        acc[r] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const block_q6_K *b = (const block_q6_K *)(row + (size_t)i * sizeof(block_q6_K));
        PF(b); PF((const char *)b + 64); PF((const char *)b + 128); PF((const char *)b + 192);   /* 210 bytes */
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
        const float dw = fp16(&b->d);
        /* 128 values h: A = values 0..63 = low nibbles of ql[64h..] | qh bits 0-1 (first 32) or 2-3 (next 32) as
         * bits 4-5; B = values 64..127 = high nibbles | qh bits 4-5 or 6-7. Scales: one per 16 values */
        __m512i q[4], sc[2];
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512(b->ql + 64 * h);
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_sllv_epi16(qh, shl), m30));
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                           _mm512_and_si512(_mm512_srlv_epi16(qh, shr), m30));
            sc[h] = _mm512_permutexvar_epi16(_mm512_add_epi16(pairs, _mm512_set1_epi16((short)(8 * h))),
                                             _mm512_castsi256_si512(sc16));
        }
        /* the -32 offset of every value, through the activations' 16-value sums, as ggml does: its lane L gets
         * -32 (bsums[2L] sc[2L] + bsums[2L + 1] sc[2L + 1]) */
        const __m512i off = _mm512_zextsi256_si512(
            _mm256_slli_epi16(_mm256_sub_epi16(_mm256_setzero_si256(), sc16), 5));
        for (int r = 0; r < n; r++) {
            const block_q8_K *y = a[r] + i;
            const __m512i bsums = _mm512_zextsi256_si512(_mm256_load_si256((const __m256i *)y->bsums));
            __m512i isum = _mm512_dpwssd_epi32(_mm512_setzero_si512(), bsums, off);
            isum = dot2(isum, q[0], q[1], y->qs, y->qs + 64, sc[0]);
            isum = dot2(isum, q[2], q[3], y->qs + 128, y->qs + 192, sc[1]);
            const __m256i sumi = _mm256_add_epi32(_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64(isum, 1));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(y->d * dw), _mm256_cvtepi32_ps(sumi), acc[r]);
        }
    }
    for (int r = 0; r < n; r++)
        *s[r] = hsum8(acc[r]);
}

/* n <= MAXN rows at once; a constant n for each case, so that the accumulators stay in registers */
#define CASES(f) switch (n) { case 1: f(row, nb, a, s, 1); break; case 2: f(row, nb, a, s, 2); break;   \
    case 3: f(row, nb, a, s, 3); break; case 4: f(row, nb, a, s, 4); break; case 5: f(row, nb, a, s, 5); break; \
    case 6: f(row, nb, a, s, 6); break; case 7: f(row, nb, a, s, 7); break; default: f(row, nb, a, s, 8); }

static void dot(int type, const uint8_t *row, int nb, const block_q8_K *const *a, float *const *s, int n) {
    if (type == TYPE_Q4_K) {
        CASES(dot_q4_K)
    } else {
        CASES(dot_q6_K)
    }
}

static size_t row_bytes(int type, int n) {
    return (size_t)(n / QK) * (type == TYPE_Q4_K ? sizeof(block_q4_K) : sizeof(block_q6_K));
}

/* ggml's own y = silu(x) * g (libggml-cpu, which runtime.ggml_ops loads with its symbols global, so this library's
 * reference resolves to it when it is loaded): h rounds to Q8_K exactly as in the graph, whichever vector width
 * that ggml was built for. */
extern void ggml_vec_swiglu_f32(int n, float *y, const float *x, const float *g);

/* Scratch layout for T tokens of top-k (P = T k (token, slot) pairs), each part 64-byte aligned. */
typedef struct {
    block_q8_K *xq, *hq;   /* x rows as Q8_K in both orders (natural, then q4_order), h rows in down's order */
    float *h, *up, *y;     /* (P, inter) gate then h; (P, inter) up; (P, hidden) each pair's down output */
    int *experts, *start, *pairs;   /* distinct experts; pairs[start[u]:start[u + 1]] route to experts[u] */
    int *of, *fill;                 /* while grouping: each pair's index into experts; the next place per expert */
    int n_experts;
} scratch_t;

static size_t layout(int T, int k, int hidden, int inter, char *base, scratch_t *sp) {
    const size_t P = (size_t)T * k;
    size_t sizes[10] = {2 * T * (size_t)(hidden / QK) * sizeof(block_q8_K), P * (inter / QK) * sizeof(block_q8_K),
                        P * inter * 4, P * inter * 4, P * hidden * 4, P * 4, (P + 1) * 4, P * 4, P * 4, P * 4};
    void **parts[10] = {(void **)&sp->xq, (void **)&sp->hq, (void **)&sp->h, (void **)&sp->up, (void **)&sp->y,
                        (void **)&sp->experts, (void **)&sp->start, (void **)&sp->pairs, (void **)&sp->of,
                        (void **)&sp->fill};
    size_t at = 0;
    for (int i = 0; i < 10; i++) {
        if (base)
            *parts[i] = base + at;
        at += (sizes[i] + 63) / 64 * 64;
    }
    return at;
}

/* Bytes of scratch moe_decode needs (give it 64-byte aligned). */
size_t moe_scratch_bytes(int T, int k, int hidden, int inter) {
    scratch_t s;
    return layout(T, k, hidden, inter, NULL, &s);
}

/* One call's inputs and scratch, for the two phases below. */
typedef struct {
    int T, k, hidden, inter, hx, hi;   /* hx, hi: blocks per row of x, h */
    const float *w;
    const uint8_t *gate, *up, *down;
    int gate_type, up_type, down_type;
    size_t grow, urow, drow;           /* bytes per row */
    float *out;
    scratch_t S;
} call_t;

/* a. Rows r0..r0 + GROUP of expert u's gate and up, each read once for all pairs routed to u; then h for them. */
static void gate_up(const call_t *C, int u, int r0) {
    const scratch_t *S = &C->S;
    const int e = S->experts[u], *pp = S->pairs + S->start[u], np = S->start[u + 1] - S->start[u];
    const uint8_t *gw = C->gate + ((size_t)e * C->inter + r0) * C->grow;
    const uint8_t *uw = C->up + ((size_t)e * C->inter + r0) * C->urow;
    const block_q8_K *xg = S->xq + (C->gate_type == TYPE_Q4_K ? C->T * C->hx : 0);   /* in the order each needs */
    const block_q8_K *xu = S->xq + (C->up_type == TYPE_Q4_K ? C->T * C->hx : 0);
    for (int c = 0; c < np; c += MAXN) {
        const int n = np - c < MAXN ? np - c : MAXN;
        const block_q8_K *ag[MAXN], *au[MAXN];
        float *gs[MAXN], *us[MAXN];
        for (int j = 0; j < n; j++) {
            ag[j] = xg + (size_t)(pp[c + j] / C->k) * C->hx;
            au[j] = xu + (size_t)(pp[c + j] / C->k) * C->hx;
        }
        for (int r = 0; r < GROUP; r++) {
            for (int j = 0; j < n; j++) {
                gs[j] = S->h + (size_t)pp[c + j] * C->inter + r0 + r;
                us[j] = S->up + (size_t)pp[c + j] * C->inter + r0 + r;
            }
            dot(C->gate_type, gw + r * C->grow, C->hx, ag, gs, n);
            dot(C->up_type, uw + r * C->urow, C->hx, au, us, n);
        }
    }
    for (int j = 0; j < np; j++) {   /* ggml: swiglu, then a separate multiply by the routing weight */
        float *hp = S->h + (size_t)pp[j] * C->inter + r0;
        ggml_vec_swiglu_f32(GROUP, hp, hp, S->up + (hp - S->h));
        _mm512_storeu_ps(hp, _mm512_mul_ps(_mm512_loadu_ps(hp), _mm512_set1_ps(C->w[pp[j]])));
    }
}

/* c. Output rows o0..o1: every expert's down rows there, dotted with the h of each pair routed to it; then the sum
 * over k in ggml's order ((y0 + y1) + y2) + ... */
static void down_rows(const call_t *C, int o0, int o1) {
    const scratch_t *S = &C->S;
    for (int u = 0; u < S->n_experts; u++) {
        const int *pp = S->pairs + S->start[u], np = S->start[u + 1] - S->start[u];
        const uint8_t *dw = C->down + ((size_t)S->experts[u] * C->hidden + o0) * C->drow;
        for (int c = 0; c < np; c += MAXN) {
            const int n = np - c < MAXN ? np - c : MAXN;
            const block_q8_K *a[MAXN];
            float *ys[MAXN];
            for (int j = 0; j < n; j++)
                a[j] = S->hq + (size_t)pp[c + j] * C->hi;
            for (int r = o0; r < o1; r++) {
                for (int j = 0; j < n; j++)
                    ys[j] = S->y + (size_t)pp[c + j] * C->hidden + r;
                dot(C->down_type, dw + (size_t)(r - o0) * C->drow, C->hi, a, ys, n);
            }
        }
    }
    for (int t = 0; t < C->T; t++) {
        const float *y = S->y + (size_t)t * C->k * C->hidden;
        float *o = C->out + (size_t)t * C->hidden;
        for (int r = o0; r < o1; r++) {
            float sum = y[r];
            for (int j = 1; j < C->k; j++)
                sum += y[(size_t)j * C->hidden + r];
            o[r] = sum;
        }
    }
}

/* out (T, hidden) = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, k]; gate/up/down: the
 * whole stacks (expert e = the e-th equal slice), rows of hidden (gate, up) or inter (down) values.
 * Returns 0, or -1 for a weight type other than Q4_K/Q6_K, -2 for a size that is no multiple of 256. */
int moe_decode(int T, int k, int hidden, int inter, const float *x, const int32_t *ids, const float *w,
               const uint8_t *gate, const uint8_t *up, const uint8_t *down, int gate_type, int up_type, int down_type,
               float *out, int nthreads, void *scratch) {
    const int types[3] = {gate_type, up_type, down_type};
    for (int i = 0; i < 3; i++)
        if (types[i] != TYPE_Q4_K && types[i] != TYPE_Q6_K)
            return -1;
    if (hidden <= 0 || inter <= 0 || hidden % QK || inter % QK || T < 0 || k <= 0)
        return -2;
    if (T == 0)
        return 0;
    call_t C = {T, k, hidden, inter, hidden / QK, inter / QK, w, gate, up, down, gate_type, up_type, down_type,
                row_bytes(gate_type, hidden), row_bytes(up_type, hidden), row_bytes(down_type, inter), out, {0}};
    scratch_t *S = &C.S;
    layout(T, k, hidden, inter, scratch, S);
    const int P = T * k;

    /* group the pairs by expert (a linear search: there are at most as many distinct experts as the model has) */
    int U = 0;
    for (int p = 0; p < P; p++) {
        int u = 0;
        while (u < U && S->experts[u] != ids[p])
            u++;
        if (u == U) {
            S->experts[U] = ids[p];
            S->start[++U] = 0;
        }
        S->start[u + 1]++;
        S->of[p] = u;
    }
    S->n_experts = U;
    S->start[0] = 0;
    for (int u = 0; u < U; u++) {
        S->start[u + 1] += S->start[u];
        S->fill[u] = S->start[u];
    }
    for (int p = 0; p < P; p++)
        S->pairs[S->fill[S->of[p]]++] = p;

    const int gu_groups = U * (inter / GROUP), rgroups = hidden / GROUP;
    #pragma omp parallel num_threads(nthreads)
    {
        const int nth = omp_get_num_threads();
        const int gu_chunk = gu_groups / (8 * nth) > 1 ? gu_groups / (8 * nth) : 1;
        const int rchunk = (rgroups / (8 * nth) > 1 ? rgroups / (8 * nth) : 1) * GROUP;

        #pragma omp for schedule(static)
        for (int i = 0; i < 2 * T * C.hx; i++)   /* x in both orders */
            quantize_q8_K(x + (size_t)(i % (T * C.hx)) * QK, S->xq + i, i >= T * C.hx);

        #pragma omp for schedule(dynamic, gu_chunk)
        for (int g = 0; g < gu_groups; g++)
            gate_up(&C, g / (inter / GROUP), g % (inter / GROUP) * GROUP);

        #pragma omp for schedule(static)
        for (int i = 0; i < P * C.hi; i++)   /* b. h -> Q8_K */
            quantize_q8_K(S->h + (size_t)i * QK, S->hq + i, down_type == TYPE_Q4_K);

        #pragma omp for schedule(dynamic, 1)
        for (int o0 = 0; o0 < hidden; o0 += rchunk)
            down_rows(&C, o0, o0 + rchunk < hidden ? o0 + rchunk : hidden);
    }
    return 0;
}
