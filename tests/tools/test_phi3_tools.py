"""`nanoserve verify` and `nanoserve plan` on Phi-3 / Phi-4-mini checkpoints: verify passes against transformers;
plan's weight bytes, KV bytes and rotary table (narrower
with partial rotary) equal the real shards' at TP 1 and 2."""

from __future__ import annotations

import json

import pytest

from nanoserve.cli import main
from tests.tools.plan_check import plan_beside_real_ranks

CLI_SMALL = ("--kv-cache-memory", "2MiB", "--block-size", "4", "--no-progress")


# Prompts within the fixtures' original_max_position_embeddings (64): a longer prompt is rotated per position,
# while transformers rotates all of it with the long factors (see layers/rotary.py; the built-in set has a
# 70-token prompt).
PROMPTS = [
    "The capital of France is", "Hi", "def fibonacci(n):\n    if n < 2:\n        return n",
    "1, 2, 3, 5, 8, 13, 21,", "the the the the the the the the", 'Q: What is 17 times 23?\nA:',
]  # fmt: skip


@pytest.mark.parametrize("name", ["phi3-longrope-window", "phi4-mini-partial-rotary"])
def test_verify_passes(checkpoint, capsys, tmp_path, name: str) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    rc = main(["verify", str(checkpoint(name)), "--prompts", str(prompts), "--max-tokens", "30", *CLI_SMALL, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["totals"]
    assert report["ok"] and report["mode"] == "exact"
    assert report["architecture"] == "Phi3ForCausalLM"
    assert report["totals"]["compared_tokens"] == 30 * len(PROMPTS)


@pytest.mark.parametrize("name, tp", [("phi3-longrope-window", 1), ("phi4-mini-partial-rotary", 2)])
def test_plan_counts_what_the_layers_hold(checkpoint, name: str, tp: int) -> None:
    plan, config, ranks = plan_beside_real_ranks(str(checkpoint(name)), tp)
    hf = config.hf_config
    assert plan.architecture == "Phi3ForCausalLM"
    for r, real in ranks:
        assert r.rotary_table_bytes == sum(b.numel() * b.element_size() for b in real.buffers())
    head_dim = hf.hidden_size // hf.num_attention_heads
    rotary = head_dim * 3 // 4 if "phi4" in name else head_dim
    assert plan.ranks[0].rotary_table_bytes == 2 * config.max_model_len * rotary * 4
