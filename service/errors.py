"""A closed set of API error types, their status codes, and the one JSON envelope every non-2xx carries:
{"error": {"type": ..., "message": ...}} (plus "request_id")."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ApiError(Exception):
    status = 500
    type = "internal_error"
    retry_after: str | None = None  # a Retry-After header every instance carries, unless `headers` sets its own

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = ({"Retry-After": self.retry_after} if self.retry_after else {}) | (headers or {})


class InvalidInput(ApiError):
    status, type = 422, "invalid_input"


class NotFound(ApiError):
    status, type = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class HeadersTooLarge(ApiError):
    status, type = 431, "headers_too_large"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"


class UnsupportedMediaType(ApiError):
    status, type = 415, "unsupported_media_type"


class Overloaded(ApiError):
    status, type = 429, "overloaded"


class RateLimited(ApiError):
    status, type = 429, "rate_limited"


def rate_limited(what: str, rate: float, burst: int, wait_s: float) -> RateLimited:
    """The 429 of a limit of `rate` requests/s: its message says to retry in the whole seconds Retry-After says."""
    retry = max(1, math.ceil(wait_s))
    unit = "request" if rate == 1 else "requests"
    return RateLimited(f"{what}: {rate:g} {unit}/s, burst {burst}; retry in {retry} s", headers={"Retry-After": str(retry)})


class Unavailable(ApiError):
    status, type = 503, "unavailable"


class GenerationFailed(ApiError):
    """The worker failed while generating (out of memory, a device error, a bug), not because of the input:
    nothing is stored, so a retry generates again."""

    status, type, retry_after = 503, "generation_failed", "1"


class NoWorkers(ApiError):
    """Distributed mode: no live `loragen worker` serves the requested checkpoint."""

    status, type, retry_after = 503, "no_workers", "5"


class Timeout(ApiError):
    status, type = 504, "timeout"


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """The body of every non-2xx response (OpenAPI documents it as each operation's default response)."""

    error: ErrorDetail


def envelope(status: int, type_: str, message: str, request_id: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    # a message may quote client input: lone surrogates (valid in JSON text, not in UTF-8) are escaped
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body: dict = {"error": {"type": type_, "message": message}}
    if request_id:
        body["error"]["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)
