"""`nanoserve verify` and `nanoserve plan` on Gemma checkpoints: verify passes against transformers (which runs
the whole vision-language model for gemma3-vl); plan's weight and KV bytes are the real shards' at TP 1 and 2."""

from __future__ import annotations

import json

import pytest
import torch

from nanoserve.cli import main
from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.models.decoder import BuildContext
from nanoserve.models.registry import resolve_architecture
from nanoserve.runner.model_runner import ModelRunner
from nanoserve.tools.plan import make_plan

CLI_SMALL = ("--kv-cache-memory", "2MiB", "--block-size", "4", "--no-progress")
ARCHITECTURE = {
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma3-vl": "Gemma3ForConditionalGeneration",
}  # fmt: skip


@pytest.mark.parametrize("name", list(ARCHITECTURE))
def test_verify_passes(checkpoint, capsys, name: str) -> None:
    rc = main(["verify", str(checkpoint(name)), "--max-tokens", "8", *CLI_SMALL, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["totals"]
    assert report["ok"] and report["mode"] == "exact"
    assert report["architecture"] == ARCHITECTURE[name]


@pytest.mark.parametrize("name,tp", [("gemma2", 1), ("gemma3", 2), ("gemma3-vl", 2)])
def test_plan_bytes_are_the_real_shards(checkpoint, name: str, tp: int) -> None:
    path = str(checkpoint(name))
    plan = make_plan(path, tensor_parallel_size=tp, kv_cache_memory="1MiB", block_size=4)
    config = EngineConfig.create(path, tensor_parallel_size=tp, kv_cache_memory="1MiB", block_size=4)
    hf = config.hf_config
    for rank in range(tp):
        ctx = BuildContext(torch.float32, TPGroup(rank=rank, size=tp), "torch_sdpa", config.max_model_len)
        real = resolve_architecture(hf)(hf, ctx)
        r = plan.ranks[rank]
        assert r.weight_bytes == sum(p.numel() * p.element_size() for p in real.parameters()) == r.weights.total
        assert r.rotary_table_bytes == sum(b.numel() * b.element_size() for b in real.buffers())
    if tp == 1:
        runner = ModelRunner(config, TPGroup())
        assert plan.ranks[0].weight_bytes == runner.weight_bytes()
        assert plan.ranks[0].kv_bytes_per_block == runner.kv_bytes_per_block
