"""A closed set of API error types, their status codes, and the one JSON envelope every non-2xx carries:
{"error": {"type": ..., "message": ...}} (plus "request_id")."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidInput(ApiError):
    status, type = 422, "invalid_input"


class NotFound(ApiError):
    status, type = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"


class Overloaded(ApiError):
    status, type = 429, "overloaded"


class Unavailable(ApiError):
    status, type = 503, "unavailable"


class Timeout(ApiError):
    status, type = 504, "timeout"


def envelope(status: int, type_: str, message: str, request_id: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict = {"error": {"type": type_, "message": message}}
    if request_id:
        body["error"]["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)
