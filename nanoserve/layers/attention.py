"""Paged attention: store each step's new K/V into their cache slots, then attend over each sequence's blocks.

The cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V). A
token at position ``p`` of a sequence with block table ``bt`` lives in slot ``bt[p // B] * B + p % B``.

Backends are registered by name; ``torch_sdpa`` (pure PyTorch) is the reference every faster backend is
tested against; ``cpu_native`` decodes with a small C kernel (the CPU default, see ``platform``).

A layer with a sliding window ``W`` (Mistral v0.1, Qwen2's upper layers, Gemma's local layers) lets the query
at position ``p`` see the keys at ``p - W + 1 .. p`` only, as transformers' sliding-window mask does; its
older keys stay in the cache (the block tables are shared by every layer) but are never read.

A layer with attention logit soft-capping ``c`` (Gemma 2) scores ``c * tanh(scale * q.k / c)`` before the
softmax, as transformers' eager attention does; ``scaled_dot_product_attention`` has no such step, so those
layers compute their scores explicitly (:func:`_softcapped_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.layers import native


@dataclass
class AttentionMetadata:
    """How the flattened tokens of one step map onto sequences and cache slots.

    Tokens are ordered decodes first (one query token each), then prefill chunks. Built once per step by the
    model runner and passed down explicitly; layers never look it up from a global.
    """

    slot_mapping: torch.Tensor  # [T] long: cache slot of each new token
    num_decode_tokens: int  # the first D tokens are single-token decodes
    decode_block_tables: torch.Tensor  # [D, max_blocks] long (padding: 0)
    decode_context_lens: torch.Tensor  # [D] long: tokens to attend to, including the new one
    # Prefill chunks, one entry each (python ints: iterated on the host anyway).
    prefill_query_starts: list[int]  # offset of the chunk in the flattened tokens
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]  # start + query_len
    prefill_block_tables: list[torch.Tensor]  # [num_blocks_of_seq] long each
    decode_max_context: int = 0


# backend(q, k, v, kv_cache, meta, scale, kv_written, window, softcap) -> out; kv_written: k and v are already
# in the cache; window: the sliding window (0: none); softcap: attention logit soft-capping (0: none)
AttentionBackend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float, bool, int, float],
    torch.Tensor,
]
_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(name: str) -> Callable[[AttentionBackend], AttentionBackend]:
    def wrap(fn: AttentionBackend) -> AttentionBackend:
        _BACKENDS[name] = fn
        return fn

    return wrap


def get_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write this step's new keys and values into their slots."""
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    # A float16 cache (kv_cache_dtype) holds the values rounded to nearest, as the C store kernel writes them.
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """softmax(softcap * tanh(scale * q k^T / softcap), masked) v, in transformers' eager order of operations.
    q: [N, Hq, S, Dh]; k, v: [N, Hkv, L, Dh]; mask: bool, broadcast to [N, Hq, S, L] (True: attend)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    # Keys no query sees may be unwritten slots (any bits, NaN included): a probability of 0 times NaN is NaN.
    unseen = ~mask.any(dim=-2, keepdim=True).transpose(-1, -2)  # [..., L, 1]
    return torch.matmul(torch.softmax(scores, dim=-1), v.masked_fill(unseen, 0.0))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float,
    is_causal: bool = False,
) -> torch.Tensor:  # fmt: skip
    """scaled_dot_product_attention, or the explicit soft-capped scores where ``softcap`` > 0."""
    if softcap:
        if mask is None:  # causal, queries and keys aligned
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        return _softcapped_attention(q, k, v, mask, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)


def _decode_sdpa(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int,
    softcap: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """q: [D, Hq, Dh] -> [D, Hq, Dh]. Gathers each decoding sequence's blocks into a dense padded
    [D, Hkv, L, Dh] copy and masks the tail (and what lies before a sliding window)."""
    block_size = kv_cache.shape[2]
    tables = meta.decode_block_tables[:, : -(-meta.decode_max_context // block_size)]
    keys = kv_cache[0][tables].flatten(1, 2).transpose(1, 2).to(q.dtype)  # [D, Hkv, L, Dh]
    values = kv_cache[1][tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
    positions = torch.arange(keys.shape[2], device=q.device)
    visible = positions[None, :] < meta.decode_context_lens[:, None]  # [D, L]
    if window:
        visible &= positions[None, :] >= meta.decode_context_lens[:, None] - window
    mask = visible[:, None, None, :]  # [D, 1, 1, L]
    o = _attend(q.unsqueeze(2), keys, values, mask, scale, softcap)
    return o.squeeze(2)  # [D, Hq, Dh]


def _as_cached(x: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """``x`` as attention reads it back from ``kv_cache``: rounded to the cache's dtype where that is narrower."""
    return x if kv_cache.dtype == x.dtype else x.to(kv_cache.dtype).to(x.dtype)


def _prefill_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, out: torch.Tensor, window: int = 0, softcap: float = 0.0,
) -> None:  # fmt: skip
    """Attention of every prefill chunk, written into ``out``. Inputs are 4-D ([1, H, n, Dh]) because
    torch's fused CPU kernel (flash attention) takes only 4-D; 3-D silently falls back to the unfused math."""
    for start, q_len, ctx_len, table in zip(
        meta.prefill_query_starts, meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_tables
    ):
        qs = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, Dh]
        windowed = 0 < window < ctx_len
        if ctx_len == q_len and not windowed:
            # No cached prefix: attend to this step's own keys, no gather needed. A float16 cache's rounding is
            # applied to them too, so a prompt sees the same keys whether it is prefilled in one chunk or
            # several (which depends on the other requests' load) or hits the prefix cache.
            ks = _as_cached(k[start : start + q_len], kv_cache).transpose(0, 1).unsqueeze(0)
            vs = _as_cached(v[start : start + q_len], kv_cache).transpose(0, 1).unsqueeze(0)
            o = _attend(qs, ks, vs, None, scale, softcap, is_causal=True)
        else:
            # Keys from the first one any query of the chunk can see (all, without a window).
            first = max(0, ctx_len - q_len - window + 1) if windowed else 0
            first -= first % kv_cache.shape[2]  # whole blocks
            blocks = table[first // kv_cache.shape[2] :]
            ks = kv_cache[0][blocks].flatten(0, 1)[: ctx_len - first].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, Dh]
            vs = kv_cache[1][blocks].flatten(0, 1)[: ctx_len - first].transpose(0, 1).unsqueeze(0)
            ks, vs = ks.to(q.dtype), vs.to(q.dtype)  # a float16 cache widens as it is read
            # Query i sits at position ctx_len - q_len + i and sees keys up to and including it (and, with a
            # window W, after position - W).
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            k_pos = torch.arange(first, ctx_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if windowed:
                mask &= k_pos > q_pos - window
            o = _attend(qs, ks, vs, mask, scale, softcap)
        out[start : start + q_len] = o[0].transpose(0, 1)


@register_backend("torch_sdpa")
def torch_sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, kv_written: bool = False, window: int = 0, softcap: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (new tokens, already rotated); returns [T, Hq, D]. Pure PyTorch:
    the reference every other backend is tested against."""
    if not kv_written:
        store_kv(k, v, kv_cache, meta)
    out = torch.empty_like(q)
    n_dec = meta.num_decode_tokens
    if n_dec:
        out[:n_dec] = _decode_sdpa(q[:n_dec], kv_cache, meta, scale, window, softcap)
    _prefill_sdpa(q, k, v, kv_cache, meta, scale, out, window, softcap)
    return out


@register_backend("cpu_native")
def cpu_native_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, kv_written: bool = False, window: int = 0, softcap: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Like ``torch_sdpa`` but decodes with the C kernel of :mod:`nanoserve.layers.native`, which walks the
    block tables instead of gathering a padded copy of every context (falls back to ``torch_sdpa`` where the
    kernel is unavailable or does not apply)."""
    lib = native.load()
    if q.dtype != torch.float32 or not native.kv_cache_supported(lib, kv_cache) or q.shape[-1] % 8 or not q.is_cpu:
        return torch_sdpa_attention(q, k, v, kv_cache, meta, scale, kv_written, window, softcap)
    if not kv_written:
        store_kv(k, v, kv_cache, meta)
    out = torch.empty(q.shape, dtype=q.dtype)
    n_dec = meta.num_decode_tokens
    if n_dec:
        native.paged_decode_attention(
            lib, q[:n_dec], kv_cache, meta.decode_block_tables, meta.decode_context_lens, scale, out[:n_dec], window,
            softcap,
        )
    _prefill_sdpa(q, k, v, kv_cache, meta, scale, out, window, softcap)
    return out


class Attention(nn.Module):
    """Attention over the paged cache of one layer. The cache tensor is bound once at start-up."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: str,
        sliding_window: int | None = None, softcap: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        if softcap is not None and softcap < 0:
            raise ValueError(f"attention soft-capping must be > 0 (0 or None: none), got {softcap}")
        self.sliding_window = sliding_window or 0  # 0: attend to the whole context
        self.softcap = float(softcap or 0.0)  # 0: no soft-capping
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = get_backend(backend)
        self.kv_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, kv_written: bool = False
    ) -> torch.Tensor:
        return self.backend(q, k, v, self.kv_cache, meta, self.scale, kv_written, self.sliding_window, self.softcap)
