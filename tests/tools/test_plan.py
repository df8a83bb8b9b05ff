"""`nanoserve plan`: weight bytes equal the real model's, KV predictions equal what the engine really allocates
(TP 1 and 2, skewed budgets), problems are named, the probe catches a difference, and --json parses."""

from __future__ import annotations

import ast
import inspect
import json
import math

import pytest
import torch
from torch import nn

from nanoserve.cli import main
from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from nanoserve.models import decoder, loader, shard
from nanoserve.models.decoder import BuildContext
from nanoserve.models.registry import resolve_architecture
from nanoserve.runner.memory import BUDGET_SCALE_ENV
from nanoserve.runner.model_runner import ModelRunner
from nanoserve.tools import plan as plan_module
from nanoserve.tools.plan import make_plan, probe

# The top-level fields the module docstring documents for --json.
DOCUMENTED_FIELDS = {
    "model", "architecture", "device", "dtype", "kv_cache_dtype", "tensor_parallel_size", "block_size", "max_model_len",
    "max_num_seqs", "kv_cache_memory", "exact", "host_available_bytes", "ranks", "num_blocks", "num_tokens",
    "short_rank", "blocks_per_max_len_seq", "concurrency", "skipped_lengths", "fits", "problems", "notes", "probe",
}  # fmt: skip
RANK_FIELDS = {
    "rank", "weight_bytes", "weights", "rotary_table_bytes", "num_kv_heads", "kv_bytes_per_block",
    "kv_budget_bytes", "budget_source", "budget_scale", "local_num_blocks", "expert_bytes", "active_weight_bytes",
}  # fmt: skip


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("qwen3-gqa", "float32"),  # head_dim decoupled from hidden/heads, q/k norms
        ("qwen3-tied", "bfloat16"),  # tied embeddings counted once
        ("qwen2-mqa-bias", "float32"),  # qkv bias, odd vocab
        ("llama-mha-v4config", "float16"),
        ("qwen3-sharded", "float32"),
        ("llama3-rope-scaling", "float32"),  # transformers' scaled-rope helper runs while the shard is built
    ],
)
def test_weight_and_block_bytes_equal_the_real_model_tp1(checkpoint, name: str, dtype: str) -> None:
    path = str(checkpoint(name))
    plan = make_plan(path, dtype=dtype, kv_cache_memory="1MiB", block_size=8)
    runner = ModelRunner(EngineConfig.create(path, dtype=dtype, kv_cache_memory="1MiB", block_size=8), TPGroup())
    (rank,) = plan.ranks
    assert rank.weight_bytes == runner.weight_bytes()
    assert rank.weights.total == rank.weight_bytes
    assert rank.kv_bytes_per_block == runner.kv_bytes_per_block
    assert rank.num_kv_heads == runner.num_kv_heads
    assert rank.rotary_table_bytes == sum(b.numel() * b.element_size() for b in runner.model.buffers())


@pytest.mark.parametrize("name,tp", [("qwen2-mqa-bias", 2), ("qwen3-gqa", 4), ("llama-mha-v4config", 4)])
def test_weight_bytes_per_rank_equal_each_real_shard(checkpoint, name: str, tp: int) -> None:
    """Each rank's shard built by the model code (no process group needed to build): vocabulary padding
    (503 rows over 2 ranks), replicated KV heads (1 or 2 KV heads over more ranks), split MLPs."""
    path = str(checkpoint(name))
    plan = make_plan(path, tensor_parallel_size=tp, kv_cache_memory="1MiB")
    config = EngineConfig.create(path, tensor_parallel_size=tp)
    for rank in range(tp):
        ctx = BuildContext(torch.float32, TPGroup(rank=rank, size=tp), "torch_sdpa", config.max_model_len)
        shard = resolve_architecture(config.hf_config)(config.hf_config, ctx)
        real = sum(p.numel() * p.element_size() for p in shard.parameters())  # shared (tied) tensors once
        assert plan.ranks[rank].weight_bytes == real, f"rank {rank}"
        assert plan.ranks[rank].num_kv_heads == shard.attention_layers()[0].num_kv_heads


@pytest.mark.parametrize(
    "name,tp,options,scale",
    [
        ("qwen3-gqa", 1, dict(kv_cache_memory="1MiB", block_size=4), None),
        ("llama-gqa", 2, dict(kv_cache_memory="2MiB", block_size=8, max_model_len=256), None),
        ("qwen2-mqa-bias", 2, dict(kv_cache_memory="1MiB", block_size=4, max_model_len=128), "1.0,0.4"),
        ("qwen3-tied", 2, dict(kv_cache_memory="3MiB", block_size=16, dtype="bfloat16"), "0.3,1.0"),
    ],
)
def test_prediction_equals_what_the_engine_allocates(checkpoint, monkeypatch, name, tp, options, scale) -> None:
    if scale is not None:
        monkeypatch.setenv(BUDGET_SCALE_ENV, scale)  # spawned workers inherit the environment
    path = str(checkpoint(name))
    plan = make_plan(path, tensor_parallel_size=tp, **options)
    assert plan.exact and plan.fits, plan.problems
    result = probe(plan, path, tensor_parallel_size=tp, **options)
    info = result.kv_cache_info
    assert info is not None, result.error
    assert plan.num_blocks == info["num_blocks"]
    assert [r.local_num_blocks for r in plan.ranks] == info["local_num_blocks"]
    assert [r.kv_bytes_per_block for r in plan.ranks] == info["bytes_per_block"]
    assert info["allocated_num_blocks"] == [plan.num_blocks] * tp
    assert plan.num_tokens == info["num_tokens"]
    assert plan.ranks[0].weight_bytes == result.weight_bytes_rank0
    if scale is not None:  # the skew really reached the engine: its ranks disagreed, as predicted
        assert len(set(info["local_num_blocks"])) == 2
        assert plan.short_rank == info["local_num_blocks"].index(min(info["local_num_blocks"]))
    at_max = next(c for c in plan.concurrency if c.is_max_model_len)
    assert at_max.max_seqs_by_kv == info["num_blocks"] // math.ceil(plan.max_model_len / info["block_size"])
    assert result.matches and not result.drift, result.differences


def test_too_small_names_the_short_rank_and_the_engine_refuses(checkpoint, monkeypatch) -> None:
    monkeypatch.setenv(BUDGET_SCALE_ENV, "1.0,0.05")
    path = str(checkpoint("qwen3-gqa"))
    options = dict(tensor_parallel_size=2, kv_cache_memory="64KiB", block_size=4, max_model_len=64)
    plan = make_plan(path, **options)
    assert not plan.fits and plan.short_rank == 1
    (problem,) = plan.problems
    assert "rank 1 can hold" in problem and "needs 16 blocks" in problem
    result = probe(plan, path, **options)
    assert result.kv_cache_info is None and "KV cache too small: rank 1" in (result.error or "")
    assert result.matches  # refusing to start is what the plan predicted
    assert not plan.ok


def test_probe_flags_a_difference(checkpoint, monkeypatch) -> None:
    """Test double: the engine's budget changes between plan and probe (the scale is set only for the probe)."""
    path = str(checkpoint("qwen3-gqa"))
    options = dict(kv_cache_memory="1MiB", block_size=4)
    plan = make_plan(path, **options)
    monkeypatch.setenv(BUDGET_SCALE_ENV, "0.5")
    plan.probe = probe(plan, path, **options)
    assert not plan.probe.matches and not plan.ok
    assert any(d.startswith("local_num_blocks") for d in plan.probe.differences)
    assert "DIFFERENCE: num_blocks" in plan.format_text()


def test_a_model_that_cannot_split_is_an_option_error(checkpoint, capsys) -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"):
        make_plan(str(checkpoint("qwen3-gqa")), tensor_parallel_size=3)
    assert main(["plan", str(checkpoint("qwen3-gqa")), "-tp", "3"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err


def test_host_dependent_budgets_are_marked_and_capped(checkpoint) -> None:
    path = str(checkpoint("qwen3-gqa"))
    default = make_plan(path, host_available_bytes=64 * 2**20)
    assert not default.exact and "default" in default.ranks[0].budget_source
    capped = make_plan(path, kv_cache_memory="1GiB", host_available_bytes=64 * 2**20)
    assert not capped.exact and "capped" in capped.ranks[0].budget_source
    assert capped.ranks[0].kv_budget_bytes < 64 * 2**20
    starved = make_plan(path, kv_cache_memory="1MiB", host_available_bytes=2**10)
    assert any("exceed the host's available memory" in p for p in starved.problems)


def test_cli_json_with_probe(checkpoint, capsys) -> None:
    path = str(checkpoint("llama-gqa"))
    rc = main(["plan", path, "--json", "--probe", "--kv-cache-memory", "1MiB", "--block-size", "4",
               "--max-model-len", "300", "--lengths", "128,512"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(out) == DOCUMENTED_FIELDS
    assert set(out["ranks"][0]) == RANK_FIELDS
    assert [c["length"] for c in out["concurrency"]] == [128, 300] and out["skipped_lengths"] == [512]
    assert out["probe"]["matches"] and out["probe"]["kv_cache_info"]["num_blocks"] == out["num_blocks"]
    assert out["num_tokens"] == out["num_blocks"] * 4


def test_cli_text(checkpoint, capsys) -> None:
    rc = main(["plan", str(checkpoint("qwen3-tied")), "-tp", "2", "--kv-cache-memory", "1MiB"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "lm_head tied to the embedding" in text and "OK: the engine would start" in text


# ---- plan asks the layers: no second copy of the shard logic --------------------------------------------

# What plan re-derived from config.json before it asked the layers; none of it may come back.
REMOVED_DEFINITIONS = {"ShardShapes", "shard_shapes", "weight_breakdown", "kv_bytes_per_block"}
SHARD_CONFIG_FIELDS = {
    "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
    "num_hidden_layers", "tie_word_embeddings", "head_dim_of",
}  # fmt: skip


def test_plan_derives_no_shard_shape_itself() -> None:
    """plan's code defines none of the removed helpers and reads no config field that decides how a model
    splits (names, attributes and strings, so ``getattr(hf, "num_key_value_heads")`` counts too)."""
    tree = ast.parse(inspect.getsource(plan_module))
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not defined & REMOVED_DEFINITIONS
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not used & SHARD_CONFIG_FIELDS
    # Both sides of the comparison count bytes per block and weight bytes through models/shard.py.
    assert "shard.kv_bytes_per_block(" in inspect.getsource(ModelRunner.kv_bytes_per_block.fget)
    assert "shard.parameter_bytes(" in inspect.getsource(ModelRunner.__init__)


class RowParallelWithExtraRow(RowParallelLinear):
    """Test double: a row-parallel layer that allocates one output row more than asked for."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__(in_features, out_features + 1, bias, dtype, tp)


class EveryKVHeadOnEveryRank(QKVParallelLinear):
    """Test double: KV heads replicated on every rank instead of split across them."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
        dtype: torch.dtype, tp: TPGroup,
    ) -> None:  # fmt: skip
        self.head_dim, self.num_heads, self.tp = head_dim, num_heads // tp.size, tp
        self.num_kv_heads, self.kv_replicas = num_kv_heads, tp.size
        LinearBase.__init__(self, hidden_size, (self.num_heads + 2 * num_kv_heads) * head_dim, bias, dtype)


def test_plan_follows_a_layer_that_allocates_more(checkpoint, monkeypatch) -> None:
    """Make o_proj and down_proj allocate one extra row each: plan's weights grow by exactly those rows."""
    path = str(checkpoint("qwen3-gqa"))  # no biases; 4 heads of 32, intermediate 128
    options = dict(tensor_parallel_size=2, kv_cache_memory="1MiB")
    before = make_plan(path, **options)
    monkeypatch.setattr(decoder, "RowParallelLinear", RowParallelWithExtraRow)
    after = make_plan(path, **options)
    hf = EngineConfig.create(path).hf_config
    o_proj_row, down_proj_row = hf.num_attention_heads * hf.head_dim // 2 * 4, hf.intermediate_size // 2 * 4
    for b, a in zip(before.ranks, after.ranks):
        assert a.weights.attention - b.weights.attention == hf.num_hidden_layers * o_proj_row
        assert a.weights.mlp - b.weights.mlp == hf.num_hidden_layers * down_proj_row
        assert (a.weights.embedding, a.weights.lm_head, a.weights.norms) == (
            b.weights.embedding, b.weights.lm_head, b.weights.norms,
        )  # fmt: skip
        assert a.weight_bytes == a.weights.total and a.kv_bytes_per_block == b.kv_bytes_per_block


def test_plan_follows_how_the_layers_place_kv_heads(checkpoint, monkeypatch) -> None:
    """Make every rank hold every KV head: plan's KV heads, bytes per block, blocks and notes follow."""
    path = str(checkpoint("qwen3-gqa"))  # 2 KV heads of 32
    options = dict(tensor_parallel_size=2, kv_cache_memory="1MiB", block_size=4)
    before = make_plan(path, **options)
    monkeypatch.setattr(decoder, "QKVParallelLinear", EveryKVHeadOnEveryRank)
    after = make_plan(path, **options)
    hf = EngineConfig.create(path).hf_config
    assert [r.num_kv_heads for r in before.ranks] == [1, 1] and [r.num_kv_heads for r in after.ranks] == [2, 2]
    for b, a in zip(before.ranks, after.ranks):
        assert a.kv_bytes_per_block == 2 * b.kv_bytes_per_block
        assert a.local_num_blocks == a.kv_budget_bytes // a.kv_bytes_per_block < b.local_num_blocks
        # k and v: one more head of head_dim rows each, in every layer
        assert a.weight_bytes - b.weight_bytes == hf.num_hidden_layers * 2 * hf.head_dim * hf.hidden_size * 4
    assert not any("replicated" in n for n in before.notes)
    assert any("each KV head is replicated on 2 ranks" in n for n in after.notes)


def test_runner_and_plan_size_a_block_with_one_function(checkpoint, monkeypatch) -> None:
    """Change the per-layer KV layout in models/shard.py (a third plane, as if scales sat beside K and V):
    the runner's bytes per block and plan's prediction change together."""
    path = str(checkpoint("qwen3-gqa"))
    options = dict(kv_cache_memory="1MiB", block_size=4)
    before = make_plan(path, **options).ranks[0].kv_bytes_per_block
    monkeypatch.setattr(shard, "kv_cache_shape", lambda layer, n, bs: (3, n, bs, layer.num_kv_heads, layer.head_dim))
    runner = ModelRunner(EngineConfig.create(path, **options), TPGroup())
    assert make_plan(path, **options).ranks[0].kv_bytes_per_block == runner.kv_bytes_per_block == before * 3 // 2


def test_plan_reads_no_weights_and_builds_on_meta(checkpoint, monkeypatch) -> None:
    path = str(checkpoint("qwen2-mqa-bias"))

    def refuse(*args, **kwargs):
        raise AssertionError("plan opened a checkpoint file")

    monkeypatch.setattr(loader, "safe_open", refuse)
    monkeypatch.setattr(loader, "load_weights", refuse)
    plan = make_plan(path, tensor_parallel_size=2, kv_cache_memory="1MiB")
    assert plan.fits and plan.ranks[0].weight_bytes > 0
    config = EngineConfig.create(path, tensor_parallel_size=2)
    ctx = BuildContext(torch.float32, TPGroup(rank=1, size=2), "torch_sdpa", config.max_model_len)
    model = shard.build_shard(resolve_architecture(config.hf_config), config.hf_config, ctx)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary tables: computed, small


def test_every_parameter_is_in_a_weight_part(checkpoint) -> None:
    """The printed breakdown always adds up: a parameter under no known part is refused, not dropped."""
    config = EngineConfig.create(str(checkpoint("qwen3-gqa")))
    ctx = BuildContext(torch.float32, TPGroup(), "torch_sdpa", config.max_model_len)
    model = shard.build_shard(resolve_architecture(config.hf_config), config.hf_config, ctx)
    assert sum(shard.parameter_bytes_by_part(model).values()) == shard.parameter_bytes(model)
    model.extra = nn.Parameter(torch.empty(3, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="parameter extra is in no weight part"):
        shard.parameter_bytes_by_part(model)
