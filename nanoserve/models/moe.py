"""Mixture-of-experts decoders: Qwen3-MoE and Mixtral. Attention, norms and rotary are the shared decoder's;
only the feed-forward of a sparse layer changes, to a router and experts (``layers/moe.py``).

Checkpoint names of the experts map onto the stacked parameters ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj`` (see :meth:`MoeForCausalLM.expert_checkpoint_target`)::

    Qwen3-MoE  mlp.experts.{e}.gate_proj|up_proj|down_proj.weight           (per expert)
    Mixtral    block_sparse_moe.experts.{e}.w1|w3|w2.weight, block_sparse_moe.gate.weight
    both       mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]   (stacked)
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from nanoserve.layers.moe import DOWN, GATE, UP, ExpertPart, SparseMoeBlock
from nanoserve.models.decoder import BuildContext, DecoderFlags, DecoderForCausalLM

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_STACKED = re.compile(r"^(?P<prefix>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
_PROJ = {"gate_proj": GATE, "w1": GATE, "up_proj": UP, "w3": UP, "down_proj": DOWN, "w2": DOWN}


class MoeForCausalLM(DecoderForCausalLM):
    """A decoder whose sparse layers (:meth:`is_sparse`) hold experts; subclasses read their config's names."""

    def __init__(self, hf_config: Any, ctx: BuildContext) -> None:
        self.check_quantization(ctx.quantization)
        super().__init__(hf_config, ctx)

    @classmethod
    def check_quantization(cls, quantization: Any) -> None:
        if quantization is not None and not quantization.on_load:
            # A format's packed experts (per-expert qweight / scales, or fused expert tensors) need their own
            # unpacking into the stacked buffers; only float checkpoints quantized on load reach the experts.
            raise ValueError(
                f"{quantization.method} checkpoints are not supported for {cls.__name__}: pre-quantized "
                "mixture-of-experts weights cannot be loaded; use the float checkpoint with quantization='int8' "
                "or 'int4' (quantized on load)"
            )

    # The checkpoint's names of an expert's gate, up and down projections (quantization_skip matches them).
    expert_projection_names = ("gate_proj", "up_proj", "down_proj")

    # Mixtral scales expert outputs by float32 routing weights; Qwen3-MoE rounds the weights to the activations'
    # dtype first (see FusedMoE; the same in float32).
    float32_routing_weights = False

    @classmethod
    def moe_settings(cls, hf_config: Any) -> tuple[int, int, int, bool]:
        """(num_experts, top_k, expert intermediate size, renormalize the top-k weights)."""
        raise NotImplementedError

    @classmethod
    def is_sparse(cls, hf_config: Any, layer_index: int) -> bool:
        return True

    @classmethod
    def build_mlp(cls, hf_config: Any, flags: DecoderFlags, ctx: BuildContext, layer_index: int) -> nn.Module | None:
        if not cls.is_sparse(hf_config, layer_index):
            return None
        num_experts, top_k, inter, renormalize = cls.moe_settings(hf_config)
        return SparseMoeBlock(
            hf_config.hidden_size, num_experts, top_k, inter, renormalize, ctx.dtype, ctx.tp,
            getattr(hf_config, "hidden_act", "silu"), cls.float32_routing_weights,
        )  # fmt: skip

    def expert_checkpoint_target(self, name: str) -> tuple[str, Any] | None:
        """(our parameter, shard id) of an expert or router tensor ``name``; None for every other tensor."""
        if m := _PER_EXPERT.match(name):
            param = "down_proj" if _PROJ[m["proj"]] == DOWN else "gate_up_proj"
            return f"{m['prefix']}.mlp.experts.{param}", ExpertPart(int(m["expert"]), _PROJ[m["proj"]])
        if m := _STACKED.match(name):
            return f"{m['prefix']}.mlp.experts.{m['proj']}", "gate_up" if m["proj"] == "gate_up_proj" else "down"
        if ".block_sparse_moe.gate." in name:  # Mixtral's router, named as transformers 5 renames it
            return name.replace(".block_sparse_moe.", ".mlp."), None
        return None


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE: the Qwen3 decoder (q/k norms); a layer is sparse unless listed in ``mlp_only_layers``, and then
    every ``decoder_sparse_step``-th (as transformers' ``Qwen3MoeDecoderLayer`` decides)."""

    @classmethod
    def flags_for(cls, hf_config: Any) -> DecoderFlags:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderFlags(qkv_bias=bias, o_bias=bias, qk_norm=True)

    @classmethod
    def moe_settings(cls, hf_config: Any) -> tuple[int, int, int, bool]:
        return (
            hf_config.num_experts, hf_config.num_experts_per_tok, hf_config.moe_intermediate_size,
            bool(getattr(hf_config, "norm_topk_prob", False)),
        )  # fmt: skip

    @classmethod
    def is_sparse(cls, hf_config: Any, layer_index: int) -> bool:
        mlp_only = getattr(hf_config, "mlp_only_layers", None) or []
        step = getattr(hf_config, "decoder_sparse_step", 1)
        return layer_index not in mlp_only and hf_config.num_experts > 0 and (layer_index + 1) % step == 0


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: the Llama/Mistral decoder with every layer sparse; top-k weights always renormalised, experts
    ``intermediate_size`` wide."""

    float32_routing_weights = True
    expert_projection_names = ("w1", "w3", "w2")

    @classmethod
    def moe_settings(cls, hf_config: Any) -> tuple[int, int, int, bool]:
        return hf_config.num_local_experts, hf_config.num_experts_per_tok, hf_config.intermediate_size, True
