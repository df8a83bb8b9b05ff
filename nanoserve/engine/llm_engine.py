"""The engine: requests in, one scheduled step at a time, outputs out. Synchronous; the offline ``LLM`` and
the async server engine both drive it.

A step is schedule → execute on every rank → sample → update the scheduler → the output processor applies
the stop rules and makes the outputs → the scheduler frees what finished. Data flows one way: the scheduler
decides, the runner computes, the output processor is the only one that ends a request."""

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
from nanoserve.engine.output_processor import OutputProcessor, ProcessedStep, RequestState
from nanoserve.engine.scheduler import Scheduler, SchedulerLimits
from nanoserve.engine.sequence import Sequence
from nanoserve.engine.step import RunnerOutput, SchedulerOutput, StepInput
from nanoserve.engine.structured_output import GrammarCompiler
from nanoserve.kvcache.block_manager import BlockManager
from nanoserve.layers.sampler import Sampler, SamplerOutput
from nanoserve.outputs import RequestOutput
from nanoserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CHECK_INVARIANTS_ENV = "NANOSERVE_CHECK_INVARIANTS"
# Fraction of the KV blocks that admission leaves free for running sequences to grow into (at least one
# block); measured in benchmarks/preemption_watermark.py.
WATERMARK_FRACTION = 0.02

Prompt = str | list[int] | dict[str, Any]


@dataclass
class EngineStats:
    num_steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    max_running_in_step: int = 0
    last_step_running: int = 0
    last_step_request_ids: list[str] = field(default_factory=list)  # requests that received a token


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
        # The context length really served: the configured one, or what the agreed KV cache holds when no
        # max_model_len was given (see kv_agreement).
        self.max_model_len = info.max_model_len or config.max_model_len
        self.block_manager = BlockManager(info.num_blocks, config.block_size, config.enable_prefix_caching)
        limits = SchedulerLimits(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            watermark_blocks=max(1, int(info.num_blocks * WATERMARK_FRACTION)),
        )
        self.scheduler = Scheduler(limits, self.block_manager)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.sampler = Sampler(self.eos_token_ids, config.seed, device="cpu" if config.device == "cpu" else "cuda")
        self.vocab_size = int(config.hf_config.vocab_size)
        # Structured outputs: grammars compiled once per spec (the server compiles them before they get here).
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
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

    @property
    def requests(self) -> dict[str, RequestState]:
        """Unfinished requests by id (the output processor's state of each)."""
        return self.output_processor.requests

    def check_prompt_fits(self, num_prompt_tokens: int) -> None:
        limit = self.max_model_len
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
        self._check_token_restrictions(params)
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs is not None else None
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(self._next_seq_id, request_id, i, list(token_ids), len(token_ids), params, now)
            seq.first_sibling = seqs[0] if seqs else None
            if grammar is not None:
                seq.grammar = self.grammars.matcher(grammar)  # each sample its own position
            self._next_seq_id += 1
            seqs.append(seq)
        self.output_processor.add_request(request_id, text, token_ids, params, seqs, now)
        self.stats.prompt_tokens += len(token_ids)
        for seq in seqs:
            self.scheduler.add(seq)

    def _check_token_restrictions(self, params: SamplingParams) -> None:
        """Token ids of logit_bias / allowed_token_ids within the vocabulary; bad_words tokenized (each with and
        without a leading space, so the word is banned at the start of the text and inside it)."""
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
            for t in ids:
                if t >= self.vocab_size:
                    raise ValueError(f"SamplingParams.{name}: token id {t} is outside the vocabulary [0, {self.vocab_size})")
        if params.bad_words:
            words: dict[tuple[int, ...], None] = {}
            for word in params.bad_words:
                for text in (word.lstrip(), " " + word.lstrip()):
                    ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                    if ids:
                        words[ids] = None
            params._bad_words_token_ids = tuple(words)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its last output (finish_reason 'abort')."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        finishes, output = self.output_processor.abort(request_id)
        self.scheduler.finish_seqs(finishes)
        self._forget([s.seq for s in state.samples])
        self._release_if_idle()
        return output

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run, sample, apply. Returns outputs of the requests that changed (by their output kind)."""
        out = self.scheduler.schedule()
        sampling = out.sampling_seqs
        step_input = out.step_input(greedy=bool(sampling) and self.sampler.plain_greedy(sampling))
        ran = self.executor.execute(step_input) if out.chunks or out.released_seq_ids else RunnerOutput()
        if ran.token_ids is not None:  # the runner took the argmax itself (a plain greedy step)
            sampled = SamplerOutput(ran.token_ids, [None] * len(sampling))
        else:
            sampled = self.sampler(ran.logits, sampling) if sampling else None
        advanced = self.scheduler.update_from_output(out, sampled.token_ids if sampled else [])
        self.output_processor.add_prompt_logprobs(ran.prompt_logprobs, out.seqs)
        done = self.output_processor.process(advanced, sampled.logprobs if sampled else None, out.out_of_capacity)
        self.scheduler.finish_seqs(done.finished)
        self._end_requests(done)
        self._record_step(out, advanced)
        self._release_if_idle()
        if self.check_invariants:
            self.scheduler.check_integrity()
        return done.outputs

    def _end_requests(self, done: ProcessedStep) -> None:
        for state in done.finished_requests:
            self._forget([s.seq for s in state.samples])

    def _forget(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.sampler.forget(seq.seq_id)

    def _release_if_idle(self) -> None:
        """Tell the ranks about finished sequences now if no step follows (otherwise the next step carries
        them): a drained engine leaves no block table behind on any rank."""
        if self.scheduler.has_pending_releases and not self.scheduler.has_unfinished():
            self.executor.execute(StepInput([], self.scheduler.take_released()))

    def runner_block_table_counts(self) -> list[int]:
        """How many block tables every rank holds now, by rank (a check for tests: 0 when idle)."""
        return self.executor.execute(StepInput([], self.scheduler.take_released(), report_tables=True)).num_block_tables

    def _record_step(self, out: SchedulerOutput, advanced: list[Sequence]) -> None:
        self.stats.num_steps += 1
        self.stats.generation_tokens += len(advanced)
        self.stats.last_step_request_ids = list(dict.fromkeys(s.request_id for s in advanced))
        self.stats.last_step_running = len(out.chunks)
        self.stats.max_running_in_step = max(self.stats.max_running_in_step, len(out.chunks))

    def shutdown(self) -> None:
        self.executor.shutdown()
