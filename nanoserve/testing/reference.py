"""transformers as the oracle: exact greedy continuations that nanoserve's output is checked against.

Choices made for exactness, not speed:
  * one prompt at a time, so there is no padding and no attention mask to get subtly wrong;
  * an explicit decode loop instead of ``model.generate``, so no stopping criterion, logits processor
    or generation_config (whose ``eos_token_id`` is a list here) can end a sequence early or bend a
    score: exactly ``max_new_tokens`` tokens always come back, EOS included if it is the argmax;
  * ``attn_implementation="eager"``: plain ``softmax(q k^T) v`` in PyTorch, deterministic on CPU and
    GPU and the same math a pure-torch reference backend does (sdpa may pick fused kernels whose
    reduction order varies by device and shape); ``experts_implementation="eager"`` likewise for
    mixture-of-experts layers.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ReferenceOutput:
    """The greedy continuation of one prompt.

    ``logprobs[i]`` is the log-prob of ``token_ids[i]`` under ``log_softmax`` of the fp32 logits;
    ``top2_gaps[i]`` is top-1 minus top-2 log-prob at that step. A small gap marks a step where a
    correct engine with different rounding may legitimately choose differently.
    """

    token_ids: list[int]
    logprobs: list[float]
    top2_gaps: list[float]


def load_hf_model(model_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, **extra: Any) -> Any:
    """Load ``model_path`` with transformers in eval mode on CPU, eager attention, weights in ``dtype``
    (``extra``: more ``from_pretrained`` arguments, e.g. a ``quantization_config``).

    Raises ``ValueError`` naming the architecture when transformers cannot load the checkpoint.
    """
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(model_path)
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a Hugging Face checkpoint (no readable config.json): {e}") from e
    # Mixture-of-experts layers the same way: transformers' plain loop over the chosen experts, not a grouped
    # matmul kernel (dense models accept and ignore the setting).
    extra.setdefault("experts_implementation", "eager")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **extra)
    except (ValueError, KeyError, OSError, ImportError, AttributeError, TypeError) as e:
        import transformers

        raise ValueError(
            f"transformers {transformers.__version__} cannot load architecture {archs} from {path}: {e}"
        ) from e
    return model.eval()


def _cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes the KV cache.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated); accept both.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def _greedy_one(model: Any, prompt: list[int], max_new_tokens: int) -> ReferenceOutput:
    from transformers import DynamicCache

    if not prompt:
        raise ValueError("empty prompt: greedy decoding needs at least one prompt token")
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    device = next(model.parameters()).device

    # Prefill the whole prompt, then feed one token per step; positions are passed explicitly so
    # nothing depends on how a given transformers version infers them from the cache.
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    positions = torch.arange(len(prompt), device=device)[None, :]
    out = model(input_ids=input_ids, position_ids=positions, use_cache=True, **{cache_kw: cache})
    token_ids: list[int] = []
    logprobs: list[float] = []
    gaps: list[float] = []
    for step in range(max_new_tokens):
        logits = out.logits[0, -1].float()  # [V]
        logp = torch.log_softmax(logits, dim=-1)
        # argmax of the fp32 logits (first index on ties), as a greedy sampler does
        token = int(torch.argmax(logits))
        top2 = torch.topk(logp, 2).values
        token_ids.append(token)
        logprobs.append(float(logp[token]))
        gaps.append(float(top2[0] - top2[1]))
        if step + 1 == max_new_tokens:
            break
        pos = len(prompt) + step
        out = model(
            input_ids=torch.tensor([[token]], dtype=torch.long, device=device),
            position_ids=torch.tensor([[pos]], device=device),
            use_cache=True,
            **{cache_kw: cache},
        )
    return ReferenceOutput(token_ids=token_ids, logprobs=logprobs, top2_gaps=gaps)


def hf_greedy(
    model_path: str | os.PathLike[str] | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    dtype: torch.dtype = torch.float32,
    model: Any | None = None,
) -> list[ReferenceOutput]:
    """Greedy continuations of ``prompts`` (token ids) by transformers: the reference output.

    Each result has exactly ``max_new_tokens`` tokens: EOS never stops decoding. Prompts run one
    at a time without padding. Pass ``model`` (from ``load_hf_model``) to reuse a loaded model;
    then ``model_path`` is ignored.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if model is None:
        if model_path is None:
            raise ValueError("pass model_path or model")
        model = load_hf_model(model_path, dtype)
    return [_greedy_one(model, list(p), max_new_tokens) for p in prompts]
