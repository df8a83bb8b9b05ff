"""The pre-norm decoder shared by the Llama, Qwen2 and Qwen3 families; each family differs only in flags
(qkv bias, per-head q/k norm), so their model files stay a few lines each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.config import sliding_window_layers
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers import native
from nanoserve.layers.attention import Attention, AttentionMetadata
from nanoserve.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanoserve.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanoserve.layers.norm import RMSNorm
from nanoserve.layers.rotary import RopeStep, RotaryEmbedding, apply_rotary, rotary_dim
from nanoserve.models import native_decode
from nanoserve.models.native_decode import NativeDecode


@dataclass(frozen=True)
class DecoderFlags:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rotary


@dataclass(frozen=True)
class BuildContext:
    """Everything a model needs to build its layers besides the Hugging Face config."""

    dtype: torch.dtype
    tp: TPGroup
    attention_backend: str
    max_position: int
    # The C kernels of nanoserve.layers.native (CPU, float32), or None: every layer uses torch ops only.
    kernels: Any = None
    # A quantization.config.QuantizationConfig: which layers hold low-bit weights (None: all float).
    quantization: Any = None


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def sliding_window_of(hf_config: Any, layer_index: int) -> int | None:
    """Layer ``layer_index``'s sliding window, or None (full attention): see ``config.sliding_window_layers``."""
    return sliding_window_layers(hf_config).get(layer_index)


class DecoderAttention(nn.Module):
    def __init__(self, hf_config: Any, flags: DecoderFlags, ctx: BuildContext, layer_index: int) -> None:
        super().__init__()
        head_dim = head_dim_of(hf_config)
        self.qkv_proj = QKVParallelLinear(
            hf_config.hidden_size, head_dim, hf_config.num_attention_heads,
            hf_config.num_key_value_heads, flags.qkv_bias, ctx.dtype, ctx.tp,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            hf_config.num_attention_heads * head_dim, hf_config.hidden_size, flags.o_bias, ctx.dtype, ctx.tp
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        if flags.qk_norm:
            self.q_norm = RMSNorm(head_dim, hf_config.rms_norm_eps, ctx.dtype)
            self.k_norm = RMSNorm(head_dim, hf_config.rms_norm_eps, ctx.dtype)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, ctx.attention_backend,
                              sliding_window_of(hf_config, layer_index))  # fmt: skip
        # Partial rotary (Phi-4-mini) rotates the first rotary_dim dims of each head, in the kernel as in torch.
        self.kernels = ctx.kernels if native.rope_supported(head_dim, rotary_dim(hf_config, head_dim)) else None

    def forward(self, rope: RopeStep, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        if self.kernels is not None:
            # One call: q/k norms, rotary (in place in qkv), and k, v into the cache.
            qk = self.q_norm is not None
            native.qk_norm_rope_store(
                self.kernels, qkv, self.num_heads, self.num_kv_heads, self.head_dim, rope.cos_table,
                rope.sin_table, rope.positions, self.q_norm.weight if qk else None,
                self.k_norm.weight if qk else None, self.q_norm.eps if qk else 0.0, meta.slot_mapping,
                self.attn.kv_cache,
            )  # fmt: skip
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        if self.kernels is not None:
            o = self.attn(q, k, v, meta, kv_written=True)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)
            o = self.attn(q, k, v.contiguous(), meta)  # [T, Hq, D]
        return self.o_proj(o.flatten(1))


class DecoderMLP(nn.Module):
    def __init__(self, hf_config: Any, flags: DecoderFlags, ctx: BuildContext) -> None:
        super().__init__()
        inter = hf_config.intermediate_size
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        self.gate_up_proj = MergedColumnParallelLinear(
            hf_config.hidden_size, [inter, inter], flags.mlp_bias, ctx.dtype, ctx.tp
        )
        self.down_proj = RowParallelLinear(inter, hf_config.hidden_size, flags.mlp_bias, ctx.dtype, ctx.tp)
        self.kernels = ctx.kernels if native.norm_supported(self.gate_up_proj.out_sizes[0]) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.down_proj(native.silu_mul(self.kernels, self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self, hf_config: Any, flags: DecoderFlags, ctx: BuildContext, layer_index: int, mlp: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(hf_config, flags, ctx, layer_index)
        # ``mlp``: another feed-forward for this layer (a mixture of experts); the dense SwiGLU MLP by default.
        self.mlp = mlp if mlp is not None else DecoderMLP(hf_config, flags, ctx)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, ctx.dtype, ctx.kernels)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, ctx.dtype, ctx.kernels)

    def forward(
        self, rope: RopeStep, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


MlpBuilder = Callable[[Any, DecoderFlags, BuildContext, int], "nn.Module | None"]


class DecoderModel(nn.Module):
    def __init__(
        self, hf_config: Any, flags: DecoderFlags, ctx: BuildContext, build_mlp: MlpBuilder | None = None
    ) -> None:
        """``build_mlp(hf_config, flags, ctx, layer_index)``: layer ``layer_index``'s feed-forward, or None for
        the dense MLP (mixture-of-experts models give some layers experts)."""
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size, ctx.dtype, ctx.tp)
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, flags, ctx, i, build_mlp(hf_config, flags, ctx, i) if build_mlp else None)
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, ctx.dtype, ctx.kernels)
        # The native attention path reads the rotary tables itself; torch ops need this step's rows gathered.
        self.rope_lookup = any(layer.self_attn.kernels is None for layer in self.layers)
        # One rotary table for all layers (a table per layer costs layers x 2 x max_position x head_dim).
        self.rotary = RotaryEmbedding(head_dim_of(hf_config), ctx.max_position, hf_config, ctx.dtype)
        # Decode steps through every layer in one C call where the model allows it (see native_decode); built
        # on first use, and again whenever the KV caches move.
        self.native_decode: NativeDecode | None = None
        self._native_decode_key: tuple | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        fast = self._native_decode_plan() if x.is_cpu else None
        if fast is not None and fast.applies(x.shape[0], meta):
            x, residual = fast.run(x, positions, meta)
        else:
            rope = self.rotary.step(positions, lookup=self.rope_lookup)  # once per step, for every layer
            residual = None
            for layer in self.layers:
                x, residual = layer(rope, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def _native_decode_plan(self) -> NativeDecode | None:
        key = native_decode.cache_key(self)
        if key != self._native_decode_key:
            self.native_decode = native_decode.plan_native_decode(self)
            self._native_decode_key = key
        return self.native_decode


class DecoderForCausalLM(nn.Module):
    """Checkpoint tensor names map onto this module's parameters; fused projections are listed in
    ``packed_modules_mapping`` (checkpoint name -> (our parameter, shard id))."""

    flags = DecoderFlags()
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config: Any, ctx: BuildContext) -> None:
        super().__init__()
        flags = self.flags_for(hf_config)
        self.model = DecoderModel(hf_config, flags, ctx, self.build_mlp)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, ctx.dtype, ctx.tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.lm_head.tied = True
        if ctx.quantization is not None:
            from nanoserve.quantization.linear import quantize_model

            quantize_model(self, ctx.quantization, ctx.kernels, hf_config)

    @classmethod
    def flags_for(cls, hf_config: Any) -> DecoderFlags:
        return cls.flags

    @classmethod
    def check_quantization(cls, quantization: Any) -> None:
        """Raise ValueError if this model cannot hold the low-bit weights ``quantization`` asks for (a
        ``QuantizationConfig``, or None). Called while the engine options are checked, before any rank starts."""

    @classmethod
    def build_mlp(cls, hf_config: Any, flags: DecoderFlags, ctx: BuildContext, layer_index: int) -> nn.Module | None:
        """Layer ``layer_index``'s feed-forward; None: the dense MLP (every layer of a dense model)."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def pack_for_cpu(self) -> int:
        """Switch every projection and the LM head to packed weights (see ``linear.pack_weight``); returns how
        many were packed. Call once, after the weights are loaded."""
        linears = [m for m in self.modules() if isinstance(m, LinearBase)]
        packed = sum(m.pack_for_cpu() for m in linears)
        packed += self.lm_head.pack_for_cpu(release_dense=not self.tie_word_embeddings)
        return packed

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
