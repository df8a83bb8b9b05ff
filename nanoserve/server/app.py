"""The FastAPI application: routes, authentication, request-size limit and OpenAI-shaped errors.

Request bodies are read and validated here, not by FastAPI's automatic body parsing, so that every failure is a
400 in the OpenAI error shape (never FastAPI's 422), an oversized body is refused (413) while it streams in,
never buffered whole, and a body that does not arrive in time (a stalled or trickling client, "slowloris") is
answered 408 and its connection closed. Since FastAPI cannot see these bodies, the routes declare them in the
OpenAPI schema themselves (``/openapi.json`` documents every request field; the fuzz tests generate requests
from it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanoserve.engine.async_engine import AsyncLLMEngine, EngineLimits
from nanoserve.generation_defaults import GenerationDefaults, resolve_generation_defaults
from nanoserve.server.errors import APIError, bad_request, from_validation_error
from nanoserve.server.metrics import ServerMetrics
from nanoserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from nanoserve.server.serving import ClientDisconnected, OpenAIServing, ServerSettings

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Status the server logs when a client left before its answer was ready (nginx's convention); nobody reads it.
CLIENT_CLOSED_REQUEST = 499
# Seconds a client has to send its whole request body once its headers are in (``--request-body-timeout``).
DEFAULT_BODY_TIMEOUT_S = 30.0


async def read_model(request: Request, model: type[M], limit: int, timeout: float = DEFAULT_BODY_TIMEOUT_S) -> M:
    """The request body parsed as ``model``: 413 beyond ``limit`` bytes, 408 if the whole body has not arrived
    ``timeout`` seconds after this is called (the headers are in by then), 400 for anything invalid.

    The deadline is for the whole body, not for each chunk: a client trickling a byte a second would pass any
    per-chunk idle timeout while holding its connection and this task for as long as it liked.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")  # fmt: skip
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
                chunks.append(chunk)
    except ClientDisconnect:  # the client left before sending its whole body: nobody to answer, nothing to log
        raise ClientDisconnected() from None
    except TimeoutError:
        # Close the connection too: the rest of the body would otherwise keep it open (uvicorn discards it).
        raise APIError(408, f"the request body did not arrive within {timeout:g} s ({size} bytes received)",
                       code="request_timeout", headers={"Connection": "close"}) from None  # fmt: skip
    body = b"".join(chunks)
    if not body:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


_SCHEMA_REF = "#/components/schemas/{model}"
# Error statuses a body-taking route may answer with, all in the OpenAI error shape.
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request (the message names the field)"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    408: {"model": ErrorResponse, "description": "request body not received within --request-body-timeout"},
    413: {"model": ErrorResponse, "description": "request body larger than --max-request-bytes"},
    503: {"model": ErrorResponse, "description": "queue full (--max-queued-requests) or engine not running"},
}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``openapi_extra`` declaring a JSON body the route parses itself."""
    ref = _SCHEMA_REF.format(model=model.__name__)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}}


def _state_server_limits(schemas: dict[str, Any], limits: EngineLimits) -> None:
    """Put this server's own limits into the request schemas: token ids below the vocabulary size, completions
    shorter than the context."""
    max_id = limits.vocab_size - 1

    def bound_ids(node: Any) -> None:
        # Every integer array item in these schemas is a token id.
        if isinstance(node, dict):
            if node.get("type") == "integer" and node.get("minimum") == 0:
                node["maximum"] = max_id
            for value in node.values():
                bound_ids(value)
        elif isinstance(node, list):
            for value in node:
                bound_ids(value)

    completion = schemas["CompletionRequest"]["properties"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for props in (completion, chat):
        bound_ids(props["stop_token_ids"])
        props["stop_token_ids"]["items"]["maximum"] = max_id
    bound_ids(completion["prompt"])
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"].update(minimum=0, maximum=max_id)
    for props, name in ((completion, "max_tokens"), (chat, "max_tokens"), (chat, "max_completion_tokens")):
        props[name]["maximum"] = limits.max_model_len - 1


def _error_json(status: int, message: str, type: str, code: str | None = None) -> JSONResponse:
    info = ErrorInfo(message=message, type=type, code=code)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def build_app(
    engine: AsyncLLMEngine,
    tokenizer: Any,
    settings: ServerSettings,
    metrics: ServerMetrics | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    generation_defaults: GenerationDefaults | None = None,
) -> FastAPI:
    """The server for ``engine``. Its lifespan starts the engine thread (if not started) and shuts it down.

    ``tokenizer`` must be a separate instance from the engine's (it is used on the event-loop thread).
    ``metrics`` should be the engine's observer, so the histograms fill; without one, a metrics registry with
    only the engine's gauges is made. ``body_timeout_s``: seconds a client has to send a request body (408).
    ``generation_defaults`` fill the sampling settings a request leaves unset and are shown on ``/v1/models``;
    None: resolve them from the engine's config (its ``generation_config``).
    """
    if not body_timeout_s > 0:
        raise ValueError(f"body_timeout_s: must be > 0, got {body_timeout_s}")
    if generation_defaults is None:
        generation_defaults = resolve_generation_defaults(engine.engine.config)
    serving = OpenAIServing(engine, tokenizer, settings, generation_defaults.params)
    if metrics is None:
        metrics = ServerMetrics()
    metrics.attach(lambda: engine.snapshot, lambda: engine.is_healthy, lambda: engine.num_in_flight)
    limit = settings.max_request_bytes

    async def read_body(request: Request, model: type[M]) -> M:
        return await read_model(request, model, limit, body_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.started:
            engine.start()
        try:
            yield
        finally:
            # uvicorn has let in-flight requests finish; now stop the engine thread and any workers.
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="nanoserve", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.serving = serving
    app.state.metrics = metrics
    body_models: list[type[BaseModel]] = [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in body_models], ref_template=_SCHEMA_REF)
            _state_server_limits(defs["$defs"], engine.limits)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # ---- errors --------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(f"invalid request: {exc.errors()}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_json(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_json(500, f"internal error: {type(exc).__name__}: {exc}", "internal_server_error")

    # ---- auth ----------------------------------------------------------------------------------------
    async def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip

    v1 = [Depends(require_api_key)]

    def respond(result: Any) -> Response:
        if isinstance(result, BaseModel):
            return Response(result.model_dump_json(), media_type="application/json")
        # An async iterator of server-sent events.
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    # ---- OpenAI routes -------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=v1, openapi_extra=_json_body(CompletionRequest),
              responses=_ERROR_RESPONSES)  # fmt: skip
    async def completions(request: Request) -> Response:
        req = await read_body(request, CompletionRequest)
        return respond(await serving.completions(req, request))

    @app.post("/v1/chat/completions", dependencies=v1, openapi_extra=_json_body(ChatCompletionRequest),
              responses=_ERROR_RESPONSES)  # fmt: skip
    async def chat_completions(request: Request) -> Response:
        req = await read_body(request, ChatCompletionRequest)
        return respond(await serving.chat(req, request))

    @app.get("/v1/models", dependencies=v1)
    async def models() -> Response:
        cards = [ModelCard(id=name, root=settings.model_path, max_model_len=engine.limits.max_model_len,
                           default_sampling_params=generation_defaults.params)
                 for name in settings.served_model_names]  # fmt: skip
        return respond(ModelList(data=cards))

    # ---- operations ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy:
            return Response(status_code=200)
        error = engine.error
        why = f"engine failed: {type(error).__name__}: {error}" if error is not None else "engine is not running"
        return _error_json(503, why, "service_unavailable", code="engine_dead")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", openapi_extra=_json_body(TokenizeRequest), responses=_ERROR_RESPONSES)
    async def tokenize(request: Request) -> Response:
        req = await read_body(request, TokenizeRequest)
        serving.check_model(req.model)
        if req.messages is not None:
            ids = serving.render_chat(req.messages, req.add_generation_prompt).token_ids
        else:
            ids = serving.tokenize_text(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return respond(TokenizeResponse(count=len(ids), max_model_len=engine.limits.max_model_len, tokens=ids))

    @app.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest), responses=_ERROR_RESPONSES)
    async def detokenize(request: Request) -> Response:
        req = await read_body(request, DetokenizeRequest)
        serving.check_model(req.model)
        ids = serving.check_token_ids(req.tokens, "tokens")
        return respond(DetokenizeResponse(prompt=tokenizer.decode(ids, skip_special_tokens=False)))

    return app
