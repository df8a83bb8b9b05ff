/* A decode step through every layer of a pre-norm decoder (Llama / Qwen2 / Qwen3) in one call.
 *
 * At batch 1 a layer is nine kernel calls (norm, qkv, q/k norm + rotary + cache store, attention, o, norm,
 * gate_up, silu * up, down); from Python each costs ctypes marshalling, tensor allocation and module
 * dispatch, ~8 ms of a ~50 ms Qwen3-0.6B int4 step (measured). Here the same kernels run in the same order on
 * the same inputs, so the result is bit-identical to the per-layer path (tests/unit/test_native_decode.py);
 * only the Python between them is gone. It is also one OpenMP parallel region rather than ~5 per layer
 * (forking the pool and joining it ~150 times a step cost SmolLM2-135M int8 decode 20 % of its speed, 111 ->
 * 140 tok/s on 2 Sapphire Rapids threads). The model's shape and weight pointers are described once
 * (dk_model, built in nanoserve/models/native_decode.py); a step passes only its own inputs.
 *
 * Applies to steps of decode tokens only, at tensor-parallel size 1 (a row-parallel layer's all-reduce sits
 * between the kernels), with every projection either low-bit (q_linear) or float32 in the packed layout
 * (packed_gemv); the caller checks that. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

/* The kernels of native_kernels.c and quant_kernels.c (one library): "_team" forms, each a team's share of one
   kernel ending in a barrier (see quant_kernels.c), and one that a thread runs alone. */
void add_rms_norm_f32_serial(const float *x, int64_t x_stride, float *residual, const float *w, float eps,
                             int64_t T, int64_t H, float *out);
void qk_norm_rope_store_team(float *qkv, int64_t qkv_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                             int64_t R, const float *cos_t, const float *sin_t, const int64_t *positions,
                             const float *q_w, const float *k_w, float eps, const int64_t *slots, void *k_cache,
                             void *v_cache, int64_t half);
void silu_mul_f32_team(const float *gu, int64_t T, int64_t I, float *out);
void paged_decode_attention_team(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                 const int64_t *block_tables, int64_t table_stride, const int64_t *context_lens,
                                 int64_t D, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t B, float scale,
                                 int64_t window, float softcap, float *out, int64_t half);
void packed_gemv_f32_team(const float *w, int64_t N, int64_t K, int64_t Kp, int64_t B, const float *x, int64_t M,
                          int64_t x_stride, const float *bias, float *y);
void q_linear_f32_team(const uint8_t *w, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym,
                       const float *x, int64_t M, int64_t x_stride, const float *bias, float *y);
void q_linear_i8_team(const uint8_t *w, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t asym,
                      const float *x, int64_t M, int64_t x_stride, const float *bias, float *y);
void argmax_rows_team(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out);

enum { DK_LOWBIT_F32 = 0, DK_LOWBIT_I8 = 1, DK_PACKED_F32 = 2 };

/* One projection, y = x W^T (+ bias). kind DK_LOWBIT_*: W in nanoserve's low-bit layout (K its padded input,
   equal to the layer's input here); DK_PACKED_F32: W in the float32 packed layout, blocks of `group` rows,
   input padded to Kp in memory. */
typedef struct {
    const void *weight;
    const float *bias;
    int64_t kind, N, K, Kp, group, bits, asym;
} dk_linear;

typedef struct {
    dk_linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
    const float *q_norm, *k_norm;  /* NULL: no per-head q/k norm */
    void *k_cache, *v_cache;       /* [num_blocks, block_size, Hkv, D] each, float32 or float16 (kv_half) */
    int64_t window;                /* sliding-window attention over the last `window` tokens; 0: all */
} dk_layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    float eps, qk_eps, scale;
    const float *cos_table, *sin_table;  /* [max_position, rotary_dim] */
    const dk_layer *layers;
    int64_t rotary_dim;                  /* the first rotary_dim dims of each head rotate (head_dim: all) */
    int64_t kv_half;                     /* 1: the caches hold float16 (kv_cache_dtype float16) */
} dk_model;

/* The greedy head a step may end with: the model's final norm, the LM head (N rows, of which the first `vocab`
   are the vocabulary) and each row's argmax. */
typedef struct {
    dk_linear lm_head;
    const float *norm;
    float eps;
    int64_t vocab;
} dk_head;

/* A team's share of one projection. */
static void dk_project(const dk_linear *l, const float *x, int64_t T, float *y) {
    if (l->kind == DK_PACKED_F32)
        packed_gemv_f32_team((const float *)l->weight, l->N, l->K, l->Kp, l->group, x, T, l->K, l->bias, y);
    else if (l->kind == DK_LOWBIT_I8)
        q_linear_i8_team((const uint8_t *)l->weight, l->N, l->K, l->group, l->bits, l->asym, x, T, l->K, l->bias, y);
    else
        q_linear_f32_team((const uint8_t *)l->weight, l->N, l->K, l->group, l->bits, l->asym, x, T, l->K, l->bias, y);
}

/* x: [T, hidden] the embeddings in; on return the last layer's MLP output, and residual [T, hidden] the
   residual stream beside it (the caller applies the final norm to x + residual, as the model does). With a
   `head` (else NULL), the step goes on to the next tokens: logits [T, head->lm_head.N] (scratch) from the final
   norm of x + residual, and tokens[t] = the argmax of row t's first head->vocab logits, the same kernels and
   order as the model's norm, compute_logits and the sampler's greedy pick (residual becomes x + residual).
   Token t decodes at positions[t] into cache slot slots[t], attending to its sequence's context_lens[t]
   tokens through block table row t (table_stride apart). Returns 0, or -1 when scratch memory ran out.

   The whole step is one parallel region. A layer's kernels share its work out in turn, each ending in a
   barrier, except the two norms: every thread computes them whole into its own copy of the residual stream
   and of the normalised rows (T x hidden values, against T x hidden x ~6 hidden of the projections after
   them), so no thread waits there. Thread 0's residual copy is the caller's buffer. */
int decoder_decode_step_f32(const dk_model *m, float *x, float *residual, int64_t T, const int64_t *positions,
                            const int64_t *slots, const int64_t *block_tables, int64_t table_stride,
                            const int64_t *context_lens, const dk_head *head, float *logits, int64_t *tokens) {
    const int64_t H = m->hidden, D = m->head_dim, Hq = m->num_heads, Hkv = m->num_kv_heads;
    const int64_t qkv_size = (Hq + 2 * Hkv) * D, inter = m->intermediate;
    float *qkv = malloc(sizeof(float) * (size_t)(T * qkv_size));
    float *attn = malloc(sizeof(float) * (size_t)(T * Hq * D));
    float *gate_up = malloc(sizeof(float) * (size_t)(T * 2 * inter));
    float *act = malloc(sizeof(float) * (size_t)(T * inter));
    int status = (qkv && attn && gate_up && act) ? 0 : -1;
    if (status == 0) {
        #pragma omp parallel
        {
            const int me = omp_get_thread_num();
            float *h = malloc(sizeof(float) * (size_t)(T * H));
            float *own = me == 0 ? residual : malloc(sizeof(float) * (size_t)(T * H));
            if (h == NULL || own == NULL) {
                #pragma omp atomic write
                status = -1;
            }
            #pragma omp barrier
            /* read after the barrier, so every thread takes the same branch (the kernels' barriers must match) */
            for (int64_t i = 0; status == 0 && i < m->num_layers; i++) {
                const dk_layer *l = &m->layers[i];
                if (i == 0) {
                    memcpy(own, x, sizeof(float) * (size_t)(T * H));
                    add_rms_norm_f32_serial(x, H, NULL, l->input_norm, m->eps, T, H, h);
                } else {
                    add_rms_norm_f32_serial(x, H, own, l->input_norm, m->eps, T, H, h);
                }
                dk_project(&l->qkv, h, T, qkv);
                qk_norm_rope_store_team(qkv, qkv_size, T, Hq, Hkv, D, m->rotary_dim, m->cos_table, m->sin_table,
                                        positions, l->q_norm, l->k_norm, m->qk_eps, slots, l->k_cache, l->v_cache,
                                        m->kv_half);
                /* softcap 0: models with attention soft-capping (Gemma 2) never get here (see native_decode.py) */
                paged_decode_attention_team(qkv, qkv_size, l->k_cache, l->v_cache, block_tables, table_stride,
                                            context_lens, T, Hq, Hkv, D, m->block_size, m->scale, l->window, 0.0f,
                                            attn, m->kv_half);
                dk_project(&l->o, attn, T, x);  /* every thread read x in its norm before the qkv barrier */
                add_rms_norm_f32_serial(x, H, own, l->post_norm, m->eps, T, H, h);
                dk_project(&l->gate_up, h, T, gate_up);
                silu_mul_f32_team(gate_up, T, inter, act);
                dk_project(&l->down, act, T, x);
            }
            if (status == 0 && head != NULL) {
                add_rms_norm_f32_serial(x, H, own, head->norm, head->eps, T, H, h);
                dk_project(&head->lm_head, h, T, logits);
                argmax_rows_team(logits, T, head->vocab, head->lm_head.N, tokens);
            }
            free(h);
            if (me != 0) free(own);
        }
    }
    free(qkv);
    free(attn);
    free(gate_up);
    free(act);
    return status;
}
