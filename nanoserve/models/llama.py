"""Llama 2/3 (incl. llama3 rope scaling), Mistral-style configs, SmolLM: the plain decoder."""

from __future__ import annotations

from typing import Any

from nanoserve.models.decoder import DecoderFlags, DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def flags_for(cls, hf_config: Any) -> DecoderFlags:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderFlags(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))
