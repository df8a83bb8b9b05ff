"""The offline facade: ``LLM(model).generate(prompts, sampling_params)``, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from nanoserve.config import EngineConfig
from nanoserve.engine.llm_engine import LLMEngine, Prompt
from nanoserve.generation_defaults import GenerationDefaults, resolve_generation_defaults
from nanoserve.outputs import RequestOutput
from nanoserve.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Load a checkpoint and generate. ``model=None`` uses the built-in demo checkpoint (random weights).

    Options (all validated): ``tensor_parallel_size``, ``dtype`` ("auto" = float32 on CPU), ``device``
    ("auto" | "cpu" | "cuda"), ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``,
    ``enable_chunked_prefill``, ``block_size``, ``kv_cache_memory`` (per rank: bytes or "2GiB"),
    ``kv_cache_dtype`` ("auto" = the model's dtype, or "float16" on CPU: half the cache bytes),
    ``gpu_memory_utilization`` (CUDA), ``enable_prefix_caching``, ``seed``.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        if model is None:
            from nanoserve.tools.demo import demo_model_path

            model = demo_model_path()
        self.config = EngineConfig.create(model, **kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def kv_cache_info(self) -> dict:
        """The agreed KV block count, each rank's own estimate and what each rank really allocated."""
        return self.engine.kv_cache_info()

    @functools.cached_property
    def generation_defaults(self) -> GenerationDefaults:
        """The default sampling settings in force and where they come from (``generation_config``: "auto" =
        the checkpoint's generation_config.json, "vllm" = built-in only, or a folder); read once, on first use."""
        return resolve_generation_defaults(self.config)

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses when given no ``sampling_params``: ``SamplingParams()`` with the checkpoint's
        recommended settings (see :attr:`generation_defaults`) in place of the built-in ones. A new object on
        every call, free to modify, as in vLLM."""
        return self.generation_defaults.sampling_params()

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. Every prompt is checked before any
        is queued, so a bad one raises ValueError (naming its index) and nothing is left behind."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts; pass one or one per prompt")
        # One output per request, when it ends: no per-step output is built for a caller who waits anyway.
        final_only = {id(p): dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list}
        params_list = [final_only[id(p)] for p in params_list]
        engine = self.engine
        for i, prompt in enumerate(prompts):
            try:
                _, ids = engine.tokenize_prompt(prompt)
                engine.check_prompt_fits(len(ids))
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        order: dict[str, int] = {}
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            request_id = str(next(self._ids))
            try:
                engine.add_request(request_id, prompt, params)
            except ValueError as exc:  # e.g. an invalid grammar: take back what was queued before it
                for queued in order:
                    engine.abort_request(queued)
                raise ValueError(f"prompt {i}: {exc}") from None
            order[request_id] = i
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while any(r is None for r in results):
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            for request_id in order:
                engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages) or several (a list of
        them), rendered by the tokenizer's chat template (or ``chat_template``), as vLLM's ``LLM.chat``. ``tools``
        reach the template as transformers' ``apply_chat_template(tools=...)`` passes them;
        ``chat_template_kwargs`` too (e.g. ``{"enable_thinking": False}`` for Qwen3)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template= or use generate()")
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, tools=tools, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=False, **(chat_template_kwargs or {}),
            )  # fmt: skip
            # The template places any BOS itself.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
