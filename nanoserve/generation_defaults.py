"""Which default sampling settings are in force, and where they come from (vLLM's ``--generation-config``).

Checkpoints ship their creator's recommended sampling settings in ``generation_config.json`` (Qwen3:
``temperature`` 0.6, ``top_p`` 0.95, ``top_k`` 20). As in vLLM, six of its keys become defaults: ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens`` (as ``max_tokens``). Each applies
only where a request leaves that setting unset; nanoserve's built-in defaults (``SamplingParams``'s, the same
as vLLM's) fill the rest. Every other key is ignored here, ``do_sample`` included: vLLM also ignores it, so
``do_sample: false`` next to ``temperature: 0.6`` still samples at 0.6. ``eos_token_id`` is read by the engine
for its stop tokens. A key set to ``null`` counts as unset.

On the server, a request that leaves its length unset gets what is left of the context, capped at a default
``max_tokens`` (vLLM's rule); on ``/v1/completions`` that replaces OpenAI's default of 16 only when there is
such a default.

``EngineConfig.generation_config`` says where to look:

- ``"auto"``: ``<model>/generation_config.json``. If the checkpoint has none, the same six keys in its
  ``config.json`` (older checkpoints kept them there; vLLM reads them through
  ``GenerationConfig.from_model_config`` in that case too).
- ``"vllm"``: nowhere. Only the built-in defaults apply.
- a folder: that folder's ``generation_config.json``.

Values are checked once, when they are resolved, so a bad file stops start-up with an error that names it
instead of failing every request that relies on the default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoserve.config import EngineConfig
from nanoserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field (Hugging Face's max_new_tokens is vLLM's max_tokens).
GENERATION_CONFIG_KEYS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class GenerationDefaults:
    """The default sampling settings in force. ``params`` maps ``SamplingParams`` fields to the values the
    generation config sets: only the ones it sets, already validated. Treat it as read-only. ``source`` says
    in a few words where they come from."""

    params: dict[str, Any] = field(default_factory=dict)
    source: str = "no generation config given"

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """``SamplingParams`` with these defaults, then ``overrides`` on top (a new object on every call)."""
        return SamplingParams(**{**self.params, **overrides})

    def summary(self) -> str:
        """One line for logs and start-up output, e.g. ``default sampling params: temperature=0.6, top_p=0.95
        from /ckpt/generation_config.json (--generation-config vllm ignores it)``."""
        if not self.params:
            return f"default sampling params: nanoserve's built-in ones ({self.source})"
        settings = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"default sampling params: {settings} {self.source}"


def resolve_generation_defaults(config: EngineConfig) -> GenerationDefaults:
    """The defaults ``config.generation_config`` selects (see the module docstring), logged at INFO. Raises
    ValueError, naming the file, if that file is not a JSON object or sets a value ``SamplingParams`` refuses."""
    defaults = _resolve(config.model, config.generation_config)
    logger.info("%s", defaults.summary())
    return defaults


def _resolve(model: str, choice: str) -> GenerationDefaults:
    if choice == "vllm":
        return GenerationDefaults(source="--generation-config vllm")
    folder = Path(model) if choice == "auto" else Path(choice)
    path = folder / "generation_config.json"
    hint = "(--generation-config vllm ignores it)"
    if path.is_file():
        params = _sampling_keys(path)
        return GenerationDefaults(params, f"from {path} {hint}" if params else f"{path} sets none")
    # Only reachable with "auto": EngineConfig refuses a folder without the file.
    path = folder / "config.json"
    params = _sampling_keys(path)
    if params:
        return GenerationDefaults(params, f"from {path}, as the checkpoint has no generation_config.json {hint}")
    return GenerationDefaults(source=f"no generation_config.json in {folder}")


def _sampling_keys(path: Path) -> dict[str, Any]:
    """The six sampling keys ``path`` sets (not null), renamed to ``SamplingParams`` fields and validated."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"generation_config: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"generation_config: {path} must hold a JSON object, got {type(data).__name__}")
    params = {name: data[key] for key, name in GENERATION_CONFIG_KEYS.items() if data.get(key) is not None}
    try:
        SamplingParams(**params)
    except ValueError as exc:
        raise ValueError(f"generation_config: {path} sets an invalid default: {exc}") from None
    return params
