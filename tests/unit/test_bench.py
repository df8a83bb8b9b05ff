"""`nanoserve bench`: workload A is the issue's workload exactly, and each subcommand runs end to end on a tiny
checkpoint and prints the JSON it documents. Figures are printed by benchmarks, never asserted."""

from __future__ import annotations

import json
import random

import pytest

from nanoserve.cli import main
from nanoserve.tools.bench import WorkloadSpec, forward_flops, make_workload


def test_workload_a_is_the_published_one() -> None:
    requests = make_workload(WorkloadSpec())
    assert len(requests) == 32
    assert sum(len(r.prompt_token_ids) for r in requests) == 5042
    assert sum(r.max_tokens for r in requests) == 2556
    # The definition other engines' scripts reproduce: module-level draws after random.seed(0), in this order.
    random.seed(0)
    for r in requests:
        n = random.randint(64, 256)
        assert r.prompt_token_ids == [random.randint(0, 9999) for _ in range(n)]
        assert r.max_tokens == random.randint(32, 128)


def test_workload_flags_change_counts_ranges_and_seed() -> None:
    spec = WorkloadSpec(num_prompts=5, input_len=(3, 4), output_len=(7, 7), token_id_high=10, seed=3)
    requests = make_workload(spec)
    assert len(requests) == 5
    assert all(3 <= len(r.prompt_token_ids) <= 4 and r.max_tokens == 7 for r in requests)
    assert all(0 <= t < 10 for r in requests for t in r.prompt_token_ids)
    assert make_workload(spec) == requests
    assert make_workload(WorkloadSpec(num_prompts=5, seed=4)) != make_workload(WorkloadSpec(num_prompts=5, seed=3))
    with pytest.raises(ValueError, match="input_len"):
        WorkloadSpec(input_len=(10, 5))


def test_forward_flops_counts_weights_attention_and_head() -> None:
    class Cfg:
        hidden_size, num_attention_heads, num_key_value_heads, head_dim = 8, 2, 1, 4
        intermediate_size, num_hidden_layers, vocab_size = 16, 3, 100

    per_layer = 8 * (2 + 2) * 4 + 2 * 4 * 8 + 3 * 8 * 16  # qkv, o, gate/up/down
    want = 2 * per_layer * 5 * 3 + 4 * 2 * 4 * (5 * 6 / 2) * 3 + 2 * 8 * 100
    assert forward_flops(Cfg, [5], 1) == want


@pytest.mark.parametrize(
    "argv",
    [
        ["throughput", "--num-prompts", "3", "--input-len-min", "4", "--input-len-max", "9",
         "--output-len-min", "2", "--output-len-max", "5", "--token-id-high", "200", "--save-tokens"],
        ["latency", "--input-len", "6", "--output-len", "4", "--num-iters", "1", "--token-id-high", "200"],
        ["prefill", "--batch-size", "2", "--input-len", "8", "--num-iters", "1", "--token-id-high", "200"],
    ],
    ids=["throughput", "latency", "prefill"],
)  # fmt: skip
def test_cli_prints_json(checkpoint, tmp_path, capsys, argv) -> None:
    out_file = tmp_path / "result.json"
    path = str(checkpoint("llama-gqa"))
    rc = main(["bench", argv[0], path, "--kv-cache-memory", "1MiB", "--max-model-len", "64",
               "--output-json", str(out_file), *argv[1:]])  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_file.read_text())
    assert printed["kind"] == argv[0] and printed["engine"] == "nanoserve"
    assert printed["elapsed_s"] > 0 and printed["memory"]["peak_rss_bytes"] > printed["memory"]["weight_bytes"] > 0
    if argv[0] == "throughput":
        tokens = printed["settings"]["output_token_ids"]
        assert len(tokens) == 3 and printed["output_tokens"] == sum(len(t) for t in tokens)
        assert all(2 <= len(t) <= 5 for t in tokens)
    elif argv[0] == "latency":
        assert printed["figures"]["ttft_s"] <= printed["figures"]["e2e_latency_s"]
    else:
        assert printed["figures"]["gflops_per_s"] > 0
