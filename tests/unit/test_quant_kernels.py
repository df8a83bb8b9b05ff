"""The low-bit C kernels (``nanoserve/layers/quant_kernels.c``) against the float64 torch reference they are
defined by (``quantization/layout.py``: ``reference_linear``, ``dequantize``), on shapes that stress the
layout: N not a multiple of the 8-row tile, K padded for per-channel weights, every group size, M across the
kernels' row paths, strided x, codes at the extremes and rows whose values change exactly at group edges.
Then the layer path (``QuantizedWeight.matmul``) on either side of ``DEQUANT_GEMM_MIN_ROWS``.

Tolerances are relative to the size of the terms the kernels sum, ``max(sum_k |x_k| |scale| 2^bits + |bias|)``
(:func:`term_scale`), not to ``max|y|``: the kernels compute ``scale * sum(code * x) - scale * zero * sum(x)``,
so a zero weight gives ~1 ulp of those terms rather than 0, and with one output (N = 1, M = 1) ``y`` itself
can cancel to almost nothing. One code wrong in one element moves ``y`` by ~1 / (K 2^bits) of that bound
(~2e-4 at K = 256, 4 bits), far above :data:`REL`. Measured on this machine's build (AVX-512 + AVX-VNNI):
at most 9e-8 of the bound (float32 and int8 activations alike), so :data:`REL` leaves ~10x headroom; single
weights read back (x = I, ``q_dequantize_rows``) matched torch's float32 exactly.
"""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

from nanoserve.layers import native
from nanoserve.layers.linear import ReplicatedLinear
from nanoserve.quantization import layout
from nanoserve.quantization.config import QuantizationConfig, WeightScheme
from nanoserve.quantization.linear import DEQUANT_GEMM_MIN_ROWS, DEQUANT_SLAB_ROWS, QuantizedWeight

REL = 1e-6  # of term_scale(); measured <= 9e-8, see the module docstring
ELEMENT_REL = 1e-6  # one weight read back: of |scale| * 2^bits (measured 0; allows a compiler's FMA contraction)

BITS = (4, 8)
GROUPS = (32, 64, 128, -1)
NS = (1, 7, 13, 37)  # below one tile, one partial tile, tile + partial, several tiles + partial
MS = (1, 2, 3, 8, 9, 17, 64, 300)
LAYOUTS = ("contiguous", "wide-rows", "every-other-row", "column-major")


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: quantized layers use the torch reference (layout.dequantize)")
    built = native.load()
    assert built is not None, "a C compiler is present but the native kernels failed to build"
    return built


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- helpers


def pack(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> tuple[layout.PackedShape, torch.Tensor]:
    n, k = codes.shape
    shape = layout.PackedShape.create(n, k, bits, group_size, zeros is not None)
    buf = layout.allocate(shape)
    layout.write_rows(buf, shape, 0, codes, scales, zeros)
    return shape, buf


def random_weight(
    n: int, k: int, bits: int, group_size: int, asymmetric: bool, seed: int
) -> tuple[layout.PackedShape, torch.Tensor]:
    """Uniform codes over the whole range, scales spread over ~2 decades, integer zero points anywhere."""
    g = gen(seed)
    groups = layout.PackedShape.create(n, k, bits, group_size, asymmetric).num_groups
    top = 1 << bits
    codes = torch.randint(0, top, (n, k), generator=g, dtype=torch.int32)
    scales = torch.exp2(torch.empty(n, groups).uniform_(-9, -2, generator=g))
    zeros = torch.randint(0, top, (n, groups), generator=g).float() if asymmetric else None
    return pack(codes, scales, zeros, bits, group_size)


def random_x(m: int, k: int, seed: int, int8_activations: bool) -> torch.Tensor:
    """[m, k] float32. For int8 activations the values sit at least 0.15 of a step from a rounding tie, so
    the reference's rounding cannot differ from the kernel's by the last bit of ``127 / max|x|`` (see
    ``test_int8_rounding_of_the_reference_matches_the_kernel``); each row's amax is exactly 127 steps."""
    g = gen(seed)
    if not int8_activations:
        return torch.randn(m, k, generator=g)
    step = torch.exp2(torch.empty(m, 1).uniform_(-8, -4, generator=g))
    q = torch.randint(-126, 127, (m, k), generator=g).float() + torch.empty(m, k).uniform_(-0.35, 0.35, generator=g)
    q[torch.arange(m), torch.randint(0, k, (m,), generator=g)] = 127.0 * torch.sign(torch.randn(m, generator=g))
    return step * q


def lay_out(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout (what layers hand the kernel: views of wider tensors)."""
    m, k = x.shape
    if how == "contiguous":
        return x.clone()
    if how == "wide-rows":  # a slice of a fused projection's output
        big = torch.full((m, k + 24), float("nan"))
        big[:, 5 : 5 + k] = x
        return big[:, 5 : 5 + k]
    if how == "every-other-row":
        big = torch.full((2 * m, k), float("nan"))
        big[::2] = x
        return big[::2]
    assert how == "column-major"
    return x.T.contiguous().T


def element_scale(buf: torch.Tensor, shape: layout.PackedShape) -> torch.Tensor:
    """[N, K] |scale| * 2^bits of each element's group: a bound on the terms (code * scale, zero * scale) the
    kernels sum for that element, whatever the weight itself (0 when the code equals the zero point)."""
    _, scales, _ = layout.unpack(buf, shape)
    per_col = scales.double().abs().repeat_interleave(shape.group_size, dim=1)[:, : shape.in_features]
    return per_col * (1 << shape.bits)


def term_scale(x: torch.Tensor, buf: torch.Tensor, shape: layout.PackedShape, bias: torch.Tensor | None) -> float:
    """max over outputs of sum_k |x| scale 2^bits + |bias|: what the kernels' float32 rounding is proportional to."""
    terms = x.double().abs() @ element_scale(buf, shape).T
    if bias is not None:
        terms = terms + bias.double().abs()
    return float(terms.max()) + 1e-30


def assert_matches(got: torch.Tensor, want: torch.Tensor, scale: float, what: str, rel: float = REL) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32, f"{what}: {tuple(got.shape)} {got.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} = {err / scale:.3g} of the terms (allowed {rel:g})"


def reference(x: torch.Tensor, buf, shape, bias, int8: bool) -> torch.Tensor:
    """reference_linear in float64 throughout (x widened first, so only the kernel rounds to float32)."""
    return layout.reference_linear(x.double(), buf, shape, None if bias is None else bias.double(), int8)


# ------------------------------------------------------------------------------------ the kernels exist


def test_the_quantized_kernels_are_built_here(lib: ctypes.CDLL) -> None:
    """Skipped only without a compiler: otherwise every test below runs the C code, not a fallback."""
    for name in ("q_linear_f32", "q_linear_i8", "q_dequant_f32"):
        assert hasattr(lib, name), name
    if native.enabled():
        assert native.kernels_for(torch.float32, "cpu") is lib
    shape, buf = random_weight(8, 32, 4, 32, False, seed=0)
    scheme = WeightScheme(4, 32, False)
    qw = QuantizedWeight("probe", "float", scheme, 8, 32, QuantizationConfig("int4", scheme), lib)
    assert qw.kernels is lib


def test_the_portable_build_matches_reference(lib, tmp_path) -> None:
    """The C fallback that CPUs without AVX2 compile (no -mavx2): built here without the arch flags."""
    target = tmp_path / "nanoserve_kernels_portable.so"
    native._compile(native._compiler(), native._FLAGS, target)
    portable = ctypes.CDLL(str(target))
    native._declare(portable)
    for i, (bits, asymmetric, group_size, int8) in enumerate(
        itertools.product(BITS, (False, True), (32, -1), (False, True))
    ):
        shape, buf = random_weight(13, 96 if group_size == 32 else 40, bits, group_size, asymmetric, seed=70 + i)
        k = shape.in_features
        x = lay_out(random_x(9, k, seed=80 + i, int8_activations=int8), "wide-rows")
        bias = torch.randn(13, generator=gen(i))
        got = native.q_linear(portable, x, buf, shape, bias, int8)
        what = f"int{bits} asym={asymmetric} group {group_size} int8={int8}"
        assert_matches(got, reference(x, buf, shape, bias, int8), term_scale(x, buf, shape, bias), what)
        rows = native.q_dequantize_rows(portable, buf, shape, 8, 5)[:, :k]
        assert ((rows - layout.dequantize(buf, shape)[8:]).abs() <= ELEMENT_REL * element_scale(buf, shape)[8:]).all()


@pytest.mark.parametrize("vnni", [False, True], ids=["avx2", "avx2-vnni"])
def test_the_avx2_build_matches_reference(lib, tmp_path, vnni: bool) -> None:
    """The AVX2 forms (maddubs, or AVX-VNNI dpbusd), which an AVX-512 machine never runs from its own build:
    built here with only those flags, on CPUs that can run them."""
    flags = native._cpu_flags()
    if not {"avx2", "fma"} <= flags or (vnni and "avx_vnni" not in flags):
        pytest.skip("this CPU cannot run the AVX2 build" + (" with AVX-VNNI" if vnni else ""))
    target = tmp_path / f"nanoserve_kernels_avx2_{vnni}.so"
    native._compile(native._compiler(), native._FLAGS + ["-mavx2", "-mfma"] + (["-mavxvnni"] if vnni else []), target)
    avx2 = ctypes.CDLL(str(target))
    native._declare(avx2)
    for i, (bits, asymmetric, group_size, int8) in enumerate(
        itertools.product(BITS, (False, True), (32, 64, 128, -1), (False, True))
    ):
        shape, buf = random_weight(21, 256 if group_size > 0 else 72, bits, group_size, asymmetric, seed=90 + i)
        k = shape.in_features
        for m in (1, 2, 7, 17):
            x = lay_out(random_x(m, k, seed=100 + i + m, int8_activations=int8), "wide-rows")
            bias = torch.randn(21, generator=gen(i))
            got = native.q_linear(avx2, x, buf, shape, bias, int8)
            what = f"int{bits} asym={asymmetric} group {group_size} int8={int8} M={m}"
            assert_matches(got, reference(x, buf, shape, bias, int8), term_scale(x, buf, shape, bias), what)


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", None], ids=["intel-distances", "amd-distances", "off"])
def test_prefetch_distances_leave_results_unchanged(lib, tmp_path, monkeypatch: pytest.MonkeyPatch, vendor: str | None) -> None:
    """The per-vendor prefetch distances (native._prefetch_flags) only move loads earlier: a build with each
    vendor's (or with prefetch off) gives this machine's build's outputs bit for bit, on every kernel path (one
    and several rows, both bits, both activation types)."""
    own = native._prefetch_flags()
    arch = [f for f in native._arch_flags() if f not in own]
    if vendor is None:
        prefetch = ["-DQ_PREFETCH=0", "-DQ_PREFETCH_F32=0"]
    else:
        monkeypatch.setattr(native, "_cpu_vendor", lambda: vendor)
        prefetch = native._prefetch_flags()
    target = tmp_path / "nanoserve_kernels_prefetch.so"
    native._compile(native._compiler(), native._FLAGS + arch + prefetch, target)
    other = ctypes.CDLL(str(target))
    native._declare(other)
    for i, (bits, asymmetric, group_size, int8) in enumerate(
        itertools.product(BITS, (False, True), (32, 128, -1), (False, True))
    ):
        shape, buf = random_weight(45, 512 if group_size > 0 else 200, bits, group_size, asymmetric, seed=300 + i)
        for m in (1, 3, 9, 20):
            x = random_x(m, shape.in_features, seed=400 + i + m, int8_activations=int8)
            want = native.q_linear(lib, x, buf, shape, None, int8)
            got = native.q_linear(other, x, buf, shape, None, int8)
            assert torch.equal(got, want), f"int{bits} asym={asymmetric} group {group_size} int8={int8} M={m}"


# ------------------------------------------------------------------------------------------ q_linear


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-act", "int8-act"])
@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: "channel" if g == -1 else f"g{g}")
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_q_linear_matches_reference(lib, bits: int, asymmetric: bool, group_size: int, int8: bool) -> None:
    k = 256  # 8, 4, 2 or 1 groups
    for i, (n, m) in enumerate(itertools.product(NS, MS)):
        shape, buf = random_weight(n, k, bits, group_size, asymmetric, seed=i)
        x = random_x(m, k, seed=1000 + i, int8_activations=int8)
        for bias, how in ((None, LAYOUTS[i % 4]), (torch.randn(n, generator=gen(i)), LAYOUTS[(i + 1) % 4])):
            xv = lay_out(x, how)
            got = native.q_linear(lib, xv, buf, shape, bias, int8)
            want = reference(x, buf, shape, bias, int8)
            what = f"N={n} M={m} bias={bias is not None} x {how}"
            assert_matches(got, want, term_scale(x, buf, shape, bias), what)


@pytest.mark.parametrize("k", [1, 31, 33, 40, 100])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32-act", "int8-act"])
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_per_channel_with_k_padded_to_32(lib, bits: int, asymmetric: bool, int8: bool, k: int) -> None:
    """Per-channel weights pad K to a multiple of 32 with codes at the zero point: the padding adds nothing,
    however x is laid out (the kernel's x is padded by the wrapper)."""
    for i, (n, m, how) in enumerate(itertools.product((1, 13), (1, 9, 64), LAYOUTS)):
        shape, buf = random_weight(n, k, bits, -1, asymmetric, seed=k * 100 + i)
        assert shape.padded_in == -(-k // 32) * 32 and shape.num_groups == 1
        x = random_x(m, k, seed=k + i, int8_activations=int8)
        bias = torch.randn(n, generator=gen(i)) if i % 2 else None
        got = native.q_linear(lib, lay_out(x, how), buf, shape, bias, int8)
        want = reference(x, buf, shape, bias, int8)
        assert_matches(got, want, term_scale(x, buf, shape, bias), f"K={k} N={n} M={m} x {how}")


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-act", "int8-act"])
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_codes_at_the_extremes(lib, bits: int, asymmetric: bool, int8: bool) -> None:
    """All-0 and all-max codes (every bit of a nibble / byte set or clear), with zero points at both ends:
    sign extension of 8-bit codes and the high nibble of 4-bit ones are where widening goes wrong."""
    n, k, g = 13, 128, 32
    top = (1 << bits) - 1
    x = random_x(9, k, seed=3, int8_activations=int8)
    scales = torch.exp2(torch.empty(n, k // g).uniform_(-6, -2, generator=gen(4)))
    for code, zero in itertools.product((0, top), (0, top, 1 << (bits - 1))):
        if not asymmetric and zero != 1 << (bits - 1):
            continue
        codes = torch.full((n, k), code, dtype=torch.int32)
        zeros = torch.full((n, k // g), float(zero)) if asymmetric else None
        shape, buf = pack(codes, scales, zeros, bits, g)
        w = layout.dequantize(buf, shape)
        torch.testing.assert_close(w, scales.repeat_interleave(g, 1) * (code - zero), rtol=1e-6, atol=0)
        got = native.q_linear(lib, x, buf, shape, None, int8)
        want = reference(x, buf, shape, None, int8)
        # (code == zero: W is 0, but y is only ~0: the kernels sum code * scale - zero * scale)
        assert_matches(got, want, term_scale(x, buf, shape, None), f"codes {code} zero {zero}")


@pytest.mark.parametrize("k", [128, 160, 288], ids=["one-group-of-128", "one-group-of-160", "one-group-of-288"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["x-max", "x-min"])
def test_int4_int8_sums_at_the_int16_limit(lib, k: int, sign: float) -> None:
    """With int8 activations and several rows of x, AVX2 without VNNI sums 4-bit products in int16 over 128
    codes before widening (two product pairs per lane and chunk, 2 x 2 x 15 x 127, over 4 chunks: 30,480 of
    32,767): every code 15 against x = +-127 everywhere is the largest such sum. Larger groups (per-channel,
    K = 160, 288) must widen every 128 codes. Saturation shows as a wrong sum, far outside the tolerance."""
    n, m = 13, 9
    codes = torch.full((n, k), 15, dtype=torch.int32)
    scales = torch.exp2(torch.empty(n, 1).uniform_(-6, -2, generator=gen(11)))
    shape, buf = pack(codes, scales, None, 4, -1)
    assert shape.group_size == k
    x = torch.full((m, k), sign * 0.5)
    x[1] *= 3.0  # a row of another scale, the same codes (+-127 everywhere)
    got = native.q_linear(lib, x, buf, shape, None, True)
    assert_matches(got, reference(x, buf, shape, None, True), term_scale(x, buf, shape, None), f"K={k} sign={sign}")
    want = (scales * 7).T * x.sum(dim=1, keepdim=True)  # (15 - 8) * scale * sum(x): exact in int8 here
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def boundary_weight(bits: int, group_size: int, asymmetric: bool, n: int = 13, k: int = 256):
    """Rows whose codes change exactly at the group edges (a different code in each group, shifted per row)
    with scales 16x apart from one group to the next: an element read against its neighbour group's scale
    or zero point is off by an order of magnitude, not by rounding."""
    groups = k // (k if group_size == -1 else group_size)
    top = (1 << bits) - 1
    group_of = torch.arange(k) // (k // groups)
    codes = ((group_of[None, :] * 5 + torch.arange(n)[:, None] * 3 + 1) % (top + 1)).to(torch.int32)
    codes[:, -1] = top  # the very last element too
    scales = torch.exp2(4.0 * (torch.arange(groups) % 5) - 10.0).repeat(n, 1)  # 2^-10 .. 2^6
    scales = scales * (1 + torch.arange(n)[:, None] / 64)
    zeros = ((torch.arange(groups)[None, :] * 7 + torch.arange(n)[:, None]) % (top + 1)).float() if asymmetric else None
    return pack(codes, scales, zeros, bits, group_size)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-act", "int8-act"])
@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: "channel" if g == -1 else f"g{g}")
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_group_edges_read_element_by_element(lib, bits: int, asymmetric: bool, group_size: int, int8: bool) -> None:
    """x = I reads every weight back on its own (y[m, n] = W[n, m]), each checked against its own size, so
    a group off by one column shows at that column however small its group's scale."""
    shape, buf = boundary_weight(bits, group_size, asymmetric)
    k = shape.in_features
    w = layout.dequantize(buf, shape)
    eye = torch.eye(k)
    for x in (eye, lay_out(eye, "wide-rows"), eye[k // 2 - 3 : k // 2 + 5]):  # all rows; strided; one edge
        got = native.q_linear(lib, x, buf, shape, None, int8)
        rows = x.argmax(dim=1)
        want = w[:, rows].T
        tol = ELEMENT_REL * element_scale(buf, shape)[:, rows].T
        bad = (got - want).abs() > tol
        assert not bad.any(), f"{int(bad.sum())} weights read wrong, first at (k, n) = {bad.nonzero()[0].tolist()}"
        assert_matches(got, reference(x, buf, shape, None, int8), term_scale(x, buf, shape, None), "vs reference")


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-act", "int8-act"])
def test_q_linear_split_over_threads(lib, int8: bool) -> None:
    """The tests run single-threaded (conftest); here the kernels' OpenMP loops really split the tiles (and the
    int8 path's per-thread scratch) over two threads: N = 301 is 38 tiles, the last partial. Only the kernel
    calls run on two threads (on a busy 2-core box torch's float64 reference slows ~50x there)."""
    cases = []
    for i, (bits, asymmetric, m) in enumerate(itertools.product(BITS, (False, True), (1, 9, 64))):
        shape, buf = random_weight(301, 256, bits, 64, asymmetric, seed=50 + i)
        x = lay_out(random_x(m, 256, seed=60 + i, int8_activations=int8), "every-other-row")
        bias = torch.randn(301, generator=gen(i))
        cases.append((f"int{bits} asym={asymmetric} M={m}", shape, buf, x, bias))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch and the kernels share libgomp's pool
    try:
        got = [native.q_linear(lib, x, buf, shape, bias, int8) for _, shape, buf, x, bias in cases]
        rows = [native.q_dequantize_rows(lib, buf, shape, 8, 293) for _, shape, buf, _, _ in cases]
    finally:
        torch.set_num_threads(threads)
    for (what, shape, buf, x, bias), y, w in zip(cases, got, rows):
        assert_matches(y, reference(x, buf, shape, bias, int8), term_scale(x, buf, shape, bias), what)
        tol = ELEMENT_REL * element_scale(buf, shape)[8:]
        assert ((w[:, :256] - layout.dequantize(buf, shape)[8:]).abs() <= tol).all(), what


def test_int8_activations_zero_row_and_bias(lib) -> None:
    """A row of x that is all zeros gets scale 1 and contributes exactly the bias; its neighbours are unaffected."""
    shape, buf = random_weight(37, 128, 4, 32, True, seed=5)
    x = random_x(9, 128, seed=6, int8_activations=True)
    x[4] = 0
    bias = torch.randn(37, generator=gen(7))
    got = native.q_linear(lib, x, buf, shape, bias, True)
    assert torch.equal(got[4], bias)
    assert_matches(got, reference(x, buf, shape, bias, True), term_scale(x, buf, shape, bias), "zero row")


def test_nothing_is_written_past_the_output(lib) -> None:
    """N = 13 is one full and one partial tile: the padding rows of the last tile must not be stored."""
    for fn, int8 in ((lib.q_linear_f32, False), (lib.q_linear_i8, True)):
        shape, buf = random_weight(13, 64, 4, 32, False, seed=8)
        m, n = 3, shape.out_features
        x = random_x(m, 64, seed=9, int8_activations=int8)
        out = torch.full((m * n + 64,), float("nan"))
        fn(
            buf.data_ptr(), n, shape.padded_in, shape.group_size, shape.bits, 0,
            x.data_ptr(), m, x.stride(0), None, out.data_ptr(),
        )  # fmt: skip
        assert torch.isnan(out[m * n :]).all(), "wrote past the end of y"
        assert_matches(
            out[: m * n].view(m, n), reference(x, buf, shape, None, int8), term_scale(x, buf, shape, None), "y"
        )


# --------------------------------------------------------------------------------------- int8 rounding


def _correctly_rounded_quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layout.quantize_activations with 127 / max|x| rounded once, as the kernel computes it (``127.f / amax``)."""
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.ones_like(amax))
    codes = torch.round(x * inv[:, None]).clamp(-127, 127)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return codes, scale


def _plain_randn_case(lib):
    # seed 10: row 184 has an element at 26.499998 under torch's 127/amax and 26.500002 under the kernel's
    shape, buf = random_weight(13, 128, 8, -1, True, seed=0)
    x = torch.randn(300, 128, generator=gen(10))
    return x, shape, buf, native.q_linear(lib, x, buf, shape, None, True)


def test_int8_kernel_matches_a_correctly_rounded_reference(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain randn activations (near-ties included) against the reference with the kernel's rounding."""
    x, shape, buf, got = _plain_randn_case(lib)
    monkeypatch.setattr(layout, "quantize_activations", _correctly_rounded_quantize_activations)
    assert_matches(got, reference(x, buf, shape, None, True), term_scale(x, buf, shape, None), "randn x")


def test_int8_rounding_of_the_reference_matches_the_kernel(lib) -> None:
    x, shape, buf, got = _plain_randn_case(lib)
    assert torch.equal(layout.quantize_activations(x)[0], _correctly_rounded_quantize_activations(x)[0])
    assert_matches(got, reference(x, buf, shape, None, True), term_scale(x, buf, shape, None), "randn x")


# ---------------------------------------------------------------------------------- q_dequantize_rows


@pytest.mark.parametrize("k,group_size", [(256, 32), (256, 128), (256, -1), (40, -1)])
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_q_dequantize_rows(lib, bits: int, asymmetric: bool, k: int, group_size: int) -> None:
    """Row windows starting at tiles 0, 1, 2, ending mid-tile or at N; padding columns come back as 0."""
    shape, buf = boundary_weight(bits, group_size, asymmetric, n=37, k=k)
    w = layout.dequantize(buf, shape)
    tol = ELEMENT_REL * element_scale(buf, shape)
    for r0, rows in ((0, 37), (8, 29), (16, 21), (0, 5), (8, 8), (16, 3), (32, 5), (24, 13)):
        got = native.q_dequantize_rows(lib, buf, shape, r0, rows)
        assert got.shape == (rows, shape.padded_in)
        bad = (got[:, :k] - w[r0 : r0 + rows]).abs() > tol[r0 : r0 + rows]
        assert not bad.any(), f"rows [{r0}, {r0 + rows}): {int(bad.sum())} wrong, first {bad.nonzero()[0].tolist()}"
        pad = got[:, k:].abs()
        assert (pad <= tol[r0 : r0 + rows, -1:]).all(), "padding columns must dequantize to 0"
    # a 7-row weight: one partial tile, read whole
    shape, buf = boundary_weight(bits, group_size, asymmetric, n=7, k=k)
    got = native.q_dequantize_rows(lib, buf, shape, 0, 7)[:, :k]
    assert ((got - layout.dequantize(buf, shape)).abs() <= ELEMENT_REL * element_scale(buf, shape)).all()


def test_q_dequantize_rows_writes_only_its_window(lib) -> None:
    shape, buf = boundary_weight(4, 32, True, n=37, k=64)
    for r0, rows in ((32, 5), (16, 3), (8, 29)):
        out = torch.full((rows * shape.padded_in + 64,), float("nan"))
        lib.q_dequant_f32(buf.data_ptr(), 37, shape.padded_in, 32, 4, 1, r0, rows, out.data_ptr())
        assert not torch.isnan(out[: rows * shape.padded_in]).any(), f"[{r0}, {r0 + rows}) left holes"
        assert torch.isnan(out[rows * shape.padded_in :]).all(), f"[{r0}, {r0 + rows}) wrote past its rows"


# ----------------------------------------------------------------------------------------- write_rows


@pytest.mark.parametrize("k,group_size", [(128, 32), (128, 64), (128, -1), (40, -1)])
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_write_rows_in_pieces_equals_one_call(bits: int, asymmetric: bool, k: int, group_size: int) -> None:
    """Fused parts and TP slices arrive a piece at a time at row offsets inside a tile: the bytes must be the
    same as one write, in whatever order the pieces come."""
    n = 37
    g = gen(bits * 1000 + k)
    shape = layout.PackedShape.create(n, k, bits, group_size, asymmetric)
    top = 1 << bits
    codes = torch.randint(0, top, (n, k), generator=g, dtype=torch.int32)
    scales = torch.rand(n, shape.num_groups, generator=g) + 0.01
    zeros = torch.randint(0, top, (n, shape.num_groups), generator=g).float() if asymmetric else None
    whole = layout.allocate(shape)
    layout.write_rows(whole, shape, 0, codes, scales, zeros)
    for order in ([(0, 5), (5, 19), (19, 37)], [(19, 37), (0, 5), (5, 19)], [(5, 19), (19, 37), (0, 5)]):
        pieces = layout.allocate(shape)
        for a, b in order:
            layout.write_rows(pieces, shape, a, codes[a:b], scales[a:b], None if zeros is None else zeros[a:b])
        assert torch.equal(pieces, whole), f"pieces in order {order}"
    # and the bytes hold what was written
    stored, _, _ = layout.unpack(whole, shape)
    assert torch.equal(stored[:, :k], codes - shape.code_offset)


# -------------------------------------------------------------------------------------- the layer path


def quantized_layer(
    n: int, k: int, scheme: WeightScheme, activations: str, kernels, bias: bool, seed: int
) -> tuple[ReplicatedLinear, torch.Tensor]:
    """A linear layer holding ``scheme`` codes, loaded from a float weight the way the loader does."""
    layer = ReplicatedLinear(k, n, bias, torch.float32)
    method = "int8" if scheme.bits == 8 else "int4"
    config = QuantizationConfig(method, scheme, activations)
    layer.use_quantized(QuantizedWeight("layer", "float", scheme, n, k, config, kernels))
    g = gen(seed)
    weight = torch.randn(n, k, generator=g) * 0.05
    layer.load_checkpoint_tensor("weight", weight)
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=g))
    return layer, weight


@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize(
    "scheme",
    [WeightScheme(4, 32, False), WeightScheme(4, 128, True), WeightScheme(8, -1, False)],
    ids=["int4-g32-sym", "int4-g128-asym", "int8-channel"],
)
def test_quantized_weight_matmul_below_and_above_the_slab_gemm(lib, scheme: WeightScheme, activations: str) -> None:
    """M < DEQUANT_GEMM_MIN_ROWS runs q_linear; from it on, fp32 activations widen slabs of
    DEQUANT_SLAB_ROWS rows and run a float GEMM (N = 300: one full slab and a partial one)."""
    n, k = DEQUANT_SLAB_ROWS + 44, 256
    int8 = activations == "int8"
    layer, weight = quantized_layer(n, k, scheme, activations, lib, bias=True, seed=11)
    quant, buf = layer.quant, layer.packed.data
    step = element_scale(buf, quant.shape) / (1 << scheme.bits)
    assert ((quant.dequantized(buf) - weight).abs() <= 1.01 * step).all(), "the codes must stand for the weight"
    for m in (1, 3, DEQUANT_GEMM_MIN_ROWS - 1, DEQUANT_GEMM_MIN_ROWS, 40, 300):
        x = lay_out(random_x(m, k, seed=m, int8_activations=int8), "wide-rows")
        got = layer(x)
        want = reference(x, buf, quant.shape, layer.bias, int8)
        assert_matches(got, want, term_scale(x, buf, quant.shape, layer.bias), f"M={m}")


def test_quantized_weight_without_kernels_uses_the_reference() -> None:
    """No compiler: the layer computes with layout.dequantize (exact parity with the reference)."""
    scheme = WeightScheme(4, 64, True)
    layer, _ = quantized_layer(37, 128, scheme, "fp32", None, bias=True, seed=12)
    for m in (1, DEQUANT_GEMM_MIN_ROWS + 1):
        x = torch.randn(m, 128, generator=gen(m))
        want = reference(x, layer.packed.data, layer.quant.shape, layer.bias, False)
        assert_matches(layer(x), want, term_scale(x, layer.packed.data, layer.quant.shape, layer.bias), f"M={m}")


def test_quantized_weight_act_order_permutes_x(lib) -> None:
    """GPTQ act-order: the codes are stored in group order and x is permuted to match before the kernel."""
    scheme = WeightScheme(4, 32, False)
    layer, _ = quantized_layer(13, 128, scheme, "fp32", lib, bias=False, seed=13)
    perm = torch.randperm(128, generator=gen(14))
    layer.quant.perm = perm
    for m in (2, DEQUANT_GEMM_MIN_ROWS):
        x = torch.randn(m, 128, generator=gen(15))
        xp = x[:, perm]
        want = reference(xp, layer.packed.data, layer.quant.shape, None, False)
        assert_matches(layer(x), want, term_scale(xp, layer.packed.data, layer.quant.shape, None), f"M={m}")
