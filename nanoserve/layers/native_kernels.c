/* nanoserve's CPU kernels (float32, AVX2/FMA when available), loaded by native.py with ctypes.
 * Each exported function has a torch reference in native.py's callers that tests compare it against. */
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

/* The KV cache in float32, or in IEEE half precision (kv_cache_dtype float16: half the bytes a decode step
   reads, and twice the tokens a budget holds). Halves widen to float32 as they load, so the arithmetic is
   the float32 kernel's on the rounded values; the F16C instructions do it eight at a time. Every AVX2 CPU
   has them; where the compiler was not given them, kv_half_supported() says so and the caller uses torch. */
#if defined(__F16C__)
#include <immintrin.h>
static inline v8 load8h(const uint16_t *p) { return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void store8h(uint16_t *p, v8 x) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT));
}
int64_t kv_half_supported(void) { return 1; }
#else
static inline v8 load8h(const uint16_t *p) { (void)p; abort(); }
static inline void store8h(uint16_t *p, v8 x) { (void)p; (void)x; abort(); }
int64_t kv_half_supported(void) { return 0; }
#endif


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
static inline void add_rms_norm_row(const float *x, int64_t x_stride, float *residual, const float *w, float eps,
                                    int64_t t, int64_t H, float *out) {
    const float *xt = x + t * x_stride;
    if (residual) {
        float *rt = residual + t * H;
        for (int64_t i = 0; i < H; i += 8) store8(rt + i, load8(xt + i) + load8(rt + i));
        xt = rt;
    }
    rms_row(xt, w, eps, H, out + t * H);
}

void add_rms_norm_f32(const float *x, int64_t x_stride, float *residual, const float *w, float eps,
                      int64_t T, int64_t H, float *out) {
    #pragma omp parallel for schedule(static) if (T * H >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) add_rms_norm_row(x, x_stride, residual, w, eps, t, H, out);
}

/* The same on the calling thread alone (the C decode step: every thread normalises its own copy). */
void add_rms_norm_f32_serial(const float *x, int64_t x_stride, float *residual, const float *w, float eps,
                             int64_t T, int64_t H, float *out) {
    for (int64_t t = 0; t < T; t++) add_rms_norm_row(x, x_stride, residual, w, eps, t, H, out);
}

/* x * cos + rotate_half(x) * sin over the first R dims of one head (R % 16 == 0), in place; the head's
   other dims pass through (partial rotary). Separate roundings of the products and the sum, as torch does
   them (this file is compiled with -ffp-contract=off). */
static inline void rope_head(float *x, const float *c, const float *s, int64_t R) {
    const int64_t half = R / 2;
    for (int64_t i = 0; i < half; i += 8) {
        v8 x1 = load8(x + i), x2 = load8(x + half + i);
        v8 lo = x1 * load8(c + i) + (-x2) * load8(s + i);
        v8 hi = x2 * load8(c + half + i) + x1 * load8(s + half + i);
        store8(x + i, lo);
        store8(x + half + i, hi);
    }
}

/* One step's q/k/v after the fused projection, per token t (qkv row t is [q heads | k heads | v heads]):
   optional per-head RMSNorm of q and k (q_w / k_w non-NULL: Qwen3), rotary embedding of the first R dims
   of each q and k head at positions[t] (tables cos/sin [P, R]; R == D unless partial rotary), all in
   place; then k and v are copied into cache slot slots[t] of k_cache / v_cache ([num_slots, Hkv, D]).
   Work unit u = t (Hq + Hkv) + h is head h of token t; a KV head's unit also stores its k and v. */
static inline __attribute__((always_inline)) void qk_norm_rope_store_head(
    float *qkv, int64_t qkv_stride, int64_t Hq, int64_t Hkv, int64_t D, int64_t R, const float *cos_t,
    const float *sin_t, const int64_t *positions, const float *q_w, const float *k_w, float eps,
    const int64_t *slots, void *k_cache, void *v_cache, const int half, int64_t u) {
    const int64_t t = u / (Hq + Hkv), h = u % (Hq + Hkv);
    float *row = qkv + t * qkv_stride, *x = row + h * D;
    const float *w = h < Hq ? q_w : k_w;
    if (w) rms_row(x, w, eps, D, x);
    rope_head(x, cos_t + positions[t] * R, sin_t + positions[t] * R, R);
    if (!slots || h < Hq) return;
    const int64_t at = (slots[t] * Hkv + h - Hq) * D;
    const float *v = row + (Hkv + h) * D;
    if (half) {  /* rounded to nearest even, as torch's .half() does; D % 8 == 0 */
        for (int64_t i = 0; i < D; i += 8) {
            store8h((uint16_t *)k_cache + at + i, load8(x + i));
            store8h((uint16_t *)v_cache + at + i, load8(v + i));
        }
    } else {
        memcpy((float *)k_cache + at, x, sizeof(float) * D);
        memcpy((float *)v_cache + at, v, sizeof(float) * D);
    }
}

static inline __attribute__((always_inline)) void qk_norm_rope_store(
    float *qkv, int64_t qkv_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t R, const float *cos_t,
    const float *sin_t, const int64_t *positions, const float *q_w, const float *k_w, float eps,
    const int64_t *slots, void *k_cache, void *v_cache, const int half) {
    #pragma omp parallel for schedule(static) if (T * (Hq + 2 * Hkv) * D >= PAR_MIN_ELEMS)
    for (int64_t u = 0; u < T * (Hq + Hkv); u++)
        qk_norm_rope_store_head(qkv, qkv_stride, Hq, Hkv, D, R, cos_t, sin_t, positions, q_w, k_w, eps, slots,
                                k_cache, v_cache, half, u);
}

/* The same as a team's share (see quant_kernels.c on "_team" forms); half: the caches hold float16. */
void qk_norm_rope_store_team(float *qkv, int64_t qkv_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                             int64_t R, const float *cos_t, const float *sin_t, const int64_t *positions,
                             const float *q_w, const float *k_w, float eps, const int64_t *slots, void *k_cache,
                             void *v_cache, int64_t half) {
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < T * (Hq + Hkv); u++) {
        if (half)
            qk_norm_rope_store_head(qkv, qkv_stride, Hq, Hkv, D, R, cos_t, sin_t, positions, q_w, k_w, eps, slots,
                                    k_cache, v_cache, 1, u);
        else
            qk_norm_rope_store_head(qkv, qkv_stride, Hq, Hkv, D, R, cos_t, sin_t, positions, q_w, k_w, eps, slots,
                                    k_cache, v_cache, 0, u);
    }
}

void qk_norm_rope_store_f32(float *qkv, int64_t qkv_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t R, const float *cos_t, const float *sin_t, const int64_t *positions,
                            const float *q_w, const float *k_w, float eps,
                            const int64_t *slots, float *k_cache, float *v_cache) {
    qk_norm_rope_store(qkv, qkv_stride, T, Hq, Hkv, D, R, cos_t, sin_t, positions, q_w, k_w, eps, slots, k_cache,
                       v_cache, 0);
}

/* The same into a float16 cache (kv_cache_dtype float16). */
void qk_norm_rope_store_f16kv(float *qkv, int64_t qkv_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                              int64_t R, const float *cos_t, const float *sin_t, const int64_t *positions,
                              const float *q_w, const float *k_w, float eps,
                              const int64_t *slots, uint16_t *k_cache, uint16_t *v_cache) {
    qk_norm_rope_store(qkv, qkv_stride, T, Hq, Hkv, D, R, cos_t, sin_t, positions, q_w, k_w, eps, slots, k_cache,
                       v_cache, 1);
}

/* out[t] = silu(gu[t, :I]) * gu[t, I:], silu(x) = x / (1 + exp(-x)). I % 8 == 0. */
static inline void silu_mul_span(const float *gu, int64_t I, int64_t t, int64_t i0, int64_t i1, float *out) {
    const float *g = gu + t * 2 * I, *u = g + I;
    float *o = out + t * I;
    for (int64_t i = i0; i < i1; i += 8) {
        v8 x = load8(g + i);
        store8(o + i, x / (1.0f + exp8(-x)) * load8(u + i));
    }
}

void silu_mul_f32(const float *gu, int64_t T, int64_t I, float *out) {
    #pragma omp parallel for schedule(static) if (T * I >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) silu_mul_span(gu, I, t, 0, I, out);
}

/* A team's share, in spans of 256 values so that one row splits too. */
void silu_mul_f32_team(const float *gu, int64_t T, int64_t I, float *out) {
    const int64_t spans = (I + 255) / 256;
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < T * spans; u++) {
        const int64_t t = u / spans, i0 = (u % spans) * 256;
        silu_mul_span(gu, I, t, i0, i0 + 256 < I ? i0 + 256 : I, out);
    }
}

/* Constrained decoding: logits[row[j], t] = -inf wherever bit t of bitmask[j] is 0, for t < vocab.
   logits:  rows ls floats apart (in place; only the n listed rows are touched)
   bitmask: [n, words] 32-bit words, bit i of word w = token 32 w + i (llguidance's layout)
   In place over the listed rows: the torch path (expand 32 bits per word, masked_fill, gather and scatter the
   rows) cost ~26 ms per step for 32 rows of a 151,936-token vocabulary; this reads each word once and skips
   the all-allowed ones. */
void apply_token_bitmask_f32(float *logits, int64_t ls, const int64_t *row, int64_t n, const uint32_t *bitmask,
                             int64_t words, int64_t vocab) {
    #pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        float *l = logits + row[j] * ls;
        const uint32_t *m = bitmask + j * words;
        for (int64_t w = 0; w < words && w * 32 < vocab; w++) {
            uint32_t bits = m[w];
            if (bits == 0xFFFFFFFFu) continue;
            int64_t base = w * 32, end = base + 32 < vocab ? base + 32 : vocab;
            for (int64_t t = base; t < end; t++)
                if (!((bits >> (t - base)) & 1u)) l[t] = -INFINITY;
        }
    }
}

/* out[r] = the index of row r's largest value (rows `stride` floats apart, n values each), as torch's argmax
   gives it: the first of ties, and a NaN counts as larger than any number (the first NaN wins). It is the
   greedy pick of every decode step. Inside a Qwen3-0.6B step, torch's max(dim) over the 151,936 logits took
   ~235 us: the LM head's threads have just written their halves of the row into their own caches, and one
   thread read them all. Here each thread takes the same share of the row (contiguous, in thread order, as the
   LM head's static split), eight lanes at a time, each lane keeping its first largest value; the shares'
   winners are combined in order. */
typedef struct { float value; int64_t index, first_nan; } argmax_part;

static argmax_part argmax_span(const float *x, int64_t lo, int64_t hi) {
    argmax_part r = {x[lo], lo, -1};
    int64_t i = lo;
    int nan = 0;
    if (hi - lo >= 16) {
        v8 bv = load8(x + lo);
        i8 bi = {0, 1, 2, 3, 4, 5, 6, 7}, idx = bi, any_nan = (i8)(bv != bv);
        for (i = lo + 8; i + 8 <= hi; i += 8) {
            const v8 v = load8(x + i);
            idx += 8;
            const i8 gt = (i8)(v > bv);  /* false for NaN: a lane keeps its first largest number */
            bv = select8(gt, v, bv);
            bi = (gt & idx) | (~gt & bi);
            any_nan |= (i8)(v != v);
        }
        for (int j = 0; j < 8; j++) nan |= any_nan[j] != 0;
        r.value = bv[0];
        r.index = lo + bi[0];
        for (int j = 1; j < 8; j++)  /* the largest lane; among equal lanes the smallest index */
            if (bv[j] > r.value || (bv[j] == r.value && lo + bi[j] < r.index)) { r.value = bv[j]; r.index = lo + bi[j]; }
    }
    for (; i < hi; i++) {
        nan |= x[i] != x[i];
        if (x[i] > r.value) { r.value = x[i]; r.index = i; }
    }
    if (nan || r.value != r.value)
        for (i = lo; i < hi; i++)
            if (x[i] != x[i]) { r.first_nan = i; break; }
    return r;
}

/* A team's share of argmax_rows_f32 (see quant_kernels.c on "_team" forms): every thread scans its share of each
   row, then the shares' winners are combined, row by row, in thread order. Ends in a barrier. */
void argmax_rows_team(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out) {
    const int me = omp_get_thread_num(), nth = omp_get_num_threads();
    argmax_part *parts;
    #pragma omp single copyprivate(parts)
    parts = malloc(sizeof(argmax_part) * (size_t)(rows * nth));
    const int64_t lo = n * me / nth, hi = n * (me + 1) / nth;
    for (int64_t r = 0; r < rows; r++)
        parts[r * nth + me] = hi > lo ? argmax_span(x + r * stride, lo, hi) : (argmax_part){0.f, -1, -1};
    #pragma omp barrier
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t best = -1, nan = -1;
        float value = 0.f;
        for (int t = 0; t < nth; t++) {  /* in order: the first NaN, else the first of the largest */
            const argmax_part p = parts[r * nth + t];
            if (p.index < 0) continue;
            if (p.first_nan >= 0 && nan < 0) nan = p.first_nan;
            if (best < 0 || p.value > value) { value = p.value; best = p.index; }
        }
        out[r] = nan >= 0 ? nan : best;
    }
    #pragma omp single nowait
    free(parts);  /* after the combine's barrier: every thread is done with it */
}

void argmax_rows_f32(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out) {
    #pragma omp parallel if (n >= 4 * PAR_MIN_ELEMS)
    argmax_rows_team(x, rows, n, stride, out);
}

/* Query heads sharing a KV head (grouped-query attention) are taken two at a time where the vector unit has 32
   registers (AVX-512VL: 16 accumulators, the pair's query or weights, and the cache row in registers), so each
   cached key and value is loaded (and widened, for a float16 cache) once for both. Each head's sums are added
   in the same order either way, so the results are the same bit for bit. */
#if defined(__AVX512VL__)
#define ATTN_PAIRS 1
#else
#define ATTN_PAIRS 0
#endif

/* Eight cache values from element offset i of a float32 (half == 0) or float16 (half == 1) cache. */
static inline __attribute__((always_inline)) v8 kv_load8(const void *cache, int64_t i, int half) {
    return half ? load8h((const uint16_t *)cache + i) : load8((const float *)cache + i);
}

/* Decode attention over a paged cache: out[d] = softmax(scale * q[d] K_d^T) V_d.
   q:                [D, Hq, Dh], rows q_stride floats apart; Dh % 8 == 0
   out:              [D, Hq, Dh] contiguous
   k_cache, v_cache: [num_blocks, B, Hkv, Dh]     the two halves of one layer's cache (float32, or float16
                                                  through paged_decode_attention_f16kv)
   block_tables:     [D, table_stride] int64      sequence d's token t lives in block table[t / B], row t % B
   context_lens:     [D] int64, >= 1              keys 0 .. len-1 are attended (the new token included)
   window:           > 0: only the last `window` of them (sliding-window attention); 0: all
   softcap:          > 0: scores = softcap * tanh(scores / softcap) before the softmax (Gemma 2); 0: none

   The work is split along the context, not by head ("split-K", as flash-decoding does): a unit is a run of
   whole blocks of one sequence, all heads, read token after token. A cached token's keys for every head are
   one contiguous row (Hkv x Dh values), so a unit streams its blocks front to back; split by head, each
   head's Dh values sat one row apart (4 KiB for Qwen3-0.6B, a page each), and 28 layers' worth read at
   ~12 GB/s (microbenchmark: 0.6B shapes, 192 cached tokens, 2 Sapphire Rapids threads, caches cold).
   Each unit leaves its unnormalised partial result (per head: running max, sum of exponentials, weighted
   sum of values); a sequence of one unit is finished at once, one of several is combined after them.

   The split depends only on the batch's context lengths (attn_chunk_blocks), never on the thread count, so
   the result is the same bit for bit on any number of threads. Cache positions are element offsets, so one
   body serves both element types. This is a team's share (see quant_kernels.c on "_team" forms), ending in
   a barrier. */
#define ATTN_MIN_CHUNK_BLOCKS 2   /* at least 2 x B tokens a unit: the partial result (Hq x Dh) is small beside it */
#define ATTN_TARGET_UNITS 64      /* the whole batch in about this many units (bounds the partial results) */

typedef struct {
    int64_t lo, b0, nblk;  /* keys lo .. L-1 are attended, in blocks b0 .. nblk-1 */
} attn_span;

static inline attn_span attn_span_of(int64_t L, int64_t B, int64_t window) {
    attn_span s;
    s.lo = window > 0 && L > window ? L - window : 0;
    s.b0 = s.lo / B;
    s.nblk = (L + B - 1) / B;
    return s;
}

static int64_t attn_chunk_blocks(const int64_t *context_lens, int64_t D, int64_t B, int64_t window) {
    int64_t total = 0, longest = 1;
    for (int64_t d = 0; d < D; d++) {
        const attn_span s = attn_span_of(context_lens[d], B, window);
        total += s.nblk - s.b0;
        longest = s.nblk - s.b0 > longest ? s.nblk - s.b0 : longest;
    }
    int64_t per_unit = (total + ATTN_TARGET_UNITS - 1) / ATTN_TARGET_UNITS;
    per_unit = per_unit > ATTN_MIN_CHUNK_BLOCKS ? per_unit : ATTN_MIN_CHUNK_BLOCKS;
    /* never longer than the longest sequence (many short ones: the scores scratch is sized by the chunk) */
    return per_unit < longest ? per_unit : longest;
}

/* Prefetch `n` rows of `bytes` bytes each, `stride` bytes apart, from p: into L1 by default; into L2 where the
   build sets ATTN_PREFETCH_LOCALITY 2 (native.py, on AMD: Zen 4, the C decode step with the two builds
   alternated in one process, three rounds, Qwen3-0.6B int8 a8 -1.7 to -5.4 %, int4 a8 0 to -4.8 %, SmolLM2-135M
   -2.6 / -4.1 %). */
#ifndef ATTN_PREFETCH_LOCALITY
#define ATTN_PREFETCH_LOCALITY 3
#endif
static inline void prefetch_rows(const char *p, int64_t n, int64_t stride, int64_t bytes) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + j * stride + off, 0, ATTN_PREFETCH_LOCALITY);
}

/* Where the 8-token group after the one at (block b, row j) starts, as an element offset into a cache half;
   -1 at the end of the unit. */
static inline int64_t attn_next_group(const int64_t *table, int64_t b, int64_t j, int64_t be, int64_t B,
                                      int64_t block_stride, int64_t token_stride) {
    if (j + 16 <= B) return table[b] * block_stride + (j + 8) * token_stride;
    return b + 1 < be ? table[b + 1] * block_stride : -1;
}

/* The scores of np query heads (rows Dh apart from q; np 1 or 2, a constant where inlined) against the 8
   keys at element offset k (rows token_stride apart): scores rows Tp apart. Each cached key is loaded once
   for the np heads; each head's sum is the same however many share the load. */
static inline __attribute__((always_inline)) void attn_scores8(
    const float *q, int np, const void *k_cache, int64_t k, int64_t token_stride, int64_t Dh, float scale,
    float *scores, int64_t Tp, const int half)
{
    v8 acc[2][8] = {{{0}}};
    for (int64_t c = 0; c < Dh; c += 8) {
        v8 qc[2];
        for (int p = 0; p < np; p++) qc[p] = load8(q + p * Dh + c);
        for (int jj = 0; jj < 8; jj++) {
            const v8 kv = kv_load8(k_cache, k + jj * token_stride + c, half);
            for (int p = 0; p < np; p++) acc[p][jj] += qc[p] * kv;
        }
    }
    for (int p = 0; p < np; p++) store8(scores + p * Tp, hsum8x8(acc[p]) * scale);
}

/* o[p, c0 .. c0+63] += sum_jj w[p, jj] v_jj for np query heads (weights rows Tp apart, o rows Dh apart; np 1 or
   2, a constant where inlined) over nj cached values at element offset v (rows token_stride apart): a constant
   count of accumulators keeps them in registers, and each value is loaded once for the np heads. */
static inline __attribute__((always_inline)) void attn_values64(
    const float *w, int np, int64_t Tp, const void *v_cache, int64_t v, int64_t token_stride, int64_t nj,
    float *o, int64_t Dh, int64_t c0, const int half)
{
    v8 acc[2][8];
    for (int p = 0; p < np; p++)
        for (int c = 0; c < 8; c++) acc[p][c] = load8(o + p * Dh + c0 + 8 * c);
    for (int64_t jj = 0; jj < nj; jj++) {
        float t[2];
        for (int p = 0; p < np; p++) t[p] = w[p * Tp + jj];
        const int64_t row = v + jj * token_stride + c0;
        for (int c = 0; c < 8; c++) {
            const v8 vv = kv_load8(v_cache, row + 8 * c, half);
            for (int p = 0; p < np; p++) acc[p][c] += t[p] * vv;
        }
    }
    for (int p = 0; p < np; p++)
        for (int c = 0; c < 8; c++) store8(o + p * Dh + c0 + 8 * c, acc[p][c]);
}

/* One unit: heads of sequence d over its keys t0 .. t1-1 (blocks bb .. be-1). scores: [Hq, Tp] scratch, Tp a
   multiple of 8 >= t1 - t0. Leaves, per query head r, m[r] = the largest score, l[r] = sum of exp(score -
   m[r]) and o[r, :] = the sum of exp(score - m[r]) v (unnormalised). */
static inline __attribute__((always_inline)) void attention_unit(
    const float *qd, const void *k_cache, const void *v_cache, const int64_t *table, int64_t t0, int64_t t1,
    int64_t bb, int64_t be, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t B, float scale, float softcap,
    float *scores, int64_t Tp, float *m, float *l, float *o, const int half)
{
    const int64_t G = Hq / Hkv, token_stride = Hkv * Dh, block_stride = B * token_stride;
    const int64_t esize = half ? 2 : 4, n = t1 - t0;
    const char *kc = (const char *)k_cache, *vc = (const char *)v_cache;
    /* scores[r, i] = scale * <q_r, k_(t0+i)>, eight keys at a time (eight independent sums) */
    for (int64_t b = bb; b < be; b++) {
        const int64_t j0 = b * B < t0 ? t0 - b * B : 0, j1 = (b + 1) * B <= t1 ? B : t1 - b * B;
        const int64_t base = table[b] * block_stride;
        int64_t j = j0;
        for (; j + 8 <= j1; j += 8) {
            const int64_t next = attn_next_group(table, b, j, be, B, block_stride, token_stride);
            const int64_t i = b * B + j - t0;
            for (int64_t h = 0; h < Hkv; h++) {
                if (next >= 0) prefetch_rows(kc + (next + h * Dh) * esize, 8, token_stride * esize, Dh * esize);
                const int64_t k = base + j * token_stride + h * Dh;
                int64_t g = 0;
                for (; ATTN_PAIRS && g + 2 <= G; g += 2)
                    attn_scores8(qd + (h * G + g) * Dh, 2, k_cache, k, token_stride, Dh, scale, scores + (h * G + g) * Tp + i, Tp, half);
                for (; g < G; g++)
                    attn_scores8(qd + (h * G + g) * Dh, 1, k_cache, k, token_stride, Dh, scale, scores + (h * G + g) * Tp + i, Tp, half);
            }
        }
        for (; j < j1; j++) {
            const int64_t i = b * B + j - t0;
            for (int64_t r = 0; r < Hq; r++) {
                const float *qr = qd + r * Dh;
                const int64_t k = base + j * token_stride + (r / G) * Dh;
                v8 acc = {0};
                for (int64_t c = 0; c < Dh; c += 8) acc += load8(qr + c) * kv_load8(k_cache, k + c, half);
                scores[r * Tp + i] = hsum8(acc) * scale;
            }
        }
    }
    /* exp(score - max) of each row; the padded tail gets 0 */
    for (int64_t r = 0; r < Hq; r++) {
        float *s = scores + r * Tp;
        /* soft-capping in transformers' order: divide, tanh, multiply (tanhf, like torch's CPU tanh, is
           within an ulp of exact; scalar: a softcapped model spends its time elsewhere) */
        if (softcap > 0.f)
            for (int64_t i = 0; i < n; i++) s[i] = tanhf(s[i] / softcap) * softcap;
        float mx = s[0];
        for (int64_t i = 1; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        const int64_t full = n & ~(int64_t)7, padded = (n + 7) & ~(int64_t)7;
        for (int64_t i = n; i < padded; i++) s[i] = mx;
        v8 vsum = {0};
        for (int64_t i = 0; i < padded; i += 8) {
            v8 e = exp8(load8(s + i) - mx);
            if (i >= full)
                for (int64_t ii = 0; ii < 8; ii++) e[ii] = i + ii < n ? e[ii] : 0.f;
            store8(s + i, e);
            vsum += e;
        }
        m[r] = mx;
        l[r] = hsum8(vsum);
    }
    /* o[r] = sum_i p[r, i] v_(t0+i), 64 values of a head at a time in registers, 8 tokens at a time */
    memset(o, 0, sizeof(float) * (size_t)(Hq * Dh));
    for (int64_t b = bb; b < be; b++) {
        const int64_t j0 = b * B < t0 ? t0 - b * B : 0, j1 = (b + 1) * B <= t1 ? B : t1 - b * B;
        const int64_t base = table[b] * block_stride;
        for (int64_t j = j0; j < j1; j += 8) {
            const int64_t nj = j + 8 <= j1 ? 8 : j1 - j, i = b * B + j - t0;
            const int64_t next = nj == 8 ? attn_next_group(table, b, j, be, B, block_stride, token_stride) : -1;
            for (int64_t h = 0; h < Hkv; h++) {
                if (next >= 0) prefetch_rows(vc + (next + h * Dh) * esize, 8, token_stride * esize, Dh * esize);
                const int64_t vb = base + j * token_stride + h * Dh;
                int64_t g = 0;
                for (; ATTN_PAIRS && g + 2 <= G && Dh % 64 == 0; g += 2)
                    for (int64_t c0 = 0; c0 < Dh; c0 += 64)
                        attn_values64(scores + (h * G + g) * Tp + i, 2, Tp, v_cache, vb, token_stride, nj, o + (h * G + g) * Dh, Dh, c0, half);
                for (; g < G; g++) {
                    const float *p = scores + (h * G + g) * Tp + i;
                    float *orow = o + (h * G + g) * Dh;
                    int64_t c0 = 0;
                    for (; c0 + 64 <= Dh; c0 += 64) attn_values64(p, 1, Tp, v_cache, vb, token_stride, nj, orow, Dh, c0, half);
                    for (; c0 < Dh; c0 += 8) {  /* head sizes not a multiple of 64: the last values 8 at a time */
                        v8 acc = load8(orow + c0);
                        for (int64_t jj = 0; jj < nj; jj++) acc += p[jj] * kv_load8(v_cache, vb + jj * token_stride + c0, half);
                        store8(orow + c0, acc);
                    }
                }
            }
        }
    }
}

static inline __attribute__((always_inline)) void paged_decode_attention_share(
    const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, const int64_t *block_tables,
    int64_t table_stride, const int64_t *context_lens, int64_t D, int64_t Hq, int64_t Hkv, int64_t Dh,
    int64_t B, float scale, int64_t window, float softcap, float *out, const int half)
{
    /* Every thread works out the same split: units of chunk blocks, first_unit[d] .. first_unit[d + 1] - 1
       sequence d's. */
    const int64_t chunk = attn_chunk_blocks(context_lens, D, B, window), Tp = (chunk * B + 7) & ~(int64_t)7;
    int64_t *first_unit = malloc(sizeof(int64_t) * (size_t)(D + 1));
    float *scores = malloc(sizeof(float) * (size_t)(Hq * Tp));
    float *own = malloc(sizeof(float) * (size_t)(Hq * (Dh + 2)));  /* a whole sequence's unit: m, l, o */
    first_unit[0] = 0;
    for (int64_t d = 0; d < D; d++) {
        const attn_span s = attn_span_of(context_lens[d], B, window);
        first_unit[d + 1] = first_unit[d] + (s.nblk - s.b0 + chunk - 1) / chunk;
    }
    const int64_t units = first_unit[D], part = Hq * (Dh + 2);
    float *parts = NULL;  /* [units, Hq * (Dh + 2)]: m, l, o of units of sequences that have several */
    if (units > D) {
        #pragma omp single copyprivate(parts)
        parts = malloc(sizeof(float) * (size_t)(units * part));
    }
    #pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; u++) {
        int64_t d = 0;
        while (first_unit[d + 1] <= u) d++;
        const int64_t L = context_lens[d], k = u - first_unit[d], whole = first_unit[d + 1] - first_unit[d] == 1;
        const attn_span s = attn_span_of(L, B, window);
        const int64_t bb = s.b0 + k * chunk, be = bb + chunk < s.nblk ? bb + chunk : s.nblk;
        const int64_t t0 = bb * B > s.lo ? bb * B : s.lo, t1 = be * B < L ? be * B : L;
        float *mlo = whole ? own : parts + u * part;
        attention_unit(q + d * q_stride, k_cache, v_cache, block_tables + d * table_stride, t0, t1, bb, be, Hq,
                       Hkv, Dh, B, scale, softcap, scores, Tp, mlo, mlo + Hq, mlo + 2 * Hq, half);
        if (whole)
            for (int64_t r = 0; r < Hq; r++) {
                const v8 inv = splat8(1.0f / mlo[Hq + r]);
                for (int64_t c = 0; c < Dh; c += 8) store8(out + (d * Hq + r) * Dh + c, load8(mlo + 2 * Hq + r * Dh + c) * inv);
            }
    }
    if (units > D) {
        /* out[d, r] = sum_u w_u o_u[r] / sum_u w_u l_u[r], w_u = exp(m_u[r] - max_u m_u[r]), units in order */
        #pragma omp for schedule(static)
        for (int64_t dr = 0; dr < D * Hq; dr++) {
            const int64_t d = dr / Hq, r = dr % Hq, u0 = first_unit[d], u1 = first_unit[d + 1];
            if (u1 - u0 == 1) continue;  /* finished above */
            float mx = parts[u0 * part + r];
            for (int64_t u = u0 + 1; u < u1; u++) mx = parts[u * part + r] > mx ? parts[u * part + r] : mx;
            float lsum = 0.f;
            v8 acc[16];
            float *dst = out + dr * Dh;
            for (int64_t c0 = 0; c0 < Dh; c0 += 128) {
                const int64_t nc = Dh - c0 < 128 ? (Dh - c0) / 8 : 16;
                for (int64_t c = 0; c < nc; c++) acc[c] = splat8(0.f);
                for (int64_t u = u0; u < u1; u++) {
                    const float *pu = parts + u * part;
                    const float w = expf(pu[r] - mx);
                    if (c0 == 0) lsum += w * pu[Hq + r];
                    const v8 wv = splat8(w);
                    for (int64_t c = 0; c < nc; c++) acc[c] += wv * load8(pu + 2 * Hq + r * Dh + c0 + 8 * c);
                }
                const v8 inv = splat8(1.0f / lsum);
                for (int64_t c = 0; c < nc; c++) store8(dst + c0 + 8 * c, acc[c] * inv);
            }
        }
        #pragma omp single nowait
        free(parts);  /* after the combine's barrier: every thread is done with it */
    }
    free(first_unit);
    free(scores);
    free(own);
}

static inline __attribute__((always_inline)) void paged_decode_attention(
    const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, const int64_t *block_tables,
    int64_t table_stride, const int64_t *context_lens, int64_t D, int64_t Hq, int64_t Hkv, int64_t Dh,
    int64_t B, float scale, int64_t window, float softcap, float *out, const int half)
{
    int64_t total = 0;
    for (int64_t d = 0; d < D; d++) total += context_lens[d];
    /* fewer than ~256 KiB of float32 keys: one thread is faster than waking the others */
    const int nthreads = total * Hkv * Dh >= 4 * PAR_MIN_ELEMS ? omp_get_max_threads() : 1;
    #pragma omp parallel num_threads(nthreads)
    paged_decode_attention_share(q, q_stride, k_cache, v_cache, block_tables, table_stride, context_lens, D, Hq,
                                 Hkv, Dh, B, scale, window, softcap, out, half);
}

void paged_decode_attention_team(
    const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, const int64_t *block_tables,
    int64_t table_stride, const int64_t *context_lens, int64_t D, int64_t Hq, int64_t Hkv, int64_t Dh,
    int64_t B, float scale, int64_t window, float softcap, float *out, int64_t half)
{
    if (half)
        paged_decode_attention_share(q, q_stride, k_cache, v_cache, block_tables, table_stride, context_lens, D,
                                     Hq, Hkv, Dh, B, scale, window, softcap, out, 1);
    else
        paged_decode_attention_share(q, q_stride, k_cache, v_cache, block_tables, table_stride, context_lens, D,
                                     Hq, Hkv, Dh, B, scale, window, softcap, out, 0);
}

void paged_decode_attention_f32(
    const float *q, int64_t q_stride, const float *k_cache, const float *v_cache, const int64_t *block_tables,
    int64_t table_stride, const int64_t *context_lens, int64_t D, int64_t Hq, int64_t Hkv, int64_t Dh,
    int64_t B, float scale, int64_t window, float softcap, float *out)
{
    paged_decode_attention(q, q_stride, k_cache, v_cache, block_tables, table_stride, context_lens, D, Hq, Hkv, Dh,
                           B, scale, window, softcap, out, 0);
}

void paged_decode_attention_f16kv(
    const float *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *block_tables,
    int64_t table_stride, const int64_t *context_lens, int64_t D, int64_t Hq, int64_t Hkv, int64_t Dh,
    int64_t B, float scale, int64_t window, float softcap, float *out)
{
    paged_decode_attention(q, q_stride, k_cache, v_cache, block_tables, table_stride, context_lens, D, Hq, Hkv, Dh,
                           B, scale, window, softcap, out, 1);
}

/* y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for a few rows m, reading W in oneDNN's blocked layout for
   linear weights on this CPU: blocks of B output rows, each stored [K][B] (so element (n, k) sits at
   (n / B) * K * B + k * B + n % B; the caller has checked this against the real weight). One streaming pass
   over W: at batch 1 a decode step is a read of every weight, and this runs near DRAM bandwidth where the
   general GEMM reaches ~60% of it. acc is [M][B]; k is tiled so that with several rows the tile of W is
   reread from L1, not from memory. */
#define GEMV_MAX_ROWS 8
#define GEMV_K_TILE 64
/* Software prefetch into L2, one per line read, this many floats (4 KiB) ahead, as quant_kernels.c does:
   SmolLM2-135M fp32 decode 41-44 -> 47-49 tok/s, Qwen3-0.6B 11.1 -> 11.8 (2 Sapphire Rapids threads). */
#define GEMV_PREFETCH 1024
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
                if (m == 0)
                    for (int j = 0; j < NB; j += 2) __builtin_prefetch(wk + 8 * j + GEMV_PREFETCH, 0, 2);
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

/* A team's share (see quant_kernels.c on "_team" forms). */
void packed_gemv_f32_team(const float *w, int64_t N, int64_t K, int64_t Kp, int64_t B, const float *x, int64_t M,
                          int64_t x_stride, const float *bias, float *y) {
    const int64_t nblocks = (N + B - 1) / B;
    /* Rows in chunks, so that the accumulators (and a k tile of x) stay in L1/L2 however many rows come. */
    const int64_t chunk = M <= GEMV_MAX_ROWS ? GEMV_MAX_ROWS : GEMM_ROW_CHUNK;
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

void packed_gemv_f32(const float *w, int64_t N, int64_t K, int64_t Kp, int64_t B, const float *x, int64_t M,
                     int64_t x_stride, const float *bias, float *y) {
    const int64_t nblocks = (N + B - 1) / B;
    #pragma omp parallel if (nblocks >= 4 && M * N * K >= 4 * PAR_MIN_ELEMS)
    packed_gemv_f32_team(w, N, K, Kp, B, x, M, x_stride, bias, y);
}
