"""Qwen2 / Qwen2.5: the plain decoder with a bias on the q/k/v projections (not on o_proj)."""

from __future__ import annotations

from nanoserve.models.decoder import DecoderFlags, DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    flags = DecoderFlags(qkv_bias=True)
