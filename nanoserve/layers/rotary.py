"""Rotary position embeddings with a precomputed cos/sin table, including scaled variants (llama3, linear,
yarn, longrope, ...) whose inverse frequencies come from transformers' own implementations, and partial rotary
(``partial_rotary_factor``: only the first fraction of each head's dims rotate, as in Phi-4-mini)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def rope_layer_types(hf_config: Any) -> list[str | None]:
    """The rope table of each layer: its layer type (``"sliding_attention"`` / ``"full_attention"``) where the
    config gives each type its own rope (Gemma 3: transformers 5 keys ``rope_parameters`` by layer type, 4.x
    had ``rope_local_base_freq`` for the sliding layers), else None for every layer (one table)."""
    layer_types = getattr(hf_config, "layer_types", None)
    params = getattr(hf_config, "rope_parameters", None)
    keyed = isinstance(params, dict) and any(isinstance(params.get(t), dict) for t in set(layer_types or ()))
    if layer_types is None or not (keyed or getattr(hf_config, "rope_local_base_freq", None)):
        return [None] * hf_config.num_hidden_layers
    return list(layer_types)


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope settings (of the layers of ``layer_type``, see :func:`rope_layer_types`) in one shape whether
    the config came from transformers 4.x (``rope_theta`` and ``rope_scaling`` at top level) or 5.x
    (``rope_parameters``, flat or keyed by layer type)."""
    params = getattr(hf_config, "rope_parameters", None)
    if layer_type is not None and isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
    elif layer_type == "sliding_attention" and getattr(hf_config, "rope_local_base_freq", None):
        params = {"rope_type": "default", "rope_theta": hf_config.rope_local_base_freq}  # 4.x Gemma 3
    else:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def rotary_dim(hf_config: Any, head_dim: int) -> int:
    """How many of each head's ``head_dim`` dims rotate: ``int(head_dim * partial_rotary_factor)``, as
    transformers computes it (the factor sits in ``rope_parameters`` in 5.x, at top level in 4.x configs)."""
    factor = rope_parameters(hf_config).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(hf_config, "partial_rotary_factor", None) or 1.0
    dim = int(head_dim * float(factor))
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(f"partial_rotary_factor {factor} gives {dim} rotary dims of a head of {head_dim}; need an even 2..{head_dim}")
    return dim


def inverse_frequencies(
    hf_config: Any, head_dim: int, layer_type: str | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2], attention scaling) exactly as transformers computes them, for the layers of
    ``layer_type`` where the config gives each type its own rope; ``seq_len`` as transformers passes it
    (longrope: above ``original_max_position_embeddings`` the long factors apply)."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = rotary_dim(hf_config, head_dim)
        base = float(params["rope_theta"])
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' changes with sequence length and is not supported")
    kwargs: dict[str, Any] = {"seq_len": seq_len} if seq_len is not None else {}
    if layer_type is not None:
        kwargs["layer_type"] = layer_type
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    if inv_freq.numel() * 2 != rotary_dim(hf_config, head_dim):
        raise ValueError(
            f"rope_type {rope_type!r} gives {inv_freq.numel()} frequencies for {rotary_dim(hf_config, head_dim)} rotary dims"
        )
    return inv_freq.float(), float(scaling)


def _rope_rows(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2], float32 like the reference
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


@dataclass(slots=True)
class RopeStep:
    """Rotary inputs of one step, computed once and shared by every layer."""

    positions: torch.Tensor  # [T] long
    cos_table: torch.Tensor  # [P, D]
    sin_table: torch.Tensor
    cos: torch.Tensor | None  # [T, 1, D]: the table rows of ``positions`` (None when not looked up)
    sin: torch.Tensor | None


class RotaryEmbedding(nn.Module):
    """Rotates the two halves of each head's first ``rotary_dim`` dims (the Hugging Face / GPT-NeoX layout;
    all of the head unless ``partial_rotary_factor`` < 1). One instance serves every layer (of its layer type,
    where the config gives each type its own rope): the table depends only on the config, and looking it up
    once per step saves a gather per layer.

    longrope (Phi-3): transformers picks the factor set per forward call from its largest position: the short
    factors while ``max(position) + 1 <= original_max_position_embeddings``, the long ones above. The table
    here is per position: rows below ``original_max_position_embeddings`` from the short factors, rows from it
    on from the long ones. For a prompt of at most that length this is exactly what transformers does, through
    any number of generated tokens (its decode steps at position p >= original use the long set, the cached
    prompt keys keep the short one). A longer prompt is another matter: transformers rotates all of it with the
    long factors in one prefill, while here its early positions keep the short ones (the same as transformers
    fed the first ``original`` tokens in one call and the rest one by one). Following transformers there would
    take a factor set per request, in every step's positions and in the prefix cache's block hashes (a short
    prompt's blocks are not a long prompt's); not done."""

    def __init__(
        self, head_dim: int, max_position: int, hf_config: Any, dtype: torch.dtype, layer_type: str | None = None
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim(hf_config, head_dim)
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim, layer_type)
        positions = torch.arange(max_position, dtype=torch.float32)
        cos, sin = _rope_rows(inv_freq, scaling, positions, dtype)  # [P, R]
        params = rope_parameters(hf_config)
        original = params.get("original_max_position_embeddings")
        if params["rope_type"] == "longrope" and original is not None and max_position > int(original):
            original = int(original)
            long_inv, long_scaling = inverse_frequencies(hf_config, head_dim, layer_type, seq_len=original + 1)
            cos[original:], sin[original:] = _rope_rows(long_inv, long_scaling, positions[original:], dtype)
            if not torch.equal(long_inv, inv_freq):
                logger.warning(
                    "longrope: positions from %d on use the long factors; a prompt longer than %d tokens is rotated "
                    "per position here, while transformers rotates all of it with the long factors",
                    original, original,
                )  # fmt: skip
        self.register_buffer("cos", cos, persistent=False)  # [P, R]
        self.register_buffer("sin", sin, persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of each position, shaped [T, 1, R] to broadcast over heads (R: the rotary dims)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def step(self, positions: torch.Tensor, lookup: bool = True) -> RopeStep:
        """What every layer needs for this step's positions; ``lookup=False`` skips the gathered cos/sin
        (the native kernel reads the tables directly)."""
        cos, sin = self.lookup(positions) if lookup else (None, None)
        return RopeStep(positions, self.cos, self.sin, cos, sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, Hq, D], k: [T, Hkv, D], positions: [T]
        cos, sin = self.lookup(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in transformers' order of operations (so rounding matches); with
    tables narrower than the head (partial rotary) only the first ``cos.shape[-1]`` dims rotate, the rest pass
    through."""
    rot = cos.shape[-1]
    if rot != x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
