"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers, token for token in float32.

The checkpoints (``DEFAULT_ARCH_CONFIGS``) cover top-2 and top-3 of 8 experts, ``norm_topk_prob`` true and
false, dense and sparse layers mixed (``mlp_only_layers``; ``decoder_sparse_step=2``), and both checkpoint
layouts (one tensor per expert; stacked). ``test_parity.py``'s every-architecture test runs them with mixed
prompt lengths too. Bad input (top-k above the expert count, a TP size that does not split the experts, a
missing expert tensor, act-order GPTQ experts) fails with an error naming it; pre-quantized experts that load are
``test_moe_prequantized.py``'s.
"""

from __future__ import annotations

import json
import pathlib
import random
import shutil
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoserve import LLM
from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers import native
from nanoserve.layers.moe import SparseMoeBlock
from nanoserve.models import native_decode
from nanoserve.models.decoder import BuildContext
from nanoserve.models.loader import load_weights
from nanoserve.models.registry import resolve_architecture
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS, build_checkpoint
from nanoserve.testing.reference import load_hf_model
from tests.conftest import (
    FIRST_PLAIN_TOKEN,
    CheckpointCache,
    ReferenceCache,
    assert_all_blocks_free,
    make_prompts,
    token_prompts,
    vocab_size_of,
)
from tests.model.test_parity import (
    BLOCK_SIZE,
    GREEDY,
    MAX_TOKENS,
    assert_matches_reference,
    bytes_per_block,
    traced_llm,
)

MOE_NAMES = ["qwen3-moe", "qwen3-moe-step2-stacked", "mixtral"]
# transformers' rule: sparse unless in mlp_only_layers, then every decoder_sparse_step-th layer.
EXPECTED_SPARSE_LAYERS = {"qwen3-moe": {0, 2}, "qwen3-moe-step2-stacked": {1, 3}, "mixtral": {0, 1}}


def moe_blocks(llm: LLM) -> list[SparseMoeBlock]:
    return [m for m in llm.engine.executor.runner.model.modules() if isinstance(m, SparseMoeBlock)]


@pytest.mark.parametrize("name", MOE_NAMES)
def test_every_scheduling_path(name: str, checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    """Mixed lengths, chunked prefill, prefix-cache hits and preemption in one run of two rounds (the second on
    a warm cache); each path is shown to have been taken."""
    path = str(checkpoint(name))
    vocab = vocab_size_of(name)
    rng = random.Random(MOE_NAMES.index(name))
    system = [rng.randrange(FIRST_PLAIN_TOKEN, vocab) for _ in range(2 * BLOCK_SIZE)]
    prompts = [system + p for p in make_prompts(vocab, 4, seed=40, min_len=1, max_len=30)]
    prompts += make_prompts(vocab, 2, seed=41, min_len=1, max_len=30)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    assert all(len(set(r.token_ids)) >= 10 for r in refs), [r.token_ids for r in refs]
    llm, trace = traced_llm(path, kv_cache_memory=18 * bytes_per_block(path), max_model_len=64, max_num_batched_tokens=12)
    with llm:
        sparse = {i for i, layer in enumerate(llm.engine.executor.runner.model.model.layers) if isinstance(layer.mlp, SparseMoeBlock)}
        assert sparse == EXPECTED_SPARSE_LAYERS[name]
        for _ in range(2):
            outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
            assert_matches_reference(outputs, refs, prompts)
            assert_all_blocks_free(llm.engine)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.stats.hits > 0
    assert any(not c.sample for step in trace.steps for c in step.chunks), "no prompt was prefilled in chunks"
    assert trace.readmitted_onto_cache, trace.allocations



@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_stacked_and_per_expert_layouts_load_the_same_model(
    name: str, checkpoint: CheckpointCache, hf_reference: ReferenceCache, tmp_path: pathlib.Path
) -> None:
    """The same weights saved both ways (``save_original_format=False`` writes the stacked tensors) load to
    identical parameters, and both generate transformers' tokens."""
    kwargs = {**DEFAULT_ARCH_CONFIGS[name], "expert_layout": "stacked"}
    stacked = build_checkpoint(tmp_path / name, **kwargs)
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(stacked / "model.safetensors"))
    prompts = make_prompts(vocab_size_of(name), 3, seed=50, min_len=3, max_len=25)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    params = []
    for path in (checkpoint(name), stacked):
        with LLM(str(path), block_size=BLOCK_SIZE, kv_cache_memory="1MiB", max_model_len=64) as llm:
            assert_matches_reference(llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False), refs, prompts)
            params.append([(b.experts.gate_up_proj.clone(), b.experts.down_proj.clone()) for b in moe_blocks(llm)])
    assert len(params[0]) == len(params[1]) > 0
    for (a_gu, a_d), (b_gu, b_d) in zip(*params):
        assert torch.equal(a_gu, b_gu) and torch.equal(a_d, b_d)


@pytest.mark.parametrize("name", ["qwen3-moe", "qwen3-moe-step2-stacked", "mixtral"])
def test_each_rank_loads_its_slice_of_every_expert(name: str, checkpoint: CheckpointCache) -> None:
    """Without starting processes: rank r of TP=2 loads rows [r I/2, (r+1) I/2) of every expert's gate and up
    and those columns of its down, from either layout; the router whole. Compared with transformers' tensors."""
    path = checkpoint(name)
    hf_model = load_hf_model(path)
    config = EngineConfig.create(str(path), tensor_parallel_size=2)
    for rank in range(2):
        ctx = BuildContext(torch.float32, TPGroup(rank=rank, size=2), "torch_sdpa", config.max_model_len)
        model = resolve_architecture(config.hf_config)(config.hf_config, ctx)
        load_weights(model, path)
        sparse = 0
        for ours, theirs in zip(model.model.layers, hf_model.model.layers):
            if not isinstance(ours.mlp, SparseMoeBlock):
                continue
            sparse += 1
            gate_up, down = theirs.mlp.experts.gate_up_proj, theirs.mlp.experts.down_proj  # [E, 2I, H], [E, H, I]
            i = down.shape[2]
            half = slice(rank * i // 2, (rank + 1) * i // 2)
            want = torch.cat([gate_up[:, :i][:, half], gate_up[:, i:][:, half]], dim=1)
            assert torch.equal(ours.mlp.experts.gate_up_proj, want)
            assert torch.equal(ours.mlp.experts.down_proj, down[:, :, half])
            assert torch.equal(ours.mlp.gate.weight, theirs.mlp.gate.weight)
        assert sparse == len(EXPECTED_SPARSE_LAYERS[name])


def test_the_c_decode_loop_declines_moe_layers(
    checkpoint: CheckpointCache, hf_reference: ReferenceCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-call C decode step has no experts kernel: a model with experts keeps the per-layer path (and
    transformers' tokens), where a dense model of the same attention takes the C loop on this machine."""
    if native.load() is None:
        pytest.skip("no native kernels on this machine (no C compiler)")
    monkeypatch.setenv(native_decode.NATIVE_DECODE_ENV, "1")
    with LLM(str(checkpoint("qwen3-gqa")), block_size=BLOCK_SIZE, kv_cache_memory="1MiB", max_model_len=64) as dense:
        dense.generate(token_prompts([[5, 6, 7]]), GREEDY, use_tqdm=False)
        plan = dense.engine.executor.runner.model.model.native_decode
        assert plan is not None and plan.steps_run > 0, "the C loop is not available here: this test shows nothing"
    name = "qwen3-moe"
    prompts = make_prompts(vocab_size_of(name), 2, seed=60, min_len=3, max_len=20)
    refs = hf_reference(name, prompts, MAX_TOKENS)
    with LLM(str(checkpoint(name)), block_size=BLOCK_SIZE, kv_cache_memory="1MiB", max_model_len=64) as llm:
        assert_matches_reference(llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False), refs, prompts)
        assert llm.engine.executor.runner.model.model.native_decode is None


# ------------------------------------------------------------------------------------------------ bad input


def patched_copy(src: pathlib.Path, dst: pathlib.Path, drop: str | None = None, **config: Any) -> pathlib.Path:
    """A copy of checkpoint ``src`` with ``config`` merged into its config.json and tensor ``drop`` removed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if drop is not None:
        tensors = load_file(dst / "model.safetensors")
        del tensors[drop]
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "name, drop, message",
    [
        (
            "qwen3-moe", "model.layers.2.mlp.experts.5.up_proj.weight",
            r"missing tensors: model\.layers\.2\.mlp\.experts\.gate_up_proj shard expert 5 up_proj$",
        ),
        (
            "mixtral", "model.layers.1.block_sparse_moe.experts.0.w2.weight",
            r"missing tensors: model\.layers\.1\.mlp\.experts\.down_proj shard expert 0 down_proj$",
        ),
        (
            "qwen3-moe-step2-stacked", "model.layers.3.mlp.experts.down_proj",
            r"missing tensors: model\.layers\.3\.mlp\.experts\.down_proj shard expert 0 down_proj, .*expert 7 down_proj$",
        ),
        ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", r"missing tensors: model\.layers\.0\.mlp\.gate\.weight$"),
    ],
    ids=["qwen3-per-expert", "mixtral-per-expert", "stacked", "router"],
)
def test_a_missing_expert_tensor_is_named(
    name: str, drop: str, message: str, checkpoint: CheckpointCache, tmp_path: pathlib.Path
) -> None:
    path = patched_copy(checkpoint(name), tmp_path / "m", drop=drop)
    with pytest.raises(ValueError, match=message):
        LLM(str(path), kv_cache_memory="1MiB")


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_top_k_above_the_expert_count(name: str, checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    path = patched_copy(checkpoint(name), tmp_path / "m", num_experts_per_tok=9)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) must be between 1 and the number of experts \(8\)"):
        LLM(str(path), kv_cache_memory="1MiB")


@pytest.mark.parametrize(
    "name, field, tp, message",
    [
        ("qwen3-moe", "moe_intermediate_size", 4, r"moe_intermediate_size \(34\) is not divisible by tensor_parallel_size \(4\)"),
        ("mixtral", "intermediate_size", 4, r"intermediate_size \(34\) is not divisible by tensor_parallel_size \(4\)"),
    ],
)  # fmt: skip
def test_a_tp_size_that_does_not_split_the_experts(
    name: str, field: str, tp: int, message: str, checkpoint: CheckpointCache, tmp_path: pathlib.Path
) -> None:
    """Refused while the options are checked, before any worker starts."""
    path = patched_copy(checkpoint(name), tmp_path / "m", **{field: 34})
    with pytest.raises(ValueError, match=message):
        EngineConfig.create(str(path), tensor_parallel_size=tp)


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_act_order_gptq_experts_are_refused(name: str, checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    """Every expert permutes its input its own way, and a layer's experts share one packed weight: refused while
    the options are checked, before any worker starts (other pre-quantized experts load: test_moe_prequantized.py)."""
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True}
    path = patched_copy(checkpoint(name), tmp_path / "m", quantization_config=qc)
    cls = {"qwen3-moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[name]
    with pytest.raises(ValueError, match=rf"act-order \(desc_act\) GPTQ checkpoints are not supported for {cls}"):
        EngineConfig.create(str(path))


def test_mixtral_with_a_sliding_window_matches_transformers(checkpoint: CheckpointCache, tmp_path: pathlib.Path) -> None:
    """Mixtral's sliding_window (every layer, as Mistral's) through the shared decoder: prompts and outputs well
    past a window of 8 give transformers' tokens, and the context is not capped at the window."""
    from nanoserve.testing.reference import hf_greedy

    path = str(patched_copy(checkpoint("mixtral"), tmp_path / "m", sliding_window=8))
    assert EngineConfig.create(path).max_model_len == EngineConfig.create(str(checkpoint("mixtral"))).max_model_len
    prompts = make_prompts(vocab_size_of("mixtral"), 3, seed=23, min_len=12, max_len=40)
    refs = hf_greedy(path, prompts, MAX_TOKENS)
    with LLM(path, block_size=4, kv_cache_memory="2MiB", max_model_len=128, max_num_batched_tokens=16) as llm:
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert [a.sliding_window for a in llm.engine.executor.runner.model.attention_layers()] == [8, 8]
    assert_matches_reference(outputs, refs, prompts)


def test_reference_routing_depends_on_the_input(checkpoint: CheckpointCache) -> None:
    """The fixtures' routers are scaled like the other projections: different tokens pick different experts
    (otherwise parity would only test one expert)."""
    model = load_hf_model(checkpoint("mixtral"))
    seen: set[tuple[int, ...]] = set()

    def record(module: Any, args: Any, out: Any) -> None:
        seen.update(tuple(sorted(row)) for row in out[2].tolist())

    handle = model.model.layers[0].mlp.gate.register_forward_hook(record)
    with torch.no_grad():
        model(torch.tensor([list(range(FIRST_PLAIN_TOKEN, FIRST_PLAIN_TOKEN + 40))]))
    handle.remove()
    assert len(seen) >= 8 and len({e for pair in seen for e in pair}) == 8
