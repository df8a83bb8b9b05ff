"""The step's messages, in one place: what the scheduler decides (:class:`SchedulerOutput`), what crosses to
every rank (:class:`StepInput` of :class:`ScheduledChunk`), and what comes back (:class:`RunnerOutput`).

Both the scheduler and the model runner import this module; neither imports the other. Only ``StepInput``
crosses a process boundary (pickled, broadcast to the ranks), so it holds plain ints and lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanoserve.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's work in a step.

    Size on the wire (pickled): a few ints plus the chunk's token ids and only the block ids added since the
    last message — 3-5 bytes per prefill token and about 45 bytes per decoding sequence per step.
    """

    seq_id: int
    start: int  # position of token_ids[0]; tokens before it already have KV in the cache
    token_ids: list[int]
    block_ids: list[int]  # blocks appended since the last message (the whole table when ``reset``)
    reset: bool  # the runner has no table for this sequence (new, or back from preemption)
    sample: bool  # the chunk ends the sequence's known tokens: sample the next one from its last position
    # prompt_logprobs: the log-probabilities of these tokens, each at the position before it, from the chunk's
    # rows from position ``logprobs_start`` on (``prompt_logprobs_k`` top tokens with each).
    prompt_logprobs_targets: list[int] | None = None
    logprobs_start: int = 0
    prompt_logprobs_k: int = 0


@dataclass(frozen=True)
class StepInput:
    """The message one step sends to every rank.

    A step may carry only ``released_seq_ids`` (no chunks): the ranks then just forget those block tables,
    so a drained engine leaves no stale table on any rank. ``report_tables`` asks every rank how many block
    tables it still holds (a check for tests; rank 0 gets the counts by rank in ``RunnerOutput``).
    """

    chunks: list[ScheduledChunk]
    released_seq_ids: list[int]
    report_tables: bool = False
    # Every sampling chunk takes the plain argmax of its logits (Sampler.plain_greedy): rank 0 may return the
    # tokens instead of the logits (RunnerOutput.token_ids).
    greedy: bool = False


@dataclass
class PromptLogprobs:
    """Prompt log-probabilities of one chunk (rank 0): for the prompt tokens at positions ``start + 1`` on, each
    one's log-probability and rank under the model, and the ``k`` most likely tokens there."""

    seq_id: int
    start: int
    token_logprobs: list[float]
    token_ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class RunnerOutput:
    """What rank 0's runner returns: logits [num_sampling_chunks, vocab] in chunk order (None when no chunk
    samples), the prompt log-probabilities the chunks asked for, and, when asked, every rank's number of block
    tables."""

    logits: Any = None  # torch.Tensor | None
    num_block_tables: list[int] | None = None
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # For a greedy step the C decode step ran through to the argmax: the sampling chunks' next tokens, in chunk
    # order, and no logits.
    token_ids: list[int] | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """A finish decision for one sequence: made by the output processor, applied by the scheduler (which
    frees its blocks)."""

    seq: Sequence
    reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None


@dataclass
class SchedulerOutput:
    """The scheduler's decisions for one step. Driver-side only; ``step_input`` is what the ranks see."""

    chunks: list[ScheduledChunk]
    released_seq_ids: list[int]  # sequences the runner should forget (finished, aborted, preempted)
    seqs: list[Sequence] = field(default_factory=list)  # driver-side twin of ``chunks``; never sent
    num_preempted: int = 0
    # Sequences the scheduler could not continue (alone and still out of KV blocks): the output processor
    # ends them with finish_reason "length".
    out_of_capacity: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [s for c, s in zip(self.chunks, self.seqs) if c.sample]

    def step_input(self, greedy: bool = False) -> StepInput:
        return StepInput(self.chunks, self.released_seq_ids, greedy=greedy)
