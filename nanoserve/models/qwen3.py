"""Qwen3: the plain decoder with RMSNorm over each head of q and k, and an optional attention bias."""

from __future__ import annotations

from typing import Any

from nanoserve.models.decoder import DecoderFlags, DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def flags_for(cls, hf_config: Any) -> DecoderFlags:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderFlags(qkv_bias=bias, o_bias=bias, qk_norm=True)
