"""The experts layer (layers/moe.py) against a plain torch reference that runs every expert on every token:
every expert chosen, some never chosen (their weights poisoned with NaN, so reading them would show), one
token, many tokens; its weight loader on both checkpoint layouts and on tensor-parallel slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers.moe import DOWN, GATE, UP, ExpertPart, FusedMoE, SparseMoeBlock, route

E, H, INTER = 8, 16, 12


def reference_moe(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, router_logits: torch.Tensor,
    top_k: int, renormalize: bool,
) -> torch.Tensor:
    """Token by token, every expert computed; its output counted with the token's routing weight (0 unless
    chosen). ``gate``/``up``: [E, I, H]; ``down``: [E, H, I]."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    top, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(gate.shape[0]):
            y = (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])) @ down[e].T
            w = top[t][ids[t] == e].sum()  # 0 when e was not chosen
            if w != 0:
                out[t] += w * y
    return out


def make_weights(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(E, INTER, H, generator=g) * 0.3,
        torch.randn(E, INTER, H, generator=g) * 0.3,
        torch.randn(E, H, INTER, generator=g) * 0.3,
    )


def loaded_layer(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, top_k: int, renormalize: bool,
    tp: TPGroup | None = None, per_expert: bool = True,
) -> FusedMoE:
    layer = FusedMoE(E, top_k, H, INTER, renormalize, torch.float32, tp or TPGroup())
    if per_expert:
        for e in range(E):
            layer.weight_loader(layer.gate_up_proj, gate[e], ExpertPart(e, GATE))
            layer.weight_loader(layer.gate_up_proj, up[e], ExpertPart(e, UP))
            layer.weight_loader(layer.down_proj, down[e], ExpertPart(e, DOWN))
    else:  # the stacked layout: [E, 2I, H] (gate rows, then up rows) and [E, H, I]
        layer.weight_loader(layer.gate_up_proj, torch.cat([gate, up], dim=1), "gate_up")
        layer.weight_loader(layer.down_proj, down, "down")
    return layer


@pytest.mark.parametrize(
    "num_tokens, top_k, renormalize",
    [(1, 2, True), (1, 1, False), (5, 3, False), (64, 2, True), (300, 2, False), (40, 8, True)],
    ids=["one-token", "one-token-top1", "few-top3", "many", "very-many-no-renorm", "top-k-is-all"],
)
def test_matches_every_expert_reference(num_tokens: int, top_k: int, renormalize: bool) -> None:
    gate, up, down = make_weights(num_tokens)
    g = torch.Generator().manual_seed(100 + num_tokens)
    x = torch.randn(num_tokens, H, generator=g)
    logits = torch.randn(num_tokens, E, generator=g) * 2
    layer = loaded_layer(gate, up, down, top_k, renormalize)
    got = layer(x, logits)
    want = reference_moe(x, gate, up, down, logits, top_k, renormalize)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if num_tokens >= 40:  # the batch really chose every expert
        assert set(route(logits, top_k, renormalize)[1].flatten().tolist()) == set(range(E))


@pytest.mark.parametrize("num_tokens", [1, 50])
def test_experts_nobody_chose_are_never_read(num_tokens: int) -> None:
    gate, up, down = make_weights(7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(num_tokens, H, generator=g)
    logits = torch.randn(num_tokens, E, generator=g)
    unused = [1, 4, 5, 7]
    logits[:, unused] -= 100.0  # these never reach the top 2
    want = reference_moe(x, gate, up, down, logits, 2, True)
    for e in unused:  # if the layer ran an unchosen expert (even times 0), NaN would reach the output
        gate[e], up[e], down[e] = float("nan"), float("nan"), float("nan")
    got = loaded_layer(gate, up, down, 2, True)(x, logits)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_token_gives_an_empty_output() -> None:
    gate, up, down = make_weights(3)
    out = loaded_layer(gate, up, down, 2, True)(torch.empty(0, H), torch.empty(0, E))
    assert out.shape == (0, H)


def test_both_layouts_load_the_same_weights() -> None:
    gate, up, down = make_weights(4)
    a = loaded_layer(gate, up, down, 2, True, per_expert=True)
    b = loaded_layer(gate, up, down, 2, True, per_expert=False)
    assert torch.equal(a.gate_up_proj, b.gate_up_proj) and torch.equal(a.down_proj, b.down_proj)
    assert torch.equal(a.gate_up_proj[3, :INTER], gate[3]) and torch.equal(a.gate_up_proj[3, INTER:], up[3])


@pytest.mark.parametrize("per_expert", [True, False], ids=["per-expert", "stacked"])
def test_tensor_parallel_shards_sum_to_the_whole(per_expert: bool) -> None:
    """Rank r holds intermediate rows [r I/2, (r+1) I/2) of each expert; the ranks' partial sums (what the
    all-reduce adds) equal the unsharded layer's output."""
    gate, up, down = make_weights(5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, H, generator=g)
    weights, ids = route(torch.randn(30, E, generator=g), 2, True)
    whole = loaded_layer(gate, up, down, 2, True).experts(x, weights, ids)
    shards = [loaded_layer(gate, up, down, 2, True, TPGroup(rank=r, size=2), per_expert) for r in range(2)]
    half = INTER // 2
    for r, shard in enumerate(shards):
        assert shard.gate_up_proj.shape == (E, INTER, H) and shard.down_proj.shape == (E, H, half)
        assert torch.equal(shard.gate_up_proj[:, half:], up[:, r * half : (r + 1) * half])
    partial = sum(s.experts(x, weights, ids) for s in shards)
    torch.testing.assert_close(partial, whole, rtol=1e-5, atol=1e-5)


def test_bad_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\).*number of experts \(8\)"):
        FusedMoE(8, 9, H, INTER, True, torch.float32, TPGroup())
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(12\) is not divisible by tensor_parallel_size \(5\)"):
        FusedMoE(8, 2, H, INTER, True, torch.float32, TPGroup(rank=0, size=5))
    with pytest.raises(ValueError, match="only 'silu'"):
        SparseMoeBlock(H, 8, 2, INTER, True, torch.float32, TPGroup(), hidden_act="gelu")
    layer = FusedMoE(8, 2, H, INTER, True, torch.float32, TPGroup())
    with pytest.raises(ValueError, match=r"shape mismatch: checkpoint \(12, 15\) vs expected \(12, 16\)"):
        layer.weight_loader(layer.gate_up_proj, torch.zeros(INTER, H - 1), ExpertPart(0, GATE))
    with pytest.raises(ValueError, match="expert 8 does not exist"):
        layer.weight_loader(layer.gate_up_proj, torch.zeros(INTER, H), ExpertPart(8, GATE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_bit_identical_to_transformers_block(arch: str, dtype: torch.dtype) -> None:
    """transformers' own sparse block (eager experts loop) on the same weights: the same bits, in float32 and in
    bfloat16 (where Mixtral's float32 routing weights and Qwen3-MoE's rounded ones differ)."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if arch == "qwen3_moe":
        config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=2)
        config._experts_implementation = "eager"
        theirs, renormalize, float32_weights = Qwen3MoeSparseMoeBlock(config), config.norm_topk_prob, False
    else:
        config = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=2)
        config._experts_implementation = "eager"
        theirs, renormalize, float32_weights = MixtralSparseMoeBlock(config), True, True
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs = theirs.to(dtype).eval()
    ours = SparseMoeBlock(H, E, 2, INTER, renormalize, dtype, TPGroup(), float32_weights=float32_weights)
    ours.experts.gate_up_proj.data.copy_(theirs.experts.gate_up_proj)
    ours.experts.down_proj.data.copy_(theirs.experts.down_proj)
    ours.gate.weight.data.copy_(theirs.gate.weight)
    x = torch.randn(1, 50, H, generator=g).to(dtype)
    with torch.no_grad():
        want = theirs(x)
        want = want[0] if isinstance(want, tuple) else want
        assert torch.equal(ours(x[0]), want[0])
