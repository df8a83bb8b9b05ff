"""Engine configuration: every user option validated once, then read-only.

What is only learned at run time (the KV block count all ranks agreed on, EOS ids, the attention backend)
lives in result objects elsewhere, never written back here.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_MEMORY_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip


def parse_memory(value: int | float | str, name: str = "kv_cache_memory") -> int:
    """Bytes from an int or a string like ``"2GiB"``, ``"512MB"``, ``"1.5G"``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected bytes or a size like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _MEMORY_UNITS:
            raise ValueError(f"{name}: cannot parse {value!r}; use bytes or a size like '2GiB', '512MB'")
        n = int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"{name}: expected bytes or a size like '2GiB', got {value!r}")
    if n <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return n


KV_CACHE_DTYPES = ("auto", "float16")


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype, dtype: torch.dtype, device: str) -> torch.dtype:
    """The KV cache's element type: "auto" is the model's ``dtype``; "float16" (also "fp16", "half", as
    llama.cpp's default cache) halves a float32 model's cache on CPU, where the attention kernels widen it to
    float32 as they read (the values are rounded once, when stored)."""
    name = str(kv_cache_dtype).removeprefix("torch.")
    name = {"fp16": "float16", "half": "float16"}.get(name, name)
    if name == "auto" or _DTYPES.get(name) == dtype:
        return dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: unsupported {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if device != "cpu" or dtype != torch.float32:
        raise ValueError(
            f"kv_cache_dtype float16 applies to float32 models on the CPU (its kernels are CPU kernels); got "
            f"device={device!r}, dtype={dtype}: use kv_cache_dtype='auto'"
        )
    return torch.float16


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: str) -> torch.dtype:
    """'auto' is float32 on CPU (fast GEMMs without native bf16, exact parity with the fp32 reference) and the
    checkpoint's half type on CUDA (bfloat16 when the checkpoint is fp32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype: unsupported {dtype}; choose one of auto, float32, bfloat16, float16")
        return dtype
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; choose one of auto, float32, bfloat16, float16")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class EngineConfig:
    """All options of one engine. Build with :meth:`create`, which validates and resolves defaults."""

    model: str
    tokenizer: str
    hf_config: Any = field(repr=False, compare=False)
    tensor_parallel_size: int = 1
    dtype: torch.dtype = torch.float32
    # What the KV cache stores: the model's dtype ("auto"), or float16 on CPU (half the bytes; see
    # resolve_kv_cache_dtype). Every rank, the plan and the block count use it.
    kv_cache_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    max_model_len: int = 2048  # the most the engine may serve; the KV cache may fit less (see KVCacheInfo)
    # True when the user gave max_model_len: then a KV cache too small for it refuses to start. False when it
    # is the model's default: then start-up lowers it to what the agreed KV cache holds (KVCacheInfo).
    max_model_len_explicit: bool = False
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes per rank; None: a share of the host's available memory
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    distributed_init: str = "spawn"  # "spawn": start local workers; "env": torchrun-style environment
    # Default sampling settings: "auto" reads the checkpoint's generation_config.json, "vllm" ignores it,
    # anything else is a folder holding a generation_config.json (vLLM's --generation-config).
    generation_config: str = "auto"
    # Low-bit weights (quantization.config.QuantizationConfig), from the options or the checkpoint; None: float.
    quantization: Any = None

    @classmethod
    def create(
        cls,
        model: str,
        *,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        kv_cache_dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool = True,
        block_size: int = 16,
        kv_cache_memory: int | str | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        distributed_init: str = "auto",
        generation_config: str = "auto",
        quantization: str | None = None,
        quantization_group_size: int | None = None,
        quantization_zero_point: bool = False,
        quantization_activations: str | None = None,  # None: the checkpoint's (int8 for W8A8), else fp32
        quantization_skip: str | list[str] | tuple[str, ...] | None = None,
    ) -> EngineConfig:
        from nanoserve.platform import resolve_device

        model_path = check_model_path(model)
        hf_config = load_hf_config(model_path)
        device = resolve_device(device)
        _positive_int(tensor_parallel_size, "tensor_parallel_size")
        check_tensor_parallel_split(hf_config, tensor_parallel_size)
        _positive_int(max_num_seqs, "max_num_seqs")
        _positive_int(block_size, "block_size")
        if block_size > 1024:
            raise ValueError(f"block_size: must be <= 1024, got {block_size}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed: must be an integer, got {seed!r}")
        if not (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization!r}")
        kv_bytes = None if kv_cache_memory is None else parse_memory(kv_cache_memory)
        checkpoint_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(checkpoint_dtype, str):
            checkpoint_dtype = _DTYPES.get(checkpoint_dtype)
        torch_dtype = resolve_dtype(dtype, checkpoint_dtype, device)
        cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, torch_dtype, device)
        from nanoserve.quantization.config import resolve as resolve_quantization

        quant = resolve_quantization(
            hf_config, quantization, quantization_group_size, quantization_zero_point, quantization_activations,
            quantization_skip,
        )  # fmt: skip
        if quant is not None:
            from nanoserve.models.registry import resolve_architecture
            from nanoserve.quantization.config import check_tensor_parallel

            resolve_architecture(hf_config).check_quantization(quant)  # e.g. pre-quantized experts: refused
            check_tensor_parallel(hf_config, tensor_parallel_size, quant, usable_tensor_parallel_sizes(hf_config))
        if quant is not None and (device != "cpu" or torch_dtype != torch.float32):
            raise ValueError(
                f"quantization ({quant.method}) runs on the CPU with dtype float32 (its kernels are CPU kernels); "
                f"got device={device!r}, dtype={torch_dtype}: use device='cpu' and dtype='float32' or 'auto'"
            )

        max_model_len_explicit = max_model_len is not None
        max_model_len = resolve_max_model_len(hf_config, max_model_len)
        if max_num_batched_tokens is None:
            # Chunked prefill keeps steps short; without it a whole prompt must fit in one step.
            max_num_batched_tokens = 2048 if enable_chunked_prefill else max(2048, max_model_len)
        _positive_int(max_num_batched_tokens, "max_num_batched_tokens")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) < max_model_len ({max_model_len}) needs "
                "chunked prefill; enable it or raise max_num_batched_tokens"
            )
        if distributed_init == "auto":
            distributed_init = "env" if _launched_by_torchrun() else "spawn"
        if distributed_init not in ("spawn", "env"):
            raise ValueError(f"distributed_init: choose 'auto', 'spawn' or 'env', got {distributed_init!r}")
        return cls(
            model=str(model_path),
            tokenizer=str(check_model_path(tokenizer)) if tokenizer else str(model_path),
            hf_config=hf_config,
            tensor_parallel_size=tensor_parallel_size,
            dtype=torch_dtype,
            kv_cache_dtype=cache_dtype,
            device=device,
            max_model_len=max_model_len,
            max_model_len_explicit=max_model_len_explicit,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=bool(enable_chunked_prefill),
            block_size=block_size,
            kv_cache_memory=kv_bytes,
            gpu_memory_utilization=float(gpu_memory_utilization),
            enable_prefix_caching=bool(enable_prefix_caching),
            seed=seed,
            distributed_init=distributed_init,
            generation_config=_check_generation_config(generation_config),
            quantization=quant,
        )


def check_model_path(model: str | os.PathLike) -> Path:
    """A local checkpoint directory; nanoserve never downloads."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model {str(model)!r} is not a local directory. nanoserve does not download checkpoints: "
            "download one first (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and pass DIR, "
            "or omit the model to use the built-in demo checkpoint."
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json; is it a Hugging Face checkpoint?")
    return path


def load_hf_config(path: Path) -> Any:
    """The checkpoint's config through transformers' AutoConfig, which reads both the 4.x shape
    (``rope_theta``/``rope_scaling``/``torch_dtype``) and the 5.x shape (``rope_parameters``/``dtype``)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises a zoo of types here; normalise to one clear error
        raise ValueError(f"cannot read config.json of {str(path)!r}: {exc}") from exc
    return text_part_config(config)


# Vision-language checkpoints whose text model nanoserve runs by itself (text in, text out).
TEXT_PART_ARCHITECTURES = ("Gemma3ForConditionalGeneration",)


def text_part_config(hf_config: Any) -> Any:
    """``hf_config`` itself, or for a checkpoint in ``TEXT_PART_ARCHITECTURES`` a copy of its ``text_config``
    that keeps the checkpoint's ``architectures`` (the registry resolves them) and whatever token ids, dtype and
    embedding tying the checkpoint sets at top level (transformers ties the LM head by the top-level setting):
    every part of the engine then reads the text model's config."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not set(archs) & set(TEXT_PART_ARCHITECTURES) or getattr(hf_config, "text_config", None) is None:
        return hf_config
    text = copy.deepcopy(hf_config.get_text_config())
    text.architectures = archs
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "dtype", "tie_word_embeddings"):
        value = getattr(hf_config, key, None)
        if value is not None:
            setattr(text, key, value)
    return text


def resolve_max_model_len(hf_config: Any, requested: int | None) -> int:
    """The context length to serve: ``requested``, or by default the model's ``max_position_embeddings``."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return limit
    _positive_int(requested, "max_model_len")
    if requested > limit:
        raise ValueError(
            f"max_model_len: {requested} exceeds the model's max_position_embeddings ({limit}); "
            f"pass max_model_len <= {limit}"
        )
    return requested


def sliding_window_layers(hf_config: Any) -> dict[int, int]:
    """Layer index -> window, for every layer that uses sliding-window attention.

    The layer types transformers resolved decide: Qwen2/Qwen3 configs carry ``layer_types`` (derived from
    ``use_sliding_window`` and ``max_window_layers`` when config.json has none; a ``sliding_window`` left
    over with ``use_sliding_window`` false windows no layer). Without ``layer_types``, as in Mistral,
    ``sliding_window`` applies to every layer.
    """
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return {}
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        return dict.fromkeys(range(hf_config.num_hidden_layers), int(window))
    return {i: int(window) for i, kind in enumerate(layer_types) if kind == "sliding_attention"}


def check_tensor_parallel_split(hf_config: Any, tp: int) -> None:
    """Fail before any process starts if the model cannot be split over ``tp`` ranks."""
    from nanoserve.distributed.parallel_state import divide

    divide(hf_config.num_attention_heads, tp, "num_attention_heads")
    divide(hf_config.intermediate_size, tp, "intermediate_size")
    if getattr(hf_config, "moe_intermediate_size", None):  # Qwen3-MoE's experts (Mixtral's use intermediate_size)
        divide(hf_config.moe_intermediate_size, tp, "moe_intermediate_size")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    if kv_heads >= tp:
        divide(kv_heads, tp, "num_key_value_heads")
    elif tp % kv_heads:
        raise ValueError(
            f"num_key_value_heads ({kv_heads}) is smaller than tensor_parallel_size ({tp}) and does not divide it, "
            "so KV heads cannot be replicated evenly; choose a tensor_parallel_size that is a multiple of "
            f"{kv_heads} or a divisor of it"
        )


def usable_tensor_parallel_sizes(hf_config: Any, largest: int = 16) -> list[int]:
    """The tensor_parallel_size values (up to ``largest``) this model's heads and MLP split evenly over."""
    sizes = []
    for tp in range(1, largest + 1):
        try:
            check_tensor_parallel_split(hf_config, tp)
        except ValueError:
            continue
        sizes.append(tp)
    return sizes


def _check_generation_config(value: object) -> str:
    if value in ("auto", "vllm"):
        return str(value)
    if not isinstance(value, (str, os.PathLike)) or not (Path(value).expanduser() / "generation_config.json").is_file():
        raise ValueError(
            f"generation_config: {value!r} is neither 'auto', 'vllm' nor a folder holding a generation_config.json"
        )
    return str(Path(value).expanduser())


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
