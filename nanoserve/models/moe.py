"""Mixture-of-experts decoders: Qwen3-MoE and Mixtral. Attention, norms and rotary are the shared decoder's;
only the feed-forward of a sparse layer changes, to a router and experts (``layers/moe.py``).

Checkpoint names of the experts map onto the stacked parameters ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj`` (see :meth:`MoeForCausalLM.expert_checkpoint_target`)::

    Qwen3-MoE  mlp.experts.{e}.gate_proj|up_proj|down_proj.weight           (per expert)
    Mixtral    block_sparse_moe.experts.{e}.w1|w3|w2.weight, block_sparse_moe.gate.weight
    both       mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]   (stacked)

A pre-quantized checkpoint (llmcompressor's compressed-tensors, GPTQ, AWQ) replaces each per-expert ``weight``
by its format's tensors (``mlp.experts.{e}.gate_proj.weight_packed``, ``.weight_scale``, ``.weight_shape``, ...);
the router stays float (llmcompressor ignores ``re:.*mlp.gate$``, and nanoserve keeps it float anyway).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from nanoserve.layers.moe import DOWN, GATE, UP, ExpertPart, ExpertTensor, SparseMoeBlock
from nanoserve.models.decoder import BuildContext, DecoderFlags, DecoderForCausalLM
from nanoserve.quantization.formats import SUFFIXES

# The tensors of one expert's projection: a float ``weight``, or any format's (int-quantized's codes are its
# ``weight``); which of them a checkpoint must have is its QuantizedWeight's to check.
_EXPERT_SUFFIXES = sorted({"weight", *(s for required, optional in SUFFIXES.values() for s in required + optional)})
_PER_EXPERT = re.compile(
    r"^(?P<module>(?P<prefix>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    rf"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2))\.(?P<suffix>{'|'.join(_EXPERT_SUFFIXES)})$"
)
_STACKED = re.compile(
    r"^(?P<prefix>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<proj>gate_up_proj|down_proj)"
    rf"(?:\.(?P<suffix>{'|'.join(s for s in _EXPERT_SUFFIXES if s != 'weight')}))?$"
)
_PROJ = {"gate_proj": GATE, "w1": GATE, "up_proj": UP, "w3": UP, "down_proj": DOWN, "w2": DOWN}


class MoeForCausalLM(DecoderForCausalLM):
    """A decoder whose sparse layers (:meth:`is_sparse`) hold experts; subclasses read their config's names."""

    def __init__(self, hf_config: Any, ctx: BuildContext) -> None:
        self.check_quantization(ctx.quantization)
        super().__init__(hf_config, ctx)

    @classmethod
    def check_quantization(cls, quantization: Any) -> None:
        if quantization is not None and quantization.desc_act:
            # Each expert has its own act-order column order, and all experts of a layer share one
            # QuantizedWeight (one permutation of the input).
            raise ValueError(
                f"act-order (desc_act) GPTQ checkpoints are not supported for {cls.__name__}: every expert permutes "
                "its input columns its own way; use a GPTQ checkpoint without desc_act, or another format"
            )

    # The checkpoint's names of an expert's gate, up and down projections (quantization_skip matches them), and of
    # the module holding the experts and router (``model.layers.{i}.<block>.experts.{e}.<projection>``).
    expert_projection_names = ("gate_proj", "up_proj", "down_proj")
    expert_block_name = "mlp"

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
            part = ExpertPart(int(m["expert"]), _PROJ[m["proj"]])
            return f"{m['prefix']}.mlp.experts.{param}", ExpertTensor(part, m["suffix"], m["module"])
        if m := _STACKED.match(name):
            if m["suffix"] is not None:
                raise ValueError(
                    f"{name}: stacked low-bit expert tensors are not a hub layout (llmcompressor, GPTQ and AWQ write "
                    "one set per expert and projection: experts.{e}.gate_proj.weight_packed, ...)"
                )
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
    expert_block_name = "block_sparse_moe"

    @classmethod
    def moe_settings(cls, hf_config: Any) -> tuple[int, int, int, bool]:
        return hf_config.num_local_experts, hf_config.num_experts_per_tok, hf_config.intermediate_size, True
