"""The engine: requests in, one scheduled step at a time, outputs out. Synchronous; the offline ``LLM`` and
the async server engine both drive it."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoserve.config import EngineConfig
from nanoserve.distributed.kv_agreement import KVCacheInfo
from nanoserve.engine.detokenizer import DetokenizerState, find_stop_string
from nanoserve.engine.scheduler import Scheduler, SchedulerLimits
from nanoserve.engine.sequence import Sequence
from nanoserve.engine.step import StepInput
from nanoserve.kvcache.block_manager import BlockManager
from nanoserve.layers.sampler import SampledLogprobs, Sampler
from nanoserve.outputs import CompletionOutput, Logprob, RequestOutput
from nanoserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CHECK_INVARIANTS_ENV = "NANOSERVE_CHECK_INVARIANTS"

Prompt = str | list[int] | dict[str, Any]


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detok: list[DetokenizerState]
    logprobs: list[list[dict[int, Logprob]] | None]
    cumulative_logprob: list[float]
    arrival_time: float
    first_token_time: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineStats:
    num_steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    max_running_in_step: int = 0
    last_step_running: int = 0


def eos_token_ids(config: EngineConfig, tokenizer: Any) -> set[int]:
    """EOS ids from generation_config.json (often a list), config.json and the tokenizer, merged."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    gen_path = Path(config.model) / "generation_config.json"
    if gen_path.is_file():
        add(json.loads(gen_path.read_text()).get("eos_token_id"))
    add(getattr(config.hf_config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    return ids


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Any = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.eos_token_ids = eos_token_ids(config, self.tokenizer)
        if executor is None:
            if config.tensor_parallel_size == 1:
                from nanoserve.distributed.executor import LocalExecutor

                executor = LocalExecutor(config)
            else:
                from nanoserve.distributed.multiproc import MultiprocExecutor

                executor = MultiprocExecutor(config)
        self.executor = executor
        info: KVCacheInfo = executor.kv_info
        self.block_manager = BlockManager(info.num_blocks, config.block_size, config.enable_prefix_caching)
        limits = SchedulerLimits(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        self.scheduler = Scheduler(limits, self.block_manager, self.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids, config.seed, device="cpu" if config.device == "cpu" else "cuda")
        self.vocab_size = int(config.hf_config.vocab_size)
        self.requests: dict[str, _RequestState] = {}
        self.stats = EngineStats()
        self.check_invariants = os.environ.get(CHECK_INVARIANTS_ENV, "") not in ("", "0")
        self._next_seq_id = 0

    # ---- requests ------------------------------------------------------------------------------------
    def kv_cache_info(self) -> dict:
        return self.executor.kv_info.as_dict()

    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_token_ids(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def _check_token_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError("prompt_token_ids must be a non-empty list of integers")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
        return list(ids)

    def check_prompt_fits(self, num_prompt_tokens: int) -> None:
        limit = self.config.max_model_len
        if num_prompt_tokens >= limit:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens but max_model_len is {limit}, leaving no room to generate; "
                f"shorten the prompt to at most {limit - 1} tokens or raise max_model_len"
            )
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if num_prompt_tokens + 1 > capacity:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens but the KV cache holds only {capacity}; "
                "raise kv_cache_memory or shorten the prompt"
            )

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, arrival_time: float | None = None) -> None:
        """Queue a request; raises ValueError (and changes nothing) if it can never run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self.check_prompt_fits(len(token_ids))
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(self._next_seq_id, request_id, i, list(token_ids), len(token_ids), params, now)
            seq.first_sibling = seqs[0] if seqs else None
            self._next_seq_id += 1
            seqs.append(seq)
        state = _RequestState(
            request_id, text, list(token_ids), params, seqs,
            [DetokenizerState.start(self.tokenizer, token_ids, params.skip_special_tokens) for _ in seqs],
            [[] if params.logprobs is not None else None for _ in seqs],
            [0.0] * len(seqs), now,
        )  # fmt: skip
        self.requests[request_id] = state
        self.stats.prompt_tokens += len(token_ids)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (finish_reason 'abort')."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for seq in state.seqs:
            self.scheduler.finish(seq, "abort")
        self.scheduler.finished_in_step = [s for s in self.scheduler.finished_in_step if s.request_id != request_id]
        return self._finalize(state)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run, sample, apply. Returns outputs of the requests that changed."""
        out = self.scheduler.schedule()
        sampling = [s for c, s in zip(out.chunks, out.seqs) if c.sample]
        logits = self.executor.execute(StepInput(out.chunks, out.released_seq_ids)).logits if out.chunks else None
        sampled = self.sampler(logits, sampling) if sampling else None
        advanced = self.scheduler.update_from_output(out, sampled.token_ids if sampled else [])
        self._record_step(out, len(advanced))
        outputs = self._process(advanced, sampled, sampling)
        if self.check_invariants:
            self.scheduler.check_integrity()
        return outputs

    def _record_step(self, out: Any, num_sampled: int) -> None:
        self.stats.num_steps += 1
        self.stats.generation_tokens += num_sampled
        self.stats.last_step_running = len(out.chunks)
        self.stats.max_running_in_step = max(self.stats.max_running_in_step, len(out.chunks))

    def _process(self, advanced: list[Sequence], sampled: Any, sampling: list[Sequence]) -> list[RequestOutput]:
        now = time.monotonic()
        logprob_of = {}
        if sampled is not None:
            logprob_of = {id(s): lp for s, lp in zip(sampling, sampled.logprobs)}
        touched: dict[str, _RequestState] = {}
        for seq in advanced:
            state = self.requests[seq.request_id]
            touched[state.request_id] = state
            if state.first_token_time is None:
                state.first_token_time = now
                state.metrics["time_to_first_token"] = now - state.arrival_time
            token = seq.token_ids[-1]
            lp = logprob_of.get(id(seq))
            if lp is not None:
                self._append_logprobs(state, seq.sample_index, token, lp)
            ended_by_token = seq.is_finished and seq.finish_reason == "stop"
            if ended_by_token:
                continue  # EOS / stop token: kept in token_ids, not shown in text
            detok = state.detok[seq.sample_index]
            delta = detok.append(token)
            stops = seq.params._stop_strings
            if delta and stops and seq.num_output_tokens >= seq.params.min_tokens:
                found = find_stop_string(detok.text, len(delta), stops)
                if found is not None:
                    stop, pos = found
                    detok.text = detok.text[: pos + (len(stop) if seq.params.include_stop_str_in_output else 0)]
                    if seq.is_finished:
                        # The same token also hit max_tokens / max_model_len (the scheduler already ended
                        # it as "length"); the stop string wins, as in vLLM, since the text was cut by it.
                        seq.finish_reason, seq.stop_reason = "stop", stop
                    else:
                        self.scheduler.finish(seq, "stop", stop_reason=stop)
        for seq in self.scheduler.finished_in_step:
            state = self.requests.get(seq.request_id)
            if state is not None:
                touched[state.request_id] = state
        self.scheduler.finished_in_step = []
        outputs = []
        for state in touched.values():
            if all(s.is_finished for s in state.seqs):
                outputs.append(self._finalize(state))
            else:
                outputs.append(self._make_output(state, finished=False))
        return outputs

    def _append_logprobs(self, state: _RequestState, index: int, token: int, lp: SampledLogprobs) -> None:
        state.cumulative_logprob[index] += lp.token_logprob
        entry = {tid: Logprob(v, rank + 1) for rank, (tid, v) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        entry[token] = Logprob(lp.token_logprob, lp.token_rank)
        state.logprobs[index].append(entry)

    def _finalize(self, state: _RequestState) -> RequestOutput:
        self.requests.pop(state.request_id, None)
        for seq in state.seqs:
            self.sampler.forget(seq.seq_id)
        return self._make_output(state, finished=True)

    def _make_output(self, state: _RequestState, finished: bool) -> RequestOutput:
        completions = []
        for seq, detok, lps, cum in zip(state.seqs, state.detok, state.logprobs, state.cumulative_logprob):
            completions.append(
                CompletionOutput(
                    index=seq.sample_index,
                    text=detok.text,
                    token_ids=list(seq.output_token_ids),
                    cumulative_logprob=cum if lps is not None else None,
                    logprobs=list(lps) if lps is not None else None,  # a snapshot: outputs must not grow later
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        if finished:
            state.metrics["e2e_latency"] = time.monotonic() - state.arrival_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=state.seqs[0].num_cached_prompt_tokens,
            metrics=dict(state.metrics),
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
