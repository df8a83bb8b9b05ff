"""What the OpenAI endpoints do: turn a validated request into engine requests, and engine outputs into
responses or server-sent events.

A streamed request asks the engine for delta outputs (``RequestOutputKind.DELTA``): each holds only the new
text, token ids and logprobs, so the work per chunk does not grow with the answer. The engine's output
processor never releases text that a stop string could still take back. A non-streamed request asks for the
final output only.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jinja2 import TemplateError
from starlette.requests import Request

from nanoserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError, RequestStream
from nanoserve.outputs import CompletionOutput, Logprob, RequestOutput
from nanoserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from nanoserve.server.errors import APIError, bad_request, from_value_error
from nanoserve.server.protocol import (
    MAX_CHOICES_PER_REQUEST,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ErrorResponse,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    ResponseFunctionCall,
    ResponseToolCall,
    SamplingFields,
    TopLogprob,
    UsageInfo,
)
from nanoserve.server.reasoning import make_reasoning_parser
from nanoserve.server.tokens import TokenStrings
from nanoserve.server.tool_parsers import (
    ToolCall,
    ToolCallStream,
    make_tool_parser,
    parse_required,
    required_calls_schema,
)

T = TypeVar("T")

# JSON has no -inf; a token the sampler ruled out (top-k/top-p) reports this instead, as vLLM does.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...]
    model_path: str
    api_key: str | None = None
    max_request_bytes: int = 4 * 2**20
    # Compact JSON for every constrained request that does not say otherwise (vLLM's disable_any_whitespace).
    disable_any_whitespace: bool = False
    # --reasoning-parser: split replies' <think> part into the reasoning field (None: leave replies whole).
    reasoning_parser: str | None = None
    # --chat-template: used instead of the tokenizer's own.
    chat_template: str | None = None
    # --enable-auto-tool-choice --tool-call-parser NAME: how "auto" tool calls are read from replies.
    tool_call_parser: str | None = None


@dataclass(frozen=True)
class EnginePrompt:
    """A prompt after tokenization: what the engine receives."""

    text: str | None
    token_ids: list[int]

    def as_engine_prompt(self) -> dict[str, Any]:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


@dataclass
class _Cursor:
    """What a stream has sent of one choice."""

    tokens_sent: int = 0
    started: bool = False  # an output of this choice has been seen (the echo goes before the first)
    text_offset: int = 0  # completions logprobs: character offset of the next token
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    done: bool = False


class ClientDisconnected(Exception):
    pass


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    """A history tool call's arguments as templates expect them: an object (OpenAI sends JSON text)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _usage_info(prompts: list[EnginePrompt], num_completion: int, num_cached: int) -> UsageInfo:
    num_prompt = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion, total_tokens=num_prompt + num_completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached))  # fmt: skip


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def _advance(cursor: _Cursor, c: CompletionOutput) -> tuple[str, int, int]:
    """A delta output's text and token range (all of it); counts its tokens as sent."""
    cursor.tokens_sent += len(c.token_ids)
    return c.text, 0, len(c.token_ids)


def _set_output_kind(params: list[SamplingParams], stream: bool) -> None:
    for p in params:
        p.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY


def _ranked(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)


def sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))
        else:
            queue.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


class OpenAIServing:
    """The completions and chat endpoints over one :class:`AsyncLLMEngine`.

    ``tokenizer`` must be this server's own instance (not the engine's): it is used on the event loop while
    the engine thread uses its own.
    """

    def __init__(
        self, engine: AsyncLLMEngine, tokenizer: Any, settings: ServerSettings,
        default_sampling_params: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """``default_sampling_params``: ``SamplingParams`` field -> value for the settings a request leaves
        unset (``GenerationDefaults.params``, from the checkpoint's generation_config.json); None: none, the
        built-in defaults apply."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.limits = engine.limits
        self.tokens = TokenStrings(tokenizer)
        self.default_sampling_params = dict(default_sampling_params or {})

    # ---- shared helpers ------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves {', '.join(names)}.",
                           param="model", code="model_not_found")  # fmt: skip
        return name

    def check_token_ids(self, ids: Iterable[int], param: str) -> list[int]:
        ids = list(ids)
        vocab = self.limits.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise bad_request(f"token id {t} is outside the vocabulary [0, {vocab})", param=param)
        return ids

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def render_chat(
        self, messages: list[ChatMessage], add_generation_prompt: bool, template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> EnginePrompt:
        """Messages through the chat template (the server's --chat-template, else the tokenizer's); 400 if there
        is none or it rejects them."""
        template = self.settings.chat_template
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                "this model's tokenizer has no chat template, so /v1/chat/completions cannot format messages; "
                "use /v1/completions with a plain prompt", param="messages", code="no_chat_template",
            )  # fmt: skip
        conversation = []
        for m in messages:
            msg: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": tc.id, "type": "function",
                     "function": {"name": tc.function.name, "arguments": _arguments_object(tc.function.arguments)}}
                    for tc in m.tool_calls
                ]  # fmt: skip
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            conversation.append(msg)
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False, chat_template=template,
                tools=tools, **(template_kwargs or {}),
            )  # fmt: skip
        except TemplateError as exc:
            raise bad_request(f"the chat template rejected the messages: {exc}", param="messages") from None
        # The template already placed any BOS it wants; do not add special tokens twice.
        return EnginePrompt(text, self.tokenize_text(text, add_special_tokens=False))

    def completion_prompt(self, prompt: str | list[int]) -> EnginePrompt:
        if isinstance(prompt, str):
            ids = self.tokenize_text(prompt)
            if not ids:
                raise bad_request("prompt is empty after tokenization", param="prompt")
            return EnginePrompt(prompt, ids)
        return EnginePrompt(None, self.check_token_ids(prompt, "prompt"))

    def sampling_params(
        self, req: SamplingFields, prompt: EnginePrompt, requested: int | None, logprobs: int | None,
        prompt_param: str, max_tokens_param: str, logprobs_param: str = "logprobs",
        tool_constraint: StructuredOutputsParams | None = None,
    ) -> SamplingParams:  # fmt: skip
        """Settings for one prompt; the server's defaults fill what the request leaves unset. ``requested=None``
        (and a request that leaves its length unset, when there is a default ``max_tokens``) fills the context
        (``max_model_len`` - prompt), capped by the default ``max_tokens`` as in vLLM. Errors name the request's
        own fields (``*_param``), not the engine's."""
        limit = self.limits.max_model_len
        num_prompt = len(prompt.token_ids)
        if num_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has {num_prompt} tokens, "
                "leaving no room to generate. Please shorten the prompt.",
                param=prompt_param, code="context_length_exceeded",
            )  # fmt: skip
        if num_prompt + 1 > self.limits.kv_capacity_tokens:
            raise bad_request(
                f"the prompt has {num_prompt} tokens but the server's KV cache holds only "
                f"{self.limits.kv_capacity_tokens}", param=prompt_param, code="context_length_exceeded",
            )  # fmt: skip
        default_max = self.default_sampling_params.get("max_tokens")
        if requested is None or (default_max is not None and req.leaves_max_tokens_unset()):
            max_tokens = limit - num_prompt if default_max is None else min(limit - num_prompt, default_max)
        else:
            max_tokens = requested
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        if req.allowed_token_ids:
            self.check_token_ids(req.allowed_token_ids, "allowed_token_ids")
        if req.logit_bias:
            self.check_token_ids((int(k) for k in req.logit_bias), "logit_bias")
        try:
            structured = req.structured_spec(self.settings.disable_any_whitespace)
            if tool_constraint is not None:
                if structured is not None:
                    raise ValueError("structured_outputs: tool_choice 'required' or a named tool already constrains "
                                     "the reply; drop response_format / structured_outputs")  # fmt: skip
                structured = tool_constraint
            params = req.sampling_params(
                max_tokens, logprobs, self.limits.vocab_size, self.default_sampling_params, structured
            )
        except ValueError as exc:
            err = from_value_error(exc)
            if err.info.param == "max_tokens":
                err.info.param = max_tokens_param
            elif err.info.param == "logprobs":
                err.info.param = logprobs_param
            raise err from None
        if num_prompt + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the completion). "
                f"Please reduce the length of the prompt or {max_tokens_param}.",
                param=max_tokens_param, code="context_length_exceeded",
            )  # fmt: skip
        return params

    async def start(
        self, request_id: str, prompts: list[EnginePrompt], params: list[SamplingParams]
    ) -> list[RequestStream]:
        """Hand every prompt to the engine; all or none (a rejected one aborts those already added)."""
        rids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        try:
            # Grammars compile here, in a worker thread, not on the engine's step loop (cached: the engine then
            # finds them compiled); an invalid schema is a 400.
            for spec in dict.fromkeys(p.structured_outputs for p in params if p.structured_outputs is not None):
                await self.engine.compile_grammar(spec)
            return await self.engine.add_requests(
                [(rid, prompt.as_engine_prompt(), p) for rid, prompt, p in zip(rids, prompts, params)]
            )
        except ValueError as exc:
            raise from_value_error(exc) from None
        except QueueFullError as exc:
            raise APIError(503, str(exc), type="service_unavailable", code="queue_full") from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type="service_unavailable", code="engine_dead") from None

    @staticmethod
    async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
        """The final output of every stream (closing them all, whatever happens)."""
        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            async for i, out in merge_streams(streams):
                finals[i] = out
        finally:
            for s in streams:
                s.close()
        return finals  # type: ignore[return-value]

    @staticmethod
    async def until_disconnected(raw: Request, work: Awaitable[T]) -> T:
        """Run ``work``; if the client goes away first, cancel it (which aborts its requests)."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        listener = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we were cancelled (shutdown): take the work down with us
            task.cancel()
            listener.cancel()
            raise
        listener.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected()
        try:
            return task.result()
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type="service_unavailable", code="engine_dead") from None

    @staticmethod
    def _stream_error(exc: BaseException) -> str:
        if isinstance(exc, EngineDeadError):
            err = APIError(503, str(exc), type="service_unavailable", code="engine_dead")
        else:
            err = APIError(500, f"{type(exc).__name__}: {exc}", type="internal_server_error")
        return sse(ErrorResponse(error=err.info))

    @staticmethod
    def _usage(prompts: list[EnginePrompt], outputs: Iterable[RequestOutput | None]) -> UsageInfo:
        outputs = [o for o in outputs if o is not None]
        num_completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return _usage_info(prompts, num_completion, sum(o.num_cached_tokens for o in outputs))

    @staticmethod
    def _stream_usage(prompts: list[EnginePrompt], cursors: list[list[_Cursor]], cached: list[int]) -> UsageInfo:
        """The usage so far of a stream (all of it, after the last chunk); ``cached``: prefix-cache hits per
        prompt, as its outputs report them."""
        return _usage_info(prompts, sum(c.tokens_sent for per_prompt in cursors for c in per_prompt), sum(cached))

    def prompt_logprobs_json(self, entries: list[dict[int, Logprob] | None] | None) -> PromptLogprobs | None:
        """An output's prompt log-probabilities as vLLM writes them: per prompt token, token id -> its logprob,
        rank and text; None for the first token."""
        if entries is None:
            return None
        return [
            None if entry is None else {
                str(tid): PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=self.tokens.text(tid))
                for tid, lp in _ranked(entry)
            }
            for entry in entries
        ]  # fmt: skip

    def echo_logprobs(self, prompt: EnginePrompt, entries: list[dict[int, Logprob] | None] | None, k: int,
                      cursor: _Cursor) -> CompletionLogprobs:  # fmt: skip
        """echo with logprobs: the prompt's tokens in the legacy completions shape, ahead of the generated ones
        (the first token has no logprob, as in OpenAI's API)."""
        lp = CompletionLogprobs()
        entries = entries or [None] * len(prompt.token_ids)
        for token, entry in zip(prompt.token_ids, entries):
            text, raw = self.tokens(token)
            lp.tokens.append(text)
            lp.text_offset.append(cursor.text_offset)
            cursor.text_offset += len(cursor.utf8.decode(raw))
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(_finite(entry[token].logprob))
            lp.top_logprobs.append({self.tokens.text(tid): _finite(v.logprob) for tid, v in _ranked(entry)
                                    if tid == token or (v.rank is not None and v.rank <= k)})  # fmt: skip
        return lp

    # ---- /v1/completions -----------------------------------------------------------------------------
    def completion_logprobs(self, c: CompletionOutput, t0: int, t1: int, k: int, cursor: _Cursor) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for pos in range(t0, t1):
            token = c.token_ids[pos]
            entry = c.logprobs[pos] if c.logprobs is not None and pos < len(c.logprobs) else {}
            text, raw = self.tokens(token)
            lp.tokens.append(text)
            lp.token_logprobs.append(_finite(entry[token].logprob) if token in entry else None)
            top = {}
            for tid, lp_ in _ranked(entry):
                if tid == token or (lp_.rank is not None and lp_.rank <= k):
                    top[self.tokens.text(tid)] = _finite(lp_.logprob)
            lp.top_logprobs.append(top)
            lp.text_offset.append(cursor.text_offset)
            # Characters this token completes (a token may carry part of a character, or finish one).
            cursor.text_offset += len(cursor.utf8.decode(raw))
        return lp

    async def completions(self, req: CompletionRequest, raw: Request) -> Any:
        model = self.check_model(req.model)
        prompts = [self.completion_prompt(p) for p in req.prompts()]
        params = [self.sampling_params(req, p, req.max_tokens, req.logprobs, "prompt", "max_tokens") for p in prompts]
        if len(prompts) * params[0].n > MAX_CHOICES_PER_REQUEST:
            raise bad_request(
                f"at most {MAX_CHOICES_PER_REQUEST} completions (prompts x n) are allowed in one request, got "
                f"{len(prompts)} x {params[0].n}", param="n",
            )  # fmt: skip
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        _set_output_kind(params, req.stream)
        streams = await self.start(request_id, prompts, params)
        if req.stream:
            return self._completion_events(req, model, request_id, created, prompts, params, streams)
        finals = await self.until_disconnected(raw, self.collect(streams))
        n = params[0].n
        choices = []
        for pi, (prompt, out) in enumerate(zip(prompts, finals)):
            echo = self._echo_text(prompt) if req.echo else ""
            prompt_logprobs = self.prompt_logprobs_json(out.prompt_logprobs) if req.prompt_logprobs is not None else None
            for c in out.outputs:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._choice_logprobs(req, prompt, out.prompt_logprobs, c, 0, len(c.token_ids), _Cursor(),
                                                     echo=req.echo)  # fmt: skip
                choices.append(CompletionChoice(
                    index=pi * n + c.index, text=echo + c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason, token_ids=list(c.token_ids) if req.return_token_ids else None,
                    prompt_logprobs=prompt_logprobs,
                ))  # fmt: skip
        return CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                  usage=self._usage(prompts, finals))  # fmt: skip

    def _choice_logprobs(
        self, req: CompletionRequest, prompt: EnginePrompt, prompt_entries: list[dict[int, Logprob] | None] | None,
        c: CompletionOutput, t0: int, t1: int, cursor: _Cursor, echo: bool,
    ) -> CompletionLogprobs:  # fmt: skip
        """A choice's logprobs for its tokens t0..t1, after the prompt's own when they are echoed."""
        if not echo:
            return self.completion_logprobs(c, t0, t1, req.logprobs, cursor)
        lp = self.echo_logprobs(prompt, prompt_entries, req.logprobs, cursor)
        generated = self.completion_logprobs(c, t0, t1, req.logprobs, cursor)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(lp, name).extend(getattr(generated, name))
        return lp

    def _echo_text(self, prompt: EnginePrompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    async def _completion_events(
        self, req: CompletionRequest, model: str, request_id: str, created: int,
        prompts: list[EnginePrompt], params: list[SamplingParams], streams: list[RequestStream],
    ) -> AsyncIterator[str]:  # fmt: skip
        n = params[0].n
        cursors = [[_Cursor() for _ in range(n)] for _ in prompts]
        cached = [0] * len(prompts)
        prompt_entries: list[Any] = [None] * len(prompts)  # a delta output carries them once: kept for each echo
        try:
            async for pi, out in merge_streams(streams):
                cached[pi] = out.num_cached_tokens
                if out.prompt_logprobs is not None:
                    prompt_entries[pi] = out.prompt_logprobs
                for c in out.outputs:
                    cursor = cursors[pi][c.index]
                    if cursor.done:
                        continue
                    first = not cursor.started
                    cursor.started = True
                    text, t0, t1 = _advance(cursor, c)
                    finished = c.finish_reason is not None
                    cursor.done = finished
                    if req.echo and first:
                        text = self._echo_text(prompts[pi]) + text
                    new_tokens = t1 > t0 and (req.logprobs is not None or req.return_token_ids)
                    if not (text or finished or new_tokens):
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = self._choice_logprobs(req, prompts[pi], prompt_entries[pi], c, t0, t1, cursor,
                                                     echo=req.echo and first)  # fmt: skip
                    choice = CompletionChoice(
                        index=pi * n + c.index, text=text, logprobs=logprobs,
                        finish_reason=c.finish_reason if finished else None,
                        stop_reason=c.stop_reason if finished else None,
                        token_ids=list(c.token_ids[t0:t1]) if req.return_token_ids else None,
                    )  # fmt: skip
                    usage = self._stream_usage(prompts, cursors, cached) if req.continuous_usage else None
                    yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice],
                                                 usage=usage))  # fmt: skip
            if req.include_usage_in_stream:
                usage = self._stream_usage(prompts, cursors, cached)
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band, as OpenAI does
            yield self._stream_error(exc)
        finally:
            for s in streams:
                s.close()
        yield SSE_DONE

    # ---- /v1/chat/completions ------------------------------------------------------------------------
    def chat_logprobs(self, c: CompletionOutput, t0: int, t1: int, k: int) -> ChatLogprobs:
        content = []
        for pos in range(t0, t1):
            token = c.token_ids[pos]
            entry = c.logprobs[pos] if c.logprobs is not None and pos < len(c.logprobs) else {}
            text, raw = self.tokens(token)
            top = []
            for tid, lp_ in _ranked(entry):
                if lp_.rank is not None and lp_.rank <= k:
                    top_text, top_raw = self.tokens(tid)
                    top.append(TopLogprob(token=top_text, logprob=_finite(lp_.logprob), bytes=list(top_raw)))
            logprob = _finite(entry[token].logprob) if token in entry else MIN_LOGPROB
            content.append(ChatLogprobToken(token=text, logprob=logprob, bytes=list(raw), top_logprobs=top))
        return ChatLogprobs(content=content)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Any:
        model = self.check_model(req.model)
        mode = req.tool_mode
        if mode == "auto" and self.settings.tool_call_parser is None:
            raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                              'on the server; or pass tool_choice "none", "required" or a named function',
                              param="tool_choice")  # fmt: skip
        prompt = self.render_chat(req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                                  req.tool_dicts() or None)  # fmt: skip
        logprobs = req.engine_logprobs()
        param_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = self.sampling_params(
            req, prompt, req.requested_max_tokens(), logprobs, "messages", param_name, logprobs_param="top_logprobs",
            tool_constraint=self._tool_constraint(req),
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        _set_output_kind([params], req.stream)
        streams = await self.start(request_id, [prompt], [params])
        if req.stream:
            return self._chat_events(req, model, request_id, created, prompt, params, streams[0])
        (out,) = await self.until_disconnected(raw, self.collect(streams))
        choices = []
        for c in out.outputs:
            message, finish_reason = self._reply(req, c.text, c.finish_reason)
            choices.append(ChatChoice(
                index=c.index, message=message,
                logprobs=self.chat_logprobs(c, 0, len(c.token_ids), req.top_logprobs or 0) if req.logprobs else None,
                finish_reason=finish_reason, stop_reason=c.stop_reason,
                token_ids=list(c.token_ids) if req.return_token_ids else None,
            ))  # fmt: skip
        return ChatCompletionResponse(
            id=request_id, created=created, model=model, choices=choices, usage=self._usage([prompt], [out]),
            prompt_logprobs=self.prompt_logprobs_json(out.prompt_logprobs) if req.prompt_logprobs is not None else None,
        )  # fmt: skip

    def _tool_constraint(self, req: ChatCompletionRequest) -> StructuredOutputsParams | None:
        """``required`` and a named tool are enforced by constrained decoding, so their replies always parse."""
        compact = (req.structured_outputs or {}).get("disable_any_whitespace", self.settings.disable_any_whitespace)
        if req.tool_mode == "required":
            return StructuredOutputsParams(json=required_calls_schema(req.tool_dicts()), disable_any_whitespace=compact)
        if req.tool_mode == "named":
            name = req.tool_choice.function.name  # type: ignore[union-attr]
            tool = next(t for t in req.tools or [] if t.function.name == name)
            return StructuredOutputsParams(json=tool.function.parameters or {"type": "object"}, disable_any_whitespace=compact)
        return None

    def _tool_calls(self, req: ChatCompletionRequest, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished reply's text, by the request's tool choice."""
        mode = req.tool_mode
        if mode == "required":
            calls = parse_required(text) if finish_reason == "stop" else None
            return (None, calls) if calls else (text, [])
        if mode == "named":
            call = ToolCall.make(req.tool_choice.function.name, text) if finish_reason == "stop" else None  # type: ignore[union-attr]
            return (None, [call]) if call else (text, [])
        if mode == "auto":
            parsed = make_tool_parser(self.settings.tool_call_parser).parse(text)  # type: ignore[arg-type]
            return parsed.content, parsed.tool_calls
        return text, []

    def _reply(self, req: ChatCompletionRequest, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
        """The message of a finished reply and its finish reason ("tool_calls" when it called tools)."""
        reasoning = None
        if self.settings.reasoning_parser is not None:
            parts = make_reasoning_parser(self.settings.reasoning_parser).split(text)
            reasoning, text = parts.reasoning or None, parts.content
        content, calls = self._tool_calls(req, text, finish_reason)
        if reasoning is not None or calls:
            content = content or None
        message = ChatResponseMessage(
            content=content, reasoning=reasoning, reasoning_content=reasoning,
            tool_calls=[ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments)) for c in calls],
        )  # fmt: skip
        return message, "tool_calls" if calls and finish_reason == "stop" else finish_reason

    async def _chat_events(
        self, req: ChatCompletionRequest, model: str, request_id: str, created: int,
        prompt: EnginePrompt, params: SamplingParams, stream: RequestStream,
    ) -> AsyncIterator[str]:  # fmt: skip
        def chunk(choice: ChatStreamChoice, usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice], usage=usage))

        cursors = [_Cursor() for _ in range(params.n)]
        name = self.settings.reasoning_parser
        parsers = [make_reasoning_parser(name) for _ in range(params.n)] if name else None
        mode = req.tool_mode
        tool_streams = [ToolCallStream(make_tool_parser(self.settings.tool_call_parser)) for _ in range(params.n)] if mode == "auto" else None  # type: ignore[arg-type]
        held = [""] * params.n  # required / named tool replies: sent as calls once they are whole

        def delta(index: int, text: str, finish_reason: str | None) -> tuple[DeltaMessage, str | None]:
            reasoning, content = "", text
            if parsers is not None:
                parts = parsers[index].feed(text)
                if finish_reason is not None:
                    rest = parsers[index].finish()
                    parts = type(parts)(parts.reasoning + rest.reasoning, parts.content + rest.content)
                reasoning, content = parts.reasoning, parts.content
            calls: list[ToolCall] = []
            if tool_streams is not None:
                content = tool_streams[index].feed(content)
                if finish_reason is not None:
                    rest_text, calls = tool_streams[index].finish()
                    content += rest_text
            elif mode in ("required", "named"):
                held[index] += content
                content = ""
                if finish_reason is not None:
                    content, calls = self._tool_calls(req, held[index], finish_reason)
                    content = content or ""
            deltas = [
                DeltaToolCall(index=k, id=c.id, type="function", function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                for k, c in enumerate(calls)
            ]  # fmt: skip
            message = DeltaMessage(content=content or None, reasoning=reasoning or None,
                                   reasoning_content=reasoning or None, tool_calls=deltas or None)  # fmt: skip
            return message, "tool_calls" if calls and finish_reason == "stop" else finish_reason

        cached = [0]
        try:
            for i in range(params.n):
                yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            async for out in stream:
                cached[0] = out.num_cached_tokens
                for c in out.outputs:
                    cursor = cursors[c.index]
                    if cursor.done:
                        continue
                    text, t0, t1 = _advance(cursor, c)
                    finished = c.finish_reason is not None
                    cursor.done = finished
                    new_tokens = t1 > t0 and (req.logprobs or req.return_token_ids)
                    if not (text or finished or new_tokens):
                        continue
                    message, finish_reason = delta(c.index, text, c.finish_reason if finished else None)
                    yield chunk(ChatStreamChoice(
                        index=c.index, delta=message,
                        logprobs=self.chat_logprobs(c, t0, t1, req.top_logprobs or 0) if req.logprobs else None,
                        finish_reason=finish_reason,
                        stop_reason=c.stop_reason if finished else None,
                        token_ids=list(c.token_ids[t0:t1]) if req.return_token_ids else None,
                    ), usage=self._stream_usage([prompt], [cursors], cached) if req.continuous_usage else None)  # fmt: skip
            if req.include_usage_in_stream:
                usage = self._stream_usage([prompt], [cursors], cached)
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
            yield self._stream_error(exc)
        finally:
            stream.close()
        yield SSE_DONE
