"""The decoder's decode steps in one C call (``decoder_decode_step_f32`` in layers/decode_kernels.c).

A batch-1 decode step of a 28-layer model makes ~250 kernel calls; from Python each one costs ctypes
marshalling, an output allocation and module dispatch (~8 ms of a ~50 ms Qwen3-0.6B int4 step, measured with
per-kernel timers). The C loop runs the same kernels in the same order, so its output is bit-identical to the
per-layer path, which stays the reference and the fallback.

:func:`plan_native_decode` describes the model once (shapes, weight pointers, norms, caches) as ctypes
structures; :meth:`NativeDecode.applies` says whether a step can take the C loop: decode tokens only, few
enough rows for each projection's kernel. Models it cannot describe (tensor parallelism, act-order weights,
weights oneDNN alone reads, a torch attention backend, Gemma's layers, ...) get no plan and always take the
per-layer path.

A step whose every row is plain greedy (``Sampler.plain_greedy``) can go further in the same call
(:meth:`NativeDecode.run_greedy` with the model's :class:`GreedyHead`): the final norm, the LM head and each
row's argmax, returning the tokens. The logits then never return to Python; a 0.6B step saved ~0.35 ms of
~14 (the norm and LM-head calls from Python, and the sampler reading 151,936 logits that the LM head's threads
had left in their caches).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

from nanoserve.layers import attention, native
from nanoserve.layers.linear import NATIVE_GEMM_MAX_ROWS, LinearBase

NATIVE_DECODE_ENV = "NANOSERVE_NATIVE_DECODE"  # "0": always the per-layer path (for comparisons)

_LOWBIT_F32, _LOWBIT_I8, _PACKED_F32 = 0, 1, 2
_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [
        ("weight", _ptr), ("bias", _ptr), ("kind", _i64), ("N", _i64), ("K", _i64), ("Kp", _i64),
        ("group", _i64), ("bits", _i64), ("asym", _i64),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("input_norm", _ptr),
        ("post_norm", _ptr), ("q_norm", _ptr), ("k_norm", _ptr), ("k_cache", _ptr), ("v_cache", _ptr),
        ("window", _i64),
    ]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [
        ("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64), ("num_kv_heads", _i64), ("head_dim", _i64),
        ("intermediate", _i64), ("block_size", _i64), ("eps", _f32), ("qk_eps", _f32), ("scale", _f32),
        ("cos_table", _ptr), ("sin_table", _ptr), ("layers", ctypes.POINTER(_Layer)), ("rotary_dim", _i64),
        ("kv_half", _i64),
    ]  # fmt: skip


class _Head(ctypes.Structure):
    _fields_ = [("lm_head", _Linear), ("norm", _ptr), ("eps", _f32), ("vocab", _i64)]


def _declare(lib: ctypes.CDLL) -> Any:
    fn = lib.decoder_decode_step_f32
    fn.argtypes = [ctypes.POINTER(_Model), _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, ctypes.POINTER(_Head), _ptr, _ptr]
    fn.restype = ctypes.c_int
    return fn


def _describe_linear(module: LinearBase) -> tuple[_Linear, int] | None:
    """The projection as the C loop sees it, and the most rows its kernel takes there (None: it cannot)."""
    bias = module.bias.data_ptr() if module.bias is not None else None
    packed = module.packed if module.quant is not None else None
    return _describe(module.quant, packed, module.packed_weight, bias, module.in_features)


def _describe(quant: Any, packed: torch.Tensor | None, packed_weight: Any, bias: int | None, in_features: int) -> tuple[_Linear, int] | None:
    """A weight in nanoserve's low-bit layout (``quant``, codes in ``packed``) or in the float32 packed layout
    (``packed_weight``) as a _Linear, and the most rows its kernel takes (None: neither applies)."""
    if quant is not None:
        q = quant
        s = q.shape
        if q.kernels is None or q.perm is not None or s.padded_in != in_features:
            return None
        kind = _LOWBIT_I8 if q.int8_activations else _LOWBIT_F32
        # float32 activations: from 16 rows on, the layer widens the weights and runs a float GEMM instead
        from nanoserve.quantization.linear import DEQUANT_GEMM_MIN_ROWS

        max_rows = 1 << 30 if q.int8_activations else DEQUANT_GEMM_MIN_ROWS - 1
        desc = _Linear(packed.data_ptr(), bias, kind, s.out_features, s.padded_in, s.padded_in,
                       s.group_size, s.bits, int(s.asymmetric))  # fmt: skip
        return desc, max_rows
    if packed_weight is None or packed_weight.kernels is None or not packed_weight.row_block:
        return None
    max_rows = NATIVE_GEMM_MAX_ROWS if packed_weight.row_block == 64 else native.GEMV_MAX_ROWS
    kp = packed_weight.padded_in_features or in_features
    desc = _Linear(packed_weight.address, bias, _PACKED_F32, packed_weight.out_features, in_features, kp,
                   packed_weight.row_block, 0, 0)  # fmt: skip
    return desc, max_rows


class GreedyHead:
    """The model's final norm, LM head and argmax as the C step sees them (see :func:`plan_greedy_head`)."""

    def __init__(self, desc: _Head, max_rows: int, keep: list) -> None:
        self.desc = desc
        self.max_rows = max_rows
        self._keep = keep  # tensors whose addresses the description holds


def plan_greedy_head(lm_head: Any, norm: Any) -> GreedyHead | None:
    """The greedy head of a model (its ``ParallelLMHead`` and final ``RMSNorm``), or None where the C step cannot
    run it: a vocabulary split across ranks, a weight only torch reads (an unpacked float32 head), a norm the
    kernels do not take."""
    if norm.kernels is None or lm_head.tp.size != 1 or native.load() is None:
        return None
    packed = lm_head.packed if lm_head.quant is not None else None
    described = _describe(lm_head.quant, packed, lm_head.packed_weight, None, lm_head.hidden_size)
    if described is None or described[0].N < lm_head.vocab_size:
        return None
    desc, max_rows = described
    head = _Head(desc, norm.weight.data_ptr(), norm.eps, lm_head.vocab_size)
    return GreedyHead(head, max_rows, [packed, norm.weight])


class NativeDecode:
    """The C description of one model, valid while its weights and KV caches stay where they are."""

    def __init__(self, model: _Model, layers: Any, max_rows: int, fn: Any, keep: list) -> None:
        self.model = model
        self.layers = layers  # the ctypes array the model points into
        self.max_rows = max_rows
        self.fn = fn
        self._keep = keep  # tensors whose addresses the description holds
        self.steps_run = 0
        self.greedy_steps_run = 0  # of those, steps that ran through to the greedy tokens

    def applies(self, num_tokens: int, meta: attention.AttentionMetadata) -> bool:
        return meta.num_decode_tokens == num_tokens and num_tokens <= self.max_rows

    def run(self, x: torch.Tensor, positions: torch.Tensor, meta: attention.AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's output, residual) for the embeddings ``x`` [T, hidden], as the layer loop returns them."""
        return self._step(x, positions, meta, None, None, None)

    def run_greedy(self, x: torch.Tensor, positions: torch.Tensor, meta: attention.AttentionMetadata, head: GreedyHead) -> torch.Tensor:
        """The greedy next token of each row [T] (int64): the step, then the final norm, the LM head and the
        argmax of each row's logits, the same kernels in the same order as forward, compute_logits and the
        sampler's argmax_rows."""
        logits = torch.empty((x.shape[0], head.desc.lm_head.N), dtype=torch.float32)
        tokens = torch.empty(x.shape[0], dtype=torch.int64)
        self._step(x, positions, meta, ctypes.byref(head.desc), logits.data_ptr(), tokens.data_ptr())
        self.greedy_steps_run += 1
        return tokens

    def _step(self, x: torch.Tensor, positions: torch.Tensor, meta: attention.AttentionMetadata, head: Any,
              logits: int | None, tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        x = x.clone(memory_format=torch.contiguous_format)  # written in place
        residual = torch.empty_like(x)
        tables = meta.decode_block_tables
        assert tables.stride(1) == 1 and positions.dtype == torch.int64
        status = self.fn(
            ctypes.byref(self.model), x.data_ptr(), residual.data_ptr(), x.shape[0], positions.data_ptr(),
            meta.slot_mapping.data_ptr(), tables.data_ptr(), tables.stride(0), meta.decode_context_lens.data_ptr(),
            head, logits, tokens,
        )  # fmt: skip
        if status != 0:
            raise MemoryError("native decode step: could not allocate its scratch buffers")
        self.steps_run += 1
        return x, residual


def enabled() -> bool:
    return os.environ.get(NATIVE_DECODE_ENV, "1").lower() not in ("0", "false", "off")


def plan_native_decode(decoder: Any) -> NativeDecode | None:
    """A :class:`NativeDecode` for ``decoder`` (a models.decoder.DecoderModel with its caches bound), or None
    where some layer cannot run in the C loop."""
    lib = native.load()
    if lib is None or not enabled() or not decoder.layers:
        return None
    flags = decoder.flags
    if flags.gemma_norms or flags.embed_scale or flags.attn_softcap or len(decoder.rotaries) > 1:
        # Gemma: four norms a layer, a scaled embedding, soft-capped scores, a rope table per layer type and
        # GeGLU; the C loop runs the Llama/Qwen layer only, so these take the per-layer path.
        return None
    first = decoder.layers[0]
    attn0 = first.self_attn
    descs, keep, max_rows = [], [], 1 << 30
    for layer in decoder.layers:
        sa, mlp = layer.self_attn, layer.mlp
        cache = sa.attn.kv_cache
        if (
            sa.kernels is None or mlp.kernels is None or layer.input_layernorm.kernels is None
            or layer.post_attention_layernorm.kernels is None or sa.attn.backend is not attention.cpu_native_attention
            or getattr(sa.o_proj, "tp", None) is not None and sa.o_proj.tp.size != 1
            or cache.dim() != 5 or not native.kv_cache_supported(lib, cache) or cache.dtype != attn0.attn.kv_cache.dtype
            or not cache.is_contiguous() or cache.numel() == 0
            or sa.head_dim % 8 or sa.attn.scale != attn0.attn.scale
        ):  # fmt: skip
            return None
        linears = []
        for module in (sa.qkv_proj, sa.o_proj, mlp.gate_up_proj, mlp.down_proj):
            described = _describe_linear(module)
            if described is None:
                return None
            linears.append(described[0])
            max_rows = min(max_rows, described[1])
        half = cache[0].numel() * cache.element_size()
        qk = sa.q_norm is not None
        descs.append(_Layer(
            *linears, layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
            sa.q_norm.weight.data_ptr() if qk else None, sa.k_norm.weight.data_ptr() if qk else None,
            cache.data_ptr(), cache.data_ptr() + half, sa.attn.sliding_window,
        ))  # fmt: skip
        keep.append(cache)
    layers = (_Layer * len(descs))(*descs)
    qk_eps = attn0.q_norm.eps if attn0.q_norm is not None else 0.0
    rotary = decoder.rotary
    model = _Model(
        len(descs), first.input_layernorm.weight.shape[0], attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
        first.mlp.gate_up_proj.out_sizes[0], first.self_attn.attn.kv_cache.shape[2], first.input_layernorm.eps,
        qk_eps, attn0.attn.scale, rotary.cos.data_ptr(), rotary.sin.data_ptr(), layers, rotary.rotary_dim,
        int(attn0.attn.kv_cache.dtype == torch.float16),
    )  # fmt: skip
    keep += [rotary.cos, rotary.sin]
    return NativeDecode(model, layers, max_rows, _declare(lib), keep)
