"""Small C kernels for the CPU hot path, compiled on first use and cached.

* ``paged_decode_attention``: in decode every sequence has one query token per step, and the pure-torch path
  must first gather each sequence's blocks into a padded dense tensor (per layer, per step) before
  ``scaled_dot_product_attention`` can read them: three passes over the context plus padding. The kernel
  walks the block table and reads each cached key and value once (3-10x faster, measured).
* ``add_rms_norm``, ``qk_norm_rope_store``, ``silu_mul``: the elementwise work of a layer in three calls
  instead of ~30 torch ops. At batch 1 each torch op costs a few microseconds of dispatch for almost no
  arithmetic; across 30 layers that was ~20% of a decode step.

How: plain C with OpenMP, no torch headers, so it compiles in about a second with the system ``cc``; the
shared object lives in ``$NANOSERVE_CACHE_DIR`` (default ``~/.cache/nanoserve``)/kernels under a name that
hashes the source, flags and compiler, and is loaded with ctypes. ``-fopenmp`` links ``libgomp.so.1``, which
resolves to the copy torch has already loaded, so the kernel shares torch's thread pool and thread count.
When there is no compiler, or ``NANOSERVE_NATIVE=0``, :func:`load` returns None and callers use the torch
path (the reference the kernel is tested against).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NATIVE_ENV = "NANOSERVE_NATIVE"
CACHE_DIR_ENV = "NANOSERVE_CACHE_DIR"

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));   /* 8 floats; unaligned loads allowed */
typedef int32_t i8 __attribute__((vector_size(32), aligned(4)));

static inline v8 load8(const float *p) { return *(const v8 *)p; }
static inline void store8(float *p, v8 x) { *(v8 *)p = x; }
static inline v8 splat8(float x) { v8 r = {x, x, x, x, x, x, x, x}; return r; }
static inline float hsum8(v8 a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }
static inline v8 select8(i8 mask, v8 a, v8 b) { return (v8)(((i8)a & mask) | ((i8)b & ~mask)); }

/* r[j] = hsum8(a[j]) for 8 vectors at once (a transposing add tree: 4 + 2 + 1 vector adds instead of
   8 separate horizontal sums). */
static inline v8 hsum8x8(const v8 *a) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define HADD(x, y) (__builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) + \
                    __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15))
    v8 h01 = HADD(a[0], a[1]), h23 = HADD(a[2], a[3]), h45 = HADD(a[4], a[5]), h67 = HADD(a[6], a[7]);
    v8 lo = HADD(h01, h23), hi = HADD(h45, h67);   /* lane groups: [a0 a1 a2 a3 | a0 a1 a2 a3] halves */
#undef HADD
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
#else
    v8 r;
    for (int j = 0; j < 8; j++) r[j] = hsum8(a[j]);
    return r;
#endif
}

/* exp(x), 8 lanes (Cephes expf: x = n ln2 + r, degree-5 polynomial in r; ~1 ulp). Inputs are clamped
   to [-87, 88], where the result is a normal float. */
static inline v8 exp8(v8 x) {
    x = select8(x < splat8(-87.f), splat8(-87.f), x);
    x = select8(x > splat8(88.f), splat8(88.f), x);
    v8 n = x * 1.44269504088896341f + 0.5f;
    i8 ni = __builtin_convertvector(n, i8);                        /* truncates toward 0 ... */
    ni += (__builtin_convertvector(ni, v8) > n);                   /* ... so step down: floor */
    n = __builtin_convertvector(ni, v8);
    v8 r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    i8 bits = (ni + 127) << 23;
    v8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Parallelise a loop over rows only when there is enough work to pay for waking the other threads. */
#define PAR_MIN_ELEMS 16384

/* sum of squares of n floats (n a multiple of 8) */
static inline float sumsq(const float *x, int64_t n) {
    v8 a0 = {0}, a1 = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) { v8 u = load8(x + i), w = load8(x + i + 8); a0 += u * u; a1 += w * w; }
    for (; i < n; i += 8) { v8 u = load8(x + i); a0 += u * u; }
    return hsum8(a0 + a1);
}

/* y = w * (x * (1 / sqrt(mean(x^2) + eps))), the multiplications in transformers' order. n % 8 == 0. */
static inline void rms_row(const float *x, const float *w, float eps, int64_t n, float *y) {
    const float r = 1.0f / sqrtf(sumsq(x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i += 8) store8(y + i, load8(w + i) * (load8(x + i) * r));
}

/* RMSNorm of T rows of H, optionally after a residual add:
     residual == NULL:  out = norm(x)
     residual != NULL:  residual = x + residual (in place, the next residual); out = norm(residual)
   x rows are x_stride floats apart; residual and out are contiguous [T, H]. */
void add_rms_norm_f32(const float *x, int64_t x_stride, float *residual, const float *w, float eps,
                      int64_t T, int64_t H, float *out) {
    #pragma omp parallel for schedule(static) if (T * H >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * x_stride;
        if (residual) {
            float *rt = residual + t * H;
            for (int64_t i = 0; i < H; i += 8) store8(rt + i, load8(xt + i) + load8(rt + i));
            xt = rt;
        }
        rms_row(xt, w, eps, H, out + t * H);
    }
}

/* x * cos + rotate_half(x) * sin for one head of D (D % 16 == 0), in place; separate roundings of the
   products and the sum, as torch does them (this file is compiled with -ffp-contract=off). */
static inline void rope_head(float *x, const float *c, const float *s, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i += 8) {
        v8 x1 = load8(x + i), x2 = load8(x + half + i);
        v8 lo = x1 * load8(c + i) + (-x2) * load8(s + i);
        v8 hi = x2 * load8(c + half + i) + x1 * load8(s + half + i);
        store8(x + i, lo);
        store8(x + half + i, hi);
    }
}

/* One step's q/k/v after the fused projection, per token t (qkv row t is [q heads | k heads | v heads]):
   optional per-head RMSNorm of q and k (q_w / k_w non-NULL: Qwen3), rotary embedding of q and k at
   positions[t] (tables cos/sin [P, D]), all in place; then k and v are copied into cache slot slots[t]
   of k_cache / v_cache ([num_slots, Hkv, D]). */
void qk_norm_rope_store_f32(float *qkv, int64_t qkv_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                            const float *cos_t, const float *sin_t, const int64_t *positions,
                            const float *q_w, const float *k_w, float eps,
                            const int64_t *slots, float *k_cache, float *v_cache) {
    #pragma omp parallel for schedule(static) if (T * (Hq + 2 * Hkv) * D >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * qkv_stride;
        const float *c = cos_t + positions[t] * D, *s = sin_t + positions[t] * D;
        for (int64_t h = 0; h < Hq + Hkv; h++) {
            float *x = row + h * D;
            const float *w = h < Hq ? q_w : k_w;
            if (w) rms_row(x, w, eps, D, x);
            rope_head(x, c, s, D);
        }
        if (slots) {
            memcpy(k_cache + slots[t] * Hkv * D, row + Hq * D, sizeof(float) * Hkv * D);
            memcpy(v_cache + slots[t] * Hkv * D, row + (Hq + Hkv) * D, sizeof(float) * Hkv * D);
        }
    }
}

/* out[t] = silu(gu[t, :I]) * gu[t, I:], silu(x) = x / (1 + exp(-x)). I % 8 == 0. */
void silu_mul_f32(const float *gu, int64_t T, int64_t I, float *out) {
    #pragma omp parallel for schedule(static) if (T * I >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        for (int64_t i = 0; i < I; i += 8) {
            v8 x = load8(g + i);
            store8(o + i, x / (1.0f + exp8(-x)) * load8(u + i));
        }
    }
}

/* Decode attention over a paged cache: out[d] = softmax(scale * q[d] K_d^T) V_d.
   q:                [D, Hq, Dh], rows q_stride floats apart; Dh % 8 == 0
   out:              [D, Hq, Dh] contiguous
   k_cache, v_cache: [num_blocks, B, Hkv, Dh]     the two halves of one layer's cache
   block_tables:     [D, table_stride] int64      sequence d's token t lives in block table[t / B], row t % B
   context_lens:     [D] int64, >= 1              keys 0 .. len-1 are attended (the new token included)
   A task is one sequence and a group of its KV heads; it reads each cached key and value once and shares
   it between the G query heads of that KV head (GQA). */
void paged_decode_attention_f32(
    const float *q, int64_t q_stride, const float *k_cache, const float *v_cache, const int64_t *block_tables,
    int64_t table_stride, const int64_t *context_lens, int64_t D, int64_t Hq, int64_t Hkv, int64_t Dh,
    int64_t B, float scale, float *out)
{
    const int64_t G = Hq / Hkv, C = Dh / 8;               /* query heads per KV head; 8-float chunks per head */
    const int64_t token_stride = Hkv * Dh, block_stride = B * token_stride;
    int64_t total = 0;
    for (int64_t d = 0; d < D; d++) total += context_lens[d];
    /* fewer than ~256 KiB of keys: one thread is faster than waking the others */
    const int nthreads = total * Hkv * Dh >= 4 * PAR_MIN_ELEMS ? omp_get_max_threads() : 1;
    const int64_t splits = D < 2 * nthreads ? Hkv : 1;   /* few sequences: split their heads over tasks */
    const int64_t hps = Hkv / splits;
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t cap = 0;
        float *scores = NULL;                              /* [hps * G, L], L padded to a multiple of 8 */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < D * splits; task++) {
            const int64_t d = task / splits, h0 = (task % splits) * hps;
            const int64_t L = context_lens[d], Lp = (L + 7) & ~(int64_t)7, rows = hps * G;
            if (Lp > cap) { free(scores); cap = Lp; scores = (float *)malloc(sizeof(float) * rows * cap); }
            const int64_t *table = block_tables + d * table_stride;
            const float *qd = q + d * q_stride + h0 * G * Dh;
            const int64_t nblk = (L + B - 1) / B;
            /* scores[r, t] = scale * <q_r, k_t>, eight keys at a time (eight independent sums) */
            for (int64_t b = 0; b < nblk; b++) {
                const float *kb = k_cache + table[b] * block_stride + h0 * Dh;
                const int64_t n = (b + 1) * B <= L ? B : L - b * B;
                for (int64_t h = 0; h < hps; h++)
                    for (int64_t g = 0; g < G; g++) {
                        const float *qr = qd + (h * G + g) * Dh;
                        float *sr = scores + (h * G + g) * Lp + b * B;
                        int64_t j = 0;
                        for (; j + 8 <= n; j += 8) {
                            const float *k = kb + j * token_stride + h * Dh;
                            v8 acc[8] = {{0}};
                            for (int64_t c = 0; c < Dh; c += 8) {
                                const v8 qc = load8(qr + c);
                                for (int jj = 0; jj < 8; jj++) acc[jj] += qc * load8(k + jj * token_stride + c);
                            }
                            store8(sr + j, hsum8x8(acc) * scale);
                        }
                        for (; j < n; j++) {
                            const float *k = kb + j * token_stride + h * Dh;
                            v8 acc = {0};
                            for (int64_t c = 0; c < Dh; c += 8) acc += load8(qr + c) * load8(k + c);
                            sr[j] = hsum8(acc) * scale;
                        }
                    }
            }
            /* softmax over t of each row; the padded tail gets probability 0 */
            for (int64_t r = 0; r < rows; r++) {
                float *s = scores + r * Lp;
                float m = s[0];
                for (int64_t t = 1; t < L; t++) m = s[t] > m ? s[t] : m;
                for (int64_t t = L; t < Lp; t++) s[t] = m - 1000.0f;
                v8 vsum = {0};
                for (int64_t t = 0; t < Lp; t += 8) {
                    v8 e = exp8(load8(s + t) - m);
                    store8(s + t, e);
                    vsum += e;
                }
                const float inv = 1.0f / hsum8(vsum);
                for (int64_t t = 0; t < Lp; t += 8) store8(s + t, load8(s + t) * inv);
            }
            /* out[r] = sum_t p[r, t] v_t, accumulated in registers 64 floats at a time */
            for (int64_t h = 0; h < hps; h++)
                for (int64_t g = 0; g < G; g++) {
                    const float *p = scores + (h * G + g) * Lp;
                    float *o = out + (d * Hq + (h0 + h) * G + g) * Dh;
                    for (int64_t c0 = 0; c0 < C; c0 += 8) {
                        const int64_t cn = C - c0 < 8 ? C - c0 : 8;
                        v8 acc[8] = {{0}};
                        for (int64_t b = 0; b < nblk; b++) {
                            const float *vb = v_cache + table[b] * block_stride + (h0 + h) * Dh + 8 * c0;
                            const int64_t n = (b + 1) * B <= L ? B : L - b * B;
                            for (int64_t j = 0; j < n; j++) {
                                const float pt = p[b * B + j];
                                const float *v = vb + j * token_stride;
                                for (int64_t c = 0; c < cn; c++) acc[c] += pt * load8(v + 8 * c);
                            }
                        }
                        for (int64_t c = 0; c < cn; c++) memcpy(o + 8 * (c0 + c), &acc[c], 32);
                    }
                }
        }
        free(scores);
    }
}

/* y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for a few rows m, reading W in oneDNN's blocked layout for
   linear weights on this CPU: blocks of B output rows, each stored [K][B] (so element (n, k) sits at
   (n / B) * K * B + k * B + n % B; the caller has checked this against the real weight). One streaming pass
   over W: at batch 1 a decode step is a read of every weight, and this runs near DRAM bandwidth where the
   general GEMM reaches ~60% of it. acc is [M][B]; k is tiled so that with several rows the tile of W is
   reread from L1, not from memory. */
#define GEMV_MAX_ROWS 8
#define GEMV_K_TILE 64
#define GEMM_ROW_CHUNK 192
static inline __attribute__((always_inline)) void gemv_block(const float *wb, int64_t K, const int NB,
                                                            const float *x, int64_t M, int64_t x_stride,
                                                            float *acc) {
    for (int64_t i = 0; i < M * NB * 8; i++) acc[i] = 0.f;
    const int64_t tile = M == 1 ? K : GEMV_K_TILE;
    for (int64_t k0 = 0; k0 < K; k0 += tile) {
        const int64_t k1 = k0 + tile < K ? k0 + tile : K;
        for (int64_t m = 0; m < M; m++) {
            v8 a[8];
            for (int j = 0; j < NB; j++) a[j] = load8(acc + m * NB * 8 + 8 * j);
            const float *xm = x + m * x_stride;
            for (int64_t k = k0; k < k1; k++) {
                const v8 xv = splat8(xm[k]);
                const float *wk = wb + k * NB * 8;
                for (int j = 0; j < NB; j++) a[j] += load8(wk + 8 * j) * xv;
            }
            for (int j = 0; j < NB; j++) store8(acc + m * NB * 8 + 8 * j, a[j]);
        }
    }
}

/* Rows m0..m0+MR of x against half h (32 outputs) of one 64-row block, over k in [k0, k1): MR x 4
   accumulators (MR <= 3), so each W vector loaded from L1 feeds MR FMAs. acc is [rows][64]. */
static inline __attribute__((always_inline)) void gemm_tile(const float *wb, int h, int64_t k0, int64_t k1,
                                                           const float *x, int64_t x_stride, int64_t m0,
                                                           const int MR, float *acc) {
    v8 a[3][4];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < 4; j++) a[r][j] = load8(acc + (m0 + r) * 64 + 32 * h + 8 * j);
    for (int64_t k = k0; k < k1; k++) {
        const float *wk = wb + k * 64 + 32 * h;
        const v8 w0 = load8(wk), w1 = load8(wk + 8), w2 = load8(wk + 16), w3 = load8(wk + 24);
        for (int r = 0; r < MR; r++) {
            const v8 xv = splat8(x[(m0 + r) * x_stride + k]);
            a[r][0] += w0 * xv; a[r][1] += w1 * xv; a[r][2] += w2 * xv; a[r][3] += w3 * xv;
        }
    }
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < 4; j++) store8(acc + (m0 + r) * 64 + 32 * h + 8 * j, a[r][j]);
}

/* The same product for more rows (B = 64 only): k is tiled so that a 64 x 64 tile of W (16 KiB) is read
   from memory once and then from L1 by every group of 3 rows. Why not oneDNN: with weights that are not in
   cache (every decode step reads all of them once) its GEMM at 8-64 rows runs at ~50-60% of this machine's
   FLOP/s; reading each tile once and reusing it from L1 brings that close to the FMA peak. */
static void gemm_block64(const float *wb, int64_t K, const float *x, int64_t M, int64_t x_stride, float *acc) {
    for (int64_t i = 0; i < M * 64; i++) acc[i] = 0.f;
    for (int64_t k0 = 0; k0 < K; k0 += GEMV_K_TILE) {
        const int64_t k1 = k0 + GEMV_K_TILE < K ? k0 + GEMV_K_TILE : K;
        int64_t m = 0;
        for (; m + 3 <= M; m += 3)
            for (int h = 0; h < 2; h++) gemm_tile(wb, h, k0, k1, x, x_stride, m, 3, acc);
        /* the last 1-2 rows: MR must be a constant for the accumulators to stay in registers */
        for (int h = 0; h < 2 && M - m == 2; h++) gemm_tile(wb, h, k0, k1, x, x_stride, m, 2, acc);
        for (int h = 0; h < 2 && M - m == 1; h++) gemm_tile(wb, h, k0, k1, x, x_stride, m, 1, acc);
    }
}

void packed_gemv_f32(const float *w, int64_t N, int64_t K, int64_t Kp, int64_t B, const float *x, int64_t M,
                     int64_t x_stride, const float *bias, float *y) {
    const int64_t nblocks = (N + B - 1) / B;
    /* Rows in chunks, so that the accumulators (and a k tile of x) stay in L1/L2 however many rows come. */
    const int64_t chunk = M <= GEMV_MAX_ROWS ? GEMV_MAX_ROWS : GEMM_ROW_CHUNK;
    #pragma omp parallel if (nblocks >= 4 && M * N * K >= 4 * PAR_MIN_ELEMS)
    {
        float *acc = aligned_alloc(64, (size_t)chunk * 64 * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const float *wb = w + b * Kp * B;  /* oneDNN may pad K to Kp in memory */
            const int64_t n0 = b * B, nn = N - n0 < B ? N - n0 : B;
            for (int64_t m0 = 0; m0 < M; m0 += chunk) {
                const int64_t mc = M - m0 < chunk ? M - m0 : chunk;
                const float *xc = x + m0 * x_stride;
                if (mc > GEMV_MAX_ROWS) gemm_block64(wb, K, xc, mc, x_stride, acc);
                else if (B == 64) gemv_block(wb, K, 8, xc, mc, x_stride, acc);
                else if (B == 32) gemv_block(wb, K, 4, xc, mc, x_stride, acc);
                else gemv_block(wb, K, 2, xc, mc, x_stride, acc);
                for (int64_t m = 0; m < mc; m++) {
                    float *ym = y + (m0 + m) * N + n0;
                    for (int64_t j = 0; j < nn; j++) ym[j] = acc[m * B + j] + (bias ? bias[n0 + j] : 0.f);
                }
            }
        }
        free(acc);
    }
}
"""

_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]  # no errno: sqrtf is one instruction


def _arch_flags() -> list[str]:
    # The kernel is compiled for this machine's vector units; the cache key includes the flags, so a cache
    # directory shared with a different CPU never hands back an object built for the wrong one.
    caps = torch.backends.cpu.get_cpu_capability()
    if caps in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma"] + (["-mavx512f"] if caps == "AVX512" else [])
    return []


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "nanoserve")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(_SOURCE)
        tmp_so = Path(tmp) / target.name
        subprocess.run([cc, *flags, str(src), "-o", str(tmp_so), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp_so, target)  # atomic: concurrent builders (TP workers, test processes) never see half a file


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library (built once per process, cached on disk), or None when it cannot be
    built. Ignores ``NANOSERVE_NATIVE``; use :func:`kernels_for`."""
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found; using torch ops instead of the native CPU kernels")
        return None
    flags = _FLAGS + _arch_flags()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([_SOURCE, *flags, *version]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"nanoserve_kernels_{key}.so"
    try:
        if not target.is_file():
            _compile(cc, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning("could not build the native CPU kernels (%s %s); using the pure-torch path", exc, detail[-500:])
        return None
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    signatures = {
        "add_rms_norm_f32": [ptr, i64, ptr, ptr, f32, i64, i64, ptr],
        "qk_norm_rope_store_f32": [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr],
        "silu_mul_f32": [ptr, i64, i64, ptr],
        "paged_decode_attention_f32": [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, ptr],
        "packed_gemv_f32": [ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None


def kernels_for(dtype: torch.dtype, device: torch.device | str) -> ctypes.CDLL | None:
    """The kernel library when it applies to models of this dtype and device (float32 on CPU) and is not
    switched off with ``NANOSERVE_NATIVE=0``; else None (callers then use torch ops)."""
    if dtype != torch.float32 or torch.device(device).type != "cpu" or not enabled():
        return None
    return load()


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1").lower() not in ("0", "false", "off")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Shape requirements of the kernels (callers check once, at build time): rows of a multiple of 8 floats,
# heads of a multiple of 16 for the rotary halves.
def norm_supported(hidden: int) -> bool:
    return hidden % 8 == 0


def rope_supported(head_dim: int) -> bool:
    return head_dim % 16 == 0


def add_rms_norm(
    lib: ctypes.CDLL, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm of x ([T, H], rows may be strided), or of x + residual with ``residual`` updated in place to
    that sum (``residual`` contiguous). Returns the normalised [T, H]."""
    t, h = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.is_contiguous())
    out = torch.empty((t, h), dtype=x.dtype)
    lib.add_rms_norm_f32(x.data_ptr(), x.stride(0), _ptr(residual), weight.data_ptr(), eps, t, h, out.data_ptr())
    return out


def qk_norm_rope_store(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    slot_mapping: torch.Tensor,
    kv_cache: torch.Tensor,
) -> None:
    """In place on ``qkv`` ([T, (Hq + 2 Hkv) * D], contiguous rows): per-head RMSNorm of q and k (when
    weights are given), rotary embedding of q and k; then k and v of each token are written to its slot."""
    t = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos_table.is_contiguous() and positions.dtype == torch.int64
    half = kv_cache[0].numel() * kv_cache.element_size()
    lib.qk_norm_rope_store_f32(
        qkv.data_ptr(), qkv.stride(0), t, num_heads, num_kv_heads, head_dim, cos_table.data_ptr(),
        sin_table.data_ptr(), positions.data_ptr(), _ptr(q_norm_weight), _ptr(k_norm_weight), eps,
        slot_mapping.data_ptr(), kv_cache.data_ptr(), kv_cache.data_ptr() + half,
    )  # fmt: skip


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] ([T, 2I], contiguous). Returns [T, I]."""
    t, two_i = gate_up.shape
    assert gate_up.is_contiguous()
    out = torch.empty((t, two_i // 2), dtype=gate_up.dtype)
    lib.silu_mul_f32(gate_up.data_ptr(), t, two_i // 2, out.data_ptr())
    return out


def paged_decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """out[d] = softmax(q[d] K_d^T * scale) V_d over sequence d's cached tokens.

    q: [D, Hq, Dh] float32 with contiguous heads (rows may be strided); out: [D, Hq, Dh] contiguous;
    kv_cache: [2, num_blocks, B, Hkv, Dh] contiguous; block_tables: [D, >= ceil(max len / B)] int64 with
    contiguous rows; context_lens: [D] int64 (each >= 1).
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    d, hq, _ = q.shape
    assert q.stride(2) == 1 and q.stride(1) == head_dim and out.is_contiguous() and block_tables.stride(1) == 1
    half = kv_cache[0].numel() * kv_cache.element_size()
    lib.paged_decode_attention_f32(
        q.data_ptr(), q.stride(0), kv_cache.data_ptr(), kv_cache.data_ptr() + half, block_tables.data_ptr(),
        block_tables.stride(0), context_lens.data_ptr(), d, hq, num_kv_heads, head_dim, block_size,
        scale, out.data_ptr(),
    )  # fmt: skip


GEMV_MAX_ROWS = 8  # must match the C source


def packed_gemv(
    lib: ctypes.CDLL, x: torch.Tensor, weight_ptr: int, out_features: int, row_block: int,
    bias: torch.Tensor | None, padded_in_features: int = 0,
) -> torch.Tensor:  # fmt: skip
    """x @ W^T (+ bias) for ``x`` [M, K] (rows may be strided; M <= GEMV_MAX_ROWS unless ``row_block`` is
    64) with W in oneDNN's blocked layout at ``weight_ptr`` (blocks of ``row_block`` output rows, each
    [K'][row_block] where K' = ``padded_in_features`` >= K, default K; see linear.py)."""
    m, k = x.shape
    assert (m <= GEMV_MAX_ROWS or row_block == 64) and x.stride(1) == 1 and row_block in (16, 32, 64)
    out = torch.empty((m, out_features), dtype=x.dtype)
    kp = padded_in_features or k
    lib.packed_gemv_f32(weight_ptr, out_features, k, kp, row_block, x.data_ptr(), m, x.stride(0), _ptr(bias), out.data_ptr())
    return out
