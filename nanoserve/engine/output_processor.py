"""The one place a request finishes: detokenize incrementally, apply every stop rule, produce finish reasons
and the outputs users see.

Each step the engine hands over the sequences that received a token (and those the scheduler could not
continue). For each, in this order:

0. a constrained request's grammar matcher takes the token (see engine/structured_output.py);
1. a stop token ends it (EOS unless ``ignore_eos``, or one of ``stop_token_ids``; only once ``min_tokens``
   are out): the token stays in ``token_ids`` but adds no text;
2. otherwise its text is extended and searched for stop strings (again only past ``min_tokens``); the text is
   cut where one starts (or after it, with ``include_stop_str_in_output``);
3. otherwise a grammar that is complete ends it with ``"stop"`` (even on its ``max_tokens``-th token);
4. otherwise ``max_tokens`` or ``max_model_len`` end it with ``"length"``.

The sequences that ended go back to the scheduler in one list per step, which frees their blocks.

Work per step is proportional to the tokens the step produced, not to the length of the run: text is kept
as released pieces plus a short held-back tail (never rebuilt), and delta outputs carry only what is new.
While stop strings are set, the last ``longest stop - 1`` characters are held back until the next step
shows they do not begin a stop string, so text once released is never taken back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nanoserve.engine.detokenizer import DetokenizerState, find_stop_string
from nanoserve.engine.sequence import Sequence
from nanoserve.engine.step import Finish, PromptLogprobs
from nanoserve.outputs import CompletionOutput, Logprob, RequestOutput
from nanoserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


def token_finish(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> Finish | None:
    """The stop rules that need no text: stop tokens (past ``min_tokens``), then the length limits. The output
    processor applies the two halves with the stop-string search between them; this is the order for callers
    with no text (scheduler tests and benchmarks that run without a tokenizer)."""
    stop = stop_token_finish(seq, token, eos_token_ids)
    return stop if stop is not None else length_finish(seq, max_model_len)


def stop_token_finish(seq: Sequence, token: int, eos_token_ids: set[int]) -> Finish | None:
    params = seq.params
    if seq.num_output_tokens < params.min_tokens:
        return None
    if not params.ignore_eos and token in eos_token_ids:
        return Finish(seq, "stop")
    if token in params.stop_token_ids:
        return Finish(seq, "stop", token)
    return None


def length_finish(seq: Sequence, max_model_len: int) -> Finish | None:
    max_tokens = seq.params.max_tokens
    if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or len(seq.token_ids) >= max_model_len:
        return Finish(seq, "length")
    return None


@dataclass(slots=True)
class SampleState:
    """Output-side state of one sample (one sequence) of a request."""

    seq: Sequence
    detok: DetokenizerState
    window: int  # longest stop string - 1: how far back a stop string may begin before the new text
    holdback: int  # characters kept back while running: ``window``, or 0 when the stop string is kept
    pieces: list[str] = field(default_factory=list)  # released text, in order
    held: str = ""  # produced but not released yet (a suffix of ``tail``)
    tail: str = ""  # the last ``window`` characters of the text, released or not: where a stop may begin
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # How much of each a delta output has already carried.
    num_pieces_sent: int = 0
    num_tokens_sent: int = 0
    num_logprobs_sent: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_text(self, delta: str, stops: tuple[str, ...], check_stops: bool, keep_stop: bool) -> str | None:
        """Extend the text by ``delta``; returns the stop string found (the text is then cut), else None."""
        if not delta:
            return None
        pending = self.held + delta
        if stops:
            searched = self.tail + delta
            if check_stops:
                found = find_stop_string(searched, len(delta), stops)
                if found is not None:
                    stop, pos = found
                    end = pos + (len(stop) if keep_stop else 0) - (len(searched) - len(pending))
                    # The cut never falls in released text: a kept stop ends in the new text, a dropped one
                    # begins at most ``window`` characters back, all of which were held.
                    assert end >= 0, "a stop string cut into text already released"
                    self.pieces.append(pending[:end])
                    self.held = self.tail = ""
                    return stop
            self.tail = searched[-self.window :] if self.window else ""
        cut = max(0, len(pending) - self.holdback)
        if cut:
            self.pieces.append(pending[:cut])
        self.held = pending[cut:]
        return None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if self.held:  # nothing can begin a stop string any more
            self.pieces.append(self.held)
            self.held = ""
        self.finish_reason, self.stop_reason = reason, stop_reason

    def full_output(self) -> CompletionOutput:
        seq = self.seq
        return CompletionOutput(
            index=seq.sample_index,
            text="".join(self.pieces),
            token_ids=seq.token_ids[seq.num_prompt_tokens :],
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def delta_output(self) -> CompletionOutput:
        seq = self.seq
        start = seq.num_prompt_tokens + self.num_tokens_sent
        out = CompletionOutput(
            index=seq.sample_index,
            text="".join(self.pieces[self.num_pieces_sent :]),
            token_ids=seq.token_ids[start:],
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs[self.num_logprobs_sent :] if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        self.num_pieces_sent = len(self.pieces)
        self.num_tokens_sent = len(seq.token_ids) - seq.num_prompt_tokens
        self.num_logprobs_sent = len(self.logprobs) if self.logprobs is not None else 0
        return out


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    arrival_time: float
    first_token_time: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # prompt_logprobs: one entry per prompt token, None for the first; filled chunk by chunk.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False

    def prompt_logprobs_output(self) -> list[dict[int, Logprob] | None] | None:
        """The prompt log-probabilities once all are in (a delta output carries them once)."""
        lps = self.prompt_logprobs
        if lps is None or len(lps) < len(self.prompt_token_ids):
            return None
        if self.params.output_kind is RequestOutputKind.DELTA:
            if self.prompt_logprobs_sent:
                return None
            self.prompt_logprobs_sent = True
        return lps

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)


@dataclass
class ProcessedStep:
    outputs: list[RequestOutput]  # one per request that has something to report, by its output kind
    finished: list[Finish]  # for the scheduler: sequences that ended this step
    finished_requests: list[RequestState]  # requests that ended this step (every sample finished)


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
        seqs: list[Sequence], arrival_time: float,
    ) -> None:  # fmt: skip
        window = max((len(stop) for stop in params._stop_strings), default=1) - 1
        # A kept stop string ends in the newest text, so the cut never falls in released text: nothing is held.
        holdback = 0 if params.include_stop_str_in_output else window
        samples = [
            SampleState(
                seq, DetokenizerState.start(self.tokenizer, prompt_token_ids, params.skip_special_tokens), window,
                holdback,
                logprobs=[] if params.logprobs is not None else None,
            )
            for seq in seqs
        ]  # fmt: skip
        self.requests[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, params, samples, arrival_time,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )  # fmt: skip

    def add_prompt_logprobs(self, pieces: list[PromptLogprobs], scheduled: list[Sequence]) -> None:
        """Append a step's prompt log-probabilities (``pieces``, from the chunks of ``scheduled`` that asked) to
        their requests; a request aborted while the step ran is gone and takes none."""
        if not pieces:
            return
        by_id = {seq.seq_id: seq for seq in scheduled}
        for piece in pieces:
            state = self.requests.get(by_id[piece.seq_id].request_id)
            if state is None or state.prompt_logprobs is None:
                continue
            assert len(state.prompt_logprobs) == piece.start + 1, "prompt log-probabilities arrived out of order"
            for j, lp in enumerate(piece.token_logprobs):
                token = state.prompt_token_ids[piece.start + 1 + j]
                entry = {t: Logprob(v, r + 1) for r, (t, v) in enumerate(zip(piece.top_ids[j], piece.top_logprobs[j]))}
                entry[token] = Logprob(lp, piece.token_ranks[j])
                state.prompt_logprobs.append(entry)

    # ---- a step --------------------------------------------------------------------------------------
    def process(
        self, advanced: list[Sequence], logprobs: list[Any] | None, out_of_capacity: list[Sequence]
    ) -> ProcessedStep:
        """``advanced``: sequences that received a token this step (``logprobs[i]`` is sampler's
        ``SampledLogprobs`` for ``advanced[i]`` or None); ``out_of_capacity``: sequences the scheduler ended
        because the KV cache can never hold their next token."""
        now = time.monotonic()
        finished: list[Finish] = []
        touched: dict[str, RequestState] = {}
        for i, seq in enumerate(advanced):
            state = self.requests[seq.request_id]
            touched[seq.request_id] = state
            if state.first_token_time is None:
                state.first_token_time = now
                state.metrics["time_to_first_token"] = now - state.arrival_time
            sample = state.samples[seq.sample_index]
            lp = logprobs[i] if logprobs is not None else None
            if lp is not None:
                _append_logprobs(sample, seq.token_ids[-1], lp)
            finish = self._advance_grammar(seq)
            if finish is None:
                finish = self._apply_stop_rules(seq, sample)
            if finish is not None:
                sample.finish(finish.reason, finish.stop_reason)
                finished.append(finish)
        for seq in out_of_capacity:
            state = self.requests[seq.request_id]
            touched[seq.request_id] = state
            state.samples[seq.sample_index].finish("length")
        outputs, done = self._outputs(touched.values())
        return ProcessedStep(outputs, finished, done)

    @staticmethod
    def _advance_grammar(seq: Sequence) -> Finish | None:
        """Advance a constrained sequence's matcher by its new token. The sampler's mask allowed only grammatical
        tokens, so a refusal means the matcher itself failed: the sequence ends (``"abort"``) rather than
        continue unconstrained."""
        if seq.grammar is None or seq.grammar.accept(seq.token_ids[-1]):
            return None
        logger.warning("request %s: the grammar refused token %d (%s); ending the sequence",
                       seq.request_id, seq.token_ids[-1], seq.grammar.error or "no error reported")  # fmt: skip
        return Finish(seq, "abort")

    def _apply_stop_rules(self, seq: Sequence, sample: SampleState) -> Finish | None:
        token = seq.token_ids[-1]
        finish = stop_token_finish(seq, token, self.eos_token_ids)
        if finish is not None:
            return finish  # a stop token adds no text
        params = seq.params
        stop = sample.add_text(
            sample.detok.append(token), params._stop_strings, seq.num_output_tokens >= params.min_tokens,
            params.include_stop_str_in_output,
        )  # fmt: skip
        if stop is not None:
            # The same token may also have reached max_tokens: the stop string wins, as in vLLM, since it cut
            # the text.
            return Finish(seq, "stop", stop)
        if seq.grammar is not None and seq.grammar.is_finished:
            return Finish(seq, "stop")  # the output is complete: nothing but EOS could follow
        return length_finish(seq, self.max_model_len)

    def abort(self, request_id: str) -> tuple[list[Finish], RequestOutput | None]:
        """End every unfinished sample of a request with ``"abort"``: the finish decisions for the scheduler
        and the request's last output (None if the request is unknown)."""
        state = self.requests.get(request_id)
        if state is None:
            return [], None
        finished = []
        for sample in state.samples:
            if not sample.finished:
                sample.finish("abort")
                finished.append(Finish(sample.seq, "abort"))
        outputs, _ = self._outputs([state])
        return finished, outputs[0]

    # ---- outputs -------------------------------------------------------------------------------------
    def _outputs(self, states: Any) -> tuple[list[RequestOutput], list[RequestState]]:
        outputs: list[RequestOutput] = []
        done: list[RequestState] = []
        for state in states:
            finished = state.finished
            if finished:
                del self.requests[state.request_id]
                state.metrics["e2e_latency"] = time.monotonic() - state.arrival_time
                done.append(state)
            kind = state.params.output_kind
            if kind is RequestOutputKind.FINAL_ONLY and not finished:
                continue
            if kind is RequestOutputKind.DELTA:
                completions = [s.delta_output() for s in state.samples]
            else:
                completions = [s.full_output() for s in state.samples]
            outputs.append(
                RequestOutput(
                    request_id=state.request_id,
                    prompt=state.prompt,
                    prompt_token_ids=state.prompt_token_ids,
                    outputs=completions,
                    finished=finished,
                    num_cached_tokens=state.samples[0].seq.num_cached_prompt_tokens,
                    metrics=dict(state.metrics),
                    prompt_logprobs=state.prompt_logprobs_output(),
                )
            )
        return outputs, done


def _append_logprobs(sample: SampleState, token: int, lp: Any) -> None:
    sample.cumulative_logprob += lp.token_logprob
    entry = {tid: Logprob(v, rank + 1) for rank, (tid, v) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
    entry[token] = Logprob(lp.token_logprob, lp.token_rank)
    sample.logprobs.append(entry)
