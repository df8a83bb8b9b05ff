"""The scheduler without a model: fake sampled tokens go back through ``update_from_output``, and the output
processor's token rules (``token_finish``: stop tokens, max_tokens, max_model_len) decide what finishes, handed
back through ``finish_seqs`` as the engine does.

A fake runner mirrors the block tables from the ``ScheduledChunk`` messages alone (full table on ``reset``,
appended blocks otherwise, dropped on release), so the incremental protocol tensor-parallel workers rely on
is checked on every step as well.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoserve.engine.output_processor import token_finish
from nanoserve.engine.scheduler import Scheduler, SchedulerLimits
from nanoserve.engine.sequence import Sequence, SequenceStatus
from nanoserve.engine.step import Finish, SchedulerOutput
from nanoserve.kvcache.block_manager import BlockManager
from nanoserve.sampling_params import SamplingParams

EOS = 0
BS = 4
DEFAULT_TOKEN = 7  # what the fake model samples unless a test says otherwise


@dataclass
class Harness:
    scheduler: Scheduler
    tables: dict[int, list[int]] = field(default_factory=dict)  # the fake runner's mirror
    seq_ids: itertools.count = field(default_factory=itertools.count)
    outputs: list[SchedulerOutput] = field(default_factory=list)

    @property
    def bm(self) -> BlockManager:
        return self.scheduler.block_manager

    def add(self, prompt: int | list[int], params: SamplingParams | None = None, n: int = 1) -> list[Sequence]:
        tokens = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
        params = params or SamplingParams(max_tokens=8, ignore_eos=True)
        seqs: list[Sequence] = []
        for i in range(n):
            seq_id = next(self.seq_ids)
            seq = Sequence(seq_id, f"r{seq_id}", i, list(tokens), len(tokens), params)
            seq.first_sibling = seqs[0] if seqs else None
            seqs.append(seq)
            self.scheduler.add(seq)
        return seqs

    def step(self, sample: Callable[[Sequence], int] = lambda seq: DEFAULT_TOKEN) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self.outputs.append(out)
        for seq_id in out.released_seq_ids:
            self.tables.pop(seq_id, None)
        for chunk, seq in zip(out.chunks, out.seqs):
            assert chunk.seq_id == seq.seq_id
            if chunk.reset:
                self.tables[chunk.seq_id] = list(chunk.block_ids)
            else:
                assert chunk.seq_id in self.tables, "incremental update for a sequence the runner does not know"
                self.tables[chunk.seq_id].extend(chunk.block_ids)
            # The runner's table covers the chunk and equals the scheduler's.
            assert self.tables[chunk.seq_id] == seq.block_ids
            assert len(seq.block_ids) * BS >= chunk.start + len(chunk.token_ids)
            assert chunk.token_ids == seq.token_ids[chunk.start : chunk.start + len(chunk.token_ids)]
            assert chunk.start == seq.num_computed_tokens
        tokens = [sample(seq) for chunk, seq in zip(out.chunks, out.seqs) if chunk.sample]
        advanced = self.scheduler.update_from_output(out, tokens)
        limit = self.scheduler.limits.max_model_len
        finishes = [f for seq in advanced if (f := token_finish(seq, seq.token_ids[-1], {EOS}, limit)) is not None]
        self.scheduler.finish_seqs(finishes)
        self.scheduler.check_integrity()
        return out

    def run(self, max_steps: int = 1000, sample: Callable[[Sequence], int] = lambda seq: DEFAULT_TOKEN) -> int:
        steps = 0
        while self.scheduler.has_unfinished():
            self.step(sample)
            steps += 1
            assert steps <= max_steps, "scheduler made no progress"
        # Releases reach the runner with the next step; an idle step delivers the last ones.
        assert self.step(sample).is_empty
        return steps


def harness(
    *,
    num_blocks: int = 64,
    budget: int = 32,
    max_num_seqs: int = 16,
    max_model_len: int = 64,
    chunked: bool = True,
    caching: bool = True,
) -> Harness:
    bm = BlockManager(num_blocks, BS, caching)
    limits = SchedulerLimits(max_num_seqs, budget, max_model_len, chunked)
    return Harness(Scheduler(limits, bm))


def lens(out: SchedulerOutput) -> dict[int, int]:
    return {c.seq_id: len(c.token_ids) for c in out.chunks}


# ------------------------------------------------------------------------------------------------ batching


def test_token_budget_and_max_num_seqs_are_respected() -> None:
    h = harness(budget=20, max_num_seqs=3, num_blocks=200, max_model_len=128)
    for length in (3, 17, 9, 30, 1, 12, 25):
        h.add(length)
    h.run()
    assert all(out.num_batched_tokens <= 20 for out in h.outputs)
    assert all(len(out.chunks) <= 3 for out in h.outputs)
    assert max(out.num_batched_tokens for out in h.outputs) == 20  # the budget is used, not just respected
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_chunked_prefill_splits_a_long_prompt() -> None:
    h = harness(budget=16)
    (seq,) = h.add(50, SamplingParams(max_tokens=2, ignore_eos=True))
    chunks = [h.step().chunks[0] for _ in range(4)]
    assert [(c.start, len(c.token_ids), c.sample) for c in chunks] == [
        (0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)
    ]  # fmt: skip
    assert seq.num_output_tokens == 1 and seq.num_computed_tokens == 50
    assert [c.reset for c in chunks] == [True, False, False, False]
    out = h.step()  # the decode of the first sampled token
    assert (out.chunks[0].start, len(out.chunks[0].token_ids)) == (50, 1)
    assert seq.is_finished and seq.finish_reason == "length"


def test_without_chunking_a_prompt_waits_for_a_step_with_room() -> None:
    h = harness(budget=40, chunked=False)
    a, b = h.add(list(range(100, 130)))[0], h.add(list(range(200, 230)))[0]
    out = h.step()
    assert lens(out) == {a.seq_id: 30}  # b does not fit in the remaining 10 and is not split
    out = h.step()
    assert lens(out) == {a.seq_id: 1, b.seq_id: 30}
    assert all(c.sample for o in h.outputs for c in o.chunks)


def test_decodes_and_prefills_share_a_step() -> None:
    h = harness(budget=16)
    (a,) = h.add(5)
    h.step()  # a's prompt
    (b,) = h.add(40)
    out = h.step()
    # a's decode goes first, b's prefill chunk takes what is left of the budget.
    assert lens(out) == {a.seq_id: 1, b.seq_id: 15}
    assert [c.seq_id for c in out.chunks] == [a.seq_id, b.seq_id]
    assert out.num_batched_tokens == 16


def test_fcfs_admission_and_head_of_line() -> None:
    h = harness(num_blocks=16, budget=64, max_model_len=64, chunked=False)
    first = h.add(list(range(100, 140)), SamplingParams(max_tokens=4, ignore_eos=True))[0]  # 10 of 16 blocks
    big = h.add(list(range(200, 240)))[0]  # needs 10 more: does not fit next to `first`
    small = h.add(list(range(300, 302)))[0]  # would fit, but must not overtake `big`
    out = h.step()
    assert lens(out) == {first.seq_id: 40}
    assert big.status is SequenceStatus.WAITING and small.status is SequenceStatus.WAITING
    order: list[int] = []
    while h.scheduler.has_unfinished():
        out = h.step()
        order += [c.seq_id for c in out.chunks if c.reset]
    assert order == [big.seq_id, small.seq_id]


def test_prefix_cache_hit_inside_the_scheduler() -> None:
    h = harness(budget=64)
    (a,) = h.add(list(range(100, 118)), SamplingParams(max_tokens=1, ignore_eos=True))
    h.step()
    (b,) = h.add(list(range(100, 118)) + [5, 6])
    out = h.step()
    assert out.chunks[0].start == 16 and len(out.chunks[0].token_ids) == 4  # 4 full blocks came from the cache
    assert b.num_cached_prompt_tokens == 16
    assert (h.bm.stats.queries, h.bm.stats.hits) == (18 + 20, 16)
    assert a.is_finished


def test_parallel_samples_share_the_prompt_blocks() -> None:
    h = harness(budget=16, caching=False)  # sharing between samples does not need the prefix cache
    first, second, third = h.add(22, SamplingParams(n=3, max_tokens=3, ignore_eos=True, seed=1), n=3)
    h.step()
    assert second.status is SequenceStatus.WAITING  # waits for the prompt instead of computing it again
    h.step()  # first's prompt is complete now (22 = 16 + 6) and the siblings come in on its blocks
    out = h.step()
    shared = (22 - 1) // BS
    for sibling in (second, third):
        assert sibling.block_ids[:shared] == first.block_ids[:shared]
    assert {c.seq_id: c.start for c in out.chunks if c.seq_id != first.seq_id} == {
        second.seq_id: shared * BS, third.seq_id: shared * BS
    }
    assert all(h.bm.blocks[b].ref_count == 3 for b in first.block_ids[:shared])
    h.run()
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_samples_waiting_for_their_prompt_do_not_stall_the_queue() -> None:
    # Sample 1 waits until sample 0 has computed the shared prompt; the request behind it must not wait too.
    h = harness(budget=16, chunked=False)
    first, second = h.add(10, SamplingParams(n=2, max_tokens=3, ignore_eos=True, seed=1), n=2)
    (other,) = h.add(4)
    out = h.step()
    assert set(lens(out)) == {first.seq_id, other.seq_id}
    assert second.status is SequenceStatus.WAITING and h.scheduler.waiting[0] is second
    h.run()
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_sibling_blocks_are_no_prefix_cache_hit() -> None:
    h = harness(budget=64)
    h.add(22, SamplingParams(n=3, max_tokens=2, ignore_eos=True, seed=1), n=3)
    h.run()
    assert (h.bm.stats.queries, h.bm.stats.hits) == (22, 0)  # one lookup for the request; nothing was cached


def steady_overload(watermark_blocks: int) -> int:
    """Preemptions while requests keep arriving faster than a 64-block cache serves them."""
    bm = BlockManager(64, BS, enable_prefix_caching=False)
    h = Harness(Scheduler(SchedulerLimits(64, 256, 256, watermark_blocks=watermark_blocks), bm))
    lengths = itertools.cycle([(9, 34), (20, 16), (5, 45), (13, 31), (30, 29)])
    for _ in range(300):
        prompt, output = next(lengths)
        h.add(prompt, SamplingParams(max_tokens=output, ignore_eos=True))
        h.step()
    h.run()
    return h.scheduler.num_preemptions


def test_a_watermark_stops_admit_then_preempt_churn() -> None:
    # Deterministic (no model, no clock): 359 preemptions without a watermark, 177 with 4 blocks, 96 with 8.
    without, small, larger = steady_overload(0), steady_overload(4), steady_overload(8)
    assert without > 100, "the workload must overload the cache"
    assert small < 0.6 * without and larger < small, (without, small, larger)


# ------------------------------------------------------------------------------------------------ preemption


def test_preemption_takes_the_newest_and_it_comes_back() -> None:
    # 12 blocks: three 12-token prompts fill 9; decoding soon needs more than remain.
    h = harness(num_blocks=12, budget=64, max_model_len=40)
    seqs = [h.add(12, SamplingParams(max_tokens=16, ignore_eos=True))[0] for _ in range(3)]
    h.step()
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)
    while h.scheduler.num_preemptions == 0:
        out = h.step()
    newest = seqs[-1]
    assert newest.status is SequenceStatus.WAITING and newest.num_preemptions == 1
    assert newest.block_ids == [] and newest.num_computed_tokens == 0
    assert h.scheduler.waiting[0] is newest
    assert out.num_preempted == 1
    assert seqs[0].num_preemptions == seqs[1].num_preemptions == 0
    assert newest.seq_id not in lens(out)
    assert newest.seq_id in out.released_seq_ids  # the runner is told to drop its stale table
    tokens_before = list(newest.token_ids)
    h.run()
    assert all(s.finish_reason == "length" and s.num_output_tokens == 16 for s in seqs)
    assert newest.token_ids[: len(tokens_before)] == tokens_before  # generated tokens survived preemption
    resets = [c for o in h.outputs for c in o.chunks if c.seq_id == newest.seq_id and c.reset]
    assert len(resets) == 1 + newest.num_preemptions  # each re-admission sends the full table again
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_alone_and_out_of_blocks_finishes_instead_of_hanging() -> None:
    # Fewer blocks than max_model_len needs (the engine forbids this; the scheduler must still not hang).
    h = harness(num_blocks=3, budget=64, max_model_len=64)
    (seq,) = h.add(10, SamplingParams(max_tokens=30, ignore_eos=True))
    h.run(max_steps=50)
    # 3 blocks hold 12 tokens; the 13th was sampled, but there is no room for its KV: stop there.
    assert seq.finish_reason == "length" and len(seq.token_ids) == 13


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20), st.integers(1, 3)), min_size=1, max_size=8),
    extra_blocks=st.integers(0, 30),
    budget=st.integers(1, 48),
    max_num_seqs=st.integers(1, 6),
    chunked=st.booleans(),
    caching=st.booleans(),
    eos_every=st.integers(0, 7),
)
def test_no_request_is_ever_lost(
    prompts: list[tuple[int, int, int]],
    extra_blocks: int,
    budget: int,
    max_num_seqs: int,
    chunked: bool,
    caching: bool,
    eos_every: int,
) -> None:
    max_model_len = 64
    if not chunked:
        budget = max(budget, max_model_len)
    h = harness(
        num_blocks=max_model_len // BS + extra_blocks, budget=budget, max_num_seqs=max_num_seqs,
        max_model_len=max_model_len, chunked=chunked, caching=caching,
    )  # fmt: skip
    seqs = []
    for i, (prompt_len, max_tokens, n) in enumerate(prompts):
        # a few shared prefixes so the prefix cache plays a part; n > 1 shares prompt blocks between samples
        tokens = list(range(100, 100 + prompt_len)) if i % 2 else [i] * prompt_len
        seqs += h.add(tokens, SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=i % 3 == 0), n=n)
    calls = itertools.count(1)

    def sample(seq: Sequence) -> int:
        return EOS if eos_every and next(calls) % eos_every == 0 else DEFAULT_TOKEN

    h.run(max_steps=5000, sample=sample)
    sched = h.scheduler
    assert sched.num_finished == sched.num_admitted == len(seqs)
    for seq in seqs:
        assert seq.is_finished
        out = seq.output_token_ids
        assert 1 <= len(out) <= seq.params.max_tokens
        assert len(seq.token_ids) <= max_model_len
        if seq.finish_reason == "stop":
            assert out[-1] == EOS and not seq.params.ignore_eos and EOS not in out[:-1]
        else:
            assert seq.finish_reason == "length"
            assert len(out) == seq.params.max_tokens or len(seq.token_ids) == max_model_len
            assert seq.params.ignore_eos or EOS not in out
    assert all(o.num_batched_tokens <= budget for o in h.outputs)
    assert h.bm.num_free_blocks == h.bm.num_blocks and not h.tables


# ------------------------------------------------------------------------------------------------ finish reasons


def finish(params: SamplingParams, prompt: int = 4, tokens: list[int] | None = None, max_model_len: int = 64) -> Sequence:
    """Run one sequence to completion; the fake model emits ``tokens`` in order, then DEFAULT_TOKEN."""
    h = harness(max_model_len=max_model_len)
    (seq,) = h.add(prompt, params)
    queue = list(tokens or [])
    h.run(sample=lambda s: queue.pop(0) if queue else DEFAULT_TOKEN)
    return seq


def test_length_at_max_tokens() -> None:
    seq = finish(SamplingParams(max_tokens=5))
    assert (seq.finish_reason, seq.num_output_tokens, seq.stop_reason) == ("length", 5, None)


def test_length_at_max_model_len() -> None:
    seq = finish(SamplingParams(max_tokens=None), prompt=60, max_model_len=64)
    assert (seq.finish_reason, len(seq.token_ids), seq.num_output_tokens) == ("length", 64, 4)


def test_eos_stops_unless_ignored() -> None:
    seq = finish(SamplingParams(max_tokens=10), tokens=[5, 6, EOS, 8])
    assert (seq.finish_reason, seq.output_token_ids, seq.stop_reason) == ("stop", [5, 6, EOS], None)
    seq = finish(SamplingParams(max_tokens=5, ignore_eos=True), tokens=[5, 6, EOS, 8])
    assert (seq.finish_reason, seq.output_token_ids) == ("length", [5, 6, EOS, 8, DEFAULT_TOKEN])


def test_stop_token_ids_stop_with_the_token_as_reason() -> None:
    seq = finish(SamplingParams(max_tokens=10, stop_token_ids=[42]), tokens=[5, 42, 8])
    assert (seq.finish_reason, seq.output_token_ids, seq.stop_reason) == ("stop", [5, 42], 42)
    # ignore_eos does not switch off explicit stop tokens
    seq = finish(SamplingParams(max_tokens=10, stop_token_ids=[42], ignore_eos=True), tokens=[EOS, 42])
    assert (seq.finish_reason, seq.output_token_ids, seq.stop_reason) == ("stop", [EOS, 42], 42)


def test_min_tokens_defers_eos_and_stop_tokens() -> None:
    # With min_tokens=3, stop conditions count from the 3rd generated token on (as vLLM's stop checker).
    seq = finish(SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[42]), tokens=[EOS, 42, 5, 42])
    assert (seq.finish_reason, seq.output_token_ids) == ("stop", [EOS, 42, 5, 42])
    seq = finish(SamplingParams(max_tokens=10, min_tokens=3), tokens=[EOS, EOS, EOS])
    assert (seq.finish_reason, seq.output_token_ids) == ("stop", [EOS, EOS, EOS])
    seq = finish(SamplingParams(max_tokens=4, min_tokens=4), tokens=[EOS] * 4)
    assert (seq.finish_reason, seq.num_output_tokens) == ("stop", 4)


@pytest.mark.parametrize("state", ["waiting", "running"])
def test_finish_frees_blocks_in_any_state(state: str) -> None:
    h = harness(budget=8)
    (seq,) = h.add(20)
    if state == "running":
        h.step()
        assert seq.block_ids
    h.scheduler.finish_seqs([Finish(seq, "abort")])
    assert seq.is_finished and seq.finish_reason == "abort" and seq.block_ids == []
    h.scheduler.finish_seqs([Finish(seq, "abort")])  # idempotent
    assert h.scheduler.num_finished == 1
    out = h.step()
    assert out.is_empty
    assert (seq.seq_id in out.released_seq_ids) == (state == "running")
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_sequence_aborted_during_a_step_is_left_alone() -> None:
    h = harness()
    a, b = h.add(6)[0], h.add(6)[0]
    out = h.scheduler.schedule()
    h.scheduler.finish_seqs([Finish(a, "abort")])  # e.g. a client disconnected while the model ran
    advanced = h.scheduler.update_from_output(out, [11, 12])
    assert advanced == [b] and b.output_token_ids == [12]
    assert a.output_token_ids == [] and a.finish_reason == "abort"
    h.scheduler.check_integrity()
