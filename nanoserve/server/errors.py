"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}`` with a fitting status."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from nanoserve.server.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """Raised anywhere in request handling; turned into an OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info).model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the first offending field (``messages.0.role``)."""
    parts = []
    param = None
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        if param is None and loc:
            param = loc
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return bad_request("invalid request: " + "; ".join(parts[:5]), param=param)


_FIELD = re.compile(r"^(?:SamplingParams\.(\w+)|(structured_outputs|response_format)(?:\.\w+)*):")


def from_value_error(exc: ValueError) -> APIError:
    """An engine ``ValueError`` (``"SamplingParams.temperature: must be >= 0 ..."``, ``"structured_outputs.json:
    ..."``) as a 400 naming the field."""
    message = str(exc)
    m = _FIELD.match(message)
    return bad_request(message, param=(m.group(1) or m.group(2)) if m else None)
