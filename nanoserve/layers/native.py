"""Small C kernels for the CPU hot path, compiled on first use and cached.

* ``paged_decode_attention``: in decode every sequence has one query token per step, and the pure-torch path
  must first gather each sequence's blocks into a padded dense tensor (per layer, per step) before
  ``scaled_dot_product_attention`` can read them: three passes over the context plus padding. The kernel
  walks the block table and reads each cached key and value once (3-10x faster, measured).
* ``add_rms_norm``, ``qk_norm_rope_store``, ``silu_mul``: the elementwise work of a layer in three calls
  instead of ~30 torch ops. At batch 1 each torch op costs a few microseconds of dispatch for almost no
  arithmetic; across 30 layers that was ~20% of a decode step.

How: plain C with OpenMP (``native_kernels.c`` beside this file), no torch headers, so it compiles in about a second with the system ``cc``; the
shared object lives in ``$NANOSERVE_CACHE_DIR`` (default ``~/.cache/nanoserve``)/kernels under a name that
hashes the source, flags and compiler, and is loaded with ctypes. ``-fopenmp`` links ``libgomp.so.1``, which
resolves to the copy torch has already loaded, so the kernel shares torch's thread pool and thread count.
When there is no compiler, or ``NANOSERVE_NATIVE=0``, :func:`load` returns None and callers use the torch
path (the reference the kernel is tested against).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NATIVE_ENV = "NANOSERVE_NATIVE"
CACHE_DIR_ENV = "NANOSERVE_CACHE_DIR"

# The C sources live beside this file (package data files, so non-editable installs carry them too); they
# compile into one library.
_SOURCE_PATHS = tuple(Path(__file__).with_name(name) for name in ("native_kernels.c", "quant_kernels.c", "decode_kernels.c"))

_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]  # no errno: sqrtf is one instruction


@functools.cache
def _source() -> str:
    return "\0".join(path.read_text() for path in _SOURCE_PATHS)


def _arch_flags() -> list[str]:
    # The kernel is compiled for this machine's vector units; the cache key includes the flags, so a cache
    # directory shared with a different CPU never hands back an object built for the wrong one.
    caps = torch.backends.cpu.get_cpu_capability()
    if caps in ("AVX2", "AVX512"):
        # AVX-VNNI (the VEX form of the int8 dot product) speeds up the int8-activation kernels where present.
        flags = _cpu_flags()
        vnni = ["-mavxvnni"] if "avx_vnni" in flags else []
        f16c = ["-mf16c"] if "f16c" in flags else []  # half <-> float conversions: the float16 KV cache
        if caps == "AVX512":
            # 512-bit forms of the low-bit kernels (byte ops and VNNI dot products) where the CPU has them.
            extra = [f"-m{name}" for name in ("avx512bw", "avx512vl", "avx512dq") if name in flags]
            vnni += ["-mavx512vnni"] if "avx512_vnni" in flags and "-mavx512bw" in extra else []
            return ["-mavx2", "-mfma", "-mavx512f", *f16c, *extra, *vnni, *_prefetch_flags()]
        return ["-mavx2", "-mfma", *f16c, *vnni, *_prefetch_flags()]
    return []


def _prefetch_flags() -> list[str]:
    # How far ahead the low-bit kernels ask for weights (quant_kernels.c, Q_PREFETCH), and into which cache
    # decode attention asks for the next keys and values (native_kernels.c): the C defaults were measured on
    # Intel (Sapphire Rapids); on AMD (Zen 4) 4 KiB ahead was the worst distance measured and 1 KiB the best,
    # the float-activation kernels ran fastest on the hardware prefetcher alone, and attention a few % faster
    # prefetching into L2 than into L1.
    if _cpu_vendor() == "AuthenticAMD":
        return ["-DQ_PREFETCH=1024", "-DQ_PREFETCH_F32=0", "-DATTN_PREFETCH_LOCALITY=2"]
    return []


@functools.cache
def _cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


@functools.cache
def _cpu_vendor() -> str:
    return _cpuinfo_field("vendor_id").strip()


def _cpuinfo_field(name: str) -> str:
    """The first CPU's ``name`` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "nanoserve")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_so = Path(tmp) / target.name
        sources = [str(path) for path in _SOURCE_PATHS]
        subprocess.run([cc, *flags, *sources, "-o", str(tmp_so), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp_so, target)  # atomic: concurrent builders (TP workers, test processes) never see half a file


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library (built once per process, cached on disk), or None when it cannot be
    built. Ignores ``NANOSERVE_NATIVE``; use :func:`kernels_for`."""
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found; using torch ops instead of the native CPU kernels")
        return None
    flags = _FLAGS + _arch_flags()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([_source(), *flags, *version]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"nanoserve_kernels_{key}.so"
    try:
        if not target.is_file():
            _compile(cc, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning("could not build the native CPU kernels (%s %s); using the pure-torch path", exc, detail[-500:])
        return None
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    signatures = {
        "add_rms_norm_f32": [ptr, i64, ptr, ptr, f32, i64, i64, ptr],
        "qk_norm_rope_store_f32": [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr],
        "silu_mul_f32": [ptr, i64, i64, ptr],
        "apply_token_bitmask_f32": [ptr, i64, ptr, i64, ptr, i64, i64],
        "argmax_rows_f32": [ptr, i64, i64, i64, ptr],
        "paged_decode_attention_f32": [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, f32, ptr],
        "paged_decode_attention_f16kv": [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, f32, ptr],
        "qk_norm_rope_store_f16kv": [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr],
        "packed_gemv_f32": [ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr],
        "q_linear_f32": [ptr, i64, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr],
        "q_linear_i8": [ptr, i64, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr],
        "q_dequant_f32": [ptr, i64, i64, i64, i64, i64, i64, i64, ptr],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    lib.kv_half_supported.argtypes = []
    lib.kv_half_supported.restype = i64
    lib.kv_half = bool(lib.kv_half_supported())  # read once: kv_cache_supported asks every layer, every step


def kernels_for(dtype: torch.dtype, device: torch.device | str) -> ctypes.CDLL | None:
    """The kernel library when it applies to models of this dtype and device (float32 on CPU) and is not
    switched off with ``NANOSERVE_NATIVE=0``; else None (callers then use torch ops)."""
    if dtype != torch.float32 or torch.device(device).type != "cpu" or not enabled():
        return None
    return load()


def kv_cache_supported(lib: ctypes.CDLL | None, kv_cache: torch.Tensor) -> bool:
    """Whether the kernels read and write this KV cache: float32, or float16 where the library was built with
    the CPU's half-precision conversions (F16C; every AVX2 CPU has them)."""
    if lib is None or kv_cache.device.type != "cpu":
        return False
    return kv_cache.dtype == torch.float32 or (kv_cache.dtype == torch.float16 and lib.kv_half)


def _check_cache(lib: ctypes.CDLL, kv_cache: torch.Tensor) -> None:
    if not kv_cache_supported(lib, kv_cache):
        raise ValueError(
            f"KV cache of dtype {kv_cache.dtype} on {kv_cache.device}: the kernels take float32, or float16 where "
            "built with F16C (see kv_cache_supported; callers take the torch path otherwise)"
        )


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1").lower() not in ("0", "false", "off")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Shape requirements of the kernels (callers check once, at build time): rows of a multiple of 8 floats,
# heads of a multiple of 16 for the rotary halves.
def norm_supported(hidden: int) -> bool:
    return hidden % 8 == 0


def rope_supported(head_dim: int, rotary_dim: int | None = None) -> bool:
    """Whether the rope kernel takes heads of ``head_dim`` rotating their first ``rotary_dim`` dims (default:
    all): vectors of 8 over each half of the rotated part."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    return head_dim % 16 == 0 and rotary_dim % 16 == 0 and 0 < rotary_dim <= head_dim


def add_rms_norm(
    lib: ctypes.CDLL, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm of x ([T, H], rows may be strided), or of x + residual with ``residual`` updated in place to
    that sum (``residual`` contiguous). Returns the normalised [T, H]."""
    t, h = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.is_contiguous())
    out = torch.empty((t, h), dtype=x.dtype)
    lib.add_rms_norm_f32(x.data_ptr(), x.stride(0), _ptr(residual), weight.data_ptr(), eps, t, h, out.data_ptr())
    return out


def qk_norm_rope_store(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    slot_mapping: torch.Tensor,
    kv_cache: torch.Tensor,
) -> None:
    """In place on ``qkv`` ([T, (Hq + 2 Hkv) * D], contiguous rows): per-head RMSNorm of q and k (when
    weights are given), rotary embedding of q and k over each head's first ``cos_table.shape[1]`` dims (all of
    it unless partial rotary); then k and v of each token are written to its slot."""
    t = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos_table.is_contiguous() and positions.dtype == torch.int64
    half = kv_cache[0].numel() * kv_cache.element_size()
    _check_cache(lib, kv_cache)
    fn = lib.qk_norm_rope_store_f16kv if kv_cache.dtype == torch.float16 else lib.qk_norm_rope_store_f32
    fn(
        qkv.data_ptr(), qkv.stride(0), t, num_heads, num_kv_heads, head_dim, cos_table.shape[1], cos_table.data_ptr(),
        sin_table.data_ptr(), positions.data_ptr(), _ptr(q_norm_weight), _ptr(k_norm_weight), eps,
        slot_mapping.data_ptr(), kv_cache.data_ptr(), kv_cache.data_ptr() + half,
    )  # fmt: skip


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] ([T, 2I], contiguous). Returns [T, I]."""
    t, two_i = gate_up.shape
    assert gate_up.is_contiguous()
    out = torch.empty((t, two_i // 2), dtype=gate_up.dtype)
    lib.silu_mul_f32(gate_up.data_ptr(), t, two_i // 2, out.data_ptr())
    return out


def apply_token_bitmask(lib: ctypes.CDLL, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """``logits[rows[j], t] = -inf`` ([N, V] float32 on CPU, rows contiguous; in place) wherever bit t of
    ``bitmask[j]`` ([len(rows), ceil(V / 32)] int32, contiguous) is 0."""
    assert logits.stride(1) == 1 and bitmask.is_contiguous() and bitmask.dtype == torch.int32
    assert bitmask.shape[0] == len(rows) and bitmask.shape[1] * 32 >= logits.shape[1]
    index = torch.tensor(rows, dtype=torch.int64)
    assert len(rows) == 0 or 0 <= int(index.min()) and int(index.max()) < logits.shape[0]
    lib.apply_token_bitmask_f32(logits.data_ptr(), logits.stride(0), index.data_ptr(), len(rows),
                                bitmask.data_ptr(), bitmask.shape[1], logits.shape[1])  # fmt: skip


def argmax_rows(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value of ``x`` ([N, V] float32 on CPU, rows contiguous), the first of
    ties, a NaN counting as the largest: what ``x.argmax(dim=-1)`` returns."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.dtype == torch.float32 and x.shape[1] > 0
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


def paged_decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """out[d] = softmax(q[d] K_d^T * scale) V_d over sequence d's cached tokens (the last ``window`` of them
    when ``window`` > 0); with ``softcap`` > 0 the scaled scores become ``softcap * tanh(scores / softcap)``
    before the softmax (Gemma 2's attention logit soft-capping).

    q: [D, Hq, Dh] float32 with contiguous heads (rows may be strided); out: [D, Hq, Dh] contiguous;
    kv_cache: [2, num_blocks, B, Hkv, Dh] contiguous, float32 or float16 (see kv_cache_supported);
    block_tables: [D, >= ceil(max len / B)] int64 with contiguous rows; context_lens: [D] int64 (each >= 1).
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    d, hq, _ = q.shape
    assert q.stride(2) == 1 and q.stride(1) == head_dim and out.is_contiguous() and block_tables.stride(1) == 1
    half = kv_cache[0].numel() * kv_cache.element_size()
    _check_cache(lib, kv_cache)
    fn = lib.paged_decode_attention_f16kv if kv_cache.dtype == torch.float16 else lib.paged_decode_attention_f32
    fn(
        q.data_ptr(), q.stride(0), kv_cache.data_ptr(), kv_cache.data_ptr() + half, block_tables.data_ptr(),
        block_tables.stride(0), context_lens.data_ptr(), d, hq, num_kv_heads, head_dim, block_size,
        scale, window, softcap, out.data_ptr(),
    )  # fmt: skip


GEMV_MAX_ROWS = 8  # must match the C source


def packed_gemv(
    lib: ctypes.CDLL, x: torch.Tensor, weight_ptr: int, out_features: int, row_block: int,
    bias: torch.Tensor | None, padded_in_features: int = 0,
) -> torch.Tensor:  # fmt: skip
    """x @ W^T (+ bias) for ``x`` [M, K] (rows may be strided; M <= GEMV_MAX_ROWS unless ``row_block`` is
    64) with W in oneDNN's blocked layout at ``weight_ptr`` (blocks of ``row_block`` output rows, each
    [K'][row_block] where K' = ``padded_in_features`` >= K, default K; see linear.py)."""
    m, k = x.shape
    assert (m <= GEMV_MAX_ROWS or row_block == 64) and x.stride(1) == 1 and row_block in (16, 32, 64)
    out = torch.empty((m, out_features), dtype=x.dtype)
    kp = padded_in_features or k
    lib.packed_gemv_f32(weight_ptr, out_features, k, kp, row_block, x.data_ptr(), m, x.stride(0), _ptr(bias), out.data_ptr())
    return out


def q_linear(
    lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, shape: Any, bias: torch.Tensor | None,
    int8_activations: bool,
) -> torch.Tensor:  # fmt: skip
    """x @ W^T (+ bias) for ``x`` [M, K] float32 (rows may be strided) and W packed in nanoserve's low-bit
    layout (``shape``: a ``quantization.layout.PackedShape``). Float32 activations widen the codes and FMA;
    ``int8_activations`` rounds each row of x to int8 first and uses integer dot products."""
    if x.shape[1] != shape.padded_in:
        x = torch.nn.functional.pad(x, (0, shape.padded_in - x.shape[1]))
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.empty((m, shape.out_features), dtype=torch.float32)
    fn = lib.q_linear_i8 if int8_activations else lib.q_linear_f32
    fn(
        packed.data_ptr(), shape.out_features, shape.padded_in, shape.group_size, shape.bits, int(shape.asymmetric),
        x.data_ptr(), m, x.stride(0), _ptr(bias), out.data_ptr(),
    )  # fmt: skip
    return out


def q_dequantize_rows(lib: ctypes.CDLL, packed: torch.Tensor, shape: Any, row_start: int, rows: int) -> torch.Tensor:
    """Rows [row_start, row_start + rows) of a packed weight widened to float32 [rows, padded K];
    ``row_start`` a multiple of the layout's tile (8)."""
    out = torch.empty((rows, shape.padded_in), dtype=torch.float32)
    lib.q_dequant_f32(
        packed.data_ptr(), shape.out_features, shape.padded_in, shape.group_size, shape.bits, int(shape.asymmetric),
        row_start, rows, out.data_ptr(),
    )  # fmt: skip
    return out
