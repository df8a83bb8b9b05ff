"""The pre-norm decoder shared by the Llama, Qwen2, Qwen3 and Gemma 2/3 families; each family differs only in
flags (qkv bias, per-head q/k norm, Gemma's norms, scaled embedding and soft-capping), so their model files
stay a few lines each."""

from __future__ import annotations

import operator
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
from nanoserve.layers.norm import GemmaRMSNorm, RMSNorm
from nanoserve.layers.rotary import RopeStep, RotaryEmbedding, apply_rotary, rope_layer_types, rotary_dim
from nanoserve.models import native_decode
from nanoserve.models.native_decode import GreedyHead, NativeDecode


@dataclass(frozen=True)
class DecoderFlags:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before rotary
    # Gemma 2/3: every RMSNorm scales by (1 + w) (GemmaRMSNorm), and a layer has four of them: after attention
    # (before the residual add), before and after the MLP ("sandwich" norms)
    gemma_norms: bool = False
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size) (rounded to the model's dtype)
    attn_softcap: float = 0.0  # Gemma 2: scores = c * tanh(scores / c) before the softmax; 0: none
    final_softcap: float = 0.0  # Gemma 2/3: the same on the logits


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


def norm_class(flags: DecoderFlags) -> type[RMSNorm]:
    return GemmaRMSNorm if flags.gemma_norms else RMSNorm


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
            self.q_norm = norm_class(flags)(head_dim, hf_config.rms_norm_eps, ctx.dtype)
            self.k_norm = norm_class(flags)(head_dim, hf_config.rms_norm_eps, ctx.dtype)
        else:
            self.q_norm = self.k_norm = None
        # Gemma scales the scores by query_pre_attn_scalar ** -0.5, which need not be head_dim ** -0.5
        scale = (getattr(hf_config, "query_pre_attn_scalar", None) or head_dim) ** -0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, scale, ctx.attention_backend,
                              sliding_window_of(hf_config, layer_index), flags.attn_softcap)  # fmt: skip
        # Partial rotary (Phi-4-mini) rotates the first rotary_dim dims of each head, in the kernel as in torch.
        self.kernels = ctx.kernels if native.rope_supported(head_dim, rotary_dim(hf_config, head_dim)) else None

    def forward(self, rope: RopeStep, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        kernels = self.kernels if native.kv_cache_supported(self.kernels, self.attn.kv_cache) else None
        if kernels is not None:
            # One call: q/k norms, rotary (in place in qkv), and k, v into the cache.
            qk = self.q_norm is not None
            native.qk_norm_rope_store(
                kernels, qkv, self.num_heads, self.num_kv_heads, self.head_dim, rope.cos_table,
                rope.sin_table, rope.positions, self.q_norm.weight if qk else None,
                self.k_norm.weight if qk else None, self.q_norm.eps if qk else 0.0, meta.slot_mapping,
                self.attn.kv_cache,
            )  # fmt: skip
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        if kernels is not None:
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
        # Gemma names it hidden_activation (gelu_pytorch_tanh: GeGLU); Llama and Qwen hidden_act (silu: SwiGLU)
        act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden activation {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[act]
        self.gate_up_proj = MergedColumnParallelLinear(
            hf_config.hidden_size, [inter, inter], flags.mlp_bias, ctx.dtype, ctx.tp
        )
        self.down_proj = RowParallelLinear(inter, hf_config.hidden_size, flags.mlp_bias, ctx.dtype, ctx.tp)
        # The C kernel is SiLU's only; GeGLU runs in torch.
        silu = act == "silu" and native.norm_supported(self.gate_up_proj.out_sizes[0])
        self.kernels = ctx.kernels if silu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.down_proj(native.silu_mul(self.kernels, self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": _gelu_tanh,  # transformers' PytorchGELUTanh is exactly this
}


class DecoderLayer(nn.Module):
    def __init__(
        self, hf_config: Any, flags: DecoderFlags, ctx: BuildContext, layer_index: int, mlp: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(hf_config, flags, ctx, layer_index)
        # ``mlp``: another feed-forward for this layer (a mixture of experts); the dense SwiGLU MLP by default.
        self.mlp = mlp if mlp is not None else DecoderMLP(hf_config, flags, ctx)

        def norm() -> RMSNorm:
            return norm_class(flags)(hf_config.hidden_size, hf_config.rms_norm_eps, ctx.dtype, ctx.kernels)

        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich_norms = flags.gemma_norms
        if self.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(
        self, rope: RopeStep, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it): the next layer (or the final norm) adds them."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        if not self.sandwich_norms:
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        # Gemma: residual + norm(attn), then residual + norm(mlp(norm(...)))
        x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


MlpBuilder = Callable[[Any, DecoderFlags, BuildContext, int], "nn.Module | None"]


class DecoderModel(nn.Module):
    def __init__(
        self, hf_config: Any, flags: DecoderFlags, ctx: BuildContext, build_mlp: MlpBuilder | None = None
    ) -> None:
        """``build_mlp(hf_config, flags, ctx, layer_index)``: layer ``layer_index``'s feed-forward, or None for
        the dense MLP (mixture-of-experts models give some layers experts)."""
        super().__init__()
        self.flags = flags
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size, ctx.dtype, ctx.tp)
        # transformers makes the normalizer a tensor in the embedding's dtype (sqrt(3072) becomes 55.5 in bf16)
        self.embed_scale = torch.tensor(hf_config.hidden_size**0.5).to(ctx.dtype) if flags.embed_scale else None
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, flags, ctx, i, build_mlp(hf_config, flags, ctx, i) if build_mlp else None)
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = norm_class(flags)(hf_config.hidden_size, hf_config.rms_norm_eps, ctx.dtype, ctx.kernels)
        # The native attention path reads the rotary tables itself; torch ops need this step's rows gathered.
        self.rope_lookup = any(layer.self_attn.kernels is None for layer in self.layers)
        # One rotary table for all layers (a table per layer costs layers x 2 x max_position x head_dim), or one
        # per layer type where the config gives each its own rope (Gemma 3: local and global layers).
        types = rope_layer_types(hf_config)
        tables = {t: RotaryEmbedding(head_dim_of(hf_config), ctx.max_position, hf_config, ctx.dtype, t)
                  for t in dict.fromkeys(types)}  # fmt: skip
        self.rotaries = nn.ModuleList(tables.values())
        self.rope_index = [list(tables).index(t) for t in types]  # layer -> its table in self.rotaries
        # Decode steps through every layer in one C call where the model allows it (see native_decode); built
        # on first use, and again whenever a KV cache is rebound. The plan holds the caches' addresses, so it is
        # kept only while every layer still holds the very tensors it was built for: an identity check per layer
        # (the data_ptr and numel of 28 caches through the module tree cost ~0.3 ms a step on a 2-core host).
        self.native_decode: NativeDecode | None = None
        self._attentions = [layer.self_attn.attn for layer in self.layers]
        self._planned_caches: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        fast = self._native_decode_plan() if x.is_cpu else None
        if fast is not None and fast.applies(x.shape[0], meta):
            x, residual = fast.run(x, positions, meta)
        else:
            # once per step for every layer (per table)
            ropes = [rotary.step(positions, lookup=self.rope_lookup) for rotary in self.rotaries]
            residual = None
            for layer, index in zip(self.layers, self.rope_index):
                x, residual = layer(ropes[index], x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def greedy_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, head: GreedyHead) -> torch.Tensor | None:
        """Each row's greedy next token (``input_ids`` on CPU), the step and ``head`` in one C call; None where that
        call does not apply (the caller then runs forward and the LM head)."""
        if self.embed_scale is not None or input_ids.shape[0] > head.max_rows:
            return None
        fast = self._native_decode_plan()
        if fast is None or not fast.applies(input_ids.shape[0], meta):
            return None
        return fast.run_greedy(self.embed_tokens(input_ids), positions, meta, head)

    @property
    def rotary(self) -> RotaryEmbedding:
        """The rotary table of the first layer (the only one, unless layer types have their own rope)."""
        return self.rotaries[self.rope_index[0]]

    def _native_decode_plan(self) -> NativeDecode | None:
        caches = [attn.kv_cache for attn in self._attentions]
        if len(caches) != len(self._planned_caches) or not all(map(operator.is_, caches, self._planned_caches)):
            self.native_decode = native_decode.plan_native_decode(self)
            self._planned_caches = caches  # referenced, so no later tensor can take their identity
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
        # The C step's description of the final norm and LM head, made on first use (after the weights are packed).
        self._greedy_head: GreedyHead | None = None
        self._greedy_head_planned = False
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

    def greedy_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Every row's greedy next token [T], with the final norm, the LM head and the argmax inside the C decode
        step (what forward, compute_logits and a plain greedy sampler give, bit for bit, without the logits
        crossing back to Python: ~0.2 ms a step on a 2-core host); None where that step does not apply."""
        if not input_ids.is_cpu:
            return None
        if not self._greedy_head_planned:
            self._greedy_head_planned = True
            if not self.model.flags.final_softcap:
                self._greedy_head = native_decode.plan_greedy_head(self.lm_head, self.model.norm)
        if self._greedy_head is None:
            return None
        return self.model.greedy_tokens(input_ids, positions, meta, self._greedy_head)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.model.flags.final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap  # transformers' order: divide, tanh, multiply
        return logits

    def pack_for_cpu(self) -> int:
        """Switch every projection and the LM head to packed weights (see ``linear.pack_weight``); returns how
        many were packed. Call once, after the weights are loaded."""
        linears = [m for m in self.modules() if isinstance(m, LinearBase)]
        packed = sum(m.pack_for_cpu() for m in linears)
        packed += self.lm_head.pack_for_cpu(release_dense=not self.tie_word_embeddings)
        return packed

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
