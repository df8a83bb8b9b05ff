"""Continuous batching under a per-step token budget, with chunked prefill and preemption by recompute.

Each step, running sequences go first (oldest first): each asks for the tokens it has not computed yet —
one for a decoding sequence, a chunk for a long prompt. If the KV cache cannot hold them, the newest running
sequence is preempted (its blocks freed, its tokens kept to be recomputed later). Then, if nothing was
preempted, waiting sequences are admitted first-come-first-served while budget, ``max_num_seqs`` and blocks
allow, keeping ``watermark_blocks`` free for the running sequences to grow into (without it, admission
may take every free block and the next decode step preempts the newcomer again). The decisions leave as a
:class:`SchedulerOutput`; the sampled tokens come back through :meth:`Scheduler.update_from_output`. The
scheduler never decides that a request is done: the output processor does, and hands the finished sequences
back through :meth:`Scheduler.finish_seqs`, once per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from nanoserve.engine.sequence import Sequence, SequenceStatus
from nanoserve.engine.step import Finish, ScheduledChunk, SchedulerOutput
from nanoserve.kvcache.block_manager import BlockManager


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    # Blocks admission leaves free for running sequences (see the module docstring); chosen by measurement
    # in benchmarks/preemption_watermark.py.
    watermark_blocks: int = 0


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager) -> None:
        self.limits = limits
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._released: list[int] = []
        self.num_admitted = 0
        self.num_finished = 0
        self.num_preemptions = 0

    # ---- intake and exits ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.num_admitted += 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_pending_releases(self) -> bool:
        """Sequences the runners still hold tables for; the next step message carries them."""
        return bool(self._released)

    def take_released(self) -> list[int]:
        released, self._released = self._released, []
        return released

    def finish_seqs(self, finishes: Iterable[Finish]) -> None:
        """Apply the output processor's finish decisions of one step: end each sequence, free its blocks."""
        for f in finishes:
            self._finish(f.seq, f.reason, f.stop_reason)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End ``seq`` (any state) and return its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if seq.block_ids:
            self.block_manager.free(seq)
        if seq.num_blocks_sent:
            self._released.append(seq.seq_id)
        seq.num_blocks_sent = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.num_finished += 1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        if seq.num_blocks_sent:
            self._released.append(seq.seq_id)
        seq.num_blocks_sent = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- the step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.limits.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        out_of_capacity: list[Sequence] = []
        num_preempted = 0

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while not self.block_manager.append_slots(seq, num_new):
                if len(self.running) == 1:
                    # Alone and still out of blocks: the cache can never hold this sequence's next token.
                    self._finish(seq, "length")
                    out_of_capacity.append(seq)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                num_preempted += 1
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            # seq was finished or preempted; the element now at index i (if any) is the next one

        if num_preempted == 0:
            budget = self._admit(budget, scheduled)

        chunks = [self._chunk(seq, n) for seq, n in scheduled]
        return SchedulerOutput(chunks, self.take_released(), [s for s, _ in scheduled], num_preempted, out_of_capacity)

    def _admit(self, budget: int, scheduled: list[tuple[Sequence, int]]) -> int:
        bm = self.block_manager
        i = 0  # index into waiting: samples waiting for their sibling's prompt are skipped, not waited on
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[i]
            sibling = seq.first_sibling
            if sibling is not None and not sibling.is_finished:
                if sibling.num_computed_tokens < sibling.num_prompt_tokens:
                    # Share its prompt blocks once it has computed them, instead of recomputing; meanwhile
                    # the requests behind this one go ahead.
                    i += 1
                    continue
            reused = bm.find_cached_prefix(seq)
            if seq.prompt_logprobs_pending:
                # A cached prefix has no hidden states to read log-probabilities from: reuse only blocks whose
                # positions have given theirs already (none at first admission), as vLLM does.
                reused = reused[: seq.num_prompt_logprobs // bm.block_size]
            shareable = (seq.num_prompt_tokens - 1) // bm.block_size
            if (
                sibling is not None
                and len(reused) < shareable
                and sibling.num_computed_tokens >= shareable * bm.block_size
                and len(sibling.block_ids) >= shareable
                and sibling.token_ids[: seq.num_prompt_tokens] == seq.token_ids[: seq.num_prompt_tokens]
            ):
                reused = sibling.block_ids[:shareable]
            remaining = len(seq.token_ids) - len(reused) * bm.block_size
            if remaining > budget and not self.limits.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            # Leave the watermark free for the running sequences, unless nothing runs (then nothing can be
            # preempted, and a sequence that fits must be admitted).
            watermark = self.limits.watermark_blocks if self.running else 0
            if not bm.can_allocate(seq, reused, num_new, reserve=watermark) or not bm.allocate(seq, reused, num_new):
                break
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = len(reused) * bm.block_size
                if sibling is None:
                    # One lookup per request: later samples reuse sample 0's blocks, which is no cache hit.
                    bm.record_lookup(seq.num_prompt_tokens, len(reused) * bm.block_size)
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return budget

    @staticmethod
    def _chunk(seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        reset = seq.num_blocks_sent == 0
        chunk = ScheduledChunk(
            seq_id=seq.seq_id,
            start=start,
            token_ids=seq.token_ids[start : start + num_new],
            block_ids=seq.block_ids[seq.num_blocks_sent :],
            reset=reset,
            sample=start + num_new == len(seq.token_ids),
        )
        seq.num_blocks_sent = len(seq.block_ids)
        if seq.prompt_logprobs_pending:
            # Positions num_prompt_logprobs.. of this chunk that precede a prompt token (the prompt's last
            # position precedes the first sampled token, which has logprobs of its own).
            first, end = seq.num_prompt_logprobs, min(start + num_new, seq.num_prompt_tokens - 1)
            assert start <= first, "a prompt position was skipped before its log-probabilities were computed"
            if first < end:
                chunk.prompt_logprobs_targets = seq.token_ids[first + 1 : end + 1]
                chunk.logprobs_start = first
                chunk.prompt_logprobs_k = seq.params.prompt_logprobs
        return chunk

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance computed counts and append sampled tokens (one per sampling chunk, in order). Returns the
        sequences that received a token, for the output processor to apply the stop rules to."""
        bm = self.block_manager
        tokens = iter(sampled_token_ids)
        advanced: list[Sequence] = []
        for chunk, seq in zip(output.chunks, output.seqs):
            if chunk.sample:
                token = next(tokens)
            if seq.is_finished or seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += len(chunk.token_ids)
            if chunk.prompt_logprobs_targets:
                seq.num_prompt_logprobs = chunk.logprobs_start + len(chunk.prompt_logprobs_targets)
            bm.cache_full_blocks(seq)
            if not chunk.sample:
                continue
            seq.token_ids.append(token)
            advanced.append(seq)
        return advanced

    # ---- checks --------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        holders = list(self.running) + [s for s in self.waiting if s.block_ids]
        self.block_manager.check_integrity(holders)
        assert all(s.status is SequenceStatus.RUNNING for s in self.running)
        assert all(s.status is SequenceStatus.WAITING for s in self.waiting)
        assert len(self.waiting) + len(self.running) + self.num_finished == self.num_admitted, (
            "a sequence was lost: waiting + running + finished != admitted"
        )
