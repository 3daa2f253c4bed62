/* 3x3 convolutions (stride 1, padding 1, dilation 1, one group) for DeRefNet's streaming parts
 * (service/conv.py is their Python face):
 *
 * - amx_conv: on Intel AMX tiles in bfloat16, for the 32-channel convolutions;
 * - direct_conv: float32, direct, for the convolutions with 1 to 8 input or output channels,
 *   which ONNX Runtime ran at under a tenth of its 32-channel speed (its blocked-layout
 *   convolution reorders tensors that have one channel).
 *
 * Both can end with an activation folded in from the graph: ReLU, or the soft threshold of the
 * ISTA stages, y = x - clip(x, lo, hi).
 *
 * AMX:
 *
 * Why it exists: after the feature cache and the native deformable convolution, ONNX Runtime's
 * float32 Conv was about 80 % of the encoder's time and half the head's; on a CPU with AMX
 * (Intel Sapphire Rapids and later) one TDPBF16PS instruction does 16 x 16 x 32 multiply-adds.
 * Inputs and weights are rounded to bfloat16 (8-bit mantissa); products are summed in float32.
 *
 * The convolution is computed as out^T = W_t x^T summed over the 9 taps t, without im2col:
 * the input is stored zero-padded and channel-pair-interleaved, P[pair][q] = (x[2 pair][q],
 * x[2 pair + 1][q]) at flat padded position q = (row + 1) * (w + 2) + col + 1, which is exactly
 * the VNNI layout of an AMX B tile: 16 channel pairs by 16 consecutive positions. Tap t reads
 * the same buffer shifted by its flat offset, so every B tile is one strided load. Output rows
 * are computed over the padded width (2 of w + 2 columns wasted) and copied out per row.
 *
 * The functions that use AMX or AVX-512 carry target attributes, so the module itself imports
 * on any x86-64 CPU; amx_usable() says whether the CPU and the kernel allow AMX, and amx_conv()
 * refuses to run until it has said yes.
 */
#include "native.h"
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define HAVE_CPUID 1

/* The CPUID words the instruction-set checks (cpu_flags, amx_check) read: leaf 1's ECX, leaf 7
 * subleaf 0's EBX, ECX and EDX, subleaf 1's EAX (0 where the CPU has no subleaf 1), and XCR0,
 * the register states the OS saves (0 without OSXSAVE); all 0 without CPUID leaf 1, and leaf7 0
 * where the CPU has no leaf 7. */
typedef struct {
    unsigned ecx1, ebx7, ecx7, edx7, eax71, xcr0;
    int leaf7;
} isa_words;

static isa_words read_isa(void) {
    isa_words w = {0};
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return w;
    w.ecx1 = c;
    if (c & (1u << 27)) { /* OSXSAVE */
        unsigned hi;
        __asm__ volatile("xgetbv" : "=a"(w.xcr0), "=d"(hi) : "c"(0));
    }
    if (!__get_cpuid_count(7, 0, &a, &w.ebx7, &w.ecx7, &w.edx7)) return w;
    w.leaf7 = 1;
    if (a >= 1) __get_cpuid_count(7, 1, &w.eax71, &b, &c, &d);
    return w;
}
#else
#define HAVE_CPUID 0
#endif

#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_SHRINK 2

/* dst (h, w) = act(src + bias) (+ res (h, w) when not NULL), src rows wp apart; one loop per
 * activation so each vectorizes.
 * As ONNX: Relu keeps a NaN (so the service's finiteness check still sees it), and Clip is
 * min(max(v, lo), hi), which is hi for every v when lo > hi. */
TARGETS static void copy_rows(const float *src, int wp, float *dst, int h, int w, float bias,
                              int act, float lo, float hi, const float *res) {
    for (int y = 0; y < h; y++, src += wp, dst += w, res = res ? res + w : NULL) {
        if (act == ACT_RELU)
            for (int i = 0; i < w; i++) {
                const float v = src[i] + bias;
                dst[i] = v > 0.0f || v != v ? v : 0.0f;
            }
        else if (act == ACT_SHRINK)
            for (int i = 0; i < w; i++) {
                const float v = src[i] + bias, c = v < lo ? lo : v;
                dst[i] = v - (c > hi ? hi : c);
            }
        else
            for (int i = 0; i < w; i++) dst[i] = src[i] + bias;
        if (res) /* a residual Add after the conv (and its activation), folded in from the graph */
            for (int i = 0; i < w; i++) dst[i] += res[i];
    }
}

/* ---- direct float32 convolution ---------------------------------------------------------
 * Same padded flat layout as the AMX kernel below: channel c of a map is stored zero-bordered,
 * position q = (row + 1) * (w + 2) + col + 1, so tap t of 16 consecutive outputs is one vector
 * load at q + s_t whatever the row. Each vector of input serves OB output channels, whose 16-wide
 * accumulators stay in registers. */

INLINE void direct_block(const float *restrict xp, const float *restrict wt, int cin, int rows,
                         int wp, int q0, int n_out, int ob, int pv, float *restrict O) {
    /* ob output channels x pv vectors of 16 positions: with few outputs, several positions keep
     * independent accumulators, so the FMAs do not wait on each other */
    v16 acc[16][4];
    for (int p = 0; p < n_out; p += 16 * pv) {
        const int q = q0 + p;
        for (int o = 0; o < ob; o++)
            for (int j = 0; j < pv; j++) acc[o][j] = (v16){0};
        for (int c = 0; c < cin; c++)
            for (int t = 0; t < 9; t++) {
                const float *src = xp + (int64_t)c * rows + q + (t / 3 - 1) * wp + (t % 3 - 1);
                const float *k = wt + (int64_t)c * 9 + t;
                for (int j = 0; j < pv; j++) {
                    const v16 v = *(const v16 *)(src + 16 * j);
                    for (int o = 0; o < ob; o++) acc[o][j] += k[(int64_t)o * cin * 9] * v;
                }
            }
        for (int o = 0; o < ob; o++)
            for (int j = 0; j < pv; j++) *(v16 *)(O + (int64_t)o * rows + q + 16 * j) = acc[o][j];
    }
}

/* All cout outputs into planar maps O (rows apart); weight (cout, cin, 3, 3) as in ONNX. Literal
 * block sizes let the compiler keep the accumulators in registers. */
INLINE void direct_outputs(const float *xp, const float *weight, int cin, int cout, int rows, int wp, int q0,
                           int n_out, float *O) {
    for (int o = 0; o < cout;) {
        const float *wo = weight + (int64_t)o * cin * 9;
        float *Oo = O + (int64_t)o * rows;
        const int left = cout - o;
        if (left >= 16) { direct_block(xp, wo, cin, rows, wp, q0, n_out, 16, 1, Oo); o += 16; }
        else if (left >= 8) { direct_block(xp, wo, cin, rows, wp, q0, n_out, 8, 2, Oo); o += 8; }
        else if (left >= 4) { direct_block(xp, wo, cin, rows, wp, q0, n_out, 4, 4, Oo); o += 4; }
        else if (left >= 2) { direct_block(xp, wo, cin, rows, wp, q0, n_out, 2, 4, Oo); o += 2; }
        else { direct_block(xp, wo, cin, rows, wp, q0, n_out, 1, 4, Oo); o += 1; }
    }
}

/* n maps x (n, cin, h, w) -> out (n, cout, h, w); weight (cout, cin, 3, 3) as in ONNX; xp
 * (cin * rows) and O (cout * rows) are scratch, rows from direct_rows(). */
static int direct_rows(int h, int w) {
    const int wp = w + 2, n_out = ((h - 1) * wp + w + 63) / 64 * 64;
    return wp + 1 + n_out + wp + 1 + 16;
}

TARGETS static void direct_maps(const float *x, const float *weight, const float *bias, int act,
                                float lo, float hi, float *out, int n, int cin, int cout, int h,
                                int w, float *xp, float *O, const float *res) {
    const int wp = w + 2, hw = h * w, q0 = wp + 1, rows = direct_rows(h, w);
    const int n_out = ((h - 1) * wp + w + 63) / 64 * 64; /* whole blocks of up to 4 vectors */
    memset(xp, 0, sizeof(float) * (size_t)cin * rows);
    for (int b = 0; b < n; b++) {
        const float *xb = x + (int64_t)b * cin * hw;
        float *ob = out + (int64_t)b * cout * hw;
        for (int c = 0; c < cin; c++)
            for (int y = 0; y < h; y++)
                memcpy(xp + (int64_t)c * rows + q0 + y * wp, xb + (int64_t)c * hw + y * w, sizeof(float) * w);
        direct_outputs(xp, weight, cin, cout, rows, wp, q0, n_out, O);
        for (int o = 0; o < cout; o++)
            copy_rows(O + (int64_t)o * rows + q0, wp, ob + (int64_t)o * hw, h, w, bias[o], act, lo, hi,
                      res ? res + ((int64_t)b * cout + o) * hw : NULL);
    }
}

/* ---- the selective attention of DeRefNet's alignment (SelectiveAttention in training/model.py)
 * mid, nb (c, h, w) -> out (2 half, h, w): a = Wm mid + bm and b = Wn nb + bn (1x1 convs to
 * half channels each), the channel mean and max of (a, b) as 2 maps, s = sigmoid(3x3 conv of
 * those (padding 1) + bmix), out = (a * s_0, b * s_1). float32 throughout. In ONNX Runtime it
 * was 13 nodes, with reorders and copies between them, for a few multiply-adds per value. */

/* ATT_BLOCK outputs x 32 positions from p: 16 accumulators in registers (a literal block size
 * lets the compiler keep them there), each input vector used ATT_BLOCK times. */
#define ATT_BLOCK 8
INLINE void pointwise_block(const float *restrict x, const float *restrict wt, const float *restrict bias, int cin,
                            int hw, int p, float *restrict out) {
    v16 acc[ATT_BLOCK][2];
    for (int o = 0; o < ATT_BLOCK; o++) acc[o][0] = acc[o][1] = (v16){0} + bias[o];
    for (int c = 0; c < cin; c++) {
        const v16 v0 = *(const v16 *)(x + (int64_t)c * hw + p), v1 = *(const v16 *)(x + (int64_t)c * hw + p + 16);
        for (int o = 0; o < ATT_BLOCK; o++) {
            acc[o][0] += wt[(int64_t)o * cin + c] * v0;
            acc[o][1] += wt[(int64_t)o * cin + c] * v1;
        }
    }
    for (int o = 0; o < ATT_BLOCK; o++) {
        *(v16 *)(out + (int64_t)o * hw + p) = acc[o][0];
        *(v16 *)(out + (int64_t)o * hw + p + 16) = acc[o][1];
    }
}

/* out[o][p] = bias[o] + sum_c wt[o][c] x[c][p], o < cout, positions p < hw (a 1x1 conv). */
TARGETS static void pointwise(const float *x, const float *wt, const float *bias, int cin, int cout, int hw,
                              float *out) {
    const int hv = hw / 32 * 32, ov = cout / ATT_BLOCK * ATT_BLOCK;
    for (int p = 0; p < hv; p += 32) /* the input's 32 positions stay in L1 for every block */
        for (int o0 = 0; o0 < ov; o0 += ATT_BLOCK)
            pointwise_block(x, wt + (int64_t)o0 * cin, bias + o0, cin, hw, p, out + (int64_t)o0 * hw);
    for (int o = 0; o < cout; o++) /* the rest: positions past the last 32, outputs past the last block */
        for (int p = o < ov ? hv : 0; p < hw; p++) {
            float acc = bias[o];
            for (int c = 0; c < cin; c++) acc += wt[(int64_t)o * cin + c] * x[(int64_t)c * hw + p];
            out[(int64_t)o * hw + p] = acc;
        }
}

/* stats: 2 maps (mean, max over the 2 half channels of out) in the padded flat layout of the
 * direct conv (rows apart, borders zero); gate: scratch 2 * rows. */
TARGETS static void attention_maps(const float *mid, const float *nb, const float *wm, const float *bm,
                                   const float *wn, const float *bn, const float *wmix, const float *bmix,
                                   float *out, int n, int c, int half, int h, int w, float *stats, float *gate) {
    const int hw = h * w, wp = w + 2, q0 = wp + 1, rows = direct_rows(h, w);
    const int n_out = ((h - 1) * wp + w + 63) / 64 * 64, cc = 2 * half;
    memset(stats, 0, sizeof(float) * 2 * (size_t)rows);
    for (int b = 0; b < n; b++) {
        float *ob = out + (int64_t)b * cc * hw;
        pointwise(mid + (int64_t)b * c * hw, wm, bm, c, half, hw, ob);
        pointwise(nb + (int64_t)b * c * hw, wn, bn, c, half, hw, ob + (int64_t)half * hw);
        for (int y = 0; y < h; y++) {
            float *mean = stats + q0 + y * wp, *mx = stats + rows + q0 + y * wp;
            for (int x = 0; x < w; x++) {
                mean[x] = 0.0f;
                mx[x] = ob[y * w + x];
            }
            for (int o = 0; o < cc; o++) {
                const float *a = ob + (int64_t)o * hw + y * w;
                for (int x = 0; x < w; x++) {
                    mean[x] += a[x];
                    mx[x] = a[x] > mx[x] || a[x] != a[x] ? a[x] : mx[x]; /* a NaN wins, as in ReduceMax */
                }
            }
            for (int x = 0; x < w; x++) mean[x] /= (float)cc;
        }
        /* the 3x3 2 -> 2 conv over the padded maps, 16 positions a vector */
        direct_block(stats, wmix, 2, rows, wp, q0, n_out, 2, 4, gate);
        for (int k = 0; k < 2; k++) {
            float *sk = gate + (int64_t)k * rows; /* the sigmoid map, compacted to (h, w) in place */
            for (int y = 0; y < h; y++)
                for (int x = 0; x < w; x++) sk[y * w + x] = 1.0f / (1.0f + expf(-(sk[q0 + y * wp + x] + bmix[k])));
            for (int o = 0; o < half; o++) {
                float *a = ob + ((int64_t)k * half + o) * hw;
                for (int p = 0; p < hw; p++) a[p] *= sk[p];
            }
        }
    }
}

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Empty string when AMX can be used on this thread's process, else why not. */
static const char *amx_check(void) {
    const isa_words w = read_isa();
    if (!w.leaf7) return "CPUID leaf 7 is missing";
    if (!(w.edx7 & (1u << 24)) || !(w.edx7 & (1u << 22))) return "the CPU has no AMX-TILE/AMX-BF16";
    if (!(w.ebx7 & (1u << 16)) || !(w.ebx7 & (1u << 30))) return "the CPU has no AVX-512F/AVX-512BW";
    if (!(w.eax71 & (1u << 5))) return "the CPU has no AVX512-BF16";
    if (!(w.ecx1 & (1u << 27))) return "the OS does not enable XSAVE";
    if ((w.xcr0 & 0xE6) != 0xE6) return "the OS does not enable the AVX-512 state (XCR0)";
    if ((w.xcr0 & 0x60000) != 0x60000) return "the OS does not enable the AMX tile state (XCR0)";
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
        return "the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)";
    return "";
}

/* Geometry of one map in the padded flat layout. */
typedef struct {
    int h, w, wp, q0, n_out, rows;
} geometry;

static geometry geometry_of(int h, int w) {
    geometry g;
    g.h = h;
    g.w = w;
    g.wp = w + 2;
    g.q0 = g.wp + 1;                               /* first output position */
    g.n_out = ((h - 1) * g.wp + w + 31) / 32 * 32; /* positions computed, whole 32-blocks */
    g.rows = g.q0 + g.n_out + g.wp + 1 + 16;       /* + the last taps' reach */
    return g;
}

/* r[i] (16 x 32-bit) -> r[i] = column i of the 16 x 16 matrix the rows formed. */
AMX_TARGET static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
    }
}

/* All 8 tiles 16 rows x 64 bytes (palette 1), for this thread until _tile_release(). */
AMX_TARGET static void load_tile_config(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* The AMX product of 32 rows: with A_t[i] the row of i (A_t + i * cin, cin bf16) for tap t,
 * S[i][nb * 16 + k] = sum over t and the 32-channel chunks c of A_t[i][c] . B_tc for output
 * tiles j and, with pair, j + 1. Four C tiles (2 x 16 rows by 2 x 16 outputs) stay in tile
 * registers over the taps, then are stored to S[32][32]. */
AMX_TARGET static inline void tile_product(const uint16_t *const A[9], const uint16_t *wt, int cin, int ntiles,
                                           int j, int pair, float *S) {
    const int chunks = cin / 32;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int t = 0; t < 9; t++)
        for (int c = 0; c < chunks; c++) {
            const uint16_t *a = A[t] + c * 32;
            const uint16_t *B = wt + (((int64_t)t * chunks + c) * ntiles + j) * 512;
            _tile_loadd(4, a, cin * 2);
            _tile_loadd(5, a + 16 * cin, cin * 2);
            _tile_loadd(6, B, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (pair) {
                _tile_loadd(7, B + 512, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
    _tile_stored(0, S, 128);
    _tile_stored(2, S + 16 * 32, 128);
    if (pair) {
        _tile_stored(1, S + 16, 128);
        _tile_stored(3, S + 16 * 32 + 16, 128);
    }
}

/* tile_product, then O[(j + nb) * 16 + k][i] (rows ostride apart) = S[i][nb * 16 + k]: each
 * 16 x 16 block transposed into O. */
AMX_TARGET static void tile_block(const uint16_t *const A[9], const uint16_t *wt, int cin, int ntiles,
                                  int j, float *S, float *O, int64_t ostride) {
    const int pair = j + 1 < ntiles;
    __m512i r[16];
    tile_product(A, wt, cin, ntiles, j, pair, S);
    for (int half = 0; half < 2; half++)
        for (int nb = 0; nb <= pair; nb++) {
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(S + (half * 16 + i) * 32 + nb * 16);
            transpose16(r);
            float *o = O + (int64_t)(j + nb) * 16 * ostride + half * 16;
            for (int k = 0; k < 16; k++) _mm512_storeu_si512(o + (int64_t)k * ostride, r[k]);
        }
}

/* 16 positions x 32 channels (channel c at src + c * stride; m: the positions read) -> r[p]:
 * position p's 32 channels in bf16, channel pairs interleaved in 32-bit lanes (one 64-byte row
 * of an AMX A tile); the 16 x 16 block of pairs is transposed. */
AMX_TARGET static inline void pack_rows16(const float *src, int64_t stride, __mmask16 m, __m512i r[16]) {
    for (int k = 0; k < 16; k++) {
        const float *a = src + (int64_t)(2 * k) * stride;
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, a)));
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, a + stride)));
        r[k] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
    }
    transpose16(r);
}

/* x (cin, h, w) float32 -> P[q][cin] bf16, position-major: a position's 32 channels of a chunk
 * are one 64-byte row of an AMX A tile. Channel pairs are interleaved in 32-bit lanes, then
 * each 16 positions x 16 pairs block is transposed. The padding stays zero from the caller. */
AMX_TARGET static void pack_input(const float *x, int cin, geometry g, uint16_t *P) {
    const int hw = g.h * g.w;
    __m512i r[16];
    for (int y = 0; y < g.h; y++)
        for (int x0 = 0; x0 < g.w; x0 += 16) {
            const int valid = g.w - x0 < 16 ? g.w - x0 : 16;
            const __mmask16 m = (__mmask16)((1u << valid) - 1);
            for (int c = 0; c < cin; c += 32) {
                pack_rows16(x + (int64_t)c * hw + y * g.w + x0, hw, m, r);
                uint16_t *d = P + (int64_t)(g.q0 + y * g.wp + x0) * cin + c;
                for (int p = 0; p < valid; p++) _mm512_storeu_si512(d + (int64_t)p * cin, r[p]);
            }
        }
}

/* n maps x (n, cin, h, w) -> out (n, cout_out, h, w). wt: B tiles (VNNI) [9][cin/32][cout/16]
 * [16 pairs][16 outputs][2] bf16 (see service/conv.py), zero beyond cout_out; cin a multiple of
 * 32, cout of 16. Tile C[16 positions][16 outputs] += A[16 positions][32 channels] B: the A rows
 * are contiguous 64-byte positions of P, and the 18 weight tiles stay in L1. P, S and O are
 * scratch. */
AMX_TARGET static void amx_maps(const float *x, const uint16_t *wt, const float *bias, int act, float lo, float hi,
                                 float *out, int n, int cin, int cout, int cout_out, int h, int w,
                                 uint16_t *P, float *S, float *O, const float *res) {
    const geometry g = geometry_of(h, w);
    const int ntiles = cout / 16, hw = h * w;
    load_tile_config();
    memset(P, 0, sizeof(uint16_t) * (size_t)g.rows * cin);
    for (int b = 0; b < n; b++) {
        pack_input(x + (int64_t)b * cin * hw, cin, g, P);
        for (int j = 0; j < ntiles; j += 2) {
            for (int p = 0; p < g.n_out; p += 32) {
                const int q = g.q0 + p;
                const uint16_t *A[9];
                for (int t = 0; t < 9; t++) A[t] = P + (int64_t)(q + (t / 3 - 1) * g.wp + (t % 3 - 1)) * cin;
                tile_block(A, wt, cin, ntiles, j, S, O + q, g.rows);
            }
        }
        float *ob = out + (int64_t)b * cout_out * hw;
        for (int o = 0; o < cout_out; o++)
            copy_rows(O + (int64_t)o * g.rows + g.q0, g.wp, ob + (int64_t)o * hw, h, w, bias[o], act, lo, hi,
                      res ? res + ((int64_t)b * cout_out + o) * hw : NULL);
    }
    _tile_release();
}

/* ---- deformable convolution on AMX ---------------------------------------------------------
 * The same function as service/_native/deform.c (torchvision / ONNX DeformConv sampling: tap k
 * of pixel (i, j) reads (i + k/3 - 1 + dy_k, j + k%3 - 1 + dx_k) bilinearly, a point at or
 * beyond one pixel outside the map or NaN reads 0, a corner outside the map reads 0), with the
 * sampled columns rounded to bfloat16 and multiplied on AMX tiles: for 32 pixels at a time the
 * 9 taps' samples are written as 9 x 2 A tiles [16 pixels][32 channels], then
 * C[16 pixels][16 outputs] += A B as in amx_maps. */

/* x (cin, hw) -> xt (hw + 1, cin) channel-last, row hw zero: a corner is one contiguous vector. */
AMX_TARGET static void to_channel_last(const float *x, int cin, int hw, float *xt) {
    __m512i r[16];
    for (int p0 = 0; p0 < hw; p0 += 16) {
        const int valid = hw - p0 < 16 ? hw - p0 : 16;
        const __mmask16 m = (__mmask16)((1u << valid) - 1);
        for (int c0 = 0; c0 < cin; c0 += 16) {
            for (int k = 0; k < 16; k++)
                r[k] = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, x + (int64_t)(c0 + k) * hw + p0));
            transpose16(r);
            for (int p = 0; p < valid; p++) _mm512_storeu_si512(xt + (int64_t)(p0 + p) * cin + c0, r[p]);
        }
    }
    memset(xt + (int64_t)hw * cin, 0, sizeof(float) * cin);
}

/* col rows of pixels p0 .. p0 + 31 (tap k, pixel i at row k * 32 + i, cin bf16 each); pixels
 * at or past hw get zero rows. rowf / colf: each pixel's row and column as floats. The corner
 * weights and indices of 16 pixels are computed at once in vectors, then each pixel's 4 corners
 * are summed over all channels. */
AMX_TARGET static void sample_block(const float *xt, const float *off, const float *rowf,
                                    const float *colf, int h, int w, int cin, int p0,
                                    uint16_t *col) {
    const int hw = h * w;
    float wt4[4][32] __attribute__((aligned(64)));
    int32_t ix4[4][32] __attribute__((aligned(64)));
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    const __m512 fh = _mm512_set1_ps((float)h), fw = _mm512_set1_ps((float)w), m1 = _mm512_set1_ps(-1.0f);
    const __m512i vw = _mm512_set1_epi32(w), vh = _mm512_set1_epi32(h), vhw = _mm512_set1_epi32(hw);
    const __m512i izero = _mm512_setzero_si512(), ione = _mm512_set1_epi32(1);
    for (int k = 0; k < 9; k++) {
        for (int g = 0; g < 2; g++) {
            const int base = p0 + 16 * g, valid = hw - base;
            const __mmask16 m = valid >= 16 ? 0xffff : (valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1));
            const __m512 py = _mm512_add_ps(_mm512_maskz_loadu_ps(m, rowf + base),
                _mm512_add_ps(_mm512_set1_ps((float)(k / 3 - 1)), _mm512_maskz_loadu_ps(m, off + (int64_t)(2 * k) * hw + base)));
            const __m512 px = _mm512_add_ps(_mm512_maskz_loadu_ps(m, colf + base),
                _mm512_add_ps(_mm512_set1_ps((float)(k % 3 - 1)), _mm512_maskz_loadu_ps(m, off + (int64_t)(2 * k + 1) * hw + base)));
            /* ordered compares: a NaN coordinate is outside */
            __mmask16 in = m & _mm512_cmp_ps_mask(py, m1, _CMP_GT_OQ) & _mm512_cmp_ps_mask(py, fh, _CMP_LT_OQ) &
                           _mm512_cmp_ps_mask(px, m1, _CMP_GT_OQ) & _mm512_cmp_ps_mask(px, fw, _CMP_LT_OQ);
            const __m512 fy = _mm512_maskz_roundscale_ps(in, py, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            const __m512 fx = _mm512_maskz_roundscale_ps(in, px, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            const __m512 ly = _mm512_maskz_sub_ps(in, py, fy), lx = _mm512_maskz_sub_ps(in, px, fx);
            const __m512i y0 = _mm512_maskz_cvttps_epi32(in, fy), x0 = _mm512_maskz_cvttps_epi32(in, fx);
            const __m512i y1 = _mm512_add_epi32(y0, ione), x1 = _mm512_add_epi32(x0, ione);
            const __mmask16 oy0 = in & _mm512_cmpge_epi32_mask(y0, izero), oy1 = in & _mm512_cmplt_epi32_mask(y1, vh);
            const __mmask16 ox0 = _mm512_cmpge_epi32_mask(x0, izero), ox1 = _mm512_cmplt_epi32_mask(x1, vw);
            const __m512 hy = _mm512_sub_ps(one, ly), hx = _mm512_sub_ps(one, lx);
            const __m512i r0 = _mm512_mullo_epi32(y0, vw), r1 = _mm512_mullo_epi32(y1, vw);
            const __mmask16 k00 = oy0 & ox0, k01 = oy0 & ox1, k10 = oy1 & ox0, k11 = oy1 & ox1;
            _mm512_store_ps(wt4[0] + 16 * g, _mm512_mask_mul_ps(zero, k00, hy, hx));
            _mm512_store_ps(wt4[1] + 16 * g, _mm512_mask_mul_ps(zero, k01, hy, lx));
            _mm512_store_ps(wt4[2] + 16 * g, _mm512_mask_mul_ps(zero, k10, ly, hx));
            _mm512_store_ps(wt4[3] + 16 * g, _mm512_mask_mul_ps(zero, k11, ly, lx));
            _mm512_store_si512(ix4[0] + 16 * g, _mm512_mask_add_epi32(vhw, k00, r0, x0));
            _mm512_store_si512(ix4[1] + 16 * g, _mm512_mask_add_epi32(vhw, k01, r0, x1));
            _mm512_store_si512(ix4[2] + 16 * g, _mm512_mask_add_epi32(vhw, k10, r1, x0));
            _mm512_store_si512(ix4[3] + 16 * g, _mm512_mask_add_epi32(vhw, k11, r1, x1));
        }
        for (int i = 0; i < 32; i++) {
            uint16_t *ck = col + ((int64_t)k * 32 + i) * cin;
            const __m512 w00 = _mm512_set1_ps(wt4[0][i]), w01 = _mm512_set1_ps(wt4[1][i]);
            const __m512 w10 = _mm512_set1_ps(wt4[2][i]), w11 = _mm512_set1_ps(wt4[3][i]);
            /* an outside corner reads the zero row hw (0 * a NaN pixel would be NaN) */
            const float *s00 = xt + (int64_t)ix4[0][i] * cin, *s01 = xt + (int64_t)ix4[1][i] * cin;
            const float *s10 = xt + (int64_t)ix4[2][i] * cin, *s11 = xt + (int64_t)ix4[3][i] * cin;
            for (int c = 0; c < cin; c += 32) {
                __m512 a = _mm512_mul_ps(w00, _mm512_loadu_ps(s00 + c));
                __m512 b = _mm512_mul_ps(w00, _mm512_loadu_ps(s00 + c + 16));
                a = _mm512_fmadd_ps(w01, _mm512_loadu_ps(s01 + c), a);
                b = _mm512_fmadd_ps(w01, _mm512_loadu_ps(s01 + c + 16), b);
                a = _mm512_fmadd_ps(w10, _mm512_loadu_ps(s10 + c), a);
                b = _mm512_fmadd_ps(w10, _mm512_loadu_ps(s10 + c + 16), b);
                a = _mm512_fmadd_ps(w11, _mm512_loadu_ps(s11 + c), a);
                b = _mm512_fmadd_ps(w11, _mm512_loadu_ps(s11 + c + 16), b);
                _mm512_storeu_si512(ck + c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
            }
        }
    }
}

/* n maps x (n, cin, h, w), off (n, 18, h, w) -> out (n, cout_out, h, w); wt as for amx_maps.
 * Scratch: xt ((hw + 1) * cin floats), col (9 * 32 * cin bf16), S (32 * 32 floats), O (cout *
 * hwp floats), rowf and colf (hwp floats each); hwp = hw rounded up to 32. */
AMX_TARGET static void amx_deform_maps(const float *x, const float *off, const uint16_t *wt,
                                       const float *bias, float *out, int n, int cin, int cout,
                                       int cout_out, int h, int w, float *xt, uint16_t *col,
                                       float *S, float *O, float *rowf, float *colf) {
    const int hw = h * w, hwp = (hw + 31) / 32 * 32, ntiles = cout / 16;
    for (int p = 0; p < hwp; p++) {
        rowf[p] = (float)(p / w);
        colf[p] = (float)(p % w);
    }
    load_tile_config();
    for (int b = 0; b < n; b++) {
        const float *ob_off = off + (int64_t)b * 18 * hw;
        to_channel_last(x + (int64_t)b * cin * hw, cin, hw, xt);
        for (int p0 = 0; p0 < hwp; p0 += 32) {
            sample_block(xt, ob_off, rowf, colf, h, w, cin, p0, col);
            for (int j = 0; j < ntiles; j += 2) {
                const uint16_t *A[9];
                for (int t = 0; t < 9; t++) A[t] = col + (int64_t)t * 32 * cin;
                tile_block(A, wt, cin, ntiles, j, S, O + p0, hwp);
            }
        }
        float *ob = out + (int64_t)b * cout_out * hw;
        for (int o = 0; o < cout_out; o++)
            copy_rows(O + (int64_t)o * hwp, hw, ob + (int64_t)o * hw, 1, hw, bias[o], ACT_NONE, 0.0f, 0.0f, NULL);
    }
    _tile_release();
}

/* ---- a chain of convolutions in one call ----------------------------------------------------
 * Consecutive convs of a split part whose intermediate results feed only the next conv (an ISTA
 * stage: direct 1 -> 32, AMX 32 -> 32 twice, direct 32 -> 1; a residual block's two AMX convs).
 * Run one by one, every conv converts its input from NCHW float32 and its output back; in a
 * chain the intermediates stay in the layout the next conv reads, all in the padded flat
 * geometry of the kernels above (position q = (row + 1) * (w + 2) + col + 1):
 * - a direct conv reads and writes planar float32 maps O[c][q];
 * - an AMX conv reads position-major bfloat16 rows P[q][c]; it writes P for a next AMX conv
 *   straight from its C tiles (rows are positions: no transpose), or planar maps otherwise.
 * The padding positions are zeroed after each conv, so they read as the next conv's zero
 * padding. The computation is the one the convs do one by one (same bfloat16 rounding points,
 * same float32 sums): only the copies between them go. */

typedef struct {
    int amx, cin, cout, cout_out, act; /* cout: tile rows (AMX, a multiple of 16) or cout_out */
    float lo, hi;
    const void *wt; /* AMX: packed bf16 B tiles; direct: (cout, cin, 3, 3) float32 */
    const float *bias;
    float *planar;  /* cout * rows floats, unless the next conv is AMX and this one too */
    uint16_t *pm;   /* rows * cout bf16 when the next conv is AMX */
} chain_layer;

/* Bias, activation, and zero at the padding positions of planar maps O (cout of them, rows
 * apart), positions q0 .. q0 + n_out - 1 (the ones the kernels computed). */
AMX_TARGET static void finish_planar(float *O, int cout, int rows, int q0, int n_out, const uint8_t *valid,
                                     const float *bias, int act, float lo, float hi) {
    for (int o = 0; o < cout; o++) {
        float *src = O + (int64_t)o * rows + q0;
        const float b = bias[o];
        for (int p = 0; p < n_out; p++) {
            const float v = src[p] + b;
            float r;
            if (act == ACT_RELU)
                r = v > 0.0f || v != v ? v : 0.0f;
            else if (act == ACT_SHRINK) {
                const float c = v < lo ? lo : v;
                r = v - (c > hi ? hi : c);
            } else
                r = v;
            src[p] = valid[p] ? r : 0.0f;
        }
    }
}

/* The activation of 16 values, as in copy_rows (vectorised). */
AMX_TARGET static inline __m512 activate16(__m512 v, int act, __m512 lo, __m512 hi) {
    if (act == ACT_RELU) /* not (v <= 0), unordered: keeps v > 0 and NaN */
        return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ), v);
    if (act == ACT_SHRINK) {
        const __m512 c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ), v, lo);
        return _mm512_sub_ps(v, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, hi, _CMP_GT_OQ), c, hi));
    }
    return v;
}

/* planar float32 maps O (cin of them, rows apart) -> position-major bf16 P[q][cin], positions
 * q0 .. q0 + n_out - 1 (16 at a time, as pack_input). */
AMX_TARGET static void planar_to_pm(const float *O, int cin, int rows, int q0, int n_out, uint16_t *P) {
    __m512i r[16];
    for (int q = q0; q < q0 + n_out; q += 16)
        for (int c = 0; c < cin; c += 32) {
            pack_rows16(O + (int64_t)c * rows + q, rows, 0xffff, r);
            for (int p = 0; p < 16; p++) _mm512_storeu_si512(P + (int64_t)(q + p) * cin + c, r[p]);
        }
}

/* One AMX conv of 32 positions (from q) into the next AMX conv's rows: the C tiles of output
 * tiles j, j + 1 are stored to S[32 positions][32 outputs], then bias and activation are applied
 * and each position's 32 outputs written as one 64-byte bf16 row of Pn (zero at padding). */
AMX_TARGET static void tile_block_pm(const uint16_t *const A[9], const chain_layer *l, int j, int q,
                                     const uint8_t *valid, float *S, uint16_t *Pn) {
    tile_product(A, l->wt, l->cin, l->cout / 16, j, 1, S);
    const __m512 b0 = _mm512_loadu_ps(l->bias + j * 16), b1 = _mm512_loadu_ps(l->bias + j * 16 + 16);
    const __m512 lo = _mm512_set1_ps(l->lo), hi = _mm512_set1_ps(l->hi);
    for (int i = 0; i < 32; i++) {
        __m512i row = _mm512_setzero_si512();
        if (valid[i]) {
            const __m512 v0 = activate16(_mm512_add_ps(_mm512_loadu_ps(S + i * 32), b0), l->act, lo, hi);
            const __m512 v1 = activate16(_mm512_add_ps(_mm512_loadu_ps(S + i * 32 + 16), b1), l->act, lo, hi);
            row = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
        }
        _mm512_storeu_si512(Pn + (int64_t)(q + i) * l->cout + j * 16, row);
    }
}

/* n maps x (n, cin0, h, w) -> out (n, cout_out of the last, h, w) through the L convs. in_planar
 * (cin0 * rows floats) or in_pm (rows * cin0 bf16) is the first conv's input; each layer's
 * planar / pm buffers are zero outside q0 .. q0 + n_out - 1 (the caller's memset). */
AMX_TARGET static void chain_maps(const float *x, float *out, int n, int h, int w, int L, chain_layer *ly,
                                  float *in_planar, uint16_t *in_pm, const uint8_t *valid, float *S,
                                  const float *res) {
    const int wp = w + 2, hw = h * w, q0 = wp + 1, rows = direct_rows(h, w);
    const int n_out = ((h - 1) * wp + w + 63) / 64 * 64;
    const int cin0 = ly[0].cin;
    load_tile_config();
    for (int b = 0; b < n; b++) {
        const float *xb = x + (int64_t)b * cin0 * hw;
        if (ly[0].amx) {
            geometry g = geometry_of(h, w);
            g.rows = rows;
            pack_input(xb, cin0, g, in_pm);
        } else
            for (int c = 0; c < cin0; c++)
                for (int y = 0; y < h; y++)
                    memcpy(in_planar + (int64_t)c * rows + q0 + y * wp, xb + (int64_t)c * hw + y * w, sizeof(float) * w);
        for (int k = 0; k < L; k++) {
            chain_layer *l = &ly[k];
            const int last = k == L - 1, next_amx = !last && ly[k + 1].amx;
            if (l->amx) {
                const uint16_t *P = k == 0 ? in_pm : ly[k - 1].pm;
                for (int j = 0; j < l->cout / 16; j += 2)
                    for (int p = 0; p < n_out; p += 32) {
                        const int q = q0 + p;
                        const uint16_t *A[9];
                        for (int t = 0; t < 9; t++) A[t] = P + (int64_t)(q + (t / 3 - 1) * wp + (t % 3 - 1)) * l->cin;
                        if (next_amx)
                            tile_block_pm(A, l, j, q, valid + p, S, l->pm);
                        else
                            tile_block(A, l->wt, l->cin, l->cout / 16, j, S, l->planar + q, rows);
                    }
            } else {
                const float *xp = k == 0 ? in_planar : ly[k - 1].planar;
                direct_outputs(xp, l->wt, l->cin, l->cout, rows, wp, q0, n_out, l->planar);
            }
            if (last) {
                float *ob = out + (int64_t)b * l->cout_out * hw;
                for (int o = 0; o < l->cout_out; o++)
                    copy_rows(l->planar + (int64_t)o * rows + q0, wp, ob + (int64_t)o * hw, h, w, l->bias[o], l->act,
                              l->lo, l->hi, res ? res + ((int64_t)b * l->cout_out + o) * hw : NULL);
            } else if (!(l->amx && next_amx)) {
                finish_planar(l->planar, l->cout_out, rows, q0, n_out, valid, l->bias, l->act, l->lo, l->hi);
                if (next_amx) planar_to_pm(l->planar, l->cout_out, rows, q0, n_out, l->pm);
            }
        }
    }
    _tile_release();
}
#else
#define HAVE_AMX 0
#endif

static int usable_cached = -1;
static const char *why_not = "not checked";

/* amx_usable() -> (bool, reason): whether amx_conv() may run here. */
static PyObject *amx_usable(PyObject *self, PyObject *args) {
    if (usable_cached < 0) {
#if HAVE_AMX
        why_not = amx_check();
        usable_cached = why_not[0] == '\0';
#else
        why_not = "built without AMX support (needs x86-64 Linux and GCC 11 or later)";
        usable_cached = 0;
#endif
    }
    return Py_BuildValue("(Os)", usable_cached ? Py_True : Py_False, why_not);
}

/* cpu_flags() -> tuple of the instruction sets this process may use, named as /proc/cpuinfo
 * names them: what CPUID reports (as ONNX Runtime's kernels and GCC's target_clones read it)
 * where the OS also saves its registers (XCR0); None on a compiler or CPU without CPUID. The
 * host's /proc/cpuinfo can differ from it, e.g. under an emulator that presents another CPU. */
static PyObject *cpu_flags(PyObject *self, PyObject *args) {
#if HAVE_CPUID
    const isa_words w = read_isa();
    const char *names[16];
    int n = 0;
    const int avx_os = (w.xcr0 & 0x6) == 0x6, avx512_os = (w.xcr0 & 0xE6) == 0xE6;
    const int amx_os = (w.xcr0 & 0x60000) == 0x60000;
    if (avx_os && (w.ecx1 & (1u << 28))) names[n++] = "avx";
    if (avx_os && (w.ecx1 & (1u << 12))) names[n++] = "fma";
    if (avx_os && (w.ebx7 & (1u << 5))) names[n++] = "avx2";
    if (avx_os && (w.eax71 & (1u << 4))) names[n++] = "avx_vnni";
    if (avx512_os && (w.ebx7 & (1u << 16))) names[n++] = "avx512f";
    if (avx512_os && (w.ebx7 & (1u << 30))) names[n++] = "avx512bw";
    if (avx512_os && (w.ecx7 & (1u << 11))) names[n++] = "avx512_vnni";
    if (avx512_os && (w.eax71 & (1u << 5))) names[n++] = "avx512_bf16";
    if (amx_os && (w.edx7 & (1u << 24))) names[n++] = "amx_tile";
    if (amx_os && (w.edx7 & (1u << 22))) names[n++] = "amx_bf16";
    if (amx_os && (w.edx7 & (1u << 25))) names[n++] = "amx_int8";
    PyObject *out = PyTuple_New(n);
    if (!out) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, s);
    }
    return out;
#else
    Py_RETURN_NONE;
#endif
}

/* Buffers shared by both entry points: x (n, cin, h, w), weight, bias (cout_out), out. */
typedef struct {
    Py_buffer x, wt, bias, out, res;
    int held;
    const float *residual; /* res.buf, or NULL without a residual */
} buffers;

static void release(buffers *b) {
    Py_buffer *all[] = {&b->x, &b->wt, &b->bias, &b->out, &b->res};
    for (int i = 0; i < b->held; i++) PyBuffer_Release(all[i]);
}

/* ores: NULL or None, or the residual (n, cout_out, h, w) float32 added after the activation. */
static int get_all(buffers *b, PyObject *ox, PyObject *owt, PyObject *obias, PyObject *oout, int n,
                   int cin, int cout_out, int h, int w, Py_ssize_t n_weight, const char *wformat,
                   PyObject *ores) {
    const Py_ssize_t hw = (Py_ssize_t)h * w;
    b->held = 0;
    b->residual = NULL;
    if (get_buffer(ox, &b->x, (Py_ssize_t)n * cin * hw, "f", 0, "x") < 0) return -1;
    b->held = 1;
    if (get_buffer(owt, &b->wt, n_weight, wformat, 0, "weight") < 0) goto fail;
    b->held = 2;
    if (get_buffer(obias, &b->bias, cout_out, "f", 0, "bias") < 0) goto fail;
    b->held = 3;
    if (get_buffer(oout, &b->out, (Py_ssize_t)n * cout_out * hw, "f", 1, "out") < 0) goto fail;
    b->held = 4;
    if (ores != NULL && ores != Py_None) {
        if (get_buffer(ores, &b->res, (Py_ssize_t)n * cout_out * hw, "f", 0, "residual") < 0) goto fail;
        b->held = 5;
        b->residual = b->res.buf;
    }
    return 0;
fail:
    release(b);
    return -1;
}

/* One 64-byte-aligned block for k scratch arrays of the given byte sizes; part[i] points into
 * it. Returns the block (to free) or NULL with MemoryError set. */
static void *scratch(int k, const size_t *bytes, void **part) {
    size_t total = 0;
    for (int i = 0; i < k; i++) total += (bytes[i] + 63) / 64 * 64;
    char *block = aligned_alloc(64, total);
    if (!block) {
        PyErr_NoMemory();
        return NULL;
    }
    for (size_t i = 0, at = 0; i < (size_t)k; at += (bytes[i] + 63) / 64 * 64, i++) part[i] = block + at;
    return block;
}

/* Positions inside a map are int: keep a padded map and its scratch far from INT_MAX. */
static int bad_sizes(int n, int cin, int cout, int h, int w, int act) {
    return n < 0 || cin < 1 || cout < 1 || cin > 1024 || cout > 1024 || h < 1 || w < 1 ||
           h > 4096 || w > 4096 || (int64_t)(h + 3) * (w + 2) * 1024 > INT32_MAX || act < 0 ||
           act > ACT_SHRINK;
}

/* Nonzero, with the Python error set, unless AMX is usable and the sizes are the AMX kernels':
 * cin a multiple of 32, cout (tile rows) of 16 with cout_out of them real, a bounded map. */
static int amx_refuses(const char *what, int n, int cin, int cout, int cout_out, int h, int w, int act) {
    if (usable_cached != 1) {
        PyErr_Format(PyExc_RuntimeError, "AMX is not usable here: %s (call amx_usable() first)", why_not);
        return 1;
    }
    if (bad_sizes(n, cin, cout, h, w, act) || cin < 32 || cin % 32 || cout < 16 || cout % 16 ||
        cout_out < 1 || cout_out > cout || cout - cout_out >= 16) {
        PyErr_Format(PyExc_ValueError, "%s: bad dimensions (cin %% 32, cout %% 16, map size) or activation", what);
        return 1;
    }
    return 0;
}

/* direct_conv(x, weight, bias, act, lo, hi, out, n, cin, cout, h, w[, residual]): all float32. */
static PyObject *direct_conv(PyObject *self, PyObject *args) {
    PyObject *ox, *owt, *obias, *oout, *ores = Py_None;
    int act, n, cin, cout, h, w;
    float lo, hi;
    if (!PyArg_ParseTuple(args, "OOOiffOiiiii|O", &ox, &owt, &obias, &act, &lo, &hi, &oout, &n, &cin,
                          &cout, &h, &w, &ores))
        return NULL;
    if (bad_sizes(n, cin, cout, h, w, act)) {
        PyErr_SetString(PyExc_ValueError, "direct conv: bad dimensions or activation");
        return NULL;
    }
    buffers b;
    if (get_all(&b, ox, owt, obias, oout, n, cin, cout, h, w, (Py_ssize_t)cout * cin * 9, "f", ores) < 0)
        return NULL;
    const int rows = direct_rows(h, w);
    const size_t bytes[] = {sizeof(float) * (size_t)cin * rows, sizeof(float) * (size_t)cout * rows};
    void *part[2], *block = scratch(2, bytes, part);
    if (!block) {
        release(&b);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    direct_maps(b.x.buf, b.wt.buf, b.bias.buf, act, lo, hi, b.out.buf, n, cin, cout, h, w, part[0], part[1],
                b.residual);
    Py_END_ALLOW_THREADS
    free(block);
    release(&b);
    Py_RETURN_NONE;
}

/* amx_conv(x, wt, bias, act, lo, hi, out, n, cin, cout, cout_out, h, w[, residual]): x, bias,
 * out, residual float32; wt uint16 (bf16 A tiles of cout rows, cout_out of them real). */
static PyObject *amx_conv(PyObject *self, PyObject *args) {
    PyObject *ox, *owt, *obias, *oout, *ores = Py_None;
    int act, n, cin, cout, cout_out, h, w;
    float lo, hi;
    if (!PyArg_ParseTuple(args, "OOOiffOiiiiii|O", &ox, &owt, &obias, &act, &lo, &hi, &oout, &n,
                          &cin, &cout, &cout_out, &h, &w, &ores))
        return NULL;
    if (amx_refuses("amx conv", n, cin, cout, cout_out, h, w, act)) return NULL;
#if HAVE_AMX
    buffers b;
    if (get_all(&b, ox, owt, obias, oout, n, cin, cout_out, h, w, (Py_ssize_t)9 * cin * cout, "H", ores) < 0)
        return NULL;
    const geometry g = geometry_of(h, w);
    const size_t bytes[] = {sizeof(uint16_t) * (size_t)g.rows * cin, sizeof(float) * 32 * 32,
                            sizeof(float) * (size_t)cout * g.rows};
    void *part[3], *block = scratch(3, bytes, part);
    if (!block) {
        release(&b);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    amx_maps(b.x.buf, b.wt.buf, b.bias.buf, act, lo, hi, b.out.buf, n, cin, cout, cout_out, h, w, part[0],
             part[1], part[2], b.residual);
    Py_END_ALLOW_THREADS
    free(block);
    release(&b);
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, why_not);
    return NULL;
#endif
}

/* amx_deform(x, offset, wt, bias, out, n, cin, cout, cout_out, h, w): x, offset, bias, out
 * float32; wt uint16 (bf16 B tiles as for amx_conv). */
static PyObject *amx_deform(PyObject *self, PyObject *args) {
    PyObject *ox, *ooff, *owt, *obias, *oout;
    int n, cin, cout, cout_out, h, w;
    if (!PyArg_ParseTuple(args, "OOOOOiiiiii", &ox, &ooff, &owt, &obias, &oout, &n, &cin, &cout,
                          &cout_out, &h, &w))
        return NULL;
    if (amx_refuses("amx deform", n, cin, cout, cout_out, h, w, ACT_NONE)) return NULL;
#if HAVE_AMX
    buffers b;
    if (get_all(&b, ox, owt, obias, oout, n, cin, cout_out, h, w, (Py_ssize_t)9 * cin * cout, "H", NULL) < 0)
        return NULL;
    Py_buffer boff;
    if (get_buffer(ooff, &boff, (Py_ssize_t)n * 18 * h * w, "f", 0, "offset") < 0) {
        release(&b);
        return NULL;
    }
    const int64_t hw = (int64_t)h * w, hwp = (hw + 31) / 32 * 32;
    const size_t bytes[] = {sizeof(float) * (size_t)((hw + 1) * cin + 16), sizeof(uint16_t) * (size_t)9 * 32 * cin,
                            sizeof(float) * 32 * 32, sizeof(float) * (size_t)(cout * hwp),
                            sizeof(float) * (size_t)(2 * hwp)};
    void *part[5], *block = scratch(5, bytes, part);
    if (!block) {
        PyBuffer_Release(&boff);
        release(&b);
        return NULL;
    }
    float *rc = part[4];
    Py_BEGIN_ALLOW_THREADS
    amx_deform_maps(b.x.buf, boff.buf, b.wt.buf, b.bias.buf, b.out.buf, n, cin, cout, cout_out, h, w,
                    part[0], part[1], part[2], part[3], rc, rc + hwp);
    Py_END_ALLOW_THREADS
    free(block);
    PyBuffer_Release(&boff);
    release(&b);
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, why_not);
    return NULL;
#endif
}

#define CHAIN_MAX 16

/* chain_conv(x, out, n, h, w, layers[, residual]): layers a sequence of (amx, wt, bias, act, lo,
 * hi, cin, cout, cout_out) tuples, each as for amx_conv (amx = 1) or direct_conv (amx = 0, cout =
 * cout_out); x (n, cin of the first, h, w), out and residual (n, cout_out of the last, h, w)
 * float32; the residual is added to the last conv's output. */
static PyObject *chain_conv(PyObject *self, PyObject *args) {
    PyObject *ox, *oout, *olayers, *ores = Py_None;
    int n, h, w;
    if (!PyArg_ParseTuple(args, "OOiiiO|O", &ox, &oout, &n, &h, &w, &olayers, &ores)) return NULL;
    if (usable_cached != 1) {
        PyErr_Format(PyExc_RuntimeError, "AMX is not usable here: %s (call amx_usable() first)", why_not);
        return NULL;
    }
#if HAVE_AMX
    PyObject *seq = PySequence_Fast(olayers, "layers must be a sequence of tuples");
    if (!seq) return NULL;
    const Py_ssize_t L = PySequence_Fast_GET_SIZE(seq);
    chain_layer ly[CHAIN_MAX];
    Py_buffer views[2 * CHAIN_MAX + 3];
    int held = 0;
    PyObject *result = NULL;
    void *block = NULL;
    if (L < 1 || L > CHAIN_MAX) {
        PyErr_Format(PyExc_ValueError, "chain conv: 1 to %d layers, got %zd", CHAIN_MAX, L);
        goto done;
    }
    for (Py_ssize_t k = 0; k < L; k++) {
        PyObject *owt, *obias;
        chain_layer *l = &ly[k];
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        if (!PyTuple_Check(item)) {
            PyErr_Format(PyExc_TypeError, "chain conv: layer %zd is not a tuple", k);
            goto done;
        }
        if (!PyArg_ParseTuple(item, "iOOiffiii", &l->amx, &owt, &obias, &l->act, &l->lo,
                              &l->hi, &l->cin, &l->cout, &l->cout_out))
            goto done;
        if (l->amx ? amx_refuses("chain conv", n, l->cin, l->cout, l->cout_out, h, w, l->act)
                   : bad_sizes(n, l->cin, l->cout, h, w, l->act) || l->cout != l->cout_out) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "chain conv: bad dimensions of layer %zd", k);
            goto done;
        }
        /* an AMX conv feeding an AMX conv writes its rows whole: all its outputs are real */
        if (k > 0 && (l->cin != ly[k - 1].cout_out ||
                      (l->amx && ly[k - 1].amx && (ly[k - 1].cout != ly[k - 1].cout_out || l->cin % 32)))) {
            PyErr_Format(PyExc_ValueError, "chain conv: layer %zd does not take layer %zd's output", k, k - 1);
            goto done;
        }
        const Py_ssize_t n_weight = (Py_ssize_t)9 * l->cin * l->cout;
        if (get_buffer(owt, &views[held], n_weight, l->amx ? "H" : "f", 0, "weight") < 0) goto done;
        l->wt = views[held++].buf;
        if (get_buffer(obias, &views[held], l->cout_out, "f", 0, "bias") < 0) goto done;
        l->bias = views[held++].buf;
    }
    const int64_t hw = (int64_t)h * w;
    if (get_buffer(ox, &views[held], (Py_ssize_t)(n * hw * ly[0].cin), "f", 0, "x") < 0) goto done;
    const float *x = views[held++].buf;
    if (get_buffer(oout, &views[held], (Py_ssize_t)(n * hw * ly[L - 1].cout_out), "f", 1, "out") < 0) goto done;
    float *out = views[held++].buf;
    const float *res = NULL;
    if (ores != Py_None) {
        if (get_buffer(ores, &views[held], (Py_ssize_t)(n * hw * ly[L - 1].cout_out), "f", 0, "residual") < 0) goto done;
        res = views[held++].buf;
    }
    const int wp = w + 2, rows = direct_rows(h, w), n_out = ((h - 1) * wp + w + 63) / 64 * 64;
    size_t bytes[2 * CHAIN_MAX + 3];
    bytes[0] = ly[0].amx ? sizeof(uint16_t) * (size_t)rows * ly[0].cin : sizeof(float) * (size_t)rows * ly[0].cin;
    bytes[1] = (size_t)n_out;
    bytes[2] = sizeof(float) * 32 * 32;
    for (Py_ssize_t k = 0; k < L; k++) {
        const int next_amx = k + 1 < L && ly[k + 1].amx;
        bytes[3 + 2 * k] = ly[k].amx && next_amx ? 0 : sizeof(float) * (size_t)rows * ly[k].cout;
        bytes[4 + 2 * k] = next_amx ? sizeof(uint16_t) * (size_t)rows * ly[k].cout_out : 0;
    }
    void *part[2 * CHAIN_MAX + 3];
    block = scratch(3 + 2 * (int)L, bytes, part);
    if (!block) goto done;
    for (Py_ssize_t k = 0; k < L; k++) {
        ly[k].planar = part[3 + 2 * k];
        ly[k].pm = part[4 + 2 * k];
    }
    uint8_t *valid = part[1];
    for (int p = 0; p < n_out; p++) valid[p] = p / wp < h && p % wp < w;
    Py_BEGIN_ALLOW_THREADS
    memset(part[0], 0, bytes[0]);
    for (Py_ssize_t k = 0; k < L; k++) {
        if (bytes[3 + 2 * k]) memset(ly[k].planar, 0, bytes[3 + 2 * k]);
        if (bytes[4 + 2 * k]) memset(ly[k].pm, 0, bytes[4 + 2 * k]);
    }
    chain_maps(x, out, n, h, w, (int)L, ly, part[0], part[0], valid, part[2], res);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(block);
    for (int i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    Py_DECREF(seq);
    return result;
#else
    PyErr_SetString(PyExc_RuntimeError, why_not);
    return NULL;
#endif
}

/* attention(mid, nb, wm, bm, wn, bn, wmix, bmix, out, n, c, half, h, w): all float32; wm, wn
 * (half, c), bm, bn (half), wmix (2, 2, 3, 3), bmix (2), out (n, 2 half, h, w). */
static PyObject *attention(PyObject *self, PyObject *args) {
    PyObject *o[9];
    int n, c, half, h, w;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOiiiii", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &n,
                          &c, &half, &h, &w))
        return NULL;
    if (bad_sizes(n, c, 2 * half, h, w, ACT_NONE) || half < 1) {
        PyErr_SetString(PyExc_ValueError, "attention: bad dimensions");
        return NULL;
    }
    const Py_ssize_t hw = (Py_ssize_t)h * w;
    const Py_ssize_t nchw = (Py_ssize_t)n * c * hw, out = (Py_ssize_t)n * 2 * half * hw; /* no int overflow */
    const Py_ssize_t sizes[9] = {nchw, nchw, (Py_ssize_t)half * c, half, (Py_ssize_t)half * c, half, 36, 2, out};
    const char *names[9] = {"mid", "nb", "mid weight", "mid bias", "nb weight", "nb bias", "mix weight", "mix bias", "out"};
    Py_buffer v[9];
    int held = 0;
    for (; held < 9; held++)
        if (get_buffer(o[held], &v[held], sizes[held], "f", held == 8, names[held]) < 0) goto fail;
    const int rows = direct_rows(h, w);
    const size_t bytes[] = {sizeof(float) * 2 * (size_t)rows, sizeof(float) * 2 * (size_t)rows};
    void *part[2], *block = scratch(2, bytes, part);
    if (!block) goto fail;
    Py_BEGIN_ALLOW_THREADS
    attention_maps(v[0].buf, v[1].buf, v[2].buf, v[3].buf, v[4].buf, v[5].buf, v[6].buf, v[7].buf, v[8].buf, n, c,
                   half, h, w, part[0], part[1]);
    Py_END_ALLOW_THREADS
    free(block);
    for (int i = 0; i < 9; i++) PyBuffer_Release(&v[i]);
    Py_RETURN_NONE;
fail:
    for (int i = 0; i < held; i++) PyBuffer_Release(&v[i]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"amx_deform", amx_deform, METH_VARARGS,
     "amx_deform(x, offset, wt, bias, out, n, cin, cout, cout_out, h, w): see conv.c"},
    {"amx_usable", amx_usable, METH_NOARGS, "amx_usable() -> (bool, reason): whether amx_conv() can run here"},
    {"cpu_flags", cpu_flags, METH_NOARGS, "cpu_flags() -> tuple of usable instruction sets (CPUID and XCR0), or None"},
    {"amx_conv", amx_conv, METH_VARARGS,
     "amx_conv(x, wt, bias, act, lo, hi, out, n, cin, cout, cout_out, h, w[, residual]): see conv.c"},
    {"attention", attention, METH_VARARGS,
     "attention(mid, nb, wm, bm, wn, bn, wmix, bmix, out, n, c, half, h, w): see conv.c"},
    {"chain_conv", chain_conv, METH_VARARGS,
     "chain_conv(x, out, n, h, w, layers[, residual]): consecutive convs in one call, see conv.c"},
    {"direct_conv", direct_conv, METH_VARARGS,
     "direct_conv(x, weight, bias, act, lo, hi, out, n, cin, cout, h, w[, residual]): see conv.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_conv", NULL, -1, methods};

PyMODINIT_FUNC PyInit__conv(void) { return PyModule_Create(&module); }
