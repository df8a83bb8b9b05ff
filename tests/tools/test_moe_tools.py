"""`nanoserve verify` and `nanoserve plan` on mixture-of-experts checkpoints: verify passes against transformers;
plan's weight bytes equal the real shards', with the experts' bytes and the bytes one token reads beside them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nanoserve.cli import main
from tests.tools.plan_check import plan_beside_real_ranks

CLI_SMALL = ("--kv-cache-memory", "2MiB", "--block-size", "4", "--no-progress")


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_verify_passes(checkpoint, capsys, name: str) -> None:
    rc = main(["verify", str(checkpoint(name)), "--max-tokens", "8", *CLI_SMALL, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["totals"]
    assert report["ok"] and report["mode"] == "exact"
    assert report["architecture"] == {"qwen3-moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[name]


def expected_expert_bytes(hf: Any, tp: int) -> tuple[int, int]:
    """(all experts' bytes, the experts one token reads) per rank, from config.json: three [I/tp, H] matrices per
    expert, in every sparse layer."""
    if hasattr(hf, "moe_intermediate_size"):  # qwen3-moe
        experts, inter = hf.num_experts, hf.moe_intermediate_size
        sparse = [i for i in range(hf.num_hidden_layers) if i not in hf.mlp_only_layers and (i + 1) % hf.decoder_sparse_step == 0]
    else:  # mixtral
        experts, inter, sparse = hf.num_local_experts, hf.intermediate_size, range(hf.num_hidden_layers)
    per_expert = 3 * hf.hidden_size * inter // tp * 4
    return len(sparse) * experts * per_expert, len(sparse) * hf.num_experts_per_tok * per_expert


@pytest.mark.parametrize("name,tp", [("qwen3-moe", 1), ("qwen3-moe-step2-stacked", 2), ("mixtral", 2)])
def test_plan_counts_experts_as_the_layers_hold_them(checkpoint, name: str, tp: int) -> None:
    _, config, ranks = plan_beside_real_ranks(str(checkpoint(name)), tp)
    experts, active = expected_expert_bytes(config.hf_config, tp)
    for r, _ in ranks:
        assert r.expert_bytes == experts
        assert r.active_weight_bytes == r.weight_bytes - experts + active < r.weight_bytes


def test_plan_text_shows_the_experts(checkpoint, capsys) -> None:
    assert main(["plan", str(checkpoint("mixtral")), "--kv-cache-memory", "1MiB"]) == 0
    text = capsys.readouterr().out
    assert "mixture of experts, rank 0: experts" in text and "one token reads" in text
