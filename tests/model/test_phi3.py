"""Phi-3 / Phi-4-mini (``Phi3ForCausalLM``) against transformers: the fused ``qkv_proj`` / ``gate_up_proj``
checkpoint tensors split into each rank's q, k, v and gate, up rows (float and quantized on load); the longrope
tables (short factors below ``original_max_position_embeddings``, long from it on) and partial rotary against
transformers' own rotary code; greedy parity through chunked prefill, prefix-cache hits and preemption, with
prompts past the sliding window and decode past the original length; and checks that the window and the long
factors really change the output (so parity could not pass with either ignored)."""

from __future__ import annotations

import json
import random
import shutil
from typing import Any

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.config import load_hf_config
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers.linear import FUSED_SHARD
from nanoserve.layers.rotary import RotaryEmbedding, apply_rotary, inverse_frequencies, rotary_dim
from nanoserve.models.decoder import BuildContext
from nanoserve.models.loader import load_weights
from nanoserve.models.registry import resolve_architecture
from nanoserve.quantization.config import resolve as resolve_quantization
from nanoserve.quantization.export import write_dequantized_checkpoint
from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS
from nanoserve.testing.reference import hf_greedy
from tests.conftest import (
    FIRST_PLAIN_TOKEN,
    CheckpointCache,
    ReferenceCache,
    assert_all_blocks_free,
    make_prompts,
    token_prompts,
    vocab_size_of,
)
from tests.model.test_parity import assert_matches_reference, traced_llm

PHI3, PHI4 = "phi3-longrope-window", "phi4-mini-partial-rotary"
WINDOW = DEFAULT_ARCH_CONFIGS[PHI3]["extra_config"]["sliding_window"]
ORIGINAL = DEFAULT_ARCH_CONFIGS[PHI3]["extra_config"]["original_max_position_embeddings"]
MAX_TOKENS = 28
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS, logprobs=0)


def build(path: Any, rank: int = 0, size: int = 1, quantization: Any = None) -> Any:
    hf = load_hf_config(path)
    ctx = BuildContext(torch.float32, TPGroup(rank=rank, size=size), "torch_sdpa", 128, quantization=quantization)
    model = resolve_architecture(hf)(hf, ctx)
    load_weights(model, path)
    return model


def hf_parts(hf_model: Any, layer: int) -> dict[str, torch.Tensor]:
    """The q, k, v and gate, up weights of one layer, cut from transformers' fused tensors as its modules cut
    their outputs (Phi3Attention.forward, Phi3MLP.forward)."""
    cfg = hf_model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    qkv = hf_model.model.layers[layer].self_attn.qkv_proj.weight
    gate, up = hf_model.model.layers[layer].mlp.gate_up_proj.weight.chunk(2, dim=0)
    return {"q": qkv[:q], "k": qkv[q : q + kv], "v": qkv[q + kv :], "gate": gate, "up": up}


def rank_rows(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = w.shape[0] // size
    return w[rank * n : (rank + 1) * n]


# ------------------------------------------------------------------------------------------- fused tensors


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", [PHI3, PHI4])
def test_fused_tensors_split_into_each_ranks_parts(
    name: str, tp: int, checkpoint: CheckpointCache, hf_reference: ReferenceCache
) -> None:
    """Each rank's q, k, v heads and gate, up rows, cut from transformers' fused tensors; at TP 4 Phi-4-mini's
    2 KV heads are replicated (ranks 0, 1 hold KV head 0; ranks 2, 3 KV head 1)."""
    path = checkpoint(name)
    hf_model = hf_reference.model(name)
    kv_heads = hf_model.config.num_key_value_heads
    for rank in range(tp):
        model = build(path, rank, tp)
        for i, layer in enumerate(model.model.layers):
            parts = hf_parts(hf_model, i)
            want = {k: rank_rows(v, rank, tp) for k, v in parts.items()}
            if kv_heads < tp:  # replicated: rank r holds KV head r // (tp // kv_heads)
                want.update({k: rank_rows(parts[k], rank // (tp // kv_heads), kv_heads) for k in ("k", "v")})
            qkv = layer.self_attn.qkv_proj.weight
            assert torch.equal(qkv, torch.cat([want["q"], want["k"], want["v"]])), f"rank {rank} layer {i} qkv"
            gate_up = layer.mlp.gate_up_proj.weight
            assert torch.equal(gate_up, torch.cat([want["gate"], want["up"]])), f"rank {rank} layer {i} gate_up"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_fused_tensors_quantize_on_load_per_part(quantization: str, checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    """Quantized on load from the fused tensors, each rank's packed weights are bit for bit those of the same
    layer fed transformers' q, k, v and gate, up tensors one part at a time."""
    path = checkpoint(PHI4)
    hf_model = hf_reference.model(PHI4)
    quant = resolve_quantization(load_hf_config(path), quantization, 32 if quantization == "int4" else None)
    for rank in range(2):
        model = build(path, rank, 2, quant)
        hf = load_hf_config(path)
        ctx = BuildContext(torch.float32, TPGroup(rank=rank, size=2), "torch_sdpa", 128, quantization=quant)
        by_parts = resolve_architecture(hf)(hf, ctx)
        for i, (layer, other) in enumerate(zip(model.model.layers, by_parts.model.layers)):
            parts = hf_parts(hf_model, i)
            for shard, key in (("q", "q"), ("k", "k"), ("v", "v")):
                other.self_attn.qkv_proj.load_checkpoint_tensor("weight", parts[key], shard)
            for shard, key in ((0, "gate"), (1, "up")):
                other.mlp.gate_up_proj.load_checkpoint_tensor("weight", parts[key], shard)
            for ours, theirs in ((layer.self_attn.qkv_proj, other.self_attn.qkv_proj), (layer.mlp.gate_up_proj, other.mlp.gate_up_proj)):
                assert ours.quant is not None and torch.equal(ours.packed, theirs.packed), f"rank {rank} layer {i}"


def test_fused_tensor_errors_are_clear(checkpoint: CheckpointCache) -> None:
    model = build(checkpoint(PHI3))
    qkv = model.model.layers[0].self_attn.qkv_proj
    short = torch.zeros(qkv.weight.shape[0] - 16, qkv.weight.shape[1])
    with pytest.raises(ValueError, match=r"fused checkpoint tensor has 176 rows, expected q 64 \+ k 64 \+ v 64 = 192"):
        qkv.weight_loader(qkv.weight, short, FUSED_SHARD)
    with pytest.raises(ValueError, match="not a fused layer"):
        o = model.model.layers[0].self_attn.o_proj
        o.weight_loader(o.weight, torch.zeros(64, 64), FUSED_SHARD)
    # A fused tensor of a pre-quantized format is packed across output rows its own way: refused, not guessed.
    quant = resolve_quantization(load_hf_config(checkpoint(PHI3)), "int8")
    hf = load_hf_config(checkpoint(PHI3))
    qmodel = resolve_architecture(hf)(hf, BuildContext(torch.float32, TPGroup(), "torch_sdpa", 128, quantization=quant))
    layer = qmodel.model.layers[0].self_attn.qkv_proj
    layer.quant.source = "gptq"
    with pytest.raises(ValueError, match="fused checkpoint tensor in gptq format cannot be split"):
        layer.load_checkpoint_tensor("qweight", torch.zeros(8, 192, dtype=torch.int32), FUSED_SHARD, "model.layers.0.self_attn.qkv_proj")


@pytest.mark.parametrize("name, quantization", [(PHI3, "int4"), (PHI4, "int8")])
def test_quantize_on_load_matches_transformers_on_the_widened_weights(
    name: str, quantization: str, checkpoint: CheckpointCache, tmp_path: Any
) -> None:
    path = checkpoint(name)
    prompts = make_prompts(vocab_size_of(name), 4, seed=3, min_len=5, max_len=40)
    extra = {"quantization_group_size": 32} if quantization == "int4" else {}
    with LLM(str(path), block_size=4, kv_cache_memory="2MiB", max_model_len=128, quantization=quantization, **extra) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
        quant = llm.engine.config.quantization
    widened = write_dequantized_checkpoint(path, tmp_path / "widened", quant)
    assert got == [r.token_ids for r in hf_greedy(widened, prompts, MAX_TOKENS)]


# ------------------------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("name", [PHI3, PHI4])
def test_longrope_tables_match_transformers(name: str, checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    """Below the original length transformers uses the short factors; a call whose largest position is past it
    uses the long ones (for every position of the call). Our per-position table equals the first below the
    original length and the second from it on."""
    hf = load_hf_config(checkpoint(name))
    head_dim = hf.hidden_size // hf.num_attention_heads
    ours = RotaryEmbedding(head_dim, hf.max_position_embeddings, hf, torch.float32)
    rope = hf_reference.model(name).model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    short_cos, short_sin = rope(x, torch.arange(ORIGINAL)[None])
    long_cos, long_sin = rope(x, torch.arange(ORIGINAL, hf.max_position_embeddings)[None])
    assert torch.equal(ours.cos[:ORIGINAL], short_cos[0]) and torch.equal(ours.sin[:ORIGINAL], short_sin[0])
    assert torch.equal(ours.cos[ORIGINAL:], long_cos[0]) and torch.equal(ours.sin[ORIGINAL:], long_sin[0])
    assert ours.cos.shape[-1] == rotary_dim(hf, head_dim) == {PHI3: head_dim, PHI4: head_dim * 3 // 4}[name]
    # Not vacuous: the attention factor scales the table (sqrt(1 + ln 4 / ln 64)), and the factor sets differ.
    assert float(ours.cos[0, 0]) == pytest.approx((1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(64.0))).sqrt().item())
    short_inv, _ = inverse_frequencies(hf, head_dim)
    long_inv, _ = inverse_frequencies(hf, head_dim, seq_len=ORIGINAL + 1)
    assert not torch.allclose(short_inv, long_inv)


def test_partial_rotary_matches_transformers(checkpoint: CheckpointCache, hf_reference: ReferenceCache) -> None:
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    hf = load_hf_config(checkpoint(PHI4))
    head_dim = hf.hidden_size // hf.num_attention_heads
    ours = RotaryEmbedding(head_dim, 128, hf, torch.float32)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 4, head_dim, generator=gen), torch.randn(7, 2, head_dim, generator=gen)  # [T, H, D]
    positions = torch.tensor([0, 1, 5, 17, 63, 64, 100])
    cos, sin = ours.lookup(positions)  # [T, 1, R]
    # transformers: q [B, H, T, D], cos [B, T, R]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, 0][None], sin[:, 0][None])
    assert torch.equal(apply_rotary(q, cos, sin), q_ref[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin), k_ref[0].transpose(0, 1))
    assert torch.equal(apply_rotary(q, cos, sin)[..., 48:], q[..., 48:])  # the last quarter passes through


@pytest.mark.parametrize("qk_norm", [False, True])
def test_partial_rotary_in_the_c_kernel_matches_torch(qk_norm: bool) -> None:
    """The rope kernel rotates the first R dims of each head from [P, R] tables and leaves the rest as they were;
    the rotated part agrees with the torch path within the whole-head kernel's tolerance
    (tests/unit/test_native_kernels.py)."""
    from nanoserve.layers import native
    from nanoserve.layers.norm import RMSNorm

    lib = native.load()
    if lib is None:
        pytest.skip("no C compiler: the torch path is the only one")
    heads, kv_heads, head_dim, rot, tokens, num_slots = 4, 2, 64, 48, 9, 32
    assert native.rope_supported(head_dim, rot) and not native.rope_supported(head_dim, 24)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    positions = torch.randint(0, 100, (tokens,), generator=g)
    freqs = torch.rand(100, rot // 2, generator=g) * 3
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # [P, R]
    w = [torch.rand(head_dim, generator=g) + 0.5 for _ in range(2)] if qk_norm else [None, None]
    slots = torch.randperm(num_slots, generator=g)[:tokens]
    kv_cache = torch.zeros(2, num_slots // 4, 4, kv_heads, head_dim)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    if qk_norm:
        norms = [RMSNorm(head_dim, 1e-6, torch.float32) for _ in range(2)]
        for n, weight in zip(norms, w):
            n.weight.data = weight
        q, k = norms[0]._norm(q), norms[1]._norm(k)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    want_q, want_k = apply_rotary(q, c, s), apply_rotary(k, c, s)
    native.qk_norm_rope_store(lib, qkv, heads, kv_heads, head_dim, cos, sin, positions, w[0], w[1], 1e-6, slots, kv_cache)
    got_q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    got_k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    if not qk_norm:  # the dims past R are untouched (normed ones differ from torch's norm by rounding only)
        assert torch.equal(got_q[..., rot:], want_q[..., rot:]) and torch.equal(got_k[..., rot:], want_k[..., rot:])
    torch.testing.assert_close(kv_cache[0].view(-1, kv_heads, head_dim)[slots], got_k, rtol=0, atol=0)


def test_partial_rotary_from_a_transformers_4_config(tmp_path: Any) -> None:
    """Phi-4-mini's hub config.json (4.x shape): ``partial_rotary_factor`` at top level, ``rope_scaling``."""
    cfg = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 512,
        "max_position_embeddings": 256, "original_max_position_embeddings": 64, "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 24, "long_factor": [2.0] * 24},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = load_hf_config(tmp_path)
    assert rotary_dim(hf, 64) == 48
    assert RotaryEmbedding(64, 128, hf, torch.float32).cos.shape == (128, 48)


# ------------------------------------------------------------------------------------------- greedy parity


def native_steps(llm: LLM) -> int:
    plan = llm.engine.executor.runner.model.model.native_decode
    return plan.steps_run if plan is not None else 0


@pytest.mark.parametrize(
    "name, native", [(PHI3, True), (PHI3, False), (PHI4, True), (PHI4, False)],
    ids=["phi3-c-kernels", "phi3-torch", "phi4-c-kernels", "phi4-torch"],
)
def test_parity_through_chunks_cache_hits_and_preemption(
    name: str, native: bool, checkpoint: CheckpointCache, hf_reference: ReferenceCache, monkeypatch: Any
) -> None:
    """Prompts of 9-60 tokens (past the window of 16, within the original length of 64) and 28 generated
    tokens (decode past 64: the long factors); at most 12 tokens a step (chunked prefill), a shared prefix
    (prefix-cache hits), and 40 blocks of 4 for a batch that needs ~100 (preemption, recompute)."""
    if not native:
        monkeypatch.setenv("NANOSERVE_NATIVE", "0")
    vocab = vocab_size_of(name)
    rng = random.Random(17)
    shared = [rng.randrange(FIRST_PLAIN_TOKEN, vocab) for _ in range(24)]
    # The shared-prefix prompts first: admitted first, they find the warm-up's blocks before preemption churns
    # the cache.
    prompts = [shared + p for p in make_prompts(vocab, 3, seed=6, min_len=3, max_len=20)]
    prompts += make_prompts(vocab, 5, seed=5, min_len=9, max_len=60)
    assert max(map(len, prompts)) <= ORIGINAL < max(map(len, prompts)) + MAX_TOKENS
    refs = hf_reference(name, [shared + [5]] + prompts, MAX_TOKENS)
    assert all(len(set(r.token_ids)) >= 10 for r in refs), [r.token_ids for r in refs]
    probe = LLM(str(checkpoint(name)), block_size=4, kv_cache_memory="1MiB", max_model_len=96)
    per_block = int(probe.kv_cache_info()["bytes_per_block"][0])
    probe.close()
    llm, trace = traced_llm(str(checkpoint(name)), max_num_batched_tokens=12, max_model_len=96,
                            kv_cache_memory=40 * per_block)  # fmt: skip
    with llm:
        warm = llm.generate(token_prompts([shared + [5]]), GREEDY, use_tqdm=False)  # caches the shared prefix
        outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert_matches_reference(warm + outputs, refs, [shared + [5]] + prompts)
        assert_all_blocks_free(llm.engine)
        assert llm.engine.scheduler.num_preemptions > 0
        assert (native_steps(llm) > 0) == native  # the C decode loop, partial rotary included
    assert all(o.num_cached_tokens >= 20 for o in outputs[:3]), [o.num_cached_tokens for o in outputs]
    assert any(c.start > WINDOW and len(c.token_ids) > 1 for step in trace.steps for c in step.chunks)
    assert any(not c.sample for step in trace.steps for c in step.chunks)


def test_the_window_and_the_long_factors_change_the_output(
    checkpoint: CheckpointCache, hf_reference: ReferenceCache, tmp_path: Any
) -> None:
    """Parity above would pass with either ignored only if they made no difference: they do."""
    prompts = make_prompts(vocab_size_of(PHI3), 3, seed=8, min_len=40, max_len=60)
    refs = hf_reference(PHI3, prompts, MAX_TOKENS)
    base = json.loads((checkpoint(PHI3) / "config.json").read_text())
    rope = base["rope_parameters"]
    for change in ({"sliding_window": None}, {"rope_parameters": {**rope, "long_factor": rope["short_factor"]}}):
        other = tmp_path / next(iter(change))
        shutil.copytree(checkpoint(PHI3), other)
        (other / "config.json").write_text(json.dumps({**base, **change}))
        with LLM(str(other), kv_cache_memory="2MiB", max_model_len=128) as llm:
            outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert any(o.outputs[0].token_ids != r.token_ids for o, r in zip(outputs, refs)), change


@torch.no_grad()
def _greedy_prefilled_in_pieces(model: Any, prompt: list[int], first: int, max_tokens: int) -> list[int]:
    """transformers' greedy tokens with the prompt's first ``first`` tokens in one call and the rest one call
    per token: each call's largest position picks its factor set, so every position past ``first`` gets the
    set of its own position."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)

    def step(ids: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(ids))[None]
        return model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=True, cache=cache).logits[0, -1]

    logits = step(prompt[:first], 0)
    for p in range(first, len(prompt)):
        logits = step([prompt[p]], p)
    tokens = []
    for _ in range(max_tokens):
        tokens.append(int(torch.argmax(logits)))
        logits = step([tokens[-1]], len(prompt) + len(tokens) - 1)
    return tokens


def test_a_prompt_longer_than_the_original_length_follows_the_per_position_rule(
    checkpoint: CheckpointCache, hf_reference: ReferenceCache
) -> None:
    """The documented difference, pinned down: for a prompt longer than original_max_position_embeddings,
    transformers' single prefill rotates all of it with the long factors (other tokens here); nanoserve's
    per-position table equals transformers fed the first 64 prompt tokens in one call and the rest one by one."""
    prompts = make_prompts(vocab_size_of(PHI3), 2, seed=9, min_len=70, max_len=80)
    model = hf_reference.model(PHI3)
    with LLM(str(checkpoint(PHI3)), block_size=4, kv_cache_memory="2MiB", max_model_len=128, max_num_batched_tokens=24) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
    assert got == [_greedy_prefilled_in_pieces(model, p, ORIGINAL, MAX_TOKENS) for p in prompts]
    assert got != [r.token_ids for r in hf_reference(PHI3, prompts, MAX_TOKENS)]
