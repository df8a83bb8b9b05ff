"""Gemma 2 and Gemma 3 (text): the shared decoder with Gemma's flags (see ``DecoderFlags``).

What sets them apart from Llama, each read from the config as transformers reads it::

    norms        (1 + w) RMSNorm in float32; four per layer:
                 h = x + post_attention_norm(attn(input_norm(x)))
                 out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))
    embedding    times sqrt(hidden_size), tied to the LM head
    MLP          GeGLU: gelu_pytorch_tanh(gate) * up (``hidden_activation``)
    attention    scale query_pre_attn_scalar ** -0.5; local (``sliding_attention``) and global layers
    Gemma 2      attn_logit_softcapping on the scores, final_logit_softcapping on the logits
    Gemma 3      q/k norms (Gemma's RMSNorm); a rope per layer type (``rope_parameters`` keyed by layer type,
                 ``rope_local_base_freq`` in 4.x configs); transformers applies no attention soft-capping
                 whatever the config says, and the final one only where set

``Gemma3ForConditionalGeneration`` checkpoints (4B and larger) hold the same text model under a prefix, beside
a vision tower and a projector this engine does not run: their text tensors are renamed and the rest ignored.
"""

from __future__ import annotations

from typing import Any

from nanoserve.models.decoder import DecoderFlags, DecoderForCausalLM


def _cap(value: float | None) -> float:
    return float(value) if value else 0.0


def _check_causal(hf_config: Any) -> None:
    # EmbeddingGemma-style configs attend both ways; every attention path here is causal.
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True is not supported: nanoserve's attention is causal")


class Gemma2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def flags_for(cls, hf_config: Any) -> DecoderFlags:
        _check_causal(hf_config)
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderFlags(
            qkv_bias=bias, o_bias=bias, gemma_norms=True, embed_scale=True,
            attn_softcap=_cap(getattr(hf_config, "attn_logit_softcapping", None)),
            final_softcap=_cap(getattr(hf_config, "final_logit_softcapping", None)),
        )  # fmt: skip


class Gemma3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def flags_for(cls, hf_config: Any) -> DecoderFlags:
        _check_causal(hf_config)
        bias = bool(getattr(hf_config, "attention_bias", False))
        # Gemma3Attention never passes attn_logit_softcapping to its attention: no soft-capping of the scores.
        return DecoderFlags(
            qkv_bias=bias, o_bias=bias, qk_norm=True, gemma_norms=True, embed_scale=True,
            final_softcap=_cap(getattr(hf_config, "final_logit_softcapping", None)),
        )  # fmt: skip


# Text tensors of a Gemma3ForConditionalGeneration checkpoint, as the hub ships them (transformers 4.x names,
# which transformers 5 also writes by default) and as transformers 5 holds them (save_original_format=False).
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.")


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The text model of a Gemma 3 vision-language checkpoint (its config: the checkpoint's ``text_config``, see
    ``config.text_part_config``); the vision tower and the multimodal projector are not loaded."""

    def checkpoint_name(self, name: str) -> str | None:
        """Our name for checkpoint tensor ``name``; None: not part of the text model (ignored)."""
        for prefix, ours in _TEXT_PREFIXES:
            if name.startswith(prefix):
                return ours + name[len(prefix) :]
        if name.removeprefix("model.").startswith(_NOT_TEXT):
            return None
        return name  # anything else: the loader's own check (unexpected tensors are an error)
