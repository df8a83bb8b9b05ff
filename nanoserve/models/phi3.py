"""Phi-3 and Phi-4-mini (``Phi3ForCausalLM``): the plain decoder, with its checkpoints' fused ``qkv_proj``
(q, k, v along the output dim) and ``gate_up_proj`` (gate, then up) split by the layers' weight loaders, so
under tensor parallelism each rank takes its own q, k, v and gate, up rows. longrope, partial rotary and a
sliding window on every layer come from the config through the shared rotary and attention layers."""

from __future__ import annotations

from nanoserve.layers.linear import FUSED_SHARD
from nanoserve.models.decoder import DecoderFlags, DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    flags = DecoderFlags()  # no biases anywhere
    packed_modules_mapping = {
        "qkv_proj": ("qkv_proj", FUSED_SHARD),
        "gate_up_proj": ("gate_up_proj", FUSED_SHARD),
    }
