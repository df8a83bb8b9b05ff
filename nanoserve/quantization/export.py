"""The float32 checkpoint a quantized model computes with: every low-bit weight widened back, under the
checkpoint's own tensor names, beside the tensors that were float all along.

This is the oracle for everything transformers cannot run itself on a CPU: quantize-on-load (transformers runs
the widened weights, so greedy tokens must match exactly) and GPTQ / AWQ (whose transformers kernels need
gptqmodel / autoawq); ``nanoserve verify`` compares against it and says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers.embed_head import ParallelLMHead
from nanoserve.layers.linear import FUSED_SHARD, MergedColumnParallelLinear, QKVParallelLinear
from nanoserve.layers.moe import FusedMoE
from nanoserve.models.decoder import BuildContext
from nanoserve.models.loader import checkpoint_files, checkpoint_target, load_weights
from nanoserve.models.registry import resolve_architecture
from nanoserve.quantization.linear import QuantizedWeight, finish_loading


def _parts(name: str, module: Any, weight: torch.Tensor, packed: dict[str, tuple[str, Any]]) -> dict[str, torch.Tensor]:
    """A fused layer's widened weight split back into the checkpoint's tensors (``q_proj.weight``, ...)."""
    prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    by_part = {shard: ckpt for ckpt, (ours, shard) in packed.items() if ours == leaf}
    if FUSED_SHARD in by_part:  # the checkpoint keeps it fused (Phi-3): one rank holds the parts in its order
        return {f"{prefix}.{by_part[FUSED_SHARD]}.weight": weight}
    if isinstance(module, QKVParallelLinear):
        q, kv = module.q_size, module.kv_size
        pieces = {"q": weight[:q], "k": weight[q : q + kv], "v": weight[q + kv :]}
    elif isinstance(module, MergedColumnParallelLinear):
        starts = [sum(module.out_sizes[:i]) for i in range(len(module.out_sizes))]
        pieces = {i: weight[s : s + n] for i, (s, n) in enumerate(zip(starts, module.out_sizes))}
    elif isinstance(module, ParallelLMHead):
        return {"lm_head.weight": weight[: module.vocab_size]}
    else:
        return {f"{name}.weight": weight}
    return {f"{prefix}.{by_part[shard]}.weight": piece.contiguous() for shard, piece in pieces.items()}


def _expert_tensors(name: str, module: FusedMoE, model: Any) -> dict[str, torch.Tensor]:
    """A low-bit experts layer widened into the hub's per-expert tensors (``mlp.experts.{e}.gate_proj.weight``;
    Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``), whichever layout the source checkpoint had."""
    gate_up, down = module.dequantized()  # [E, 2 I, H], [E, H, I] (one rank: whole)
    i = module.intermediate_size
    gate, up, down_name = model.expert_projection_names
    prefix = name.rsplit(".mlp.experts", 1)[0] + f".{model.expert_block_name}.experts"
    out = {}
    for e in range(module.num_experts):
        out[f"{prefix}.{e}.{gate}.weight"] = gate_up[e, :i].contiguous()
        out[f"{prefix}.{e}.{up}.weight"] = gate_up[e, i:].contiguous()
        out[f"{prefix}.{e}.{down_name}.weight"] = down[e].contiguous()
    return out


def write_dequantized_checkpoint(model_dir: str | Path, out_dir: str | Path, quantization: Any) -> Path:
    """Load ``model_dir`` with ``quantization`` (a QuantizationConfig) on one rank, widen every low-bit
    weight to float32, and write a float checkpoint (config without ``quantization_config``; a quantized LM
    head of a tied model becomes its own ``lm_head.weight``, so the config is untied) to ``out_dir``."""
    from nanoserve.config import load_hf_config

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf_config = load_hf_config(model_dir)
    ctx = BuildContext(torch.float32, TPGroup(), "torch_sdpa", 64, kernels=None, quantization=quantization)
    model = resolve_architecture(hf_config)(hf_config, ctx)
    load_weights(model, model_dir)
    finish_loading(model)
    packed = getattr(model, "packed_modules_mapping", {})
    modules = dict(model.named_modules())
    quantized = {n: m for n, m in modules.items() if isinstance(getattr(m, "quant", None), QuantizedWeight)}
    # A checkpoint that names its tensors otherwise than the model (a vision-language checkpoint's text model,
    # see loader.load_weights) gets the widened tensors back under its own names.
    rename = getattr(model, "checkpoint_name", lambda name: name)
    checkpoint_name: dict[str, str] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            checkpoint_name.update({rename(key): key for key in f.keys() if rename(key) not in (None, key)})
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.items():
        parts = _parts(name, module, module.quant.dequantized(module.packed.data), packed)
        tensors.update({checkpoint_name.get(ours, ours): t for ours, t in parts.items()})
    experts = {
        n: m for n, m in modules.items()
        if isinstance(m, FusedMoE) and (m.gate_up_quant is not None or m.down_quant is not None)
    }  # fmt: skip
    for name, module in experts.items():
        tensors.update(_expert_tensors(name, module, model))
    expert_target = getattr(model, "expert_checkpoint_target", lambda key: None)
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                target, _ = checkpoint_target(rename(key) or key, packed)
                if target.rpartition(".")[0] in quantized or key in tensors:
                    continue
                if (hit := expert_target(rename(key) or key)) and hit[1] is not None and hit[0].rpartition(".")[0] in experts:
                    continue  # written widened above, one tensor per expert
                tensors[key] = f.get_tensor(key).to(torch.float32) if f.get_tensor(key).is_floating_point() else f.get_tensor(key)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = "float32"
    if "lm_head" in quantized:
        config["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for extra in model_dir.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(extra, out_dir / extra.name)
    return out_dir
