"""The CPU fast path against its pure-torch reference: each C kernel of ``nanoserve.layers.native`` on random
inputs (odd lengths, GQA/MQA/MHA, strided rows, blocks out of order), the oneDNN-packed linear, and a whole
engine with and without the fast path producing the same greedy tokens and log-probs."""

from __future__ import annotations

import psutil
import pytest
import torch
import torch.nn.functional as F

from nanoserve import LLM, SamplingParams
from nanoserve.layers import native
from nanoserve.layers.linear import PACKED_CHUNK_ROWS, ReplicatedLinear, pack_weight, packed_linear, packed_row_bucket
from nanoserve.layers.norm import RMSNorm
from nanoserve.layers.rotary import apply_rotary
from nanoserve.testing.checkpoints import build_checkpoint
from tests.conftest import make_prompts, token_prompts, vocab_size_of


@pytest.fixture(scope="module")
def lib():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the engine uses torch ops (covered by the parity tests)")
    built = native.load()
    assert built is not None, "a C compiler is present but the native kernels failed to build"
    return built


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("hidden,tokens", [(64, 1), (576, 7), (1024, 40)])
def test_rms_norm_with_and_without_residual(lib, hidden: int, tokens: int) -> None:
    g = gen(hidden)
    norm = RMSNorm(hidden, 1e-5, torch.float32)
    norm.weight.data = torch.rand(hidden, generator=g) + 0.5
    wide = torch.randn(tokens, 3 * hidden, generator=g)
    x = wide[:, hidden : 2 * hidden]  # strided rows, as the kernel may receive them
    residual = torch.randn(tokens, hidden, generator=g)
    want_plain = norm._norm(x)
    want_sum = x + residual
    want = norm._norm(want_sum)
    got_plain = native.add_rms_norm(lib, x, None, norm.weight, norm.eps)
    res = residual.clone()
    got = native.add_rms_norm(lib, x, res, norm.weight, norm.eps)
    torch.testing.assert_close(got_plain, want_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, want_sum, rtol=0, atol=0)  # the residual sum is exact
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 16), (2, 2, 128)])
def test_qk_norm_rope_store_matches_torch_and_fills_the_right_slots(lib, qk_norm, heads, kv_heads, head_dim) -> None:
    g = gen(heads * 100 + head_dim)
    tokens, positions_max, num_slots = 11, 300, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    positions = torch.randint(0, positions_max, (tokens,), generator=g)
    freqs = torch.rand(positions_max, head_dim // 2, generator=g) * 3
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q_w = torch.rand(head_dim, generator=g) + 0.5 if qk_norm else None
    k_w = torch.rand(head_dim, generator=g) + 0.5 if qk_norm else None
    slots = torch.randperm(num_slots, generator=g)[:tokens]
    kv_cache = torch.zeros(2, num_slots // 4, 4, kv_heads, head_dim)

    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim).clone()
    if qk_norm:
        qn, kn = RMSNorm(head_dim, 1e-6, torch.float32), RMSNorm(head_dim, 1e-6, torch.float32)
        qn.weight.data, kn.weight.data = q_w, k_w
        q, k = qn._norm(q), kn._norm(k)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    want_q, want_k = apply_rotary(q, c, s), apply_rotary(k, c, s)

    native.qk_norm_rope_store(lib, qkv, heads, kv_heads, head_dim, cos, sin, positions, q_w, k_w, 1e-6, slots, kv_cache)
    got_q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    got_k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    flat_k = kv_cache[0].view(-1, kv_heads, head_dim)
    flat_v = kv_cache[1].view(-1, kv_heads, head_dim)
    torch.testing.assert_close(flat_k[slots], got_k, rtol=0, atol=0)
    torch.testing.assert_close(flat_v[slots], v, rtol=0, atol=0)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (2, 2, 128)])
def test_qk_norm_rope_store_into_a_half_cache_rounds_as_torch_does(lib, heads, kv_heads, head_dim) -> None:
    """kv_cache_dtype float16: the stored k and v are torch's float16 rounding (nearest, ties to even) of the
    float32 results, bit for bit; q stays float32 and equal to the float32 kernel's."""
    if not lib.kv_half:
        pytest.skip("the kernels were built without F16C: float16 caches take the torch path")
    g = gen(heads * 10 + head_dim)
    tokens, num_slots = 9, 48
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 3
    # Ties between two halves (1 + 2^-11 lies halfway between 1 and 1 + 2^-10), tiny (subnormal) and huge values.
    v0 = (heads + kv_heads) * head_dim
    qkv[0, v0 : v0 + 4] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 3e-6, 7e4])
    positions = torch.randint(0, 100, (tokens,), generator=g)
    emb = torch.rand(100, head_dim // 2, generator=g).repeat(1, 2) * 3
    cos, sin = emb.cos(), emb.sin()
    slots = torch.randperm(num_slots, generator=g)[:tokens]
    full = torch.zeros(2, num_slots // 4, 4, kv_heads, head_dim)
    half = torch.zeros(2, num_slots // 4, 4, kv_heads, head_dim, dtype=torch.float16)
    qkv_full = qkv.clone()
    native.qk_norm_rope_store(lib, qkv_full, heads, kv_heads, head_dim, cos, sin, positions, None, None, 0.0, slots, full)
    native.qk_norm_rope_store(lib, qkv, heads, kv_heads, head_dim, cos, sin, positions, None, None, 0.0, slots, half)
    assert torch.equal(qkv, qkv_full)
    assert torch.equal(half.view(torch.int16), full.half().view(torch.int16))
    assert half[1].view(-1, kv_heads, head_dim)[slots[0]].flatten()[:4].tolist() == [1.0, 1 + 2 * 2**-10, 50 * 2**-24, float("inf")]


@pytest.mark.parametrize("tokens,inter", [(1, 8), (5, 1536), (300, 64)])
def test_silu_mul(lib, tokens: int, inter: int) -> None:
    gate_up = torch.randn(tokens, 2 * inter, generator=gen(inter)) * 6  # reaches exp's clamped range
    gate_up[0, 0], gate_up[-1, inter - 1] = -200.0, 150.0
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(native.silu_mul(lib, gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def reference_decode(q, kv_cache, tables, lens, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Dense float64 attention of each sequence's one query over its cached tokens: softmax(c * tanh(scale *
    q.k / c)) v (no tanh for c = 0) over the last ``window`` keys (all for 0)."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    out = torch.empty_like(q)
    group = q.shape[1] // kv_heads
    for d in range(q.shape[0]):
        n = int(lens[d])
        pos = torch.arange(max(0, n - window) if window else 0, n)
        slots = tables[d][pos // block_size] * block_size + pos % block_size
        k = kv_cache[0].reshape(-1, kv_heads, head_dim)[slots].double().repeat_interleave(group, 1)
        v = kv_cache[1].reshape(-1, kv_heads, head_dim)[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[d].double(), k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out[d] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).float()
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,num_seqs",
    [(9, 3, 64, 16, 7), (4, 1, 16, 4, 3), (4, 4, 32, 8, 1), (16, 8, 128, 16, 2), (6, 2, 24, 5, 9)],
)
def test_paged_decode_attention(lib, heads, kv_heads, head_dim, block_size, num_seqs) -> None:
    g = gen(heads + head_dim + block_size)
    num_blocks = 64
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    max_blocks = 6
    # Lengths include 1, exact block multiples and a full table; blocks are scattered and out of order.
    lens = torch.randint(1, max_blocks * block_size + 1, (num_seqs,), generator=g)
    lens[0] = 1
    if num_seqs > 2:
        lens[1], lens[2] = block_size, max_blocks * block_size
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(num_seqs)])
    qkv = torch.randn(num_seqs, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, : heads * head_dim].view(num_seqs, heads, head_dim)  # strided rows, as in the engine
    out = torch.empty(num_seqs, heads, head_dim)
    scale = head_dim**-0.5
    native.paged_decode_attention(lib, q, kv_cache, tables, lens, scale, out)
    torch.testing.assert_close(out, reference_decode(q, kv_cache, tables, lens, scale), rtol=1e-5, atol=2e-6)
    if lib.kv_half:  # kv_cache_dtype float16: the same attention over the cache's float16 values
        half = kv_cache.half()
        out.fill_(float("nan"))  # a kernel that writes nothing must not pass on the float32 result
        native.paged_decode_attention(lib, q, half, tables, lens, scale, out)
        torch.testing.assert_close(out, reference_decode(q, half.float(), tables, lens, scale), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,lens,window,softcap",
    [
        (16, 8, 128, 16, [700], 0, 0.0),  # one long sequence: many units, combined
        (8, 2, 96, 16, [1, 33, 1000, 64], 0, 0.0),  # a 64 + 32 head; short and long sequences together
        (6, 3, 40, 5, [417, 2, 260], 100, 4.0),  # blocks of 5 (8-key groups cross them), a window mid-block
        (4, 4, 32, 8, [1300], 37, 0.0),  # the window inside one unit of a long sequence
    ],
)
def test_paged_decode_attention_over_long_contexts(lib, heads, kv_heads, head_dim, block_size, lens, window, softcap) -> None:
    """Long contexts are split into units of whole blocks whose partial softmaxes are combined (see
    paged_decode_attention_share): the result matches the dense reference, and is the same bit for bit on one
    thread and on two (the split must not depend on the thread count: the C decode step runs on two threads
    and the per-layer path it is tested against on one)."""
    g = gen(sum(lens) + window)
    lens_t = torch.tensor(lens)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = max_blocks * len(lens) + 3
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: max_blocks * len(lens)].view(len(lens), max_blocks)
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim, generator=g) * 2  # peaked softmaxes
    q = qkv[:, : heads * head_dim].view(len(lens), heads, head_dim)
    scale = head_dim**-0.5
    caches = [kv_cache] + ([kv_cache.half()] if lib.kv_half else [])
    for cache in caches:
        want = reference_decode(q, cache.float(), tables, lens_t, scale, window, softcap)
        outs = []
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)  # the kernels share torch's OpenMP runtime
            try:
                out = torch.full((len(lens), heads, head_dim), float("nan"))
                native.paged_decode_attention(lib, q, cache, tables, lens_t, scale, out, window, softcap)
            finally:
                torch.set_num_threads(before)
            outs.append(out)
        torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=2e-6)
        assert torch.equal(outs[0], outs[1])


def test_paired_query_heads_are_bit_identical_to_one_at_a_time(lib, tmp_path) -> None:
    """Where the build has 32 vector registers (AVX-512VL), attention takes the query heads of a KV head two at
    a time, loading each cached key and value once for both; each head's sums keep their order, so the output is
    that of an AVX2 build (one head at a time) bit for bit: groups of 1-4 heads, head sizes that are and are not
    multiples of 64, both cache types."""
    import ctypes

    flags = native._cpu_flags()
    if "avx512vl" not in flags or not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("the pairs exist only in AVX-512VL builds, and the AVX2 build must run here to compare")
    target = tmp_path / "nanoserve_kernels_avx2.so"
    native._compile(native._compiler(), native._FLAGS + ["-mavx2", "-mfma", "-mf16c"], target)
    avx2 = ctypes.CDLL(str(target))
    native._declare(avx2)
    avx2.kv_half = bool(avx2.kv_half_supported())
    g = gen(5)
    for heads, kv_heads, head_dim in ((16, 8, 128), (9, 3, 64), (8, 2, 96), (4, 4, 32), (12, 3, 128)):
        lens = torch.tensor([1, 40, 301])
        kv_cache = torch.randn(2, 64, 16, kv_heads, head_dim, generator=g)
        tables = torch.randperm(64, generator=g)[:60].view(3, 20)
        q = torch.randn(3, heads, head_dim, generator=g)
        for cache in (kv_cache, kv_cache.half()):
            outs = []
            for kernels in (lib, avx2):
                out = torch.full((3, heads, head_dim), float("nan"))
                native.paged_decode_attention(kernels, q, cache, tables, lens, head_dim**-0.5, out)
                outs.append(out)
            assert torch.equal(outs[0], outs[1]), (heads, kv_heads, head_dim, cache.dtype)


def test_packed_linear_matches_dense_and_releases_the_dense_weight() -> None:
    g = gen(7)
    layer = ReplicatedLinear(96, 200, bias=True, dtype=torch.float32)
    layer.weight.data = torch.randn(200, 96, generator=g)
    layer.bias.data = torch.randn(200, generator=g)
    x = torch.randn(13, 96, generator=g)
    want = F.linear(x, layer.weight, layer.bias)
    if pack_weight(layer.weight) is None:
        pytest.skip("this torch build has no oneDNN linear")
    assert layer.pack_for_cpu()
    assert layer.weight.numel() == 0  # memory does not grow: the dense copy is gone
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_engine_with_and_without_the_fast_path_agree(lib, checkpoint, monkeypatch) -> None:
    """Greedy tokens and log-probs with native kernels + packed weights equal those of the pure-torch path,
    through chunked prefill (budget 24 tokens) and decode with small blocks."""
    name = "qwen3-gqa"  # q/k norms, head_dim decoupled from hidden/heads
    prompts = make_prompts(vocab_size_of(name), 5, seed=11, min_len=3, max_len=50)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, logprobs=0)
    opts = dict(block_size=4, kv_cache_memory="1MiB", max_model_len=128, max_num_batched_tokens=24)
    results = {}
    for fast in (True, False):
        monkeypatch.setenv(native.NATIVE_ENV, "1" if fast else "0")
        monkeypatch.setenv("NANOSERVE_PACK_WEIGHTS", "1" if fast else "0")
        monkeypatch.setenv("NANOSERVE_ATTENTION_BACKEND", "cpu_native" if fast else "torch_sdpa")
        with LLM(str(checkpoint(name)), **opts) as llm:
            layer = llm.engine.executor.runner.model.model.layers[0]
            assert (layer.self_attn.kernels is not None) == fast
            results[fast] = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    for fast_out, ref_out in zip(results[True], results[False]):
        (a,), (b,) = fast_out.outputs, ref_out.outputs
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-4)


def test_odd_shapes_fall_back_to_torch(tmp_path, monkeypatch) -> None:
    """head_dim 12 (not a multiple of 16) and hidden 36: the kernels do not apply, the engine still runs."""
    path = build_checkpoint(tmp_path / "odd", arch="llama", hidden_size=36, num_attention_heads=3,
                            num_key_value_heads=1, intermediate_size=20, vocab_size=320)  # fmt: skip
    with LLM(str(path), kv_cache_memory="1MiB", max_model_len=64) as llm:
        model = llm.engine.executor.runner.model.model
        assert model.layers[0].self_attn.kernels is None and model.norm.kernels is None
        (out,) = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("rows", [1, 16, 17, 63, 65, 255, 256, 257, 700])
def test_packed_linear_pads_and_chunks_rows_without_changing_the_product(rows: int) -> None:
    g = gen(rows)
    weight, bias = torch.randn(300, 70, generator=g), torch.randn(300, generator=g)
    packed = pack_weight(weight)
    if packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    x = torch.randn(rows, 70, generator=g)
    torch.testing.assert_close(packed_linear(x, packed, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_packed_linear_memory_stays_flat_over_every_row_count() -> None:
    """oneDNN keeps state per distinct row count: unbucketed, rows 1..800 on this 256x256 weight grow the RSS
    by ~530 MiB (measured). Serving sees every row count, so this is a leak unless rows are bucketed (oneDNN
    path) or the native kernel does the product (no per-shape state)."""
    packed = pack_weight(torch.randn(256, 256, generator=gen(3)))
    if packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    process = psutil.Process()
    packed_linear(torch.randn(1, 256), packed, None)
    before = process.memory_info().rss
    for rows in range(1, 801):
        packed_linear(torch.randn(rows, 256), packed, None)
    grown_mib = (process.memory_info().rss - before) / 2**20
    assert grown_mib < 48, f"RSS grew {grown_mib:.0f} MiB over 800 row counts"
    assert len({packed_row_bucket(r) for r in range(1, PACKED_CHUNK_ROWS + 1)}) <= 32


def _blocked(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``weight`` [N, K] in the layout the native GEMM reads: blocks of ``block`` output rows, each [K][block]
    (the last block zero-padded), built here independently of oneDNN."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // block) * block, k + 5)  # and K padded, as oneDNN may do
    padded[:n, :k] = weight
    return padded.view(-1, block, k + 5).transpose(1, 2).contiguous()


# More than GEMV_MAX_ROWS rows run natively only on 64-row blocks (the only layout oneDNN uses here).
@pytest.mark.parametrize(
    ("block", "rows"),
    [(b, r) for b in (16, 32) for r in (1, 2, 3, 5, 8)] + [(64, r) for r in (1, 2, 3, 5, 8, 9, 20, 64, 193, 450)],
)
def test_native_packed_gemm_matches_dense(lib, block: int, rows: int) -> None:
    g = gen(rows * 100 + block)
    weight, bias = torch.randn(200, 72, generator=g), torch.randn(200, generator=g)
    blocked = _blocked(weight, block)
    x = torch.randn(rows, 80, generator=g)[:, 3:75]  # strided rows, as the engine hands in slices
    for b in (bias, None):
        got = native.packed_gemv(lib, x, blocked.data_ptr(), 200, block, b, padded_in_features=72 + 5)
        torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_pack_weight_recognises_onednn_layout_and_uses_the_native_kernel(lib) -> None:
    g = gen(5)
    weight = torch.randn(192 * 2, 100, generator=g)  # oneDNN pads 100 inputs to 112 in memory
    packed = pack_weight(weight)
    if packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    if torch.backends.cpu.get_cpu_capability() == "AVX2":  # this project's CPU: oneDNN blocks 64 rows here
        assert packed.row_block == 64 and packed.kernels is not None
    for rows in (1, 7, 40, 300):
        x = torch.randn(rows, 100, generator=g)
        torch.testing.assert_close(packed_linear(x, packed, None), F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("vocab", [1, 7, 16, 333, 65_536 * 4 + 13, 151_936])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_argmax_rows_equals_torch_argmax(lib, vocab: int, threads: int) -> None:
    """The greedy pick against torch.argmax on rows of every kind: distinct values, many-way ties (also across the
    threads' shares of a long row and across the eight lanes), NaN (first lane, inside, in the tail, in a later
    share than a larger number), -inf, all equal; strided rows; rows shorter than a vector and odd lengths."""
    g = gen(vocab + threads)
    wide = torch.randn(12, vocab + 5, generator=g)
    x = wide[:, 2 : 2 + vocab]  # rows vocab + 5 apart
    x[1] = torch.randint(0, 3, (vocab,), generator=g).float()  # ties for the maximum everywhere
    x[2] = 0.0
    x[3, -1] = 1e9  # the last value, in the tail after the lanes
    x[4, vocab // 2 :] = x[4, : vocab - vocab // 2].max()  # the maximum again in the second share
    if vocab > 1:
        x[5, vocab - 1], x[5, vocab // 3] = float("nan"), float("nan")  # the first NaN wins, not the last
        x[6, vocab // 2], x[6, 0] = float("nan"), 1e9  # a larger number first, a NaN later
    x[7, 0] = float("nan")
    x[8] = float("-inf")
    x[9, 3 * vocab // 4 :] = float("-inf")
    x[10, -3:] = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernel splits a long row into a share per thread
    try:
        got = native.argmax_rows(lib, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, x.argmax(dim=-1)), (got.tolist(), x.argmax(dim=-1).tolist())
    if vocab > 16:
        assert len(set(got.tolist())) > 4  # the rows really differ


@pytest.mark.parametrize("vocab,rows", [(151_936, [0, 3, 5]), (1000, [1]), (333, [2, 0, 4, 1])])
def test_apply_token_bitmask_equals_the_torch_path(lib, vocab: int, rows: list[int]) -> None:
    """The constrained-decoding mask in place over the listed rows: the same -inf cells as the torch
    reference, other rows untouched, tokens past the vocabulary (the last word's spare bits) ignored."""
    from nanoserve.engine.structured_output import apply_token_bitmask

    g = gen(vocab)
    logits = torch.randn(6, vocab, generator=g)
    words = -(-vocab // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0, : words // 2] = -1  # all-allowed words (the kernel's skip)
    bitmask[-1, -2:] = 0  # all-banned words
    expected = logits.clone()
    masked = expected[rows]
    apply_token_bitmask(masked, bitmask)
    expected[rows] = masked
    native.apply_token_bitmask(lib, logits, rows, bitmask)
    assert torch.equal(logits, expected)
    assert torch.isinf(logits[rows]).any() and not torch.isinf(logits[[r for r in range(6) if r not in rows]]).any()
