"""Integrations with a running loragen service: `loragen.client` talks to its HTTP API from Python.

Nothing here imports torch, so the client installs and imports beside any inference stack.
"""

from loragen.client import (
    Adapter,
    APIError,
    AsyncClient,
    AuthError,
    BatchResult,
    Client,
    ConnectionFailed,
    InvalidInput,
    LoragenError,
    NotFound,
    ProtocolError,
    RateLimited,
    Unavailable,
)

__all__ = [
    "APIError", "Adapter", "AsyncClient", "AuthError", "BatchResult", "Client", "ConnectionFailed", "InvalidInput",
    "LoragenError", "NotFound", "ProtocolError", "RateLimited", "Unavailable",
]
