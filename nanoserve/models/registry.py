"""Architecture name (config.json ``architectures``) -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from nanoserve.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from nanoserve.models.llama import LlamaForCausalLM
from nanoserve.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from nanoserve.models.phi3 import Phi3ForCausalLM
from nanoserve.models.qwen2 import Qwen2ForCausalLM
from nanoserve.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    # the text model only (config.text_part_config): vision tower and projector ignored
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
}


def resolve_architecture(hf_config: Any) -> type[nn.Module]:
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported architecture {names or '(none in config.json)'}; "
        f"nanoserve supports: {', '.join(MODEL_REGISTRY)}"
    )

