"""One rank's start-up, the same on every rank and in lockstep: build the runner (its shard of the model),
size this rank's KV cache, take part in the agreement, allocate exactly the agreed count."""

from __future__ import annotations

import functools

from nanoserve.config import EngineConfig
from nanoserve.distributed.kv_agreement import KVCacheInfo, establish_kv_cache
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.runner.memory import local_num_blocks, short_kv_layers
from nanoserve.runner.model_runner import ModelRunner


def start_rank(config: EngineConfig, tp: TPGroup, local_world_size: int, show_progress: bool = False) -> tuple[ModelRunner, KVCacheInfo]:
    """Build this rank's runner and its agreed KV cache (every rank runs this, in lockstep).

    ``KVCacheInfo.max_model_len`` is the context length to serve: ``config.max_model_len``, or less when that
    was the model's default and the agreed KV cache holds less."""
    runner = ModelRunner(config, tp, show_progress=show_progress)
    short = short_kv_layers(tp.rank, tp.size, len(runner.attention_layers))
    info = establish_kv_cache(
        local_num_blocks(runner, config, tp.rank, tp.size, local_world_size),
        runner.kv_bytes_per_block,
        config.block_size,
        config.max_model_len,
        functools.partial(runner.allocate_kv_cache, short_layers=short),
        tp,
        max_model_len_explicit=config.max_model_len_explicit,
    )
    return runner, info
