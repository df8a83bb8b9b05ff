"""A sequence is one sample of one request: its tokens, how many have KV computed, and its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from nanoserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens catch up under the scheduler: ``num_computed_tokens`` (KV written) trails ``len(token_ids)``.

    There is no prefill or decode phase: a fresh prompt has many uncomputed tokens, a decoding sequence has
    one (the token sampled last step), a preempted one has all of them again.
    """

    seq_id: int
    request_id: str
    sample_index: int  # 0..n-1 within its request
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # memo of full-block hashes (prefix caching)
    num_hashed_blocks: int = 0  # block manager's cursor: blocks of block_ids already offered to the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    # Prompt positions whose next-token log-probabilities are computed (prompt_logprobs): positions 0..n-1 gave
    # the log-probabilities of prompt tokens 1..n. Kept through preemption, so none is computed twice.
    num_prompt_logprobs: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    first_sibling: Sequence | None = None  # sample 0 of the same request, whose prompt blocks we share
    # How many of block_ids the runner has been told about; 0 forces a full resend (new or preempted).
    num_blocks_sent: int = 0
    # A constrained request's position in its grammar (engine.structured_output.GrammarMatcher): the sampler
    # masks with it, the output processor advances it with each accepted token.
    grammar: Any = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_logprobs_pending(self) -> bool:
        """This sequence still owes prompt log-probabilities (only sample 0 of a request computes them)."""
        return (
            self.params.prompt_logprobs is not None
            and self.first_sibling is None
            and self.num_prompt_logprobs < self.num_prompt_tokens - 1
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
