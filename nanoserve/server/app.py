"""The FastAPI application: routes, authentication, request-size limit and OpenAI-shaped errors.

Request bodies are read and validated here, not by FastAPI's automatic body parsing, so that every failure is a
400 in the OpenAI error shape (never FastAPI's 422) and an oversized body is refused (413) before it is parsed.
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoserve.engine.async_engine import AsyncLLMEngine
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


async def read_model(request: Request, model: type[M], limit: int) -> M:
    """The request body parsed as ``model``: 413 beyond ``limit`` bytes, 400 for anything invalid."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")  # fmt: skip
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _error_json(status: int, message: str, type: str, code: str | None = None) -> JSONResponse:
    info = ErrorInfo(message=message, type=type, code=code)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def build_app(
    engine: AsyncLLMEngine,
    tokenizer: Any,
    settings: ServerSettings,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The server for ``engine``. Its lifespan starts the engine thread (if not started) and shuts it down.

    ``tokenizer`` must be a separate instance from the engine's (it is used on the event-loop thread).
    ``metrics`` should be the engine's observer, so the histograms fill; without one, a metrics registry with
    only the engine's gauges is made.
    """
    serving = OpenAIServing(engine, tokenizer, settings)
    if metrics is None:
        metrics = ServerMetrics()
    metrics.attach(lambda: engine.snapshot, lambda: engine.is_healthy, lambda: engine.num_in_flight)
    limit = settings.max_request_bytes

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
    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request) -> Response:
        req = await read_model(request, CompletionRequest, limit)
        return respond(await serving.completions(req, request))

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(request: Request) -> Response:
        req = await read_model(request, ChatCompletionRequest, limit)
        return respond(await serving.chat(req, request))

    @app.get("/v1/models", dependencies=v1)
    async def models() -> Response:
        cards = [ModelCard(id=name, root=settings.model_path, max_model_len=engine.limits.max_model_len)
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

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await read_model(request, TokenizeRequest, limit)
        serving.check_model(req.model)
        if req.messages is not None:
            ids = serving.render_chat(req.messages, req.add_generation_prompt).token_ids
        else:
            ids = serving.tokenize_text(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return respond(TokenizeResponse(count=len(ids), max_model_len=engine.limits.max_model_len, tokens=ids))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await read_model(request, DetokenizeRequest, limit)
        serving.check_model(req.model)
        ids = serving.check_token_ids(req.tokens, "tokens")
        return respond(DetokenizeResponse(prompt=tokenizer.decode(ids, skip_special_tokens=False)))

    return app
