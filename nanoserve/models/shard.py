"""What one rank's shard of a model holds, read from the layers themselves: parameter bytes (in total and by
part), buffer bytes, KV heads and the bytes of one KV block.

The model runner asks these of the model it loaded; ``nanoserve plan`` asks them of the same model class built
by :func:`build_shard`, with every parameter on the meta device. Both go through the functions here, so a
prediction cannot drift from what the layers allocate: the layers (``layers/linear.py``, ``embed_head.py``,
``models/decoder.py``) stay the one place that decides how a model splits over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nanoserve.layers.attention import Attention
from nanoserve.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanoserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from nanoserve.layers.moe import FusedMoE, SparseMoeBlock
from nanoserve.layers.norm import RMSNorm
from nanoserve.models.decoder import BuildContext, DecoderAttention, DecoderMLP

# The parts a parameter is counted under, by the nearest enclosing module of one of these types (first match;
# ParallelLMHead before its base class, a norm inside attention is a norm).
WEIGHT_PARTS: tuple[tuple[type[nn.Module], str], ...] = (
    (RMSNorm, "norms"),
    (ParallelLMHead, "lm_head"),
    (VocabParallelEmbedding, "embedding"),
    (DecoderAttention, "attention"),
    (DecoderMLP, "mlp"),
    (SparseMoeBlock, "mlp"),  # router and experts
)
PART_NAMES = ("embedding", "lm_head", "attention", "mlp", "norms")

# Factories that only allocate (their values do not depend on other tensors): what layers create parameters with.
_ALLOCATORS = frozenset(
    {torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}
)


class _AllocateOnMeta(TorchFunctionMode):
    """Puts every tensor made by an allocating factory without an explicit device on the meta device: shapes
    and dtypes are the layers' own, no memory is touched. Unlike ``with torch.device("meta")`` everything else
    still runs on the CPU, so the rotary table is really computed (transformers' scaled-rope helpers move their
    tensors to the CPU explicitly and cannot run on meta; and the meta arithmetic imports sympy and
    torch._dynamo, ~1.5 s)."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _ALLOCATORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_shard(model_cls: type[nn.Module], hf_config: Any, ctx: BuildContext) -> nn.Module:
    """``model_cls(hf_config, ctx)``: the shard of rank ``ctx.tp.rank`` exactly as the runner builds it, with
    its parameters on the meta device (no memory, no weights read). ``ctx.tp`` needs no process group:
    collectives only run in ``forward``. Buffers (the rotary tables) are real CPU tensors."""
    with _AllocateOnMeta():
        return model_cls(hf_config, ctx)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters, a tensor shared by two modules (tied embeddings) counted once."""
    return sum(_nbytes(p) for p in model.parameters())


def buffer_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s buffers (the rotary cos/sin tables): resident, but not loaded from the checkpoint."""
    return sum(_nbytes(b) for b in model.buffers())


def parameter_bytes_by_part(model: nn.Module) -> dict[str, int]:
    """:func:`parameter_bytes` split into :data:`PART_NAMES` (all layers summed). A tied LM head shares the
    embedding's tensor, which is counted once, under the part of the module registered first (the embedding):
    then ``lm_head`` is 0. Raises ValueError for a parameter under none of :data:`WEIGHT_PARTS`, so the parts
    always add up to :func:`parameter_bytes`."""
    parts = dict.fromkeys(PART_NAMES, 0)
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str, part: str | None) -> None:
        part = next((name for cls, name in WEIGHT_PARTS if isinstance(module, cls)), part)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if part is None:
                raise ValueError(f"parameter {prefix}{name} is in no weight part ({', '.join(PART_NAMES)})")
            parts[part] += _nbytes(p)
        for name, child in module.named_children():
            walk(child, f"{prefix}{name}.", part)

    walk(model, "", None)
    return parts


def kv_head_replicas(model: nn.Module) -> int:
    """On how many ranks each KV head is held (1 unless there are fewer KV heads than ranks)."""
    return max((m.kv_replicas for m in model.modules() if isinstance(m, QKVParallelLinear)), default=1)


def mlp_width(model: nn.Module) -> int:
    """The widest per-rank intermediate activation of the MLPs (``intermediate_size / tp`` for the decoder; an
    experts layer runs ``top_k`` experts' intermediates per token)."""
    dense = (max(m.out_sizes) for m in model.modules() if isinstance(m, MergedColumnParallelLinear))
    experts = (m.top_k * m.intermediate_per_rank for m in model.modules() if isinstance(m, FusedMoE))
    return max((*dense, *experts), default=0)


def expert_parameter_bytes(model: nn.Module) -> int:
    """Bytes of this rank's expert weights (every expert of every sparse layer; routers not included)."""
    return sum(_nbytes(p) for m in model.modules() if isinstance(m, FusedMoE) for p in m.parameters())


def active_parameter_bytes(model: nn.Module) -> int:
    """Bytes of this rank's weights one token's forward reads: all of :func:`parameter_bytes` but, in each
    experts layer, only ``top_k`` of its experts. (The embedding is counted whole, as a table.)"""
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    inactive = sum(_nbytes(m.gate_up_proj) + _nbytes(m.down_proj) - m.active_parameter_bytes() for m in experts)
    return parameter_bytes(model) - inactive


def kv_cache_shape(layer: Attention, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """Shape of one layer's paged cache: K then V, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""
    return (2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim)


def kv_bytes_per_block(layers: Sequence[Attention], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes on this rank: K and V of every attention layer for ``block_size`` tokens."""
    return sum(math.prod(kv_cache_shape(layer, 1, block_size)) for layer in layers) * dtype.itemsize
