"""Turn the last-position logits of each sampling sequence into next tokens (and log-probabilities).

Order of operations, as in vLLM v1: log-probabilities are taken from the raw model logits; then penalties,
logit_bias / allowed_token_ids / bad_words, min_tokens suppression, the grammar masks of constrained requests, then greedy argmax or sampling: temperature, min-p, top-k, top-p (``_truncate``).
Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which needs no host sync per row, and a
per-sequence generator for seeded requests, so a seeded request samples the same tokens alone or in any batch.

Penalties read per-sequence state (``_PenaltyState``) that is brought up to date with only the tokens appended
since the sampler last saw the sequence, so their host work per step does not grow with the sequence; on the
device they touch only the distinct tokens seen (at a 152k vocabulary, full-vocabulary masks cost ~2 ms a row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from nanoserve.engine.sequence import Sequence
from nanoserve.engine.structured_output import apply_token_bitmask
from nanoserve.layers import native
from nanoserve.sampling_params import SamplingParams


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value, the first of ties (NaN counts as largest), as ``argmax`` gives.
    On CPU the native kernel reads the row once (151,936 logits: ~235 us of a decode step with ``max(dim)``,
    which was itself 3x faster than ``argmax``); elsewhere ``max(dim)``."""
    lib = native.kernels_for(x.dtype, x.device) if x.dim() == 2 and x.shape[1] and x.stride(1) == 1 else None
    if lib is not None:
        return native.argmax_rows(lib, x)
    return x.max(dim=-1).indices


@dataclass(slots=True)
class SampledLogprobs:
    token_logprob: float
    token_rank: int  # 1 = the most likely token
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampledLogprobs | None]


def _seed_for(seed: int, sample_index: int) -> int:
    """The generator seed for sample ``sample_index`` of a request seeded with ``seed`` (any Python int,
    negative or beyond 64 bits): the same pair always gives the same seed, different pairs differ except by
    hash chance. A hash, not arithmetic, because torch's CPU generator keeps only the low 32 bits of its seed:
    with ``seed * c + i`` the seeds ``s`` and ``s + 2**32`` (or ``-1`` and ``2**64 - 1``) shared one stream.
    Every bit of the pair reaches the low 32 bits of the hash. Masked to 63 bits: a valid seed everywhere."""
    # Two's-complement bytes, not str(seed): str raises beyond 4300 digits, and this runs on the engine thread.
    data = seed.to_bytes(seed.bit_length() // 8 + 1, "little", signed=True)
    return xxhash.xxh3_64_intdigest(data, seed=sample_index) & 0x7FFF_FFFF_FFFF_FFFF


def _truncate(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The temperature-scaled ``logits`` ([N, V], row i sampled with ``params[i]``, none greedy) with every
    token that truncation drops set to -inf; ``logits`` itself is not modified. vLLM v1's order:

    1. divide by the temperature (>= SAMPLING_EPS for rows that are not greedy, so dividing is safe);
    2. min-p: drop tokens whose probability is below ``min_p`` times the largest, both taken on the full
       temperature-scaled distribution;
    3. top-k, then top-p on the distribution renormalised over what remains, so min-p can make top-p keep fewer
       tokens than it would alone.

    The most likely token always stays (``min_p <= 1``; top-p keeps its first token), so no row loses every
    token. Only host-side Python values decide which steps run: no device sync.
    """
    device = logits.device
    vocab = logits.shape[1]
    # A temperature beyond float32's range would become inf, and -inf / inf (a masked token) is NaN.
    max_temp = torch.finfo(logits.dtype).max
    temps = torch.tensor([min(p.temperature, max_temp) for p in params], dtype=logits.dtype, device=device)
    logits = logits / temps[:, None]
    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, dtype=probs.dtype, device=device)[:, None]
        logits.masked_fill_(probs < threshold, float("-inf"))
    # top_k beyond the vocabulary keeps everything (and a bignum must not reach an int64 tensor).
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        k = torch.tensor(top_k, device=device)
        sorted_logits.masked_fill_(ranks >= k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens strictly before it already reach top_p. The most likely token always
        # stays, however small top_p is.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        p = torch.tensor(top_p, dtype=before.dtype, device=device)
        drop = before >= p[:, None]
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
    return logits


@dataclass(slots=True)
class _DistinctIds:
    """Distinct token ids seen so far: a host set, which tells the new ones apart in O(1) each, and the same
    ids in arrival order at the front of a [V] device buffer, which indexes the logits: the penalties then
    touch only these entries, never the whole vocabulary."""

    members: set[int]
    buffer: torch.Tensor  # [V] int64; buffer[: len(members)] holds the members

    @classmethod
    def empty(cls, vocab: int, device: torch.device) -> _DistinctIds:
        return cls(set(), torch.empty(vocab, dtype=torch.long, device=device))

    @property
    def index(self) -> torch.Tensor:
        return self.buffer[: len(self.members)]


@dataclass(slots=True)
class _PenaltyState:
    """What the penalties of one sequence need, counted over ``token_ids[:num_counted]`` and brought up to date
    each step with only the tokens appended since. Token ids >= V are never counted. A preempted sequence
    keeps its token_ids (they are recomputed, not re-sampled), so the state stays valid across preemption."""

    seen: _DistinctIds | None  # tokens of the prompt and the output; None without repetition_penalty
    output: _DistinctIds | None  # tokens of the output; None without presence/frequency penalties
    counts: torch.Tensor | None  # [V] float32: occurrences in the output (with ``output``)
    num_counted: int = 0


def _add_distinct(distinct: _DistinctIds, tokens: list[int], vocab: int) -> list[int]:
    """Add ``tokens`` (ids >= ``vocab`` ignored) to ``distinct``'s host set; returns the new ones, in order, for
    the caller to write into its device buffer."""
    new = []
    for t in tokens:
        if t < vocab and t not in distinct.members:
            distinct.members.add(t)
            new.append(t)
    return new


def _restrict_tokens(row: torch.Tensor, seq: Sequence) -> None:
    """``logit_bias``, then ``allowed_token_ids``, then ``bad_words`` on one row of logits ([V], in place)."""
    params, vocab = seq.params, row.shape[0]
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=row.device)
        row[ids] += torch.tensor(list(params.logit_bias.values()), dtype=row.dtype, device=row.device)
    if params.allowed_token_ids:
        keep = torch.tensor(params.allowed_token_ids, device=row.device)
        kept = row[keep]
        row.fill_(float("-inf"))
        row[keep] = kept
    if params._bad_words_token_ids:
        output = seq.token_ids[seq.num_prompt_tokens :]
        banned = [
            word[-1] for word in params._bad_words_token_ids
            if word[-1] < vocab and (len(word) == 1 or tuple(output[len(output) - len(word) + 1 :]) == word[:-1])
        ]  # fmt: skip
        if banned:
            row[banned] = float("-inf")


class Sampler:
    def __init__(self, eos_token_ids: set[int], seed: int, device: torch.device | str = "cpu") -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}
        self._penalty_states: dict[int, _PenaltyState] = {}  # only for sequences whose params have penalties

    def forget(self, seq_id: int) -> None:
        """Drop what the sampler keeps for a sequence (its seeded generator, its penalty state); the engine calls
        this once the sequence's request has ended."""
        self._seq_generators.pop(seq_id, None)
        self._penalty_states.pop(seq_id, None)

    @staticmethod
    def plain_greedy(seqs: list[Sequence]) -> bool:
        """Whether every row's token is the plain argmax of its logits: greedy, and nothing below edits the
        logits or reads them (penalties, logit_bias / allowed_token_ids / bad_words, min_tokens holding stop
        tokens back, a grammar, log-probabilities). Such a step may take its tokens from the runner."""
        return all(
            s.params.greedy and not s.params.has_penalties and not s.params.restricts_tokens
            and s.params.logprobs is None and s.grammar is None and s.num_output_tokens >= s.params.min_tokens
            for s in seqs
        )  # fmt: skip

    # The runner returns logits made under inference_mode (inference tensors); penalties and min_tokens
    # masking edit them in place, which torch only allows inside inference_mode too.
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [N, V], row i belongs to seqs[i]. Rows are modified in place (penalties, masking)."""
        logits = logits.float()
        logprob_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

        self._apply_penalties(logits, seqs)
        for i, seq in enumerate(seqs):
            if seq.params.restricts_tokens:
                _restrict_tokens(logits[i], seq)
        for i, seq in enumerate(seqs):
            params = seq.params
            # A complete grammar allows only EOS: min_tokens cannot hold it open (it would leave no token at all).
            if seq.num_output_tokens < params.min_tokens and not (seq.grammar is not None and seq.grammar.is_finished):
                banned = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
                # A stop id outside the vocabulary can never be sampled anyway; indexing with it would raise.
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[i, banned] = float("-inf")
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            self._apply_grammars(logits, seqs, constrained)

        tokens = argmax_rows(logits)
        # Which rows sample is known on the host: no device sync to find them.
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = self._sample(logits[index], [seqs[i] for i in rows])
        token_list = tokens.tolist()

        out_logprobs: list[SampledLogprobs | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            chosen = torch.tensor([token_list[i] for i in logprob_rows], device=logits.device)
            chosen_lp = raw_logprobs.gather(1, chosen[:, None]).squeeze(1)
            ranks = (raw_logprobs > chosen_lp[:, None]).sum(dim=1) + 1
            k_max = max(seqs[i].params.logprobs for i in logprob_rows)
            top_lp, top_ids = raw_logprobs.topk(k_max, dim=-1) if k_max else (None, None)
            for j, i in enumerate(logprob_rows):
                k = seqs[i].params.logprobs
                out_logprobs[i] = SampledLogprobs(
                    token_logprob=float(chosen_lp[j]),
                    token_rank=int(ranks[j]),
                    top_ids=top_ids[j, :k].tolist() if k else [],
                    top_logprobs=top_lp[j, :k].tolist() if k else [],
                )
        return SamplerOutput(token_list, out_logprobs)

    @staticmethod
    def _apply_grammars(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        """Rows of constrained sequences keep only the tokens their grammar allows next (the others become
        -inf), after the penalties, before greedy or sampling, as in vLLM; log-probabilities stay those of the
        model's own distribution."""
        bitmask = torch.empty((len(rows), -(-logits.shape[1] // 32)), dtype=torch.int32)  # host: the matchers write it
        for j, i in enumerate(rows):
            seqs[i].grammar.fill_bitmask(bitmask, j)
        kernels = native.kernels_for(logits.dtype, logits.device)
        if kernels is not None and logits.stride(1) == 1:
            native.apply_token_bitmask(kernels, logits, rows, bitmask)  # in place, no gather/scatter of rows
            return
        index = torch.tensor(rows, device=logits.device)
        masked = logits[index]
        apply_token_bitmask(masked, bitmask)
        logits[index] = masked

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """OpenAI/vLLM definitions, on the rows of ``logits`` ([N, V], modified in place) whose sequence has
        penalties: ``repetition_penalty`` divides the positive logits and multiplies the negative ones of every
        token in the prompt or the output; ``frequency_penalty`` is subtracted once per occurrence of a token in
        the output, ``presence_penalty`` once from every token that occurs there. Token ids >= V are ignored.

        Host work is proportional to the tokens appended since the previous call for each sequence, not to its
        length: those cross to the device in one copy for the whole batch and update the kept state."""
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return
        vocab = logits.shape[1]
        states = [self._penalty_state_for(seqs[i], vocab, logits.device) for i in rows]
        # Every row's new tokens go to the device in one copy: per row, the new distinct ids of ``seen``, every
        # new output token (for ``counts``), then the new distinct ids of ``output``.
        new_ids: list[int] = []
        spans: list[tuple[int, int, int, int]] = []
        for i, state in zip(rows, states):
            seq = seqs[i]
            a = len(new_ids)
            if state.seen is not None:
                new_ids += _add_distinct(state.seen, seq.token_ids[state.num_counted :], vocab)
            b = len(new_ids)
            if state.output is not None:
                output = [t for t in seq.token_ids[max(state.num_counted, seq.num_prompt_tokens) :] if t < vocab]
                new_ids += output
                c = len(new_ids)
                new_ids += _add_distinct(state.output, output, vocab)
            else:
                c = b
            spans.append((a, b, c, len(new_ids)))
            state.num_counted = len(seq.token_ids)
        if new_ids:
            ids = torch.tensor(new_ids, dtype=torch.long, device=logits.device)
            ones = torch.ones(len(new_ids), dtype=torch.float32, device=logits.device)
            for state, (a, b, c, d) in zip(states, spans):
                if b > a:
                    n = len(state.seen.members)
                    state.seen.buffer[n - (b - a) : n] = ids[a:b]
                if c > b:
                    state.counts.index_add_(0, ids[b:c], ones[b:c])
                if d > c:
                    n = len(state.output.members)
                    state.output.buffer[n - (d - c) : n] = ids[c:d]
        for i, state in zip(rows, states):
            params, row = seqs[i].params, logits[i]
            if state.seen is not None and state.seen.members:
                penalty, index = params.repetition_penalty, state.seen.index
                values = row[index]
                row[index] = torch.where(values > 0, values / penalty, values * penalty)
            if state.output is not None and state.output.members:
                # Tokens absent from the output would lose 0: only those present are touched.
                index = state.output.index
                row[index] -= params.frequency_penalty * state.counts[index].to(row.dtype) + params.presence_penalty

    def _penalty_state_for(self, seq: Sequence, vocab: int, device: torch.device) -> _PenaltyState:
        state = self._penalty_states.get(seq.seq_id)
        # token_ids only grow while a sequence lives; should they ever shrink, count again from the start.
        if state is None or state.num_counted > len(seq.token_ids):
            params = seq.params
            seen = _DistinctIds.empty(vocab, device) if params.repetition_penalty != 1 else None
            wants_counts = params.presence_penalty != 0 or params.frequency_penalty != 0
            output = _DistinctIds.empty(vocab, device) if wants_counts else None
            counts = torch.zeros(vocab, dtype=torch.float32, device=device) if wants_counts else None
            state = self._penalty_states[seq.seq_id] = _PenaltyState(seen, output, counts)
        return state

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits: [N, V] of rows that are not greedy."""
        probs = _truncate(logits, [s.params for s in seqs]).softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=self._generator_for(seq))
        return argmax_rows(probs / noise)

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        gen = self._seq_generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(self.device).manual_seed(_seed_for(seq.params.seed, seq.sample_index))
            self._seq_generators[seq.seq_id] = gen
        return gen
