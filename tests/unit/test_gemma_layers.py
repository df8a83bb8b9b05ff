"""Gemma's pieces one at a time against transformers' own modules (or a float64 reference): attention logit
soft-capping on every path (the C decode kernel, torch decode, torch prefill with a cached prefix and a window),
the (1 + w) RMSNorm (torch and C), GeGLU, the scaled embedding's rounding, and the rope of each layer type from
5.x- and 4.x-shaped Gemma 3 configs."""

from __future__ import annotations

import pytest
import torch

from nanoserve.layers import attention, native
from nanoserve.layers.norm import GemmaRMSNorm
from nanoserve.layers.rotary import RotaryEmbedding, rope_layer_types
from tests.unit.test_native_kernels import reference_decode


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def lib():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the engine uses torch ops (covered by the parity tests)")
    built = native.load()
    assert built is not None
    return built


def paged_case(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int, lens: list[int]):
    """A random paged cache, scattered block tables and one query per sequence (strided rows)."""
    g = gen(seed)
    num_blocks, max_blocks = 48, -(-max(lens) // block_size)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g) * 2.0
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in lens])
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim, generator=g) * 2.0
    q = qkv[:, : heads * head_dim].view(len(lens), heads, head_dim)
    return q, kv_cache, tables, torch.tensor(lens)


@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 16, 4), (6, 1, 32, 8), (4, 4, 64, 16)])
def test_softcapped_decode_c_kernel_and_torch_match_the_reference(
    lib, heads: int, kv_heads: int, head_dim: int, block_size: int, window: int
) -> None:
    lens = [1, 7, block_size, 37, 50]
    q, kv_cache, tables, lens_t = paged_case(heads * head_dim + window, heads, kv_heads, head_dim, block_size, lens)
    scale, softcap = 24**-0.5, 4.0  # scores of ~ +-6: tanh bends them
    want = reference_decode(q, kv_cache, tables, lens_t, scale, window, softcap)
    assert not torch.allclose(want, reference_decode(q, kv_cache, tables, lens_t, scale, window, 0.0), atol=1e-3)

    out = torch.empty(q.shape)
    native.paged_decode_attention(lib, q, kv_cache, tables, lens_t, scale, out, window, softcap)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)

    meta = attention.AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long), num_decode_tokens=len(lens), decode_block_tables=tables,
        decode_context_lens=lens_t, prefill_query_starts=[], prefill_query_lens=[], prefill_context_lens=[],
        prefill_block_tables=[], decode_max_context=max(lens),
    )  # fmt: skip
    torch_out = attention._decode_sdpa(q, kv_cache, meta, scale, window, softcap)
    torch.testing.assert_close(torch_out, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("window", [0, 8])
def test_softcapped_prefill_matches_transformers_eager_attention(window: int) -> None:
    """A chunk of 9 queries over 14 cached keys (and without a cache), against transformers' Gemma 2 eager
    attention with its own sliding-window mask arithmetic written out."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    g = gen(window)
    heads, kv_heads, head_dim, block_size, cached, q_len = 4, 2, 16, 4, 14, 9
    ctx = cached + q_len
    k_all = torch.randn(ctx, kv_heads, head_dim, generator=g) * 2.0
    v_all = torch.randn(ctx, kv_heads, head_dim, generator=g)
    q = torch.randn(q_len, heads, head_dim, generator=g) * 2.0
    scale, softcap = 24**-0.5, 4.0

    # transformers: [1, H, S, D] with an additive mask over all ctx keys
    q_pos, k_pos = torch.arange(cached, ctx)[:, None], torch.arange(ctx)[None, :]
    visible = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    mask = torch.zeros(q_len, ctx).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]

    class Module:
        num_key_value_groups = heads // kv_heads
        training = False

    want, _ = eager_attention_forward(
        Module(), q.transpose(0, 1)[None], k_all.transpose(0, 1)[None], v_all.transpose(0, 1)[None], mask,
        scaling=scale, softcap=softcap,
    )  # fmt: skip
    want = want[0]  # [S, H, D]

    num_blocks = 16
    kv_cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"))  # unwritten: NaN
    table = torch.tensor([9, 3, 12, 5, 0, 7])
    slots = table[torch.arange(ctx) // block_size] * block_size + torch.arange(ctx) % block_size
    kv_cache[0].view(-1, kv_heads, head_dim)[slots] = k_all
    kv_cache[1].view(-1, kv_heads, head_dim)[slots] = v_all
    out = torch.empty(q_len, heads, head_dim)
    meta = attention.AttentionMetadata(
        slot_mapping=slots[cached:], num_decode_tokens=0, decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long), prefill_query_starts=[0], prefill_query_lens=[q_len],
        prefill_context_lens=[ctx], prefill_block_tables=[table],
    )  # fmt: skip
    attention._prefill_sdpa(q, k_all[cached:], v_all[cached:], kv_cache, meta, scale, out, window, softcap)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)

    # a whole prompt at once (no cached prefix): the causal-mask branch
    alone = torch.empty(ctx, heads, head_dim)
    q_full = torch.randn(ctx, heads, head_dim, generator=g) * 2.0
    meta_full = attention.AttentionMetadata(
        slot_mapping=slots, num_decode_tokens=0, decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long), prefill_query_starts=[0], prefill_query_lens=[ctx],
        prefill_context_lens=[ctx], prefill_block_tables=[table],
    )  # fmt: skip
    attention._prefill_sdpa(q_full, k_all, v_all, kv_cache, meta_full, scale, alone, window, softcap)
    rows, cols = torch.arange(ctx)[:, None], torch.arange(ctx)[None, :]
    full_visible = (cols <= rows) & ((cols > rows - window) if window else True)
    full_mask = torch.zeros(ctx, ctx).masked_fill(~full_visible, torch.finfo(torch.float32).min)[None, None]
    want_full, _ = eager_attention_forward(
        Module(), q_full.transpose(0, 1)[None], k_all.transpose(0, 1)[None], v_all.transpose(0, 1)[None], full_mask,
        scaling=scale, softcap=softcap,
    )  # fmt: skip
    torch.testing.assert_close(alone, want_full[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_matches_transformers(lib, dtype: torch.dtype) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = gen(3)
    hidden = 64
    theirs = Gemma3RMSNorm(hidden, eps=1e-6)
    theirs.weight.data = (torch.rand(hidden, generator=g) - 0.5).to(dtype)
    x = (torch.randn(5, hidden, generator=g) * 3).to(dtype)
    residual = (torch.randn(5, hidden, generator=g) * 3).to(dtype)
    for kernels in (None, lib if dtype == torch.float32 else None):
        ours = GemmaRMSNorm(hidden, 1e-6, dtype, kernels)
        ours.weight.weight_loader(ours.weight, theirs.weight.data)
        assert ours.weight.dtype == torch.float32  # 1 + w kept in float32, as transformers computes it
        got = ours(x)
        torch.testing.assert_close(got, theirs(x), rtol=1e-6 if kernels is None else 2e-6, atol=1e-6)
        if kernels is None:
            assert torch.equal(got, theirs(x))  # the torch path is transformers' arithmetic exactly
        summed, new_residual = ours(x, residual.clone())
        assert torch.equal(new_residual, x + residual)
        torch.testing.assert_close(summed, theirs(x + residual), rtol=2e-6, atol=1e-6)


def test_geglu_and_embedding_scale_round_as_transformers_do() -> None:
    from transformers.activations import ACT2FN

    from nanoserve.models.decoder import _ACTIVATIONS

    x = torch.randn(1000, generator=gen(1)) * 4
    assert torch.equal(_ACTIVATIONS["gelu_pytorch_tanh"](x), ACT2FN["gelu_pytorch_tanh"](x))
    # Gemma's normalizer is a tensor in the embedding's dtype: sqrt(3072) = 55.43 becomes 55.5 in bfloat16
    assert float(torch.tensor(3072**0.5).to(torch.bfloat16)) == 55.5


def gemma3_text_config(**overrides):
    from transformers import Gemma3TextConfig

    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip
    return Gemma3TextConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    "shape",
    [
        # transformers 5: rope_parameters keyed by layer type
        dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        # transformers 4.x: rope_theta and rope_scaling for the global layers, rope_local_base_freq for the local
        dict(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=1e4),
    ],
    ids=["v5", "v4"],
)  # fmt: skip
def test_each_layer_type_gets_its_own_rope(shape: dict) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = gemma3_text_config(**shape)
    assert rope_layer_types(config) == config.layer_types
    theirs = Gemma3RotaryEmbedding(config)
    positions = torch.arange(100)
    x = torch.zeros(1, dtype=torch.float32)
    tables = {}
    for layer_type in ("sliding_attention", "full_attention"):
        cos, sin = theirs(x, positions[None], layer_type)
        ours = RotaryEmbedding(16, 100, config, torch.float32, layer_type)
        assert torch.equal(ours.cos, cos[0]) and torch.equal(ours.sin, sin[0])
        tables[layer_type] = ours.cos
    assert not torch.allclose(tables["sliding_attention"], tables["full_attention"])


def test_one_rope_table_without_per_type_rope() -> None:
    from transformers import Gemma2Config, LlamaConfig

    gemma2 = Gemma2Config(num_hidden_layers=4, head_dim=16, hidden_size=32, num_attention_heads=2)
    assert rope_layer_types(gemma2) == [None] * 4  # local and global layers, one rope
    assert rope_layer_types(LlamaConfig(num_hidden_layers=2)) == [None] * 2


def test_a_bidirectional_gemma_config_is_refused() -> None:
    from nanoserve.models.gemma import Gemma3ForCausalLM

    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma3ForCausalLM.flags_for(gemma3_text_config(use_bidirectional_attention=True))
    assert Gemma3ForCausalLM.flags_for(gemma3_text_config()).qk_norm
