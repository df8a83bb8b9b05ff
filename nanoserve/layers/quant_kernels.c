/* Low-bit linear kernels: y = x W^T (+ bias) with W in nanoserve's blocked layout (4- or 8-bit codes, scales
 * beside them; the layout is defined, written and read back in nanoserve/quantization/layout.py, whose
 * reference_linear is what these are tested against).
 *
 * Two ways to multiply, chosen by the caller (quantization_activations):
 *   q_linear_f32: float32 activations; codes are widened to float in registers and FMA'd (the exact-parity
 *                 path: only the summation order differs from x @ dequantize(W)^T).
 *   q_linear_i8:  activations rounded per token to int8, integer dot products (AVX2 maddubs/madd, or
 *                 AVX-VNNI dpbusd where the CPU has it) per group, scales applied once per group.
 * And q_dequant_f32 widens whole rows to float32 for large batches, where a float GEMM on the widened rows
 * beats re-widening every tile for every row of x.
 *
 * Work splits over 8-row tiles (one record per group: 8 scales, [8 scale*zero], 8 rows of codes), so a tile
 * is read from memory once whatever M is; with several rows of x it is reread from L1. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QT 8        /* rows per tile */
#define QCHUNK 32   /* k per chunk */
#define Q_PAR_MIN 65536  /* below this many weight bytes x rows, one thread is faster than waking the pool */

typedef struct {
    int64_t N, K, G, ngroups, header, row_bytes, record;
    int bits, asym;
} qshape;

static qshape q_shape(int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym) {
    qshape s;
    s.N = N; s.K = K; s.G = G; s.ngroups = K / G; s.bits = (int)bits; s.asym = (int)asym;
    s.header = QT * 4 * (asym ? 2 : 1);
    s.row_bytes = G * bits / 8;
    s.record = s.header + QT * s.row_bytes;
    return s;
}

static inline const uint8_t *q_record(const uint8_t *w, const qshape *s, int64_t tile, int64_t g) {
    return w + (tile * s->ngroups + g) * s->record;
}

/* Ask for the bytes Q_PREFETCH ahead of those about to be read: a thread streams its tiles in order, and at
   batch 1 the hardware prefetcher alone leaves a decode step well below the machine's read bandwidth on some
   CPUs (each call streams only a few MB per thread, too short for it to ramp up). Into L2 (locality 2), one
   line per line read, rather than a burst into L1 for a whole record at its start. How far ahead depends on
   the CPU, so the build may set the distances (native.py, _prefetch_flags):
   * Sapphire Rapids, 2 threads, 0.6B-shaped weights from DRAM: int4 g128 17 -> 21 GB/s for the L2 hint,
     int8 24 -> 26 GB/s for one prefetch per line; 4 KiB ahead rather than 2: SmolLM2 int4 decode 210 ->
     245-279 tok/s, Qwen3-0.6B 51 -> 56. These are the defaults.
   * Zen 4 (EPYC), 2 threads, Qwen3-0.6B C decode step, libraries alternated step by step in one process:
     4 KiB ahead is the worst distance there (int4 a8 13.9 ms a step, int8 a8 16.6); 1 KiB gives 9.8 and
     14.3. The float-activation kernels (Q_PREFETCH_F32) are best with no software prefetch at all (int4
     17.0 -> 14.3 ms, int8 17.7 -> 17.4; 1 KiB: 14.1 and 19.1). 0 turns a distance off. */
#ifndef Q_PREFETCH
#define Q_PREFETCH 4096
#endif
#ifndef Q_PREFETCH_F32
#define Q_PREFETCH_F32 4096
#endif
static inline void q_prefetch_record(const uint8_t *rec, const qshape *s) {
    if (Q_PREFETCH == 0) return;
    for (int64_t off = 0; off < s->record; off += 64) __builtin_prefetch(rec + Q_PREFETCH + off, 0, 2);
}
/* The same for the 64 bytes at p, issued beside their load (one row of x reads the codes once, in order). */
static inline void q_prefetch_line(const uint8_t *p) {
    if (Q_PREFETCH != 0) __builtin_prefetch(p + Q_PREFETCH, 0, 2);
}
/* The same, in the float-activation kernels. */
static inline void q_prefetch_line_f32(const uint8_t *p) {
    if (Q_PREFETCH_F32 != 0) __builtin_prefetch(p + Q_PREFETCH_F32, 0, 2);
}

/* Store the 8 lanes of a tile's result for one row of x, dropping padding rows past N. */
static inline void q_store_tile(float *y, const float *v, int64_t n0, int64_t N, const float *bias) {
    for (int j = 0; j < QT && n0 + j < N; j++) y[n0 + j] = v[j] + (bias ? bias[n0 + j] : 0.f);
}

/* Byte offset of row r's codes for k (a multiple of 16 within the group) in a record's code area: chunks of 32
   k, each holding the 8 rows' bytes one row after another (see layout.py). */
static inline int64_t q_code_offset(int bits, int r, int64_t k) {
    const int64_t chunk = QCHUNK * bits / 8;
    return (k / QCHUNK) * QT * chunk + r * chunk + (k % QCHUNK) * bits / 8;
}

#if defined(__AVX2__)
static inline __m256 q_hsum8x8_ps(const __m256 *a) {
    __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

static inline __m256i q_hsum8x8_epi32(const __m256i *a) {
    __m256i h01 = _mm256_hadd_epi32(a[0], a[1]), h23 = _mm256_hadd_epi32(a[2], a[3]);
    __m256i h45 = _mm256_hadd_epi32(a[4], a[5]), h67 = _mm256_hadd_epi32(a[6], a[7]);
    __m256i lo = _mm256_hadd_epi32(h01, h23), hi = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
/* sum over k in the group of codes * x for the 8 rows of one record, as a vector of 8 row sums (AVX-512: 16
   codes per widening; a 4-bit chunk's 16 bytes widen to k 0-7, 16-23 in the low nibbles and k 8-15, 24-31 in
   the high ones, so x is gathered in those two orders once per chunk for all 8 rows). */
static inline __m256 q_group_dot_f32(const uint8_t *codes, const qshape *s, const float *x, const int prefetch) {
    __m512 acc[QT];
    for (int r = 0; r < QT; r++) acc[r] = _mm512_setzero_ps();
    if (s->bits == 4) {
        const __m512i low = _mm512_set1_epi32(15);
        for (int64_t c = 0; c < s->G; c += QCHUNK) {
            const __m512 xa = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x + c)), _mm256_loadu_ps(x + c + 16), 1);
            const __m512 xb = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x + c + 8)), _mm256_loadu_ps(x + c + 24), 1);
            if (prefetch) {
                q_prefetch_line_f32(codes + q_code_offset(4, 0, c));
                q_prefetch_line_f32(codes + q_code_offset(4, 4, c));
            }
            #pragma GCC unroll 8
            for (int r = 0; r < QT; r++) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + q_code_offset(4, r, c))));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), xa, acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), xb, acc[r]);
            }
        }
    } else {
        for (int64_t c = 0; c < s->G; c += 16) {
            const __m512 xv = _mm512_loadu_ps(x + c);
            if (prefetch && c % QCHUNK == 0)  /* a chunk's 8 rows: 256 bytes */
                for (int r = 0; r < QT; r += 2) q_prefetch_line_f32(codes + q_code_offset(8, r, c));
            #pragma GCC unroll 8
            for (int r = 0; r < QT; r++) {
                const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + q_code_offset(8, r, c))));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), xv, acc[r]);
            }
        }
    }
    __m256 half[QT];
    for (int r = 0; r < QT; r++)
        half[r] = _mm256_add_ps(_mm512_castps512_ps256(acc[r]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1)));
    return q_hsum8x8_ps(half);
}
#else
/* sum over k in the group of codes * x for the 8 rows of one record, as a vector of 8 row sums. */
static inline __m256 q_group_dot_f32(const uint8_t *codes, const qshape *s, const float *x, const int prefetch) {
    __m256 acc[QT];
    for (int r = 0; r < QT; r++) acc[r] = _mm256_setzero_ps();
    if (s->bits == 4) {
        const __m256i low = _mm256_set1_epi32(15);
        for (int64_t c = 0; c < s->G; c += 16) {
            const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
            if (prefetch && c % QCHUNK == 0) {  /* a chunk's 8 rows: 128 bytes */
                q_prefetch_line_f32(codes + q_code_offset(4, 0, c));
                q_prefetch_line_f32(codes + q_code_offset(4, 4, c));
            }
            #pragma GCC unroll 8
            for (int r = 0; r < QT; r++) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + q_code_offset(4, r, c))));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), x0, acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), x1, acc[r]);
            }
        }
    } else {
        for (int64_t c = 0; c < s->G; c += 16) {
            const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
            if (prefetch && c % QCHUNK == 0)
                for (int r = 0; r < QT; r += 2) q_prefetch_line_f32(codes + q_code_offset(8, r, c));
            #pragma GCC unroll 8
            for (int r = 0; r < QT; r++) {
                const int8_t *p = (const int8_t *)codes + q_code_offset(8, r, c);
                const __m256i v0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
                const __m256i v1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v0), x0, acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v1), x1, acc[r]);
            }
        }
    }
    return q_hsum8x8_ps(acc);
}
#endif
#endif

/* Per row of x, the sum of its entries in each group (the zero points' share: sum_k (c - z) x = dot - z sum x). */
static void q_group_sums_f32(const float *x, int64_t M, int64_t x_stride, const qshape *s, float *xs) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < s->ngroups; g++) {
            float t = 0.f;
            const float *xg = x + m * x_stride + g * s->G;
            for (int64_t k = 0; k < s->G; k++) t += xg[k];
            xs[m * s->ngroups + g] = t;
        }
}

/* Whether a product is large enough to be worth waking the thread pool for. */
static inline int q_parallel(const qshape *s, int64_t M) {
    const int64_t tiles = (s->N + QT - 1) / QT;
    return tiles >= 4 && tiles * s->ngroups * s->record * M >= Q_PAR_MIN;
}

/* The "_team" forms below are the kernels' bodies: every thread of an OpenMP team calls one with the same
   arguments (outside any parallel region it runs as a team of one), and each takes its share of the tiles with
   an orphaned `omp for`, whose barrier ends the call. The exported functions wrap one in a parallel region;
   the C decode step (decode_kernels.c) calls them inside its own single region, so a step forks the pool once
   instead of ~5 times per layer. Per-thread scratch is allocated by each thread; the work split changes which
   thread computes a tile, never the arithmetic, so the results are the same whoever calls. */
void q_linear_f32_team(const uint8_t *w, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym,
                       const float *x, int64_t M, int64_t x_stride, const float *bias, float *y) {
    const qshape s = q_shape(N, K, G, bits, asym);
    const int64_t tiles = (N + QT - 1) / QT;
    /* each thread sums x's groups itself (M K adds beside the M N K / threads of the product): no barrier */
    float *xs = malloc(sizeof(float) * (size_t)(M * s.ngroups));
    q_group_sums_f32(x, M, x_stride, &s, xs);
    const float implied_zero = bits == 4 ? 8.f : 0.f;  /* symmetric: 8-bit codes are stored signed */
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * x_stride;
            float out[QT];
#if defined(__AVX2__)
            __m256 tot = _mm256_setzero_ps();
            for (int64_t g = 0; g < s.ngroups; g++) {
                const uint8_t *rec = q_record(w, &s, t, g);
                const __m256 scale = _mm256_loadu_ps((const float *)rec);
                const __m256 sum = _mm256_set1_ps(xs[m * s.ngroups + g]);
                const __m256 mins = s.asym ? _mm256_loadu_ps((const float *)rec + QT)
                                           : _mm256_mul_ps(scale, _mm256_set1_ps(implied_zero));
                tot = _mm256_fmadd_ps(q_group_dot_f32(rec + s.header, &s, xm + g * G, m == 0), scale, tot);
                tot = _mm256_fnmadd_ps(mins, sum, tot);
            }
            _mm256_storeu_ps(out, tot);
#else
            for (int r = 0; r < QT; r++) out[r] = 0.f;
            for (int64_t g = 0; g < s.ngroups; g++) {
                const uint8_t *rec = q_record(w, &s, t, g);
                const float *scale = (const float *)rec;
                for (int r = 0; r < QT; r++) {
                    const uint8_t *codes = rec + s.header;
                    float dot = 0.f;
                    for (int64_t k = 0; k < G; k++) {
                        const uint8_t *b = codes + q_code_offset((int)bits, r, k - k % 16);
                        float c = bits == 4 ? (float)((b[k % 8] >> (k % 16 >= 8 ? 4 : 0)) & 15) : (float)(int8_t)b[k % 16];
                        dot += c * xm[g * G + k];
                    }
                    const float mn = s.asym ? ((const float *)rec)[QT + r] : scale[r] * implied_zero;
                    out[r] += dot * scale[r] - mn * xs[m * s.ngroups + g];
                }
            }
#endif
            q_store_tile(y + m * N, out, t * QT, N, bias);
        }
    }
    free(xs);
}

void q_linear_f32(const uint8_t *w, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym,
                  const float *x, int64_t M, int64_t x_stride, const float *bias, float *y) {
    const qshape s = q_shape(N, K, G, bits, asym);
    #pragma omp parallel if (q_parallel(&s, M))
    q_linear_f32_team(w, N, K, G, bits, asym, x, M, x_stride, bias, y);
}

/* Rows [row0, row0 + rows) (row0 a multiple of 8) widened to float32, out [rows][K] row-major. */
void q_dequant_f32(const uint8_t *w, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym,
                   int64_t row0, int64_t rows, float *out) {
    const qshape s = q_shape(N, K, G, bits, asym);
    const int64_t t0 = row0 / QT, t1 = (row0 + rows + QT - 1) / QT;
    const float implied_zero = bits == 4 ? 8.f : 0.f;
    #pragma omp parallel for schedule(static) if (t1 - t0 >= 4)
    for (int64_t t = t0; t < t1; t++)
        for (int64_t g = 0; g < s.ngroups; g++) {
            const uint8_t *rec = q_record(w, &s, t, g);
            const float *scale = (const float *)rec;
            for (int r = 0; r < QT; r++) {
                const int64_t n = t * QT + r;
                if (n < row0 || n >= row0 + rows) continue;
                const float sc = scale[r], mn = s.asym ? scale[QT + r] : scale[r] * implied_zero;
                const uint8_t *codes = rec + s.header;
                float *o = out + (n - row0) * K + g * G;
                for (int64_t c = 0; c < G; c += 16) {
                    const uint8_t *b = codes + q_code_offset((int)bits, r, c);
                    if (bits == 4)
                        for (int i = 0; i < 8; i++) {
                            o[c + i] = (float)(b[i] & 15) * sc - mn;
                            o[c + i + 8] = (float)(b[i] >> 4) * sc - mn;
                        }
                    else
                        for (int i = 0; i < 16; i++) o[c + i] = (float)(int8_t)b[i] * sc - mn;
                }
            }
        }
}

/* ---- int8 activations ---- */

/* Row m of x rounded to int8 with scale max|x| / 127 (round to nearest even, as torch.round), and the sum of
   the codes of each group. For 4-bit weights the codes of each 32-chunk are stored in the order the weight
   nibbles unpack to: k 0-7, 16-23, 8-15, 24-31 (a dot product only needs both sides in the same order). */

#if defined(__AVX2__)
/* The same, 32 codes at a time (K is a multiple of 32): round-to-nearest-even in the vector unit as rintf does,
   saturating packs to bytes, then the 4-byte groups put in natural or in the 4-bit unpack order. At M = 128
   the scalar loop was a fifth of a SmolLM2 projection's time. */
static void q_quantize_row(const float *x, const qshape *s, int8_t *xq, float *sx, int32_t *xsum) {
    __m256 vmax = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t k = 0; k < s->K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = 0.f;
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    const float inv = amax > 0 ? 127.f / amax : 1.f;
    *sx = amax > 0 ? amax / 127.f : 1.f;
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
    /* of the 32 codes a = k 0-7, b = 8-15, c = 16-23, d = 24-31, the two packs leave the eight 4-byte groups
       as a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7; the permutation puts them in natural or nibble order */
    const __m256i order = s->bits == 4 ? _mm256_setr_epi32(0, 4, 2, 6, 1, 5, 3, 7) : _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < s->ngroups; g++) {
        __m256i tot = _mm256_setzero_si256();
        for (int64_t k = g * s->G; k < (g + 1) * s->G; k += QCHUNK) {
            __m256i q[4];
            for (int i = 0; i < 4; i++) {
                __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), vinv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
                tot = _mm256_add_epi32(tot, q[i]);
            }
            const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)(xq + k), _mm256_permutevar8x32_epi32(packed, order));
        }
        int32_t t[8];
        _mm256_storeu_si256((__m256i *)t, tot);
        xsum[g] = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    }
}
#else
static void q_quantize_row(const float *x, const qshape *s, int8_t *xq, float *sx, int32_t *xsum) {
    float amax = 0.f;
    for (int64_t k = 0; k < s->K; k++) {
        const float a = x[k] < 0 ? -x[k] : x[k];
        amax = a > amax ? a : amax;
    }
    const float inv = amax > 0 ? 127.f / amax : 1.f;
    *sx = amax > 0 ? amax / 127.f : 1.f;
    for (int64_t g = 0; g < s->ngroups; g++) {
        int32_t t = 0;
        for (int64_t k = g * s->G; k < (g + 1) * s->G; k++) {
            float v = __builtin_rintf(x[k] * inv);
            v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
            const int8_t q = (int8_t)v;
            int64_t dst = k;
            if (s->bits == 4) {
                const int64_t c = k % QCHUNK, base = k - c;
                dst = base + (c < 8 ? c : c < 16 ? c + 8 : c < 24 ? c - 8 : c);
            }
            xq[dst] = q;
            t += q;
        }
        xsum[g] = t;
    }
}
#endif

/* Whether u8 x s8 dot products sum in 32 bits (VNNI) rather than through saturating int16 pairs (maddubs). */
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512BW__))
#define Q_WIDE_DOT 1
#else
#define Q_WIDE_DOT 0
#endif

#if defined(__AVX2__)
static inline __m256i q_dot_u8s8(__m256i acc, __m256i u, __m256i s8) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s8);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s8), _mm256_set1_epi16(1)));
#endif
}

/* 32 4-bit codes (16 bytes) as 32 unsigned bytes in the order k 0-7, 16-23, 8-15, 24-31. */
static inline __m256i q_unpack32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}

/* The 8 row sums of a record from accumulators holding two rows each, [row 2p: 4 lanes | row 2p+1: 4 lanes]:
   lanes of hadd(hadd(a0, a1), hadd(a2, a3)) are rows 0 2 4 6 | 1 3 5 7, then put in order. */
static inline __m256i q_reduce_pairs(const __m256i *a) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    return _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* AVX-512 VNNI: the integer sums of one group of 4-bit codes against one row of quantized x, four rows per
   512-bit load (a chunk's 8 rows are 128 contiguous bytes): sums[0] rows 0-3 and sums[1] rows 4-7, each row's
   in one 128-bit lane (the AVX2 form below holds two rows per register). */
static inline __attribute__((always_inline)) void q_group_sums_i4(const uint8_t *codes, const qshape *s,
                                                                  const int8_t *xq, __m512i *sums) {
    /* High nibbles are taken in place (16 x the code: one AND, no shift per load); their sums, exact
       multiples of 16, are divided once per group. */
    const __m512i low = _mm512_set1_epi8(15), high = _mm512_set1_epi8((char)0xF0);
    __m512i lo0 = _mm512_setzero_si512(), lo1 = lo0, hi0 = lo0, hi1 = lo0;
    for (int64_t c = 0; c < s->G; c += QCHUNK) {
        const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + c)));
        const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + c + 16)));
        const uint8_t *chunk = codes + (c / QCHUNK) * QT * 16;
        q_prefetch_line(chunk);
        q_prefetch_line(chunk + 64);
        const __m512i v0 = _mm512_loadu_si512(chunk), v1 = _mm512_loadu_si512(chunk + 64);
        lo0 = _mm512_dpbusd_epi32(lo0, _mm512_and_si512(v0, low), xl);
        hi0 = _mm512_dpbusd_epi32(hi0, _mm512_and_si512(v0, high), xh);
        lo1 = _mm512_dpbusd_epi32(lo1, _mm512_and_si512(v1, low), xl);
        hi1 = _mm512_dpbusd_epi32(hi1, _mm512_and_si512(v1, high), xh);
    }
    sums[0] = _mm512_add_epi32(lo0, _mm512_srai_epi32(hi0, 4));
    sums[1] = _mm512_add_epi32(lo1, _mm512_srai_epi32(hi1, 4));
}

#define Q_I4_ONE_ROW 1
/* One row of x against a whole tile of 4-bit codes (batch-1 decode): the same dot products, but each group's
   sums are scaled lane by lane (a lane holds part of one row's sum) and the lanes of a row are added up once
   per tile instead of once per group. In cache, one thread: group 32 21.6 -> 30.7 GB/s, group 128 32.5 -> 35.0;
   SmolLM2-135M (group 64) int4 a8 decode 225 -> 240 tok/s, Qwen3-0.6B (group 128) unchanged (memory-bound). */
static void q_tile_i4_one_row(const uint8_t *w, const qshape *s, int64_t t, const int8_t *xq, const int32_t *xsum,
                              float sx, const float *bias, float *y) {
    const __m512i rows03 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i rows47 = _mm512_add_epi32(rows03, _mm512_set1_epi32(4));
    __m512 f0 = _mm512_setzero_ps(), f1 = f0;  /* rows 0-3 | 4-7, four lanes a row */
    __m256 z = _mm256_setzero_ps();
    for (int64_t g = 0; g < s->ngroups; g++) {
        const uint8_t *rec = q_record(w, s, t, g);
        __m512i sums[2];
        q_group_sums_i4(rec + s->header, s, xq + g * s->G, sums);
        const __m256 sc = _mm256_loadu_ps((const float *)rec);
        const __m512 sc512 = _mm512_castps256_ps512(sc);
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[0]), _mm512_permutexvar_ps(rows03, sc512), f0);
        f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[1]), _mm512_permutexvar_ps(rows47, sc512), f1);
        const __m256 mn = s->asym ? _mm256_loadu_ps((const float *)rec + QT) : _mm256_mul_ps(sc, _mm256_set1_ps(8.f));
        z = _mm256_fmadd_ps(mn, _mm256_set1_ps((float)xsum[g]), z);
    }
    /* each 128-bit lane's four floats summed into all four, then lane k's first float is row k (k < 4: f0) */
    f0 = _mm512_add_ps(f0, _mm512_shuffle_ps(f0, f0, _MM_SHUFFLE(2, 3, 0, 1)));
    f1 = _mm512_add_ps(f1, _mm512_shuffle_ps(f1, f1, _MM_SHUFFLE(2, 3, 0, 1)));
    f0 = _mm512_add_ps(f0, _mm512_shuffle_ps(f0, f0, _MM_SHUFFLE(1, 0, 3, 2)));
    f1 = _mm512_add_ps(f1, _mm512_shuffle_ps(f1, f1, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256 rows = _mm512_castps512_ps256(_mm512_permutex2var_ps(f0, pick, f1));
    float out[QT];
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_sub_ps(rows, z), _mm256_set1_ps(sx)));
    q_store_tile(y, out, t * QT, s->N, bias);
}
#else
/* 4-bit codes of the 8 rows of a record against one row of quantized x, two rows per 256-bit load: in a
   chunk, rows 2p and 2p+1 are 32 adjacent bytes, whose low nibbles pair with x's first 16 bytes (k 0-7, 16-23)
   and high nibbles with its last 16 (k 8-15, 24-31), each broadcast to both halves. The accumulators then hold
   row 2p in their low half and row 2p+1 in their high half. */
static inline __m256i q_group_dot_i4_pairs(const uint8_t *codes, const qshape *s, const int8_t *xq) {
    const __m256i low = _mm256_set1_epi8(15);
    __m256i lo[4], hi[4];
    for (int p = 0; p < 4; p++) lo[p] = hi[p] = _mm256_setzero_si256();
    for (int64_t c = 0; c < s->G; c += QCHUNK) {
        const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + c)));
        const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + c + 16)));
        const uint8_t *chunk = codes + (c / QCHUNK) * QT * 16;
        #pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            if (p % 2 == 0) q_prefetch_line(chunk + 32 * p);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(chunk + 32 * p));
            lo[p] = q_dot_u8s8(lo[p], _mm256_and_si256(v, low), xl);
            hi[p] = q_dot_u8s8(hi[p], _mm256_and_si256(_mm256_srli_epi16(v, 4), low), xh);
        }
    }
    __m256i a[4];
    for (int p = 0; p < 4; p++) a[p] = _mm256_add_epi32(lo[p], hi[p]);
    return q_reduce_pairs(a);
}

#endif

/* Several rows of x: the record's codes are first made unsigned bytes, chunk-major like the record ([chunk][8
   rows][32 k]): 4-bit codes unpacked, 8-bit codes with their sign bit flipped (c + 128, compensated through the
   zero point), so every row of x then costs one u8 x s8 dot product per 32 codes. */
static inline void q_unsigned_record(const uint8_t *codes, const qshape *s, uint8_t *out) {
    if (s->bits == 4) {
        for (int64_t c = 0; c < s->G; c += QCHUNK)
            for (int r = 0; r < QT; r++)
                _mm256_storeu_si256((__m256i *)(out + (c / QCHUNK) * QT * 32 + r * 32), q_unpack32(codes + q_code_offset(4, r, c)));
    } else {
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int64_t i = 0; i < s->G * QT; i += 32)
            _mm256_storeu_si256((__m256i *)(out + i), _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + i)), flip));
    }
}

static inline __m256i q_group_dot_unsigned(const uint8_t *u, const qshape *s, const int8_t *xq) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512i acc[4];
    for (int p = 0; p < 4; p++) acc[p] = _mm512_setzero_si512();
    for (int64_t c = 0; c < s->G; c += QCHUNK) {
        const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xq + c)));
        const uint8_t *chunk = u + (c / QCHUNK) * QT * 32;
        #pragma GCC unroll 4
        for (int p = 0; p < 4; p++) acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_loadu_si512(chunk + 64 * p), xv);
    }
    __m256i rows[QT];
    for (int p = 0; p < 4; p++) {
        rows[2 * p] = _mm512_castsi512_si256(acc[p]);
        rows[2 * p + 1] = _mm512_extracti64x4_epi64(acc[p], 1);
    }
    return q_hsum8x8_epi32(rows);
#else
    __m256i acc[QT];
    for (int r = 0; r < QT; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t c = 0; c < s->G; c += QCHUNK) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + c));
        const uint8_t *chunk = u + (c / QCHUNK) * QT * 32;
        #pragma GCC unroll 8
        for (int r = 0; r < QT; r++) acc[r] = q_dot_u8s8(acc[r], _mm256_loadu_si256((const __m256i *)(chunk + 32 * r)), xv);
    }
    return q_hsum8x8_epi32(acc);
#endif
}

/* Integer dot products of one row of quantized x with the 8 rows of a group, codes read from the record. With
   AVX-512 VNNI, 8-bit codes are read as c + 128 (sign bit flipped, two rows per 512-bit load; the caller
   compensates through the zero point, Q_I8_FLIPPED): a third of the instructions of the sign trick below. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q_I8_FLIPPED 1
#else
#define Q_I8_FLIPPED 0
#endif
static inline __m256i q_group_dot_i8(const uint8_t *codes, const qshape *s, const int8_t *xq, const int prefetch) {
#if !defined(Q_I4_ONE_ROW)  /* there one row of 4-bit codes takes q_tile_i4_one_row, several the unpacked form */
    if (s->bits == 4) return q_group_dot_i4_pairs(codes, s, xq);
#endif
#if Q_I8_FLIPPED
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[4];
    for (int p = 0; p < 4; p++) acc[p] = _mm512_setzero_si512();
    for (int64_t c = 0; c < s->G; c += QCHUNK) {
        const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xq + c)));
        const uint8_t *chunk = codes + (c / QCHUNK) * QT * 32;
        #pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            if (prefetch) q_prefetch_line(chunk + 64 * p);
            acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_xor_si512(_mm512_loadu_si512(chunk + 64 * p), flip), xv);
        }
    }
    __m256i rows[QT];
    for (int p = 0; p < 4; p++) {
        rows[2 * p] = _mm512_castsi512_si256(acc[p]);
        rows[2 * p + 1] = _mm512_extracti64x4_epi64(acc[p], 1);
    }
    return q_hsum8x8_epi32(rows);
#else
    __m256i acc[QT];
    for (int r = 0; r < QT; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t c = 0; c < s->G; c += QCHUNK) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + c));
        #pragma GCC unroll 8
        for (int r = 0; r < QT; r++) {
            if (prefetch && r % 2 == 0) q_prefetch_line(codes + q_code_offset(8, r, c));
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(codes + q_code_offset(8, r, c)));
            acc[r] = q_dot_u8s8(acc[r], _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        }
    }
    return q_hsum8x8_epi32(acc);
#endif
}
#endif

#if defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q_BLOCKED 1
/* Several rows of x, AVX-512 VNNI: one 512-bit dot product covers 64 codes, so the per-group reduction of the
   row sums (shuffles, one port) would cost more than the dot products. Instead the tile's codes are made
   unsigned once for all its groups, then each pair of x rows walks every group with its sums in registers:
   per group the integer sums of each lane are scaled lane-wise (scale vectors built once per tile), and the
   lanes of each row are added up once per tile, not once per group. Each weight vector loaded from L1 feeds
   both rows. */
static void q_tile_i8_blocked(const uint8_t *w, const qshape *s, int64_t t, const int8_t *xq, int64_t M,
                              const int32_t *xsum, const float *sx, uint8_t *unpacked, __m512 *scale_lanes,
                              __m256 *mins, const float *bias, float *y) {
    const int64_t G = s->G, K = s->K, ng = s->ngroups;
    const float implied_zero = s->bits == 4 ? 8.f : 0.f;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *rec = q_record(w, s, t, g);
        q_prefetch_record(rec, s);
        const __m256 sc = _mm256_loadu_ps((const float *)rec);
        __m256 mn = s->asym ? _mm256_loadu_ps((const float *)rec + QT) : _mm256_mul_ps(sc, _mm256_set1_ps(implied_zero));
        if (s->bits == 8) mn = _mm256_fmadd_ps(sc, _mm256_set1_ps(128.f), mn);  /* codes + 128 */
        mins[g] = mn;
        q_unsigned_record(rec + s->header, s, unpacked + g * QT * G);
        /* lanes 0-7 of a row-pair accumulator hold row 2p, lanes 8-15 row 2p+1 */
        const __m512 sc512 = _mm512_castps256_ps512(sc);
        for (int p = 0; p < 4; p++) {
            const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi32(2 * p), _mm256_set1_epi32(2 * p + 1), 1);
            scale_lanes[g * 4 + p] = _mm512_permutexvar_ps(idx, sc512);
        }
    }
    for (int64_t m = 0; m < M; m += 2) {
        const int64_t m1 = m + 1 < M ? m + 1 : m;  /* an odd last row is computed twice, stored once */
        __m512 f0[4], f1[4];
        for (int p = 0; p < 4; p++) f0[p] = f1[p] = _mm512_setzero_ps();
        __m256 z0 = _mm256_setzero_ps(), z1 = z0;
        for (int64_t g = 0; g < ng; g++) {
            __m512i a0[4], a1[4];
            for (int p = 0; p < 4; p++) a0[p] = a1[p] = _mm512_setzero_si512();
            const uint8_t *u = unpacked + g * QT * G;
            const int8_t *x0 = xq + m * K + g * G, *x1 = xq + m1 * K + g * G;
            for (int64_t c = 0; c < G; c += QCHUNK) {
                const __m512i xv0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x0 + c)));
                const __m512i xv1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x1 + c)));
                const uint8_t *chunk = u + (c / QCHUNK) * QT * 32;
                #pragma GCC unroll 4
                for (int p = 0; p < 4; p++) {
                    const __m512i wv = _mm512_loadu_si512(chunk + 64 * p);
                    a0[p] = _mm512_dpbusd_epi32(a0[p], wv, xv0);
                    a1[p] = _mm512_dpbusd_epi32(a1[p], wv, xv1);
                }
            }
            for (int p = 0; p < 4; p++) {
                f0[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[p]), scale_lanes[g * 4 + p], f0[p]);
                f1[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[p]), scale_lanes[g * 4 + p], f1[p]);
            }
            z0 = _mm256_fmadd_ps(mins[g], _mm256_set1_ps((float)xsum[m * ng + g]), z0);
            z1 = _mm256_fmadd_ps(mins[g], _mm256_set1_ps((float)xsum[m1 * ng + g]), z1);
        }
        for (int64_t r = 0; r < 2 && m + r < M; r++) {
            const __m512 *f = r ? f1 : f0;
            __m256 rows[QT];
            for (int p = 0; p < 4; p++) {
                rows[2 * p] = _mm512_castps512_ps256(f[p]);
                rows[2 * p + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f[p]), 1));
            }
            const __m256 v = _mm256_mul_ps(_mm256_sub_ps(q_hsum8x8_ps(rows), r ? z1 : z0), _mm256_set1_ps(sx[m + r]));
            float out[QT];
            _mm256_storeu_ps(out, v);
            q_store_tile(y + (m + r) * s->N, out, t * QT, s->N, bias);
        }
    }
}
#endif

#if defined(__AVX2__) && !Q_WIDE_DOT
#define Q_BLOCKED_MADDUBS 1
#define Q_INT16_SPAN (4 * QCHUNK)  /* codes summed in int16 before widening */
/* Several rows of x, 4-bit codes, AVX2 without VNNI (maddubs: u8 x s8 pairs summed into saturating int16).
   Rows 2p and 2p+1 of a chunk are 32 adjacent code bytes; their low nibbles (k 0-7, 16-23 of each row) are
   stored once per tile as one 32-byte vector and their high nibbles (k 8-15, 24-31) as the next, so one maddubs
   against x's first (or last) 16 codes broadcast to both halves serves two weight rows: an accumulator holds
   row 2p in its low half and row 2p+1 in its high half, and four of them cover the tile. A lane adds two
   product pairs per chunk, at most 2 x 2 x 15 x 127 = 7,620, so the int16 sums of 4 chunks (128 codes; 30,480
   of 32,767) cannot saturate: they are widened (madd) once per group of up to 128 (every 128 codes of a larger
   one), scaled lane-wise by the group's scales ([s_2p x 4 | s_2p+1 x 4], built once per tile) and added across
   lanes once per tile. */
static inline __attribute__((always_inline)) void q_tile_i4_maddubs_g(
        const uint8_t *w, const qshape *s, int64_t t, const int8_t *xq, int64_t M, const int32_t *xsum,
        const float *sx, uint8_t *unpacked, __m256 *scale_lanes, __m256 *mins, const float *bias, float *y,
        const int64_t G) {
    const int64_t K = s->K, ng = s->ngroups;
    const __m256i low = _mm256_set1_epi8(15);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *rec = q_record(w, s, t, g);
        q_prefetch_record(rec, s);
        const __m256 sc = _mm256_loadu_ps((const float *)rec);
        mins[g] = s->asym ? _mm256_loadu_ps((const float *)rec + QT) : _mm256_mul_ps(sc, _mm256_set1_ps(8.f));
        for (int p = 0; p < 4; p++)
            scale_lanes[g * 4 + p] = _mm256_permutevar8x32_ps(sc, _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p,
                                                                                  2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1));
        const uint8_t *codes = rec + s->header;
        uint8_t *out = unpacked + g * QT * G;
        for (int64_t c = 0; c < G; c += QCHUNK)
            for (int p = 0; p < 4; p++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(codes + (c / QCHUNK) * QT * 16 + 32 * p));
                uint8_t *o = out + (c / QCHUNK) * QT * 32 + 64 * p;
                _mm256_storeu_si256((__m256i *)o, _mm256_and_si256(v, low));
                _mm256_storeu_si256((__m256i *)(o + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
            }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t m = 0; m < M; m++) {
        const int8_t *xm = xq + m * K;
        __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, z = f0;
        for (int64_t g = 0; g < ng; g++) {
            __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
            const uint8_t *u = unpacked + g * QT * G;
            const int8_t *xg = xm + g * G;
            for (int64_t c0 = 0; c0 < G; c0 += Q_INT16_SPAN) {  /* once, for groups of up to 128 */
                __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
                const int64_t c1 = c0 + Q_INT16_SPAN < G ? c0 + Q_INT16_SPAN : G;
                for (int64_t c = c0; c < c1; c += QCHUNK) {
                    const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xg + c)));
                    const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xg + c + 16)));
                    const uint8_t *ch = u + (c / QCHUNK) * QT * 32;
                    a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)ch), xl));
                    a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(ch + 64)), xl));
                    a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(ch + 128)), xl));
                    a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(ch + 192)), xl));
                    a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(ch + 32)), xh));
                    a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(ch + 96)), xh));
                    a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(ch + 160)), xh));
                    a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)(ch + 224)), xh));
                }
                i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(a0, ones));
                i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(a1, ones));
                i2 = _mm256_add_epi32(i2, _mm256_madd_epi16(a2, ones));
                i3 = _mm256_add_epi32(i3, _mm256_madd_epi16(a3, ones));
            }
            const __m256 *sl = scale_lanes + g * 4;
            f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), sl[0], f0);
            f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), sl[1], f1);
            f2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2), sl[2], f2);
            f3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i3), sl[3], f3);
            z = _mm256_fmadd_ps(mins[g], _mm256_set1_ps((float)xsum[m * ng + g]), z);
        }
        /* lanes of hadd(hadd(f0, f1), hadd(f2, f3)) are rows 0 2 4 6 | 1 3 5 7 */
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(f0, f1), _mm256_hadd_ps(f2, f3));
        const __m256 rows = _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        const __m256 v = _mm256_mul_ps(_mm256_sub_ps(rows, z), _mm256_set1_ps(sx[m]));
        float out[QT];
        _mm256_storeu_ps(out, v);
        q_store_tile(y + m * s->N, out, t * QT, s->N, bias);
    }
}

/* The group size as a constant where it is one of the usual ones, so the chunk loop unrolls (measured: SmolLM2's
   g64 projections at M = 128 went from 100 to 137 GOP/s on 2 Zen 3 threads). */
static void q_tile_i4_maddubs(const uint8_t *w, const qshape *s, int64_t t, const int8_t *xq, int64_t M,
                              const int32_t *xsum, const float *sx, uint8_t *unpacked, __m256 *scale_lanes,
                              __m256 *mins, const float *bias, float *y) {
    switch (s->G) {
    case 32: q_tile_i4_maddubs_g(w, s, t, xq, M, xsum, sx, unpacked, scale_lanes, mins, bias, y, 32); break;
    case 64: q_tile_i4_maddubs_g(w, s, t, xq, M, xsum, sx, unpacked, scale_lanes, mins, bias, y, 64); break;
    case 128: q_tile_i4_maddubs_g(w, s, t, xq, M, xsum, sx, unpacked, scale_lanes, mins, bias, y, 128); break;
    default: q_tile_i4_maddubs_g(w, s, t, xq, M, xsum, sx, unpacked, scale_lanes, mins, bias, y, s->G);
    }
}
#endif

/* The tiled kernel for several rows of x that this build has (at most one: AVX-512 VNNI or AVX2 maddubs), the
   calls it serves, and the type of its per-tile scale vectors. */
#if defined(Q_BLOCKED)
/* per-channel weights (one group per row) gain nothing from it: measured equal or slower */
#define Q_TILED(M, s) ((M) > 1 && (s).ngroups > 1)
#define Q_TILE q_tile_i8_blocked
typedef __m512 q_lanes;
#elif defined(Q_BLOCKED_MADDUBS)
#define Q_TILED(M, s) ((M) > 1 && (s).bits == 4)
#define Q_TILE q_tile_i4_maddubs
typedef __m256 q_lanes;
#endif

/* x's rows rounded to int8 (q_quantize_row): the codes, each row's scale and each group's code sum. */
typedef struct {
    int8_t *xq;
    float *sx;
    int32_t *xsum;
} q_acts;

static q_acts q_acts_alloc(const qshape *s, int64_t M) {
    q_acts a;
    a.xq = aligned_alloc(64, (size_t)((M * s->K + 63) / 64 * 64));
    a.sx = malloc(sizeof(float) * (size_t)M);
    a.xsum = malloc(sizeof(int32_t) * (size_t)(M * s->ngroups));
    return a;
}

static void q_acts_free(q_acts *a) {
    free(a->xq);
    free(a->sx);
    free(a->xsum);
}

void q_linear_i8_team(const uint8_t *w, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym,
                      const float *x, int64_t M, int64_t x_stride, const float *bias, float *y) {
    const qshape s = q_shape(N, K, G, bits, asym);
    const int64_t tiles = (N + QT - 1) / QT;
    const int shared = M >= 8;
    q_acts acts;
    if (shared) {
        /* many rows (prefill): the team rounds them into one buffer, a share each */
        #pragma omp single copyprivate(acts)
        acts = q_acts_alloc(&s, M);
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) q_quantize_row(x + m * x_stride, &s, acts.xq + m * K, acts.sx + m, acts.xsum + m * s.ngroups);
    } else {
        /* a few rows (decode): each thread rounds them itself (K values a row) rather than wait at a barrier */
        acts = q_acts_alloc(&s, M);
        for (int64_t m = 0; m < M; m++) q_quantize_row(x + m * x_stride, &s, acts.xq + m * K, acts.sx + m, acts.xsum + m * s.ngroups);
    }
    const int8_t *xq = acts.xq;
    const float *sx = acts.sx;
    const int32_t *xsum = acts.xsum;
    const float implied_zero = bits == 4 ? 8.f : 0.f;
#if defined(Q_TILE)
    if (Q_TILED(M, s)) {
        uint8_t *unpacked = aligned_alloc(64, (size_t)(QT * K));
        q_lanes *scale_lanes = aligned_alloc(64, sizeof(q_lanes) * (size_t)(4 * s.ngroups));
        __m256 *mins = aligned_alloc(64, sizeof(__m256) * (size_t)s.ngroups);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++)
            Q_TILE(w, &s, t, xq, M, xsum, sx, unpacked, scale_lanes, mins, bias, y);
        free(unpacked);
        free(scale_lanes);
        free(mins);
    } else
#endif
#if defined(Q_I4_ONE_ROW)
    if (M == 1 && bits == 4) {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) q_tile_i4_one_row(w, &s, t, xq, xsum, sx[0], bias, y);
    } else
#endif
    {
        /* For several rows of x, codes are made unsigned once per record instead of once per row; not 8-bit
           codes where the dot product is maddubs, whose int16 pair sums would saturate at 255 x 127 (the
           sign trick of q_group_dot_i8 keeps them within 128 x 127). */
        uint8_t *unpacked = M > 1 && (bits == 4 || Q_WIDE_DOT) ? aligned_alloc(64, (size_t)(QT * G)) : NULL;
        float *acc = malloc(sizeof(float) * (size_t)(M * QT));
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t i = 0; i < M * QT; i++) acc[i] = 0.f;
            for (int64_t g = 0; g < s.ngroups; g++) {
                const uint8_t *rec = q_record(w, &s, t, g);
                if (unpacked) q_prefetch_record(rec, &s);  /* otherwise the first row's dot product prefetches */
                const float *scale = (const float *)rec;
                const uint8_t *codes = rec + s.header;
#if defined(__AVX2__)
                const __m256 sc = _mm256_loadu_ps(scale);
                __m256 mins = s.asym ? _mm256_loadu_ps(scale + QT) : _mm256_mul_ps(sc, _mm256_set1_ps(implied_zero));
                if (unpacked) q_unsigned_record(codes, &s, unpacked);
                if (bits == 8 && (unpacked || Q_I8_FLIPPED)) mins = _mm256_fmadd_ps(sc, _mm256_set1_ps(128.f), mins);  /* codes + 128 */
                for (int64_t m = 0; m < M; m++) {
                    const int8_t *xg = xq + m * K + g * G;
                    const __m256 dot = _mm256_cvtepi32_ps(unpacked ? q_group_dot_unsigned(unpacked, &s, xg)
                                                                   : q_group_dot_i8(codes, &s, xg, m == 0));
                    __m256 a = _mm256_loadu_ps(acc + m * QT);
                    a = _mm256_fmadd_ps(dot, sc, a);
                    a = _mm256_fnmadd_ps(mins, _mm256_set1_ps((float)xsum[m * s.ngroups + g]), a);
                    _mm256_storeu_ps(acc + m * QT, a);
                }
#else
                for (int64_t m = 0; m < M; m++)
                    for (int r = 0; r < QT; r++) {
                        const int8_t *xg = xq + m * K + g * G;
                        int32_t dot = 0;
                        for (int64_t k = 0; k < G; k++) {
                            int32_t c;
                            if (bits == 4) {  /* xq is in unpack order: position k holds code index */
                                const int64_t ch = k % QCHUNK, base = k - ch;
                                const int64_t src = base + (ch < 8 ? ch : ch < 16 ? ch + 8 : ch < 24 ? ch - 8 : ch);
                                const uint8_t *b = codes + q_code_offset(4, r, src - src % 16);
                                c = (b[src % 8] >> (src % 16 >= 8 ? 4 : 0)) & 15;
                            } else {
                                c = (int8_t)codes[q_code_offset(8, r, k - k % 16) + k % 16];
                            }
                            dot += c * xg[k];
                        }
                        const float mn = s.asym ? scale[QT + r] : scale[r] * implied_zero;
                        acc[m * QT + r] += (float)dot * scale[r] - mn * (float)xsum[m * s.ngroups + g];
                    }
#endif
            }
            for (int64_t m = 0; m < M; m++) {
                float out[QT];
                for (int r = 0; r < QT; r++) out[r] = acc[m * QT + r] * sx[m];
                q_store_tile(y + m * N, out, t * QT, N, bias);
            }
        }
        free(acc);
        free(unpacked);
    }
    if (shared) {
        #pragma omp single nowait
        q_acts_free(&acts);  /* after the tiles' barrier: every thread is done with it */
    } else {
        q_acts_free(&acts);
    }
}

void q_linear_i8(const uint8_t *w, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym,
                 const float *x, int64_t M, int64_t x_stride, const float *bias, float *y) {
    const qshape s = q_shape(N, K, G, bits, asym);
    #pragma omp parallel if (q_parallel(&s, M) || M >= 8)
    q_linear_i8_team(w, N, K, G, bits, asym, x, M, x_stride, bias, y);
}
