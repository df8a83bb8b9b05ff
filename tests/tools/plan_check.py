"""The check every architecture's `nanoserve plan` test shares: the plan beside the real model of each rank."""

from __future__ import annotations

from typing import Any

import torch

from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.models.decoder import BuildContext
from nanoserve.models.registry import resolve_architecture
from nanoserve.runner.model_runner import ModelRunner
from nanoserve.tools.plan import make_plan


def plan_beside_real_ranks(path: str, tp: int) -> tuple[Any, EngineConfig, list[tuple[Any, Any]]]:
    """``make_plan``'s answer for ``path`` at TP ``tp`` and, per rank, (its plan, the model that rank really
    builds). Asserted here: each rank's planned weight bytes are its real parameters' (and the plan's own
    total); at TP 1, the runner's weight and KV block bytes too. Callers add their architecture's checks."""
    plan = make_plan(path, tensor_parallel_size=tp, kv_cache_memory="1MiB", block_size=4)
    config = EngineConfig.create(path, tensor_parallel_size=tp, kv_cache_memory="1MiB", block_size=4)
    hf = config.hf_config
    ranks = []
    for rank in range(tp):
        # With the checkpoint's own quantization (a pre-quantized one), as the runner builds it.
        ctx = BuildContext(
            torch.float32, TPGroup(rank=rank, size=tp), "torch_sdpa", config.max_model_len,
            quantization=config.quantization,
        )  # fmt: skip
        real = resolve_architecture(hf)(hf, ctx)
        r = plan.ranks[rank]
        assert r.weight_bytes == sum(p.numel() * p.element_size() for p in real.parameters()) == r.weights.total
        ranks.append((r, real))
    if tp == 1:
        runner = ModelRunner(config, TPGroup())
        assert plan.ranks[0].weight_bytes == runner.weight_bytes()
        assert plan.ranks[0].kv_bytes_per_block == runner.kv_bytes_per_block
    return plan, config, ranks
