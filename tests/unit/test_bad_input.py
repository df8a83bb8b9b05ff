"""Bad input gets a clear error that names the problem, and never takes other requests down with it."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.engine.llm_engine import LLMEngine
from nanoserve.testing.checkpoints import build_arch_checkpoint
from tests.conftest import CheckpointCache, assert_all_blocks_free, make_prompts, token_prompts

NAME = "qwen3-gqa"
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)


def copy_checkpoint(checkpoint: CheckpointCache, name: str, dest: pathlib.Path) -> pathlib.Path:
    """A private copy to damage; the session's checkpoints stay intact."""
    return pathlib.Path(shutil.copytree(checkpoint(name), dest / name))


# ------------------------------------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def engine(checkpoint: CheckpointCache) -> Any:
    config = EngineConfig.create(str(checkpoint(NAME)), block_size=4, kv_cache_memory="256KiB", max_model_len=32)
    eng = LLMEngine(config)
    yield eng
    eng.shutdown()


def run_to_completion(engine: Any, max_steps: int = 500) -> dict[str, Any]:
    finished: dict[str, Any] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert not engine.has_unfinished_requests(), "engine did not finish"
    assert_all_blocks_free(engine)
    return finished


def test_over_long_prompt_is_rejected_and_the_others_go_on(engine: Any) -> None:
    good = make_prompts(512, 2, seed=60, min_len=5, max_len=31)
    engine.add_request("good-0", {"prompt_token_ids": good[0]}, GREEDY)
    engine.step()  # one request already running when the bad one arrives
    engine.add_request("good-1", {"prompt_token_ids": good[1]}, GREEDY)
    for n in (32, 40):  # n == max_model_len leaves no room for a single generated token
        with pytest.raises(ValueError, match="max_model_len") as err:
            engine.add_request(f"bad-{n}", list(range(3, 3 + n)), GREEDY)
        assert str(n) in str(err.value) and "32" in str(err.value)
        assert f"bad-{n}" not in engine.requests
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("bad-text", "word " * 100, GREEDY)
    finished = run_to_completion(engine)
    assert set(finished) == {"good-0", "good-1"}
    # good-1 is 31 tokens: it may only grow to max_model_len, one token
    assert len(finished["good-0"].outputs[0].token_ids) == min(6, 32 - len(good[0]))
    assert len(finished["good-1"].outputs[0].token_ids) == 1
    assert finished["good-1"].outputs[0].finish_reason == "length"
    assert engine.scheduler.num_admitted == engine.scheduler.num_finished


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ([], "non-empty"),
        ({"prompt_token_ids": []}, "non-empty"),
        ([3, 4, 512], "512"),  # vocab is 512
        ([3, -1], "-1"),
        ([3, 4.0], "4.0"),
        ({"text": "hi"}, "prompt_token_ids"),
        (42, "prompt must be"),
    ],
)
def test_malformed_prompts(engine: Any, prompt: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        engine.add_request("x", prompt, GREEDY)
    assert "x" not in engine.requests


def test_duplicate_request_id(engine: Any) -> None:
    engine.add_request("dup", [5, 6, 7], GREEDY)
    with pytest.raises(ValueError, match="dup"):
        engine.add_request("dup", [5, 6, 7], GREEDY)
    assert set(run_to_completion(engine)) == {"dup"}


def test_generate_with_one_bad_prompt_queues_nothing(checkpoint: CheckpointCache) -> None:
    with LLM(str(checkpoint(NAME)), block_size=4, kv_cache_memory="256KiB", max_model_len=32) as llm:
        prompts = token_prompts(make_prompts(512, 3, seed=61, min_len=3, max_len=10))
        with pytest.raises(ValueError, match=r"prompt 1: .*max_model_len"):
            llm.generate([prompts[0], list(range(3, 60)), prompts[2]], GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert_all_blocks_free(llm.engine)
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)  # the engine is still fine
        assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6, 6]
        with pytest.raises(ValueError, match="sampling_params"):
            llm.generate(prompts, [GREEDY, GREEDY], use_tqdm=False)


# ------------------------------------------------------------------------------------------------ SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1000),
        ("n", 2.0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", True),
        ("min_tokens", -1),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("seed", 1.5),
        ("logprobs", -1),
        ("logprobs", 1000),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
    ],
)
def test_invalid_sampling_params_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_valid_edge_values_are_accepted() -> None:
    SamplingParams(temperature=0)  # greedy must be allowed
    SamplingParams(top_k=-1, top_p=1.0, min_p=0.0, logprobs=0, max_tokens=None, stop="x")
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(top_k=-1).top_k == 0


# ------------------------------------------------------------------------------------------------ engine options


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=4096), "block_size"),
        (dict(block_size=4.0), "block_size"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_model_len=0), "max_model_len"),
        (dict(max_model_len=100_000), "max_model_len"),  # past max_position_embeddings
        (dict(tensor_parallel_size=0), "tensor_parallel_size"),
        (dict(kv_cache_memory="lots"), "kv_cache_memory"),
        (dict(kv_cache_memory=-1), "kv_cache_memory"),
        (dict(dtype="int8"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(seed="abc"), "seed"),
        (dict(enable_chunked_prefill=False, max_num_batched_tokens=64), "chunked prefill"),
        (dict(distributed_init="mpi"), "distributed_init"),
    ],
)
def test_invalid_engine_options_name_the_option(checkpoint: CheckpointCache, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LLM(str(checkpoint(NAME)), **options)


def test_unknown_engine_option(checkpoint: CheckpointCache) -> None:
    with pytest.raises(TypeError, match="block_sise"):
        LLM(str(checkpoint(NAME)), block_sise=8)


def test_kv_cache_too_small_for_one_sequence(checkpoint: CheckpointCache) -> None:
    with pytest.raises((ValueError, RuntimeError), match="kv_cache_memory") as err:
        LLM(str(checkpoint(NAME)), block_size=4, kv_cache_memory="8KiB", max_model_len=256)
    assert "max_model_len" in str(err.value)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_model_that_is_not_a_local_directory() -> None:
    with pytest.raises(ValueError) as err:
        LLM("Qwen/Qwen3-0.6B")
    message = str(err.value)
    assert "Qwen/Qwen3-0.6B" in message and "not a local directory" in message
    assert "does not download" in message  # say that nothing is fetched ...
    assert "download" in message and "pass" in message  # ... and what to do instead


def test_directory_without_config(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_unknown_architecture_lists_the_supported_ones(checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(checkpoint, "llama-gqa", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as err:
        LLM(str(path))
    assert "Qwen3ForCausalLM" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_unknown_model_type(checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(checkpoint, "llama-gqa", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "fancy_new_model"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fancy_new_model"):
        LLM(str(path))


def test_missing_weight_file(checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(checkpoint, NAME, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(path))


def test_missing_shard(checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(checkpoint, "qwen3-sharded", tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        LLM(str(path))


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"])
def test_missing_tensor_is_named(checkpoint: CheckpointCache, tmp_path: pathlib.Path, tensor: str) -> None:
    path = copy_checkpoint(checkpoint, NAME, tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights[tensor]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as err:
        LLM(str(path))
    # named as in the checkpoint or as the fused parameter it feeds (e.g. qkv_proj shard k)
    module = tensor.rsplit(".", 2)[0]
    assert tensor in str(err.value) or module in str(err.value), str(err.value)


def test_unexpected_tensor_is_named(checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(checkpoint, NAME, tmp_path)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.mlp.surprise_proj.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.0.mlp.surprise_proj.weight"):
        LLM(str(path))


@pytest.mark.parametrize(
    "tensor, damage",
    [
        ("model.norm.weight", lambda w: w[:-1]),  # replicated parameter, one element short
        ("model.layers.0.self_attn.q_proj.weight", lambda w: w[: w.shape[0] // 2]),  # half the rows
        ("model.layers.0.self_attn.q_proj.weight", lambda w: torch.cat([w, w])),  # twice the rows
        ("model.layers.0.mlp.down_proj.weight", lambda w: torch.cat([w, w], dim=1)),  # twice the columns
        ("model.layers.1.mlp.gate_proj.weight", lambda w: torch.cat([w, w])),  # a packed (merged) shard
        ("model.embed_tokens.weight", lambda w: torch.cat([w, w])),  # a bigger vocabulary
        ("lm_head.weight", lambda w: w[:, :1]),  # one column, which would broadcast
    ],
    ids=["norm-short", "q-half", "q-double", "down-cols", "gate-double", "embed-vocab", "lm-head-broadcast"],
)
def test_wrong_tensor_shape_is_named(
    checkpoint: CheckpointCache, tmp_path: pathlib.Path, tensor: str, damage: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """A tensor of the wrong shape must not be truncated, broadcast or half-copied into the model."""
    path = copy_checkpoint(checkpoint, NAME, tmp_path)
    weights = load_file(path / "model.safetensors")
    weights[tensor] = damage(weights[tensor]).contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shape") as err:
        LLM(str(path), kv_cache_memory="256KiB", max_model_len=32)
    assert tensor in str(err.value)


def test_fresh_checkpoint_still_loads(tmp_path: pathlib.Path) -> None:
    """Control for the tests above: an undamaged copy built the same way loads and generates."""
    path = build_arch_checkpoint(NAME, tmp_path)
    with LLM(str(path), block_size=4, kv_cache_memory="256KiB", max_model_len=32) as llm:
        (out,) = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 6
