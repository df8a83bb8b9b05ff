"""Rotary position embeddings with a precomputed cos/sin table, including scaled variants (llama3, linear,
yarn, ...) whose inverse frequencies come from transformers' own implementations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


def inverse_frequencies(hf_config: Any, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention scaling) exactly as transformers computes them (for the layers of
    ``layer_type`` where the config gives each type its own rope)."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = float(params["rope_theta"])
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' changes with sequence length and is not supported")
    by_type = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **by_type)
    return inv_freq.float(), float(scaling)


@dataclass(slots=True)
class RopeStep:
    """Rotary inputs of one step, computed once and shared by every layer."""

    positions: torch.Tensor  # [T] long
    cos_table: torch.Tensor  # [P, D]
    sin_table: torch.Tensor
    cos: torch.Tensor | None  # [T, 1, D]: the table rows of ``positions`` (None when not looked up)
    sin: torch.Tensor | None


class RotaryEmbedding(nn.Module):
    """Rotates the two halves of each head (the Hugging Face / GPT-NeoX layout). One instance serves every
    layer (of its layer type, where the config gives each type its own rope): the table depends only on the
    config, and looking it up once per step saves a gather per layer."""

    def __init__(
        self, head_dim: int, max_position: int, hf_config: Any, dtype: torch.dtype, layer_type: str | None = None
    ) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim, layer_type)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2], float32 like the reference
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(dtype), persistent=False)  # [P, D]
        self.register_buffer("sin", (emb.sin() * scaling).to(dtype), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of each position, shaped [T, 1, D] to broadcast over heads."""
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
    """x * cos + rotate_half(x) * sin, in transformers' order of operations (so rounding matches)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
