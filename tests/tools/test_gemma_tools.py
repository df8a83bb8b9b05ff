"""`nanoserve verify` and `nanoserve plan` on Gemma checkpoints: verify passes against transformers (which runs
the whole vision-language model for gemma3-vl); plan's weight and KV bytes are the real shards' at TP 1 and 2."""

from __future__ import annotations

import json

import pytest

from nanoserve.cli import main
from tests.tools.plan_check import plan_beside_real_ranks

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
    _, _, ranks = plan_beside_real_ranks(str(checkpoint(name)), tp)
    for r, real in ranks:
        assert r.rotary_table_bytes == sum(b.numel() * b.element_size() for b in real.buffers())
