"""Load ``*.safetensors`` weights (one file or sharded with an index) into a model, reading only this rank's
slice of each tensor. A missing or unexpected tensor is an error that names it."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Buffers some older checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _top_module(name: str) -> str:
    """``model.vision_tower.encoder...`` -> ``model.vision_tower``; ``vision_tower.encoder...`` -> ``vision_tower``."""
    parts = name.split(".")
    return ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1])


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {str(model_dir)!r} (.bin/.pt checkpoints are not supported; "
            "re-save with safe_serialization=True)"
        )
    return files


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    """Replicated parameters (norms): copy the whole tensor, cast to the parameter's dtype."""
    tensor = loaded[:]
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
    param.data.copy_(tensor)


def checkpoint_target(name: str, packed: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """(our parameter name, part) of checkpoint tensor ``name``: fused layers' parts map onto the fused
    module (``...q_proj.weight`` -> (``...qkv_proj.weight``, "q"))."""
    for ckpt_name, (ours, shard) in packed.items():
        if f".{ckpt_name}." in name:
            return name.replace(ckpt_name, ours), shard
    return name, None


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding low-bit weights: they take their checkpoint tensors (``weight`` to quantize, or a
    format's ``qweight`` / ``scales`` / ...) through ``load_checkpoint_tensor`` rather than as parameters."""
    return {name: m for name, m in model.named_modules() if getattr(m, "quant", None) is not None}


def load_weights(model: nn.Module, model_dir: str | Path, show_progress: bool = False) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = _quantized_modules(model)
    packed = getattr(model, "packed_modules_mapping", {})
    # Mixture-of-experts models map expert tensors (per expert or stacked) onto stacked parameters themselves.
    expert_target = getattr(model, "expert_checkpoint_target", lambda name: None)
    tied = getattr(model, "tie_word_embeddings", False)
    # Checkpoints holding more than the model (the text model of a vision-language checkpoint) name their
    # tensors for it, or None for those it does not use.
    rename = getattr(model, "checkpoint_name", lambda name: name)
    loaded: set[str] = set()
    unexpected: list[str] = []
    ignored: Counter[str] = Counter()
    files = checkpoint_files(model_dir)
    for path in tqdm(files, desc="Loading weights", disable=not show_progress or len(files) < 2):
        with safe_open(str(path), framework="pt") as f:
            for ckpt_name in f.keys():
                name = rename(ckpt_name)
                if name is None:
                    ignored[_top_module(ckpt_name)] += 1
                    continue
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if tied and name == "lm_head.weight":
                    continue  # some tied checkpoints store a copy; the embedding is authoritative
                target, shard_id = expert_target(name) or checkpoint_target(name, packed)
                module_name, _, suffix = target.rpartition(".")
                module = quantized.get(module_name)
                if module is not None and suffix in sum(module.quant.suffixes, ()):
                    try:  # the layer's errors name the checkpoint tensor at fault (not always this one)
                        module.load_checkpoint_tensor(suffix, f.get_slice(ckpt_name), shard_id, name.rpartition(".")[0])
                    except (ValueError, RuntimeError) as exc:
                        raise ValueError(f"checkpoint {path.name}: {exc}") from exc
                    loaded.add(f"{target}#{shard_id}" if shard_id is not None else target)
                    continue
                param = params.get(target)
                if param is None:
                    unexpected.append(ckpt_name)
                    continue
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, f.get_slice(ckpt_name), shard_id)
                except (ValueError, RuntimeError) as exc:  # name the tensor: the layer only knows shapes
                    raise ValueError(f"checkpoint tensor {ckpt_name} ({path.name}): {exc}") from exc
                # A parameter filled piecewise by parts of several kinds (experts: one tensor per expert, or
                # one stacked tensor for all) says which of its parts a tensor filled.
                filled = getattr(param, "parts_filled", None)
                parts = filled(shard_id) if filled is not None else [shard_id]
                loaded.update(target if s is None else f"{target}#{s}" for s in parts)
    if ignored:
        parts = ", ".join(f"{top}.* ({n} tensors)" for top, n in sorted(ignored.items()))
        logger.info("%s runs the checkpoint's text model only; ignored %s", type(model).__name__, parts)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model does not expect: {', '.join(sorted(unexpected)[:10])}")
    def parts_of(name: str) -> list[str]:
        """The keys ``loaded`` holds for parameter (or tensor) ``name``: one per part of a fused module."""
        declared = getattr(params.get(name), "checkpoint_parts", None)
        if declared is not None:
            return [f"{name}#{s}" for s in declared]
        module_name = name.rsplit(".", 1)[0]
        shards = [s for ckpt, (ours, s) in packed.items() if module_name.endswith(ours)]
        return [f"{name}#{s}" for s in shards] if shards else [name]

    expected = set()
    for module_name, module in quantized.items():
        if not (tied and module_name == "lm_head"):
            for suffix in module.quant.suffixes[0]:
                expected.update(parts_of(f"{module_name}.{suffix}"))
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        if name.rsplit(".", 1)[0] in quantized and name.endswith(".packed"):
            continue  # filled from the tensors counted above
        expected.update(parts_of(name))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {', '.join(m.replace('#', ' shard ') for m in missing[:10])}")
