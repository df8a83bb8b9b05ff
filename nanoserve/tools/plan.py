"""`nanoserve plan [MODEL]`: what the engine will hold per rank, predicted from ``config.json`` alone.

No weights are read. From the checkpoint's config (through ``AutoConfig``) and the engine options, for every
tensor-parallel rank: the bytes of its weight shard (vocabulary padded to a multiple of the TP size, tied
embeddings counted once, replicated KV heads when there are fewer KV heads than ranks), the bytes of one KV
block, the KV budget and how it was decided, and the blocks that fit; then the block count the ranks will
agree on (the MIN, honouring ``NANOSERVE_KV_BUDGET_SCALE``) and how many sequences fit at once at
``max_model_len`` and at a few typical lengths — plus everything that would stop the engine from starting.

Shard sizes are the layers' own answers, not derived here: each rank's model is built by the model code
itself with its parameters on the meta device (``models/shard.py::build_shard``: no memory, no weights, no
process group), and its parameter bytes, KV heads and bytes per KV block are read off the built layers
through the functions ``ModelRunner`` uses (``shard.parameter_bytes``, ``shard.kv_bytes_per_block``). The
budget arithmetic is the engine's own (``runner/memory.py::local_num_blocks``, ``memory.cpu_kv_budget`` /
``budget_scale``):

    bytes_per_block = 2 (K and V) * block_size * sum over attention layers of (kv_heads_on_rank * head_dim) * dtype_size
    blocks_on_rank  = int(budget * scale) // bytes_per_block ;  agreed = min over ranks

It is exact when the budget is an explicit ``--kv-cache-memory`` below the host-memory cap. A default
budget (30 % of the host's available memory) or a capped one depends on how much memory the host has free
when the ranks start; the plan predicts that as *now minus the weights all ranks will load*, and marks the
prediction ``exact: false``. On CUDA the budget depends on the device's free memory and is an estimate too.

``--probe`` then starts the real engine and sets its ``kv_cache_info()`` next to the prediction; any
difference is flagged (host-dependent block counts within 5 % are reported as drift, not as a mismatch).

Exit status: 0 when the engine would start (and, with ``--probe``, the engine matched the prediction), 1
otherwise, 2 for invalid options.

``--json`` prints :meth:`Plan.to_dict`::

    model, architecture, device, dtype, kv_cache_dtype, tensor_parallel_size, block_size, max_model_len, max_num_seqs
    kv_cache_memory        requested per-rank budget in bytes, or null for the default
    exact                  true when the block counts do not depend on free host/device memory
    host_available_bytes   CPU: the host's available memory now (null on CUDA)
    ranks[]                per rank: rank, weight_bytes, weights {embedding, lm_head, attention, mlp, norms},
                           rotary_table_bytes (cos/sin buffers, not weights), num_kv_heads, kv_bytes_per_block,
                           kv_budget_bytes (after cap and scale), budget_source, budget_scale, local_num_blocks,
                           expert_bytes (mixture-of-experts weights, 0 for a dense model; part of weights.mlp),
                           active_weight_bytes (the weights one token reads: only top-k experts per sparse layer)
    num_blocks             the agreed count (min over ranks); num_tokens = num_blocks * block_size
    short_rank             the rank with the fewest blocks
    blocks_per_max_len_seq blocks one sequence of max_model_len needs
    concurrency[]          per length: length, blocks_per_seq, max_seqs_by_kv, max_seqs (also capped by
                           max_num_seqs), limited_by ("kv_cache" | "max_num_seqs"), is_max_model_len
    skipped_lengths        typical lengths left out because they exceed max_model_len
    fits                   whether the engine would start
    problems[]             why it would not (empty when fits)
    notes[]                caveats and warnings the engine would log
    probe                  null, or {kv_cache_info, weight_bytes_rank0, error, differences[], drift[], matches}
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nanoserve.engine_args import add_engine_args, engine_kwargs, resolve_model

TYPICAL_LENGTHS = (512, 2048, 8192)
# A host-dependent budget moves with the host's free memory between plan and probe; within this fraction
# the difference is drift, not a wrong prediction.
DRIFT_TOLERANCE = 0.05
_HOST_DEPENDENT = ("num_blocks", "local_num_blocks", "allocated_num_blocks", "num_tokens")


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBreakdown:
    """Bytes of one rank's parameters by part (all layers summed). ``lm_head`` is 0 when tied to the embedding."""

    embedding: int
    lm_head: int
    attention: int
    mlp: int
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.mlp + self.norms


@dataclass(frozen=True)
class RankPlan:
    rank: int
    weight_bytes: int
    weights: WeightBreakdown
    rotary_table_bytes: int
    num_kv_heads: int
    kv_bytes_per_block: int
    kv_budget_bytes: int  # after the host cap and the budget scale
    budget_source: str
    budget_scale: float
    local_num_blocks: int
    expert_bytes: int = 0
    active_weight_bytes: int = 0


@dataclass(frozen=True)
class Concurrency:
    """How many sequences of ``length`` tokens fit at once (each holds ``ceil(length / block_size)`` blocks;
    blocks shared through the prefix cache are not counted, so this is the floor)."""

    length: int
    blocks_per_seq: int
    max_seqs_by_kv: int
    max_seqs: int
    limited_by: str
    is_max_model_len: bool


@dataclass
class ProbeResult:
    """What the real engine reported, and how it compares. ``differences`` fail the probe; ``drift`` (a
    host-dependent count off by less than :data:`DRIFT_TOLERANCE`) does not."""

    kv_cache_info: dict[str, Any] | None
    weight_bytes_rank0: int | None
    error: str | None
    differences: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences


@dataclass
class Plan:
    model: str
    architecture: str
    device: str
    dtype: str
    kv_cache_dtype: str
    tensor_parallel_size: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    kv_cache_memory: int | None
    exact: bool
    host_available_bytes: int | None
    ranks: list[RankPlan]
    num_blocks: int
    short_rank: int | None
    blocks_per_max_len_seq: int
    concurrency: list[Concurrency]
    skipped_lengths: list[int]
    problems: list[str]
    notes: list[str]
    probe: ProbeResult | None = None

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def ok(self) -> bool:
        """The exit status is 0 exactly when this holds."""
        return self.fits and (self.probe is None or self.probe.matches)

    def to_dict(self) -> dict[str, Any]:
        ranks = []
        for r in self.ranks:
            d = asdict(r)
            d["weights"] = asdict(r.weights)
            ranks.append(d)
        probe = None
        if self.probe is not None:
            probe = {**asdict(self.probe), "matches": self.probe.matches}
        return {
            "model": self.model,
            "architecture": self.architecture,
            "device": self.device,
            "dtype": self.dtype,
            "kv_cache_dtype": self.kv_cache_dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "block_size": self.block_size,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_memory": self.kv_cache_memory,
            "exact": self.exact,
            "host_available_bytes": self.host_available_bytes,
            "ranks": ranks,
            "num_blocks": self.num_blocks,
            "num_tokens": self.num_tokens,
            "short_rank": self.short_rank,
            "blocks_per_max_len_seq": self.blocks_per_max_len_seq,
            "concurrency": [asdict(c) for c in self.concurrency],
            "skipped_lengths": list(self.skipped_lengths),
            "fits": self.fits,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "probe": probe,
        }

    def format_text(self) -> str:
        budget = "default (a share of free memory)" if self.kv_cache_memory is None else fmt_bytes(self.kv_cache_memory)
        lines = [
            f"nanoserve plan: {self.model} ({self.architecture}) — from config.json, no weights loaded",
            f"  device {self.device}, dtype {self.dtype}, kv_cache_dtype {self.kv_cache_dtype}, "
            f"tensor_parallel_size {self.tensor_parallel_size}, "
            f"block_size {self.block_size}, max_model_len {self.max_model_len}, max_num_seqs {self.max_num_seqs}",
            f"  KV budget per rank: {budget}"
            + (
                f"; host memory available now: {fmt_bytes(self.host_available_bytes)}"
                if self.host_available_bytes is not None
                else ""
            )
            + ("" if self.exact else " (block counts depend on free memory at start-up: an estimate)"),
            "",
        ]
        if self.ranks:
            lines.append(
                f"  {'rank':>4}  {'weights':>10}  {'KV heads':>8}  {'KV/block':>10}  {'KV budget':>10}  {'scale':>5}  {'blocks':>8}  budget from"
            )
            for r in self.ranks:
                lines.append(
                    f"  {r.rank:>4}  {fmt_bytes(r.weight_bytes):>10}  {r.num_kv_heads:>8}  {fmt_bytes(r.kv_bytes_per_block):>10}  "
                    f"{fmt_bytes(r.kv_budget_bytes):>10}  {r.budget_scale:>5.2f}  {r.local_num_blocks:>8}  {r.budget_source}"
                )
            w = self.ranks[0].weights
            head = "tied to the embedding" if w.lm_head == 0 else fmt_bytes(w.lm_head)
            lines += [
                f"  weights of rank 0: embedding {fmt_bytes(w.embedding)}, lm_head {head}, attention {fmt_bytes(w.attention)}, "
                f"mlp {fmt_bytes(w.mlp)}, norms {fmt_bytes(w.norms)}; plus rotary tables {fmt_bytes(self.ranks[0].rotary_table_bytes)}",
            ]
            r0 = self.ranks[0]
            if r0.expert_bytes:
                lines.append(
                    f"  mixture of experts, rank 0: experts {fmt_bytes(r0.expert_bytes)} of the weights; one token reads "
                    f"{fmt_bytes(r0.active_weight_bytes)} of {fmt_bytes(r0.weight_bytes)} (its top-k experts per sparse layer)"
                )
            lines += [
                f"  agreed: {self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens of KV cache on every rank"
                + (
                    f" (rank {self.short_rank} holds the fewest)"
                    if len(set(r.local_num_blocks for r in self.ranks)) > 1
                    else ""
                ),
                "",
                "  concurrent sequences (each holds ceil(length / block_size) blocks; prefix sharing not counted):",
                f"  {'length':>8}  {'blocks/seq':>10}  {'by KV':>8}  {'at once':>8}  limited by",
            ]
            for c in self.concurrency:
                tag = " (max_model_len)" if c.is_max_model_len else ""
                lines.append(
                    f"  {c.length:>8}  {c.blocks_per_seq:>10}  {c.max_seqs_by_kv:>8}  {c.max_seqs:>8}  {c.limited_by}{tag}"
                )
            if self.skipped_lengths:
                lines.append(
                    f"  not shown: {', '.join(map(str, self.skipped_lengths))} (longer than max_model_len {self.max_model_len})"
                )
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append("")
        if self.fits:
            lines.append("OK: the engine would start with these settings")
        else:
            lines.append("WOULD NOT START:")
            lines += [f"  - {p}" for p in self.problems]
        if self.probe is not None:
            lines += ["", *self._format_probe()]
        return "\n".join(lines)

    def _format_probe(self) -> list[str]:
        p = self.probe
        assert p is not None
        lines = ["probe: started the engine with the same options"]
        if p.error is not None:
            lines.append(f"  engine refused to start: {p.error}")
        if p.kv_cache_info is not None:
            info = p.kv_cache_info
            predicted = {
                "num_blocks": self.num_blocks,
                "local_num_blocks": [r.local_num_blocks for r in self.ranks],
                "allocated_num_blocks": [self.num_blocks] * len(self.ranks),
                "bytes_per_block": [r.kv_bytes_per_block for r in self.ranks],
                "num_tokens": self.num_tokens,
                "weight_bytes (rank 0)": self.ranks[0].weight_bytes if self.ranks else None,
            }
            actual = {**info, "weight_bytes (rank 0)": p.weight_bytes_rank0}
            lines.append(f"  {'':<22}  {'predicted':>22}  {'engine':>22}")
            for key, want in predicted.items():
                got = actual.get(key)
                if got == want:
                    mark = "ok"
                elif key in _HOST_DEPENDENT and not self.exact and _within(want, got):
                    mark = "drift"
                else:
                    mark = "DIFFERENT"
                lines.append(f"  {key:<22}  {str(want):>22}  {str(got):>22}  {mark}")
        lines += [f"  drift: {d}" for d in p.drift]
        lines += [f"  DIFFERENCE: {d}" for d in p.differences]
        lines.append(
            "  the engine matches the prediction" if p.matches else "  the engine does NOT match the prediction"
        )
        return lines


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------------------
# Shards: asked of the layers, never derived here
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSizes:
    """One rank's shard as the model code builds it (``models/shard.py``)."""

    weights: WeightBreakdown
    weight_bytes: int  # tied tensors once, as ``ModelRunner.weight_bytes`` counts
    rotary_table_bytes: int  # the model's buffers
    num_kv_heads: int  # of the first attention layer, as the runner's cache is shaped
    kv_head_replicas: int
    kv_bytes_per_block: int  # ``shard.kv_bytes_per_block``, the runner's own function
    mlp_width: int  # the widest per-rank MLP activation (for the CUDA activation estimate)
    expert_bytes: int  # mixture-of-experts weights (0 for a dense model)
    active_weight_bytes: int  # what one token's forward reads: top-k experts per sparse layer


def measure_shard(config: Any, rank: int) -> ShardSizes:
    """Build rank ``rank``'s shard of ``config``'s model as the runner does, with no memory for parameters
    (``shard.build_shard``: meta device, no weights read, no process group), and read its sizes."""
    from nanoserve.distributed.parallel_state import TPGroup
    from nanoserve.models import shard
    from nanoserve.models.decoder import BuildContext
    from nanoserve.models.registry import resolve_architecture
    from nanoserve.platform import default_attention_backend

    hf = config.hf_config
    ctx = BuildContext(
        dtype=config.dtype, tp=TPGroup(rank=rank, size=config.tensor_parallel_size),
        attention_backend=default_attention_backend(config.device), max_position=config.max_model_len,
        quantization=config.quantization,
    )  # fmt: skip
    model = shard.build_shard(resolve_architecture(hf), hf, ctx)
    layers = model.attention_layers()
    weights = WeightBreakdown(**shard.parameter_bytes_by_part(model))
    total = shard.parameter_bytes(model)
    assert weights.total == total, (weights, total)  # parameter_bytes_by_part refuses a parameter in no part
    return ShardSizes(
        weights=weights,
        weight_bytes=total,
        rotary_table_bytes=shard.buffer_bytes(model),
        num_kv_heads=layers[0].num_kv_heads,
        kv_head_replicas=shard.kv_head_replicas(model),
        kv_bytes_per_block=shard.kv_bytes_per_block(layers, config.block_size, config.kv_cache_dtype),
        mlp_width=shard.mlp_width(model),
        expert_bytes=shard.expert_parameter_bytes(model),
        active_weight_bytes=shard.active_parameter_bytes(model),
    )


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


def make_plan(
    model: str | None = None,
    *,
    lengths: tuple[int, ...] = TYPICAL_LENGTHS,
    host_available_bytes: int | None = None,
    **engine_options: Any,
) -> Plan:
    """Predict what ``LLM(model, **engine_options)`` will hold, reading only ``config.json``.

    ``host_available_bytes`` replaces the measurement of the host's available memory (CPU; for tests and
    what-if questions). Raises ValueError for invalid options or an unsupported architecture.
    """
    from nanoserve.config import EngineConfig
    from nanoserve.distributed.kv_agreement import SKEW_WARNING
    from nanoserve.runner.memory import budget_scale

    path = resolve_model(model)
    config = EngineConfig.create(path, **engine_options)  # validates, incl. that the model splits over tp
    hf = config.hf_config
    tp, bs = config.tensor_parallel_size, config.block_size
    problems: list[str] = []
    notes: list[str] = []

    # ---- per rank: weights, bytes per block (from the layers), budget, blocks
    shards = [measure_shard(config, r) for r in range(tp)]
    if config.device == "cuda":
        budgets, exact, host_available = _cuda_budgets(config, shards, problems, notes), False, None
    else:
        weights = [s.weight_bytes for s in shards]
        budgets, exact, host_available = _cpu_budgets(config, weights, host_available_bytes, problems, notes)
    ranks = []
    for r, (s, (budget, how)) in enumerate(zip(shards, budgets)):
        scale = budget_scale(r, tp)
        scaled = int(max(0, budget) * scale)  # as local_num_blocks does: scale, then whole blocks
        ranks.append(
            RankPlan(
                rank=r, weight_bytes=s.weight_bytes, weights=s.weights, rotary_table_bytes=s.rotary_table_bytes,
                num_kv_heads=s.num_kv_heads, kv_bytes_per_block=s.kv_bytes_per_block, kv_budget_bytes=scaled,
                budget_source=how, budget_scale=scale, local_num_blocks=scaled // s.kv_bytes_per_block,
                expert_bytes=s.expert_bytes, active_weight_bytes=s.active_weight_bytes,
            )
        )  # fmt: skip

    # ---- the agreement, and whether one sequence of max_model_len fits (establish_kv_cache's check)
    local = [r.local_num_blocks for r in ranks]
    agreed = min(local)
    short = local.index(agreed)
    if tp > 1 and max(local) > 0 and (max(local) - agreed) / max(local) > SKEW_WARNING:
        notes.append(
            f"KV estimates differ by more than {SKEW_WARNING:.0%} across ranks ({local}); the engine will warn, "
            f"and every rank will use {agreed} blocks"
        )
    replicas = max(s.kv_head_replicas for s in shards)
    if replicas > 1:
        notes.append(f"fewer KV heads than ranks: each KV head is replicated on {replicas} ranks")
    max_model_len = config.max_model_len
    needed = -(-max_model_len // bs)
    if agreed < needed and not config.max_model_len_explicit and agreed > 0:
        # As establish_kv_cache does: without an explicit max_model_len the engine serves what fits.
        max_model_len = agreed * bs
        notes.append(
            f"the model's context ({config.max_model_len}) does not fit the KV cache: the engine will serve "
            f"max_model_len {max_model_len}; raise kv_cache_memory or pass max_model_len to choose"
        )
        needed = -(-max_model_len // bs)
    elif agreed < needed:
        short_by, per_block = needed - agreed, ranks[short].kv_bytes_per_block
        problems.append(
            f"KV cache too small: rank {short} can hold {agreed} blocks of {bs} tokens but one sequence of "
            f"max_model_len ({config.max_model_len}) needs {needed} blocks (short by {short_by} blocks, "
            f"{fmt_bytes(short_by * per_block)}); raise kv_cache_memory to at least "
            f"{fmt_bytes(math.ceil(needed * per_block / ranks[short].budget_scale))} per rank, or lower "
            f"max_model_len to {agreed * bs} or less"
        )

    concurrency = concurrency_table(agreed, bs, max_model_len, config.max_num_seqs, lengths)
    notes += [
        f"a single sequence of {c.length} tokens does not fit in the agreed KV cache ({agreed * bs} tokens)"
        for c in concurrency
        if c.max_seqs_by_kv == 0 and not c.is_max_model_len  # max_model_len itself is a problem above
    ]
    return Plan(
        model=path,
        architecture=", ".join(getattr(hf, "architectures", None) or ["?"]),
        device=config.device,
        dtype=str(config.dtype).removeprefix("torch."),
        kv_cache_dtype=str(config.kv_cache_dtype).removeprefix("torch."),
        tensor_parallel_size=tp,
        block_size=bs,
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        kv_cache_memory=config.kv_cache_memory,
        exact=exact,
        host_available_bytes=host_available,
        ranks=ranks,
        num_blocks=agreed,
        short_rank=short,
        blocks_per_max_len_seq=needed,
        concurrency=concurrency,
        skipped_lengths=sorted(n for n in lengths if n > max_model_len),
        problems=problems,
        notes=notes,
    )


def concurrency_table(
    num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int, lengths: tuple[int, ...]
) -> list[Concurrency]:
    """Sequences that fit at once at ``max_model_len`` and at each of ``lengths`` not longer than it."""
    table = []
    for n in sorted({max_model_len, *(n for n in lengths if n <= max_model_len)}):
        per_seq = -(-n // block_size)
        by_kv = num_blocks // per_seq
        table.append(
            Concurrency(
                length=n, blocks_per_seq=per_seq, max_seqs_by_kv=by_kv, max_seqs=min(by_kv, max_num_seqs),
                limited_by="kv_cache" if by_kv < max_num_seqs else "max_num_seqs", is_max_model_len=n == max_model_len,
            )
        )  # fmt: skip
    return table


def _cpu_budgets(
    config: Any, weight_bytes: list[int], host_available: int | None, problems: list[str], notes: list[str]
) -> tuple[list[tuple[int, str]], bool, int]:
    """Each rank's KV budget as ``cpu_kv_budget`` will decide it once the weights are loaded."""
    from nanoserve.platform import host_available_memory
    from nanoserve.runner.memory import MAX_HOST_KV_FRACTION, cpu_kv_budget

    tp = config.tensor_parallel_size
    available = host_available_memory() if host_available is None else host_available
    all_weights = sum(weight_bytes)  # every local rank holds its shard in host memory
    if all_weights > available:
        problems.append(
            f"the weights of all {tp} ranks ({fmt_bytes(all_weights)}) exceed the host's available memory "
            f"({fmt_bytes(available)})"
        )
    # Ranks measure available memory after loading their shard; predict that as now minus all the weights.
    at_start = max(0, available - all_weights)
    budget, how = cpu_kv_budget(config.kv_cache_memory, at_start, tp)
    exact = config.kv_cache_memory is not None and budget == config.kv_cache_memory
    if config.kv_cache_memory is not None and not exact:
        notes.append(
            f"kv_cache_memory {fmt_bytes(config.kv_cache_memory)} exceeds {MAX_HOST_KV_FRACTION:.0%} of this host's "
            f"available memory per rank after the weights ({fmt_bytes(at_start)} / {tp}); it will be capped"
        )
    if not exact:
        notes.append(
            "the KV budget depends on the host's available memory when the ranks start; pass --kv-cache-memory "
            "for an exact plan"
        )
    return [(budget, how)] * tp, exact, available


def _cuda_budgets(
    config: Any, shards: list[ShardSizes], problems: list[str], notes: list[str]
) -> list[tuple[int, str]]:
    """Each rank's KV budget as ``local_num_blocks`` computes it on CUDA, with the device's memory as it is now."""
    hidden = config.hf_config.hidden_size
    tp = config.tensor_parallel_size
    if tp > torch.cuda.device_count():
        problems.append(
            f"tensor_parallel_size {tp} needs {tp} CUDA devices on this host, found {torch.cuda.device_count()}"
        )
    budgets = []
    for rank, shard in enumerate(shards):
        resident_bytes = shard.weight_bytes + shard.rotary_table_bytes
        activation = 4 * config.max_num_batched_tokens * (hidden + shard.mlp_width) * 4
        device = rank % max(1, torch.cuda.device_count())
        free, total = torch.cuda.mem_get_info(device)
        usable = int(total * config.gpu_memory_utilization)
        if resident_bytes > usable:
            problems.append(
                f"rank {rank}: weights ({fmt_bytes(resident_bytes)}) exceed gpu_memory_utilization x device memory "
                f"({fmt_bytes(usable)})"
            )
        budget = usable - resident_bytes - (total - free) - activation
        if config.kv_cache_memory is not None:
            budget = min(budget, config.kv_cache_memory)
        budgets.append((budget, f"gpu_memory_utilization={config.gpu_memory_utilization} (estimate)"))
    notes.append("on CUDA the KV budget depends on the device's free memory at start-up: the plan is an estimate")
    return budgets


# ---------------------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------------------


def probe(plan: Plan, model: str | None = None, **engine_options: Any) -> ProbeResult:
    """Start the real engine with the same options, read ``kv_cache_info()`` and compare it with ``plan``."""
    from nanoserve.llm import LLM

    try:
        llm = LLM(resolve_model(model), **engine_options)
    except RuntimeError as exc:
        # A worker's failure carries its whole traceback; the last line is the reason.
        reason = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
        result = ProbeResult(kv_cache_info=None, weight_bytes_rank0=None, error=reason[0].strip())
        if plan.fits:
            result.differences.append(f"the plan predicted the engine would start, but it refused: {result.error}")
        elif "KV cache too small" not in result.error or not any("KV cache too small" in p for p in plan.problems):
            result.differences.append("the engine refused to start for a different reason than the plan gave")
        return result
    try:
        info = llm.kv_cache_info()
        runner = getattr(llm.engine.executor, "runner", None)
        weight = runner.weight_bytes() if runner is not None else None
    finally:
        llm.close()
    result = ProbeResult(kv_cache_info=info, weight_bytes_rank0=weight, error=None)
    if not plan.fits:
        result.differences.append(
            f"the plan predicted the engine would not start ({'; '.join(plan.problems)}), but it did"
        )
    _compare(plan, info, weight, result)
    return result


def _compare(plan: Plan, info: dict[str, Any], weight: int | None, result: ProbeResult) -> None:
    def check(what: str, predicted: Any, actual: Any, host_dependent: bool = False) -> None:
        if predicted == actual:
            return
        if host_dependent and not plan.exact and _within(predicted, actual):
            result.drift.append(
                f"{what}: predicted {predicted}, engine {actual} (free memory changed between plan and probe)"
            )
        else:
            result.differences.append(f"{what}: predicted {predicted}, engine {actual}")

    check("block_size", plan.block_size, info["block_size"])
    check("bytes_per_block", [r.kv_bytes_per_block for r in plan.ranks], info["bytes_per_block"])
    check("local_num_blocks", [r.local_num_blocks for r in plan.ranks], info["local_num_blocks"], host_dependent=True)
    check("num_blocks", plan.num_blocks, info["num_blocks"], host_dependent=True)
    if info["allocated_num_blocks"] != [info["num_blocks"]] * len(info["allocated_num_blocks"]):
        result.differences.append(
            f"allocated_num_blocks {info['allocated_num_blocks']} differ from the agreed {info['num_blocks']}"
        )
    if weight is not None and plan.ranks:
        check("weight_bytes of rank 0", plan.ranks[0].weight_bytes, weight)


def _within(predicted: Any, actual: Any) -> bool:
    a = predicted if isinstance(predicted, list) else [predicted]
    b = actual if isinstance(actual, list) else [actual]
    return len(a) == len(b) and all(abs(x - y) <= DRIFT_TOLERANCE * max(abs(x), abs(y), 1) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="predict weight and KV cache memory per rank and how many sequences fit, from config.json alone",
        description=__doc__.split("\n\n")[0],
    )
    add_engine_args(p)
    g = p.add_argument_group("plan")
    g.add_argument(
        "--lengths",
        default=",".join(map(str, TYPICAL_LENGTHS)),
        help="comma-separated sequence lengths to report concurrency for, besides max_model_len",
    )
    g.add_argument(
        "--probe", action="store_true", help="also start the engine and compare kv_cache_info() with the plan"
    )
    g.add_argument("--json", action="store_true", help="print the plan as JSON (fields: see `pydoc nanoserve.tools.plan`)")
    p.set_defaults(run=run_cli)


def _parse_lengths(raw: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--lengths: expected comma-separated integers such as '512,2048', got {raw!r}") from None
    if any(n < 1 for n in lengths):
        raise ValueError(f"--lengths: lengths must be positive, got {raw!r}")
    return lengths


def run_cli(args: argparse.Namespace) -> int:
    options = engine_kwargs(args)
    plan = make_plan(args.model, lengths=_parse_lengths(args.lengths), **options)
    if args.probe:
        plan.probe = probe(plan, args.model, **options)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format_text())
    return 0 if plan.ok else 1
