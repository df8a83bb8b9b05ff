"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests are validated strictly (``"5"`` is not an int, ``true`` is not a number) so a client bug surfaces as a
400 naming the field instead of a silent coercion. Value ranges (temperature >= 0, max_tokens >= 1, ...) are
checked once, by :class:`~nanoserve.sampling_params.SamplingParams`, so the server and the offline ``LLM``
accept exactly the same settings. Unknown fields are ignored, as vLLM does, so clients that send extras work.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nanoserve.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams, StructuredOutputsParams


# Optional response fields OpenAI leaves out when unset (``delta.role``), or that only extensions ask for.
def _omit_none() -> Any:
    return Field(default=None, exclude_if=lambda v: v is None)


# A stop list longer than this is almost certainly hostile: every stop string is searched on every token.
MAX_STOP_STRINGS = 64
# OpenAI's own limit on logit_bias entries.
MAX_LOGIT_BIAS = 300
# bad_words are tokenized on the engine thread: a word is a word, not a document.
MAX_BAD_WORD_CHARS = 256
# Completions one request may ask for (prompts x n): each is a sequence held in host memory until it ends, so
# this bounds what a single request can queue (OpenAI caps the prompt list at 2048; n is at most MAX_N).
MAX_CHOICES_PER_REQUEST = 1024


def _documented(default: Any = None, **schema: Any) -> Any:
    """A field whose range is stated in the OpenAPI schema only. The check itself stays in one place,
    :class:`SamplingParams` (its errors name the field), so the server and ``LLM`` accept the same settings;
    the schema tells clients (and the fuzz tests' request generator) what will be accepted."""
    return Field(default=default, json_schema_extra=schema)


def _prompt_schema(schema: dict[str, Any]) -> None:
    """The prompt's four shapes, each non-empty; token ids are >= 0 (the upper bound is per model: the app
    adds it)."""
    for branch in schema["anyOf"]:
        if branch.get("type") == "string":
            branch["minLength"] = 1
        else:
            branch["minItems"] = 1
            items = branch["items"]
            if items.get("type") == "array":
                branch["maxItems"] = MAX_CHOICES_PER_REQUEST
                items["minItems"] = 1
                items["items"]["minimum"] = 0
            elif items.get("type") == "integer":
                items["minimum"] = 0
            else:
                branch["maxItems"] = MAX_CHOICES_PER_REQUEST
                items["minLength"] = 1


class OpenAIModel(BaseModel):
    # allow_inf_nan=False: JSON has no NaN or Infinity; a client sending them (Python's json does) gets a 400.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


# ---- errors ------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- shared pieces -----------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far (with include_usage).
    continuous_usage_stats: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class PromptLogprob(BaseModel):
    """One token of a prompt_logprobs entry, as vLLM writes it."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt token: token id (as a string) -> its logprob; None for the first token.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


# Settings a checkpoint's generation_config.json may give defaults for (besides max_tokens, which the server
# resolves against the context first): see nanoserve.generation_defaults.
DEFAULTABLE_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class SamplingFields(OpenAIModel):
    """Fields both endpoints share. ``None`` means the default, as OpenAI clients send explicit nulls: the
    server's default for that field (from the checkpoint's generation_config.json) if it has one, else
    nanoserve's built-in one."""

    model: str | None = None
    temperature: float | None = _documented(minimum=0)
    top_p: float | None = _documented(exclusiveMinimum=0, maximum=1)
    top_k: int | None = _documented(minimum=-1, description="0 or -1: no limit")
    min_p: float | None = _documented(minimum=0, maximum=1)
    n: int | None = _documented(minimum=1, maximum=MAX_N)
    stop: str | list[str] | None = _documented(minLength=1, maxItems=MAX_STOP_STRINGS, items={"minLength": 1})
    stop_token_ids: list[int] | None = _documented(items={"minimum": 0})
    seed: int | None = _documented(description="any integer")
    presence_penalty: float | None = _documented(minimum=-2, maximum=2)
    frequency_penalty: float | None = _documented(minimum=-2, maximum=2)
    repetition_penalty: float | None = _documented(exclusiveMinimum=0)
    ignore_eos: bool = False
    min_tokens: int = _documented(0, minimum=0, description="at most max_tokens")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = _documented(
        maxProperties=MAX_LOGIT_BIAS, additionalProperties={"minimum": -100, "maximum": 100},
        description="token id (as a string) -> bias added to its logit, -100..100",
    )
    allowed_token_ids: list[int] | None = _documented(minItems=1, items={"minimum": 0})
    bad_words: list[str] | None = _documented(maxItems=MAX_STOP_STRINGS, items={"minLength": 1, "maxLength": MAX_BAD_WORD_CHARS})
    # nanoserve/vLLM extension: return the generated token ids with each choice.
    return_token_ids: bool = False
    # vLLM extension: the log-probability of each prompt token (and the top k there); not with stream.
    prompt_logprobs: int | None = _documented(minimum=0, maximum=MAX_LOGPROBS, description="not with stream")
    # vLLM's constrained decoding fields: ``structured_outputs`` (vLLM >= 0.11) and the older ``guided_*`` names
    # that many clients still send (vLLM dropped them in 0.12).
    structured_outputs: dict[str, Any] | None = _documented(
        description="one of json (a JSON schema), json_object, regex, choice, grammar (Lark); "
        "disable_any_whitespace: compact JSON"
    )
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed, got {len(v)}")
        for key in v or {}:
            if not key.isdigit() or len(key) > 12:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    @field_validator("bad_words")
    @classmethod
    def _few_bad_words(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} bad_words are allowed, got {len(v)}")
        if v is not None and any(len(w) > MAX_BAD_WORD_CHARS for w in v):
            raise ValueError(f"bad_words: each word may have at most {MAX_BAD_WORD_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available with stream=true (as in vLLM); drop one of them")
        return self

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, vocab_size: int, defaults: Mapping[str, Any] | None = None,
        structured: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """The engine's settings for this request; raises ValueError naming a field that is out of range.

        ``defaults`` (``SamplingParams`` field -> value, e.g. from generation_config.json) fills each of
        :data:`DEFAULTABLE_FIELDS` the request leaves unset or null, ahead of the built-in default, as vLLM does;
        ``max_tokens`` is taken as given (the caller has applied any default to it)."""
        opts: dict[str, Any] = {}
        for name in DEFAULTABLE_FIELDS:  # the request's value, else the server's default, else SamplingParams'
            value = getattr(self, name)
            if value is None and defaults:
                value = defaults.get(name)
            if value is not None:
                opts[name] = value
        if opts.get("top_k", 0) >= vocab_size:
            # Every token is within the top k: the same as no limit. Also keeps a JSON bignum (top_k=10**30) out
            # of the sampler's int64 tensors, where it would fail the whole batch.
            opts["top_k"] = 0
        opts.update(
            n=1 if self.n is None else self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=self.engine_prompt_logprobs(),
            presence_penalty=0.0 if self.presence_penalty is None else self.presence_penalty,
            frequency_penalty=0.0 if self.frequency_penalty is None else self.frequency_penalty,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=structured,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
        )
        return SamplingParams(**opts)

    def structured_spec(self, disable_any_whitespace: bool = False) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever one of its spellings it uses (``structured_outputs``,
        the ``guided_*`` fields, or chat's ``response_format``); ``disable_any_whitespace`` is the server's
        default for it. Raises ValueError naming the field."""
        sources: dict[str, dict[str, Any]] = {}
        so = dict(self.structured_outputs or {})
        unknown = sorted(set(so) - STRUCTURED_OUTPUT_KEYS)
        if unknown:
            raise ValueError(
                f"structured_outputs: unsupported key(s) {', '.join(unknown)}; supported: "
                f"{', '.join(sorted(STRUCTURED_OUTPUT_KEYS))}"
            )
        # disable_any_whitespace alone constrains nothing: it shapes whichever constraint the request gives.
        compact = so.pop("disable_any_whitespace", disable_any_whitespace)
        if so:
            sources["structured_outputs"] = so
        guided = {
            key: getattr(self, f"guided_{key}") for key in ("json", "regex", "choice", "grammar")
            if getattr(self, f"guided_{key}") is not None
        }  # fmt: skip
        if guided:
            sources["guided_" + "/guided_".join(guided)] = guided
        sources.update(self._response_format_spec())
        if not sources:
            return None
        if len(sources) > 1:
            raise ValueError(f"structured_outputs: give one output constraint, got several ({', '.join(sources)})")
        fields = {**next(iter(sources.values())), "disable_any_whitespace": compact}
        try:
            return StructuredOutputsParams(**fields)
        except TypeError as exc:  # a value of the wrong type for the dataclass
            raise ValueError(f"structured_outputs: {exc}") from None

    def _response_format_spec(self) -> dict[str, dict[str, Any]]:
        return {}

    def leaves_max_tokens_unset(self) -> bool:
        """The request does not name its length (no ``max_tokens`` nor ``max_completion_tokens`` in the body),
        so a server default may apply even where the field has a default of its own (completions' 16)."""
        return not {"max_tokens", "max_completion_tokens"} & self.model_fields_set

    def engine_prompt_logprobs(self) -> int | None:
        """How many top tokens per prompt position the engine computes (None: no prompt log-probabilities)."""
        return self.prompt_logprobs

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Every streamed chunk carries the usage so far."""
        return self.include_usage_in_stream and self.stream_options.continuous_usage_stats


# apply_chat_template arguments the server itself decides.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "tokenize", "add_generation_prompt", "chat_template", "tools",
                                      "return_dict", "return_tensors", "continue_final_message"})  # fmt: skip
# Keys of ``structured_outputs`` nanoserve reads (vLLM's names).
STRUCTURED_OUTPUT_KEYS = frozenset({"json", "json_object", "regex", "choice", "grammar", "disable_any_whitespace"})


# ---- /v1/completions ---------------------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra=_prompt_schema)
    # Explicit null means "fill up to max_model_len", as in vLLM.
    max_tokens: int | None = _documented(16, minimum=1)
    logprobs: int | None = _documented(minimum=0, maximum=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = _documented(maxLength=0, description="not supported")
    best_of: int | None = _documented(minimum=1, maximum=MAX_N, description="only equal to n (no best-of sampling)")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(p, list | str) and not p for p in v)):
            raise ValueError("prompt must not be empty (nor contain an empty prompt)")
        if isinstance(v, list) and isinstance(v[0], list | str) and len(v) > MAX_CHOICES_PER_REQUEST:
            raise ValueError(f"at most {MAX_CHOICES_PER_REQUEST} prompts are allowed in one request, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of is not supported (it may only equal n)")
        return self

    def engine_prompt_logprobs(self) -> int | None:
        # echo with logprobs: the echoed prompt's tokens get logprobs too, from the prompt log-probabilities.
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _omit_none()
    prompt_logprobs: PromptLogprobs | None = _omit_none()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions ----------------------------------------------------------------------------
class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients send the object


class MessageToolCall(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


MAX_TOOLS = 128


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ToolDefinition(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _documented(minimum=1)
    max_completion_tokens: int | None = _documented(minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = _documented(minimum=0, maximum=MAX_LOGPROBS, description="needs logprobs=true")
    add_generation_prompt: bool = True
    # Passed to the chat template, e.g. {"enable_thinking": false} for Qwen3.
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = _documented(maxItems=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: dict[str, Any] | None = _documented(
        properties={"type": {"enum": ["text", "json_object", "json_schema"]}},
        description="{'type': 'text'}, {'type': 'json_object'}, or {'type': 'json_schema', 'json_schema': "
        "{'name': ..., 'schema': {...}, 'strict': true}}",
    )

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        if self.tools and len(self.tools) > MAX_TOOLS:
            raise ValueError(f"tools: at most {MAX_TOOLS} are allowed")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {choice.function.name!r} (tools: {', '.join(names)})")
        reserved = sorted(set(self.chat_template_kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat_template_kwargs: {', '.join(reserved)} cannot be set here (the server sets them)")
        return self

    def _response_format_spec(self) -> dict[str, dict[str, Any]]:
        """``response_format`` as structured-output fields (none for ``text``)."""
        rf = self.response_format
        if not rf:
            return {}
        kind = rf.get("type", "text")
        if kind == "text":
            return {}
        if kind == "json_object":
            return {"response_format": {"json_object": True}}
        if kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError(
                    "response_format: type json_schema needs json_schema.schema, a JSON schema object "
                    "({'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}})"
                )
            return {"response_format": {"json": spec["schema"]}}
        raise ValueError(f"response_format: type must be text, json_object or json_schema, got {kind!r}")

    @property
    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named" (``tool_choice`` unset means auto when tools are given)."""
        if not self.tools:
            return "none"
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named"
        return choice or "auto"

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as the chat template takes them (transformers' ``apply_chat_template(tools=...)``)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = _omit_none()
    arguments: str | None = _omit_none()


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = _omit_none()
    type: Literal["function"] | None = _omit_none()
    function: DeltaFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)
    # With --reasoning-parser: the reply's <think> part. vLLM names it ``reasoning``; older clients read
    # ``reasoning_content``: both are sent.
    reasoning: str | None = _omit_none()
    reasoning_content: str | None = _omit_none()


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _omit_none()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = _omit_none()


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()
    tool_calls: list[DeltaToolCall] | None = _omit_none()
    reasoning: str | None = _omit_none()
    reasoning_content: str | None = _omit_none()


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _omit_none()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer -------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanoserve"
    root: str | None = None
    max_model_len: int | None = None
    # nanoserve extension: what fills the settings a request leaves unset (generation_config.json's
    # temperature, top_p, top_k, min_p, repetition_penalty, max_tokens); empty: the built-in defaults.
    default_sampling_params: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template first)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
