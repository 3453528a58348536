/* Q4_K and Q6_K quantization without an importance matrix, byte for byte what ggml's reference quantizer makes
 * (ggml_quantize_chunk with no imatrix runs that reference code: scalar, one sub-block after another).
 *
 * Why it is faster and still exact: the sub-blocks of a 256-value super-block (eight of 32 values for Q4_K,
 * sixteen of 16 for Q6_K) are independent until their scales are packed, so they run as the lanes of a vector,
 * each lane doing exactly the reference's float operations in the reference's order (sequential sums, no
 * reassociation). Compile with -ffp-contract=off: a fused multiply-add rounds once where the reference rounds
 * twice.
 *
 * Q4_K block (144 bytes): fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes of 4-bit values
 * (sub-blocks 2p and 2p+1 share bytes 32p..32p+31: low and high nibble).
 * Q6_K block (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16 d. */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define LANES 8
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline vf splat(float a) { vf v; for (int j = 0; j < LANES; ++j) v[j] = a; return v; }
static inline vi splati(int32_t a) { vi v; for (int j = 0; j < LANES; ++j) v[j] = a; return v; }
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vi seli(vi m, vi a, vi b) { return (a & m) | (b & ~m); }
static inline vf vabs(vf a) { return (vf)((vi)a & splati(0x7fffffff)); }

/* round to nearest (ties to even) by adding 1.5 * 2^23: the reference's trick, valid for |v| < 2^22 */
static inline vi round_int(vf v) {
    vi bits = (vi)(v + splat(12582912.f));
    return (bits & splati(0x007fffff)) - splati(0x00400000);
}

static inline int round_int1(float v) {
    float t = v + 12582912.f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline vi clamp(vi l, int lo, int hi) {
    l = seli(l < splati(lo), splati(lo), l);
    return seli(l > splati(hi), splati(hi), l);
}

/* IEEE binary16, round to nearest even (as ggml's conversion), and back */
static uint16_t to_fp16(float f) {
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static float from_fp16(uint16_t u) {
    _Float16 h;
    memcpy(&h, &u, 2);
    return (float)h;
}

/* One super-block: lane j is sub-block j. Returns each lane's scale and min (the reference's scales[j] and
 * mins[j] = -min) and its 4-bit values in L[i][j]. */
static void sub_blocks(const vf xt[32], vf *scale_out, vf *min_out, vi L[32]) {
    const int nmax = 15;
    vf sum_x2 = splat(0.f);
    for (int i = 0; i < 32; ++i) sum_x2 += xt[i] * xt[i];
    vf av_x;
    for (int j = 0; j < LANES; ++j) av_x[j] = sqrtf(sum_x2[j] / 32);
    vf w[32];
    for (int i = 0; i < 32; ++i) w[i] = av_x + vabs(xt[i]);

    vf mn = xt[0], mx = xt[0], sum_w = w[0], sum_x = w[0] * xt[0];
    for (int i = 1; i < 32; ++i) {
        mn = sel(xt[i] < mn, xt[i], mn);
        mx = sel(xt[i] > mx, xt[i], mx);
        sum_w += w[i];
        sum_x += w[i] * xt[i];
    }
    mn = sel(mn > splat(0.f), splat(0.f), mn);
    vi flat = mx == mn;
    vf iscale = splat((float)nmax) / (mx - mn);
    vf scale = splat(1.f) / iscale;
    vf best = splat(0.f);
    for (int i = 0; i < 32; ++i) {
        L[i] = clamp(round_int(iscale * (xt[i] - mn)), 0, nmax);
        vf diff = scale * __builtin_convertvector(L[i], vf) + mn - xt[i];
        best += w[i] * (diff * diff);
    }
    for (int is = 0; is <= 20; ++is) {
        float c = -1.f + 0.1f * (float)is + (float)nmax;
        vf isc = splat(c) / (mx - mn);                /* mn: the best min so far, as in the reference */
        vi Laux[32];
        vf sum_l = splat(0.f), sum_l2 = splat(0.f), sum_xl = splat(0.f);
        for (int i = 0; i < 32; ++i) {
            Laux[i] = clamp(round_int(isc * (xt[i] - mn)), 0, nmax);
            vf wl = w[i] * __builtin_convertvector(Laux[i], vf);
            sum_l += wl;
            sum_l2 += wl * __builtin_convertvector(Laux[i], vf);
            sum_xl += wl * xt[i];
        }
        vf D = sum_w * sum_l2 - sum_l * sum_l;
        vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        vi pos_min = this_min > splat(0.f);
        this_scale = sel(pos_min, sum_xl / sum_l2, this_scale);
        this_min = sel(pos_min, splat(0.f), this_min);
        vf err = splat(0.f);
        for (int i = 0; i < 32; ++i) {
            vf diff = this_scale * __builtin_convertvector(Laux[i], vf) + this_min - xt[i];
            err += w[i] * (diff * diff);
        }
        vi better = (D > splat(0.f)) & (err < best);
        for (int i = 0; i < 32; ++i) L[i] = seli(better, Laux[i], L[i]);
        best = sel(better, err, best);
        scale = sel(better, this_scale, scale);
        mn = sel(better, this_min, mn);
    }
    for (int i = 0; i < 32; ++i) L[i] = seli(flat, splati(0), L[i]);
    *scale_out = sel(flat, splat(0.f), scale);
    *min_out = -mn;
}

void dsv3_quantize_q4_K(const float *x, uint8_t *out, int64_t n) {
    for (int64_t b = 0; b < n / 256; ++b, x += 256, out += 144) {
        vf xt[32];
        for (int i = 0; i < 32; ++i)
            for (int j = 0; j < LANES; ++j) xt[i][j] = x[32 * j + i];
        vf scales, mins;
        vi L[32];
        sub_blocks(xt, &scales, &mins, L);

        float max_scale = 0, max_min = 0;
        for (int j = 0; j < LANES; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        uint8_t ls[LANES], lm[LANES], *sc = out + 4;
        for (int j = 0; j < LANES; ++j) {
            ls[j] = (uint8_t)round_int1(inv_scale * scales[j]);
            lm[j] = (uint8_t)round_int1(inv_min * mins[j]);
            if (ls[j] > 63) ls[j] = 63;
            if (lm[j] > 63) lm[j] = 63;
        }
        for (int j = 0; j < 4; ++j) {
            sc[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
            sc[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
            sc[j + 8] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4);
        }
        uint16_t d16 = to_fp16(max_scale / 63.f), m16 = to_fp16(max_min / 63.f);
        memcpy(out, &d16, 2);
        memcpy(out + 2, &m16, 2);

        /* the values again, against the scales as stored; a sub-block whose stored scale is 0 keeps its own */
        vf d, dm;
        for (int j = 0; j < LANES; ++j) {
            d[j] = from_fp16(d16) * (float)ls[j];
            dm[j] = from_fp16(m16) * (float)lm[j];
        }
        vi keep = d == splat(0.f);
        for (int i = 0; i < 32; ++i)
            L[i] = seli(keep, L[i], clamp(round_int((xt[i] + dm) / d), 0, 15));

        uint8_t *q = out + 16;
        for (int p = 0; p < 4; ++p)
            for (int i = 0; i < 32; ++i)
                q[32 * p + i] = (uint8_t)(L[i][2 * p] | (L[i][2 * p + 1] << 4));
    }
}

/* Eight 16-value sub-blocks (lane j: sub-block j) by the reference's search for Q6_K (nmax 32, each value
 * weighted by its square): the scale of each, and its values + 32 in L (0 for an all-zero sub-block). */
static void q6_sub_blocks(const vf xt[16], vf *scale_out, vi L[16]) {
    vf mx = splat(0.f), amax = splat(0.f), w[16];
    for (int i = 0; i < 16; ++i) {
        vf ax = vabs(xt[i]);
        vi m = ax > amax;
        amax = sel(m, ax, amax);
        mx = sel(m, xt[i], mx);
        w[i] = xt[i] * xt[i];
    }
    vi zero = amax < splat(1e-15f);
    vf isc = splat(-32.f) / mx;
    vf sumlx = splat(0.f), suml2 = splat(0.f);
    for (int i = 0; i < 16; ++i) {
        vi l = clamp(round_int(isc * xt[i]), -32, 31);
        L[i] = l + splati(32);
        vf fl = __builtin_convertvector(l, vf);
        sumlx += w[i] * xt[i] * fl;
        suml2 += w[i] * fl * fl;
    }
    vf scale = sel(suml2 != splat(0.f), sumlx / suml2, splat(0.f));
    vf best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        isc = splat(-(32.f + 0.1f * (float)is)) / mx;
        vi laux[16];
        sumlx = suml2 = splat(0.f);
        for (int i = 0; i < 16; ++i) {
            vi l = clamp(round_int(isc * xt[i]), -32, 31);
            laux[i] = l;
            vf fl = __builtin_convertvector(l, vf);
            sumlx += w[i] * xt[i] * fl;
            suml2 += w[i] * fl * fl;
        }
        vi better = (suml2 > splat(0.f)) & (sumlx * sumlx > best * suml2);
        for (int i = 0; i < 16; ++i) L[i] = seli(better, laux[i] + splati(32), L[i]);
        vf s = sumlx / suml2;
        scale = sel(better, s, scale);
        best = sel(better, s * sumlx, best);
    }
    for (int i = 0; i < 16; ++i) L[i] = seli(zero, splati(0), L[i]);
    *scale_out = sel(zero, splat(0.f), scale);
}

void dsv3_quantize_q6_K(const float *x, uint8_t *out, int64_t n) {
    for (int64_t b = 0; b < n / 256; ++b, x += 256, out += 210) {
        vf xt[2][16], sc[2];
        vi L[2][16];
        for (int h = 0; h < 2; ++h) {
            for (int i = 0; i < 16; ++i)
                for (int j = 0; j < LANES; ++j) xt[h][i][j] = x[16 * (LANES * h + j) + i];
            q6_sub_blocks(xt[h], &sc[h], L[h]);
        }
        float max_scale = 0, max_abs = 0;
        for (int ib = 0; ib < 16; ++ib) {
            float s = sc[ib / LANES][ib % LANES];
            if (fabsf(s) > max_abs) {
                max_abs = fabsf(s);
                max_scale = s;
            }
        }
        if (max_abs < 1e-15f) {
            memset(out, 0, 210);
            continue;
        }
        float iscale = -128.f / max_scale;
        uint16_t d16 = to_fp16(1 / iscale);
        int8_t *s8 = (int8_t *)(out + 192);
        for (int ib = 0; ib < 16; ++ib) {
            int v = round_int1(iscale * sc[ib / LANES][ib % LANES]);
            s8[ib] = (int8_t)(v < 127 ? v : 127);
        }
        memcpy(out + 208, &d16, 2);

        uint8_t Lf[256];
        for (int h = 0; h < 2; ++h) {
            vf d;
            for (int j = 0; j < LANES; ++j) d[j] = from_fp16(d16) * (float)s8[LANES * h + j];
            vi keep = d == splat(0.f);
            for (int i = 0; i < 16; ++i) {
                vi l = clamp(round_int(xt[h][i] / d), -32, 31);
                vi v = seli(keep, L[h][i], l + splati(32));
                for (int j = 0; j < LANES; ++j) Lf[16 * (LANES * h + j) + i] = (uint8_t)v[j];
            }
        }
        uint8_t *ql = out, *qh = out + 128;
        for (int jb = 0; jb < 256; jb += 128, ql += 64, qh += 32)
            for (int l = 0; l < 32; ++l) {
                uint8_t q1 = Lf[jb + l], q2 = Lf[jb + l + 32], q3 = Lf[jb + l + 64], q4 = Lf[jb + l + 96];
                ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
    }
}
