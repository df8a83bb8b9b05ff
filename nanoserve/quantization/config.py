"""Which weights are low-bit, and how: the user's ``quantization*`` options and a checkpoint's own
``quantization_config``, resolved once into a :class:`QuantizationConfig` (or None for float weights).

Two sources, never mixed:

* quantize on load (``int8``, ``int4``): the checkpoint holds float weights; every projection of the decoder is
  rounded to integer codes as it is read. The LM head goes to int8 per output channel as well (on tied models
  it is a quarter of the bytes a decode step reads), the embedding stays float (a lookup reads one row per token).
* a checkpoint that carries a ``quantization_config`` (``gptq``, ``awq``, ``compressed-tensors``): its tensors
  are unpacked into the same layout; modules it left in float (its LM head, an ``ignore`` list) stay float.
  A compressed-tensors ``int-quantized`` (W8A8) checkpoint also prescribes dynamic per-token int8 activations,
  which nanoserve's int8-activation kernels compute; ``quantization_activations="fp32"`` overrides that.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

ON_LOAD_METHODS = ("int8", "int4")
CHECKPOINT_METHODS = ("gptq", "awq", "compressed-tensors")
SUPPORTED_METHODS = ON_LOAD_METHODS + CHECKPOINT_METHODS
ACTIVATIONS = ("fp32", "int8")
# compressed-tensors formats nanoserve reads, and what each holds.
CT_FORMATS = {
    "pack-quantized": "W4A16 / W8A16: codes packed in int32, symmetric or asymmetric, group or channel strategy",
    "int-quantized": "W8A8: int8 weights, symmetric, channel or group strategy, with dynamic per-token int8 "
    "activations (or none)",
}
# The one activation scheme the int8-activation kernels compute: scale = max|x| / 127 per token, no zero point.
CT_INPUT_ACTIVATIONS = {"type": "int", "num_bits": 8, "symmetric": True, "dynamic": True, "strategy": "token"}
ON_LOAD_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
# What llama.cpp and vLLM call these checkpoints; the hub's quant_method strings.
_ALIASES = {"compressed_tensors": "compressed-tensors", "gptq_v2": "gptq"}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightScheme:
    """How one linear weight is stored: bits, group size along K (-1: one group per output row), asymmetric."""

    bits: int
    group_size: int
    asymmetric: bool


@dataclass(frozen=True)
class QuantizationConfig:
    method: str  # one of SUPPORTED_METHODS
    scheme: WeightScheme  # of the decoder's projections
    activations: str = "fp32"  # fp32: exact arithmetic on the weights' values; int8: per-token int8 dot products
    skip: tuple[str, ...] = ()  # module-name patterns kept in float
    lm_head: WeightScheme | None = None  # None: the LM head stays float
    # Checkpoint formats only:
    desc_act: bool = False  # GPTQ act-order: columns are assigned to groups by g_idx
    gptq_zero_offset: int = 1  # GPTQ v1 checkpoints store zero - 1
    checkpoint_ignore: tuple[str, ...] = ()  # modules the checkpoint keeps in float
    ct_format: str = "pack-quantized"  # compressed-tensors only: one of CT_FORMATS
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # A bad "re:" pattern would otherwise surface as a bare re.error from deep inside model loading.
        for source, patterns in (("quantization_skip", self.skip), ("the checkpoint's ignore list", self.checkpoint_ignore)):
            for pattern in patterns:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        raise ValueError(
                            f"{source}: {pattern!r} is not a valid regular expression ({exc}); write it as "
                            "'re:' followed by a Python regex matched from the start of the module name"
                        ) from exc

    @property
    def on_load(self) -> bool:
        return self.method in ON_LOAD_METHODS

    @property
    def tensor_format(self) -> str:
        """How a quantized layer's checkpoint tensors are read: "float" (a ``weight`` to quantize on load), or
        a key of ``formats.SUFFIXES`` ("gptq", "awq", "compressed-tensors" = pack-quantized, "int-quantized")."""
        if self.on_load:
            return "float"
        if self.method == "compressed-tensors" and self.ct_format == "int-quantized":
            return "int-quantized"
        return self.method

    def describe(self) -> str:
        s = self.scheme
        group = "per channel" if s.group_size == -1 else f"group {s.group_size}"
        head = "int8 LM head" if self.lm_head else "float LM head"
        zero = "asymmetric" if s.asymmetric else "symmetric"
        method = f"{self.method} {self.ct_format}" if self.method == "compressed-tensors" else self.method
        return f"{method}: {s.bits}-bit {zero}, {group}, {head}, {self.activations} activations"


def module_skipped(patterns: tuple[str, ...], names: list[str]) -> bool:
    """Whether any of a module's names (ours, e.g. ``model.layers.0.self_attn.qkv_proj``, and the checkpoint's
    parts, ``...q_proj``) matches a pattern: a glob (``*.down_proj``), a plain name matching a whole
    dotted component or suffix (``lm_head``, ``down_proj``, ``layers.0.mlp``), or compressed-tensors' ``re:``
    regex, matched from the start of the name (llmcompressor ignores MoE routers as ``re:.*mlp.gate$``)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if any(re.match(pattern[3:], name) for name in names):
                return True
            continue
        for name in names:
            if fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern):
                return True
            if f".{pattern}." in f".{name}.":
                return True
    return False


def resolve(
    hf_config: Any,
    quantization: str | None,
    group_size: int | None = None,
    zero_point: bool = False,
    activations: str | None = None,
    skip: tuple[str, ...] | list[str] | str | None = None,
) -> QuantizationConfig | None:
    """The quantization in force, or None for float weights; every inconsistent combination is a ValueError
    naming the option to change. ``activations`` None: what the checkpoint prescribes (int8 for a W8A8
    compressed-tensors checkpoint), else fp32."""
    if isinstance(skip, str):
        skip = tuple(p.strip() for p in skip.split(",") if p.strip())
    skip = tuple(skip or ())
    if activations is not None and activations not in ACTIVATIONS:
        raise ValueError(f"quantization_activations: choose one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None and not isinstance(checkpoint, dict):
        checkpoint = checkpoint.to_dict() if hasattr(checkpoint, "to_dict") else dict(vars(checkpoint))
    requested = None if quantization in (None, "", "none", "auto") else _canonical(quantization)
    if requested is not None and requested not in SUPPORTED_METHODS:
        raise ValueError(f"quantization: {quantization!r} is not supported; supported: {', '.join(SUPPORTED_METHODS)}")
    if checkpoint:
        found = _canonical(str(checkpoint.get("quant_method", "")))
        if found not in CHECKPOINT_METHODS:
            raise ValueError(
                f"the checkpoint's quantization_config has quant_method {found!r}, which nanoserve cannot load; "
                f"supported checkpoint formats: {', '.join(CHECKPOINT_METHODS)} (or a float checkpoint with "
                f"quantization={' / '.join(ON_LOAD_METHODS)})"
            )
        if requested is not None and requested != found:
            raise ValueError(
                f"quantization={quantization!r} contradicts the checkpoint, which is quantized with {found!r}; "
                f"omit quantization or pass {found!r}"
            )
        given = [name for name, value in (("quantization_group_size", group_size), ("quantization_zero_point", zero_point),
                                          ("quantization_skip", skip)) if value]  # fmt: skip
        if given:
            raise ValueError(
                f"{' / '.join(given)} apply to quantize-on-load (int8, int4); this checkpoint is already quantized "
                f"({found}): its own settings are used (modules it keeps in float are in its ignore list)"
            )
        return _from_checkpoint(found, checkpoint, activations, skip)
    if requested is None:
        given = [name for name, value in (
            ("quantization_group_size", group_size is not None), ("quantization_zero_point", zero_point),
            ("quantization_activations", activations not in (None, "fp32")), ("quantization_skip", skip),
        ) if value]  # fmt: skip
        if given:
            raise ValueError(
                f"{' / '.join(given)} needs quantization='int8' or 'int4' (or a quantized checkpoint); "
                "this checkpoint has float weights and no quantization was asked for"
            )
        return None
    if requested in CHECKPOINT_METHODS:
        raise ValueError(
            f"quantization={requested!r} needs a checkpoint quantized with it (config.json quantization_config); "
            f"this checkpoint has float weights: use quantization='int8' or 'int4' to quantize on load"
        )
    lm_head = None if module_skipped(skip, ["lm_head"]) else WeightScheme(8, -1, False)
    activations = activations or "fp32"
    if requested == "int8":
        if group_size is not None or zero_point:
            raise ValueError(
                "int8 is per-output-channel symmetric; quantization_group_size and quantization_zero_point "
                "apply to int4"
            )
        return QuantizationConfig("int8", WeightScheme(8, -1, False), activations, skip, lm_head)
    group = default_group_size(hf_config) if group_size is None else group_size
    if group not in ON_LOAD_GROUP_SIZES:
        raise ValueError(
            f"quantization_group_size: {group_size!r} is not supported for int4; choose one of "
            f"{', '.join(map(str, ON_LOAD_GROUP_SIZES))}"
        )
    return QuantizationConfig("int4", WeightScheme(4, group, bool(zero_point)), activations, skip, lm_head)


def default_group_size(hf_config: Any) -> int:
    """128, or when that does not divide every projection's input (SmolLM2's hidden size is 576), the largest
    of 64 and 32 that does; an explicit quantization_group_size that does not fit is an error instead."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    inputs = (hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_attention_heads * head_dim)
    for group in sorted(ON_LOAD_GROUP_SIZES, reverse=True):
        if group <= DEFAULT_GROUP_SIZE and all(k % group == 0 for k in inputs):
            return group
    return DEFAULT_GROUP_SIZE  # nothing fits: the layers' own check names the layer


def _canonical(method: str) -> str:
    method = method.strip().lower()
    return _ALIASES.get(method, method)


def _check_bits(bits: Any, allowed: tuple[int, ...], where: str) -> int:
    if bits not in allowed:
        raise ValueError(f"{where}: {bits}-bit weights are not supported; supported: {', '.join(map(str, allowed))}")
    return int(bits)


def _from_checkpoint(
    method: str, qc: dict[str, Any], activations: str | None, skip: tuple[str, ...]
) -> QuantizationConfig:
    if method == "compressed-tensors":
        return _from_compressed_tensors(qc, activations, skip)
    activations = activations or "fp32"  # GPTQ and AWQ are weight-only formats
    if method == "gptq":
        bits = _check_bits(qc.get("bits"), (4, 8), "gptq quantization_config.bits")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq checkpoint_format {fmt!r} is not supported; supported: gptq, gptq_v2")
        return QuantizationConfig(
            "gptq", WeightScheme(bits, int(qc.get("group_size", -1)), not bool(qc.get("sym", True))),
            activations, skip, None, desc_act=bool(qc.get("desc_act", False)),
            gptq_zero_offset=1 if fmt == "gptq" else 0, raw=qc,
        )  # fmt: skip
    if method == "awq":
        bits = _check_bits(qc.get("bits", qc.get("w_bit")), (4,), "awq quantization_config.bits")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq version {version!r} is not supported; supported: gemm")
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        zero = bool(qc.get("zero_point", True))
        ignore = tuple(qc.get("modules_to_not_convert") or ())
        return QuantizationConfig(
            "awq", WeightScheme(bits, group, zero), activations, skip, None, checkpoint_ignore=ignore, raw=qc
        )
    raise ValueError(f"unknown checkpoint method {method!r}")


def _from_compressed_tensors(qc: dict[str, Any], activations: str | None, skip: tuple[str, ...]) -> QuantizationConfig:
    """One config group targeting ``Linear``, in a format of :data:`CT_FORMATS`. compressed-tensors writes the
    format model-wide (``format``) and, since 0.10, per group too (``config_groups.<name>.format``; the
    model-wide one is then that, or "mixed-precision" when groups differ)."""
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: {len(groups)} config_groups; nanoserve supports exactly one scheme")
    (name, group), = groups.items()
    where = f"compressed-tensors config_groups.{name}"
    fmt = _ct_format(qc.get("format"), group.get("format"), where)
    weights = group.get("weights") or {}
    inputs = group.get("input_activations")
    if group.get("output_activations"):
        raise ValueError(f"{where}.output_activations: output activation quantization is not supported")
    if inputs and fmt != "int-quantized":
        raise ValueError(
            f"{where}: activation quantization is not supported in format {fmt!r} (weight-only W4A16 / W8A16 "
            "pack-quantized schemes are; W8A8 with dynamic per-token int8 activations is read from int-quantized)"
        )
    if weights.get("type", "int") != "int":
        raise ValueError(f"{where}.weights.type {weights.get('type')!r}: only int")
    allowed = (8,) if fmt == "int-quantized" else (4, 8)
    bits = _check_bits(weights.get("num_bits"), allowed, f"{where}.weights.num_bits ({fmt})")
    symmetric = bool(weights.get("symmetric", True))
    if fmt == "int-quantized" and not symmetric:
        raise ValueError(
            f"{where}.weights.symmetric false: int-quantized weights must be symmetric (no zero points); "
            f"supported: {CT_FORMATS['int-quantized']}"
        )
    strategy = weights.get("strategy")
    if strategy == "group":
        group_size = int(weights.get("group_size") or 0)
        if group_size <= 0:
            raise ValueError(f"{where}: strategy 'group' needs a group_size")
    elif strategy == "channel":
        group_size = -1
    else:
        raise ValueError(f"{where}.weights.strategy {strategy!r} is not supported; supported: group, channel")
    targets = group.get("targets") or []
    if targets not in (["Linear"], ("Linear",)):
        raise ValueError(f"{where}.targets {targets!r}: only ['Linear'] is supported")
    prescribed = "fp32"
    if inputs:
        _check_input_activations(inputs, f"{where}.input_activations")
        prescribed = "int8"
    if activations is None:
        activations = prescribed
    elif prescribed == "int8" and activations == "fp32":
        logger.info(
            "compressed-tensors %s: the checkpoint prescribes dynamic per-token int8 activations; "
            "quantization_activations='%s' runs its int8 weights with float32 activations instead", fmt, activations,
        )  # fmt: skip
    return QuantizationConfig(
        "compressed-tensors", WeightScheme(bits, group_size, not symmetric), activations, skip, None,
        checkpoint_ignore=tuple(qc.get("ignore") or ()), ct_format=fmt, raw=qc,
    )  # fmt: skip


def _ct_format(model_wide: Any, per_group: Any, where: str) -> str:
    fmt = per_group if model_wide in (None, "mixed-precision") else model_wide
    if per_group is not None and per_group != fmt:
        raise ValueError(
            f"compressed-tensors format {model_wide!r} (quantization_config.format) contradicts {where}.format "
            f"{per_group!r}; the checkpoint must say one format"
        )
    if fmt not in CT_FORMATS:
        listed = "; ".join(f"{k} ({v})" for k, v in CT_FORMATS.items())
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported; supported: {listed}")
    return str(fmt)


def _check_input_activations(args: dict[str, Any], where: str) -> None:
    """Only what the int8-activation kernels compute: symmetric int8 per token, its scale found at run time."""
    supported = ", ".join(f"{k} {_json(v)}" for k, v in CT_INPUT_ACTIVATIONS.items())
    for key, want in CT_INPUT_ACTIVATIONS.items():
        got = args.get(key)
        if got != want:
            reason = "not supported"
            if key == "dynamic" and got is False:
                reason = "static activation scales (an input_scale tensor per layer) are not supported"
            elif key == "symmetric" and got is False:
                reason = "asymmetric activations (a zero point per token) are not supported"
            raise ValueError(
                f"{where}.{key} {_json(got)}: {reason}; supported: dynamic per-token int8 activations ({supported})"
            )
    if args.get("group_size") is not None:
        raise ValueError(f"{where}.group_size {args['group_size']!r}: per-token activations take no group_size")


def _json(value: Any) -> str:
    """A config value as config.json spells it (false, null, "token")."""
    return json.dumps(value)


def check_tensor_parallel(hf_config: Any, tp_size: int, config: QuantizationConfig, usable: list[int]) -> None:
    """Refuse, before any rank starts, a split that cuts a group: the row-parallel layers (o_proj, down_proj)
    split their input over ranks, so each rank's share must be whole groups. ``usable``: the sizes the model's
    heads allow; the error lists those that also keep groups whole."""
    if tp_size == 1:
        return
    if config.desc_act:
        raise ValueError(
            "act-order (desc_act) GPTQ checkpoints assign input columns to groups across the whole input, so "
            "row-parallel layers (o_proj, down_proj) cannot be split over ranks; use tensor_parallel_size 1"
        )
    group = config.scheme.group_size
    if group == -1:
        return
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    inputs = {
        "self_attn.o_proj": hf_config.num_attention_heads * head_dim,
        "mlp.down_proj": hf_config.intermediate_size,
    }
    # Experts split their intermediate the same way (down's input); Mixtral's are intermediate_size wide.
    if getattr(hf_config, "moe_intermediate_size", None):
        inputs["mlp.experts.down_proj"] = hf_config.moe_intermediate_size
    elif getattr(hf_config, "num_local_experts", None):
        inputs = {"self_attn.o_proj": inputs["self_attn.o_proj"], "mlp.experts.down_proj": hf_config.intermediate_size}
    for layer, size in inputs.items():
        if size % tp_size or (size // tp_size) % group:
            ok = [t for t in usable if size % t == 0 and (size // t) % group == 0 and all(
                s % t == 0 and (s // t) % group == 0 for s in inputs.values()
            )]  # fmt: skip
            raise ValueError(
                f"model.layers.*.{layer}: group size {group} does not fit this rank's share of its input "
                f"({size} over tensor_parallel_size {tp_size}); the sizes that work are {', '.join(map(str, ok))}"
            )
