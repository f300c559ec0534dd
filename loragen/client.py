"""A Python client for the loragen HTTP API (docs/api.md), synchronous and asynchronous, on httpx.

    from loragen import Client

    with Client("http://127.0.0.1:8000") as client:
        adapter = client.generate("Put the word inside square brackets.")
        adapter.save_pretrained("brackets-lora")   # then PeftModel.from_pretrained(base_model, "brackets-lora")

`AsyncClient` has the same methods as coroutines. Both:
- send the API key as `Authorization: Bearer <key>`, the way the server checks it;
- send one `X-Request-Id` per call, kept across its retries, so every attempt of a call is one id in the
  server's log lines and in the error a failed call raises;
- retry what the server says is worth retrying (429, 503, 504) and a lost or timed-out connection, with
  exponential backoff and jitter, never sooner than the server's `Retry-After` and never past `total_timeout`.
  Retrying a generation is safe: an adapter's id is a hash of the request, so a repeat is the same adapter
  (at worst generated once more), usually answered from the cache;
- raise a `LoragenError` subclass that carries the server's error envelope (type, message, request id).

No torch here, on purpose: a client beside an inference server should not pull in a training stack. The
safetensors header is read by hand (8-byte little-endian length, then JSON), as `generator.adapter` writes it.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import math
import os
import random
import struct
import tarfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"  # where `loragen serve` listens unless told otherwise
# A cache miss is generated while the request waits. The server gives up at LORAGEN_REQUEST_TIMEOUT_S (60 s by
# default) with a 504, so the client waits longer than that, to hear the 504 rather than time out first.
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_TOTAL_TIMEOUT_S = 300.0  # bounds a call with all its retries: a client never hangs on a sick server
BACKOFF_S = 0.5  # the first retry waits 0.25-0.5 s, the next 0.5-1 s, ... (unless Retry-After asks for more)
MAX_BACKOFF_S = 30.0

FORMATS = ("safetensors", "peft-tar")
ADAPTER_CONFIG = "adapter_config.json"  # the names PEFT's from_pretrained reads
ADAPTER_WEIGHTS = "adapter_model.safetensors"

Format = Literal["safetensors", "peft-tar"]
CacheResult = Literal["hit", "miss"]
BatchInput = str | Mapping[str, Any]  # a task description, or {"task": ...} / {"document": ...} / {"embedding": [...]}
StackInput = str | tuple[str, float]  # a cached adapter's id (weight 1), or (id, weight)
T = TypeVar("T")


# ---- errors ----------------------------------------------------------------------------------------------------


class LoragenError(Exception):
    """A call that did not succeed: what the server's error envelope said, and where to look.

    status      the HTTP status; None when no answer came (ConnectionFailed)
    type        the envelope's `type` (`invalid_input`, `not_found`, `rate_limited`, ... as in docs/api.md)
    message     the envelope's message, written for a person
    request_id  the request's id, also in the server's log lines: quote it when reporting a problem
    retry_after the seconds the server asked the client to wait (Retry-After), when it said
    attempts    how many requests the call made before giving up (1: it was not retried)
    """

    retryable: bool = False  # whether the API says the same request may succeed later

    def __init__(self, message: str, *, type: str, status: int | None = None, request_id: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.type, self.status = message, type, status
        self.request_id, self.retry_after = request_id, retry_after
        self.attempts = 1

    def __str__(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no answer"
        return f"{self.message} ({self.type}, {status}, request id {self.request_id})"


class InvalidInput(LoragenError):
    """The server refused the request as given (422, 400, 413, 415, 431): fix it, retrying will not help."""


class AuthError(LoragenError):
    """No API key (401) or one the server does not accept (403): pass `api_key=` to the client."""


class NotFound(LoragenError):
    """No cached adapter with that id (never generated, or evicted): generate it again with the same request."""


class RateLimited(LoragenError):
    """429: this client's rate limit is spent (`rate_limited`) or the server's queue is full (`overloaded`);
    raised once the retries or `total_timeout` are used up."""

    retryable = True


class Unavailable(LoragenError):
    """503 or 504: the server could not answer now (cache unreachable, no workers, a failed or slow
    generation); raised once the retries or `total_timeout` are used up."""

    retryable = True


class ConnectionFailed(Unavailable):
    """No answer at all: the connection was refused or lost, or the request timed out."""

    def __init__(self, message: str, *, type: str, request_id: str | None, retryable: bool):
        super().__init__(message, type=type, request_id=request_id)
        self.retryable = retryable  # a refused connection may come back; an unsupported URL will not


class APIError(LoragenError):
    """Any other error answer (500 `internal_error`, 405, ...)."""


class ProtocolError(LoragenError):
    """A success answer that is not what the API promises (no adapter id, an unreadable adapter): a proxy in
    the way, or a client and server that disagree about the API."""


_ERRORS_BY_STATUS: dict[int, type[LoragenError]] = {
    400: InvalidInput, 413: InvalidInput, 415: InvalidInput, 422: InvalidInput, 431: InvalidInput,
    401: AuthError, 403: AuthError,
    404: NotFound,
    429: RateLimited,
    503: Unavailable, 504: Unavailable,
}
# a lost connection or a timeout may go better next time; a URL httpx cannot send to never will
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def error_from_response(response: httpx.Response) -> LoragenError:
    """The typed error for a non-2xx answer, from its `{"error": {"type", "message", "request_id"}}` envelope
    (or, for a body that is not one, e.g. from a proxy, from its status and first bytes)."""
    request_id = response.headers.get("x-request-id")
    try:
        detail = response.json()["error"]
        type_, message = str(detail["type"]), str(detail["message"])
        request_id = detail.get("request_id") or request_id
    except (ValueError, KeyError, TypeError):
        type_ = "http_error"
        message = f"HTTP {response.status_code} {response.reason_phrase}: {response.text[:200]!r}"
    cls = _ERRORS_BY_STATUS.get(response.status_code, APIError)
    return cls(message, type=type_, status=response.status_code, request_id=request_id,
               retry_after=parse_retry_after(response.headers.get("retry-after")))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: the server sends a number of seconds; an HTTP date (as proxies may) also works."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # unreadable: back off by our own schedule
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _connection_failed(e: httpx.TransportError, request_id: str) -> ConnectionFailed:
    try:
        url = str(e.request.url)
    except RuntimeError:  # an error raised before httpx had a request to attach
        url = "the server"
    timed_out = isinstance(e, httpx.TimeoutException)
    what = "no answer within the timeout" if timed_out else "could not reach the server"
    error = ConnectionFailed(f"{what} at {url}: {type(e).__name__}: {e}", type="timeout" if timed_out else "connection_error",
                             request_id=request_id, retryable=isinstance(e, _RETRYABLE_TRANSPORT))
    error.__cause__ = e
    return error


# ---- results -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Adapter:
    """A generated adapter as the server sent it, and the PEFT directory it makes.

    data         the bytes as received: one safetensors file, or a tar of the PEFT directory (`format`)
    weights      the adapter_model.safetensors bytes (`data` itself for the safetensors format)
    peft_config  the PEFT adapter_config (r, lora_alpha, target_modules, base_model_name_or_path, ...)
    metadata     the safetensors `__metadata__`: `format`, `adapter_config` and `loragen` (provenance), as strings
    """

    id: str
    format: Format
    cache: CacheResult
    request_id: str | None
    peft_config: dict[str, Any]
    metadata: dict[str, str]
    data: bytes = field(repr=False)
    weights: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes, *, format: Format = "safetensors", id: str = "", cache: CacheResult = "miss",
                   request_id: str | None = None) -> Adapter:
        """An adapter from its bytes in either format (as the API sends them, or as saved from a response)."""
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        if format == "safetensors":
            weights, config = data, None
        else:
            weights, config = _unpack_peft_tar(data)
        metadata = read_safetensors_metadata(weights)
        if config is None:
            if "adapter_config" not in metadata:
                raise ProtocolError("the safetensors file carries no adapter_config in its metadata: not a loragen "
                                    "adapter", type="invalid_adapter")
            config = _json_object(metadata["adapter_config"], "the adapter_config in the safetensors metadata")
        return cls(id=id, format=format, cache=cache, request_id=request_id, peft_config=config, metadata=metadata,
                   data=data, weights=weights)

    @property
    def provenance(self) -> dict[str, str]:
        """Where the adapter came from (checkpoint, its hash, dtype, base model, ...): the `loragen` metadata."""
        raw = self.metadata.get("loragen")
        return _json_object(raw, "the loragen provenance in the safetensors metadata") if raw else {}

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write a PEFT adapter directory (adapter_model.safetensors + adapter_config.json) that
        `PeftModel.from_pretrained`, vLLM and LoRAX load, whichever format was fetched. Each file is written
        whole or not at all (a temporary file, then a rename), so a crash never leaves a half adapter."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        _write_whole(out / ADAPTER_WEIGHTS, self.weights)
        # the same bytes as the adapter_config.json inside the server's tar
        _write_whole(out / ADAPTER_CONFIG, (json.dumps(self.peft_config, indent=2, sort_keys=True) + "\n").encode())
        return out


@dataclass(frozen=True)
class BatchResult:
    """One input of a batch: its adapter's id (fetch the bytes with `get(id)`), size in bytes, and whether it
    was answered from the cache."""

    id: str
    size: int
    cache: CacheResult


def read_safetensors_metadata(weights: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: an 8-byte little-endian header length, then the JSON header."""
    if len(weights) < 8:
        raise ProtocolError(f"not a safetensors file: {len(weights)} bytes, shorter than its header length",
                            type="invalid_adapter")
    (n,) = struct.unpack("<Q", weights[:8])
    if 8 + n > len(weights):
        raise ProtocolError(f"not a safetensors file: a header of {n} bytes in a file of {len(weights)}",
                            type="invalid_adapter")
    header = _json_object(weights[8 : 8 + n], "the safetensors header")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError("the safetensors __metadata__ is not a map of strings", type="invalid_adapter")
    return metadata


def _unpack_peft_tar(data: bytes) -> tuple[bytes, dict[str, Any]]:
    """(weights, config) from the tar of a PEFT directory (`{id}/adapter_config.json`, `{id}/adapter_model.safetensors`).
    Read in memory, never extracted, so a hostile archive cannot write anywhere."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            files = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if name not in files]
            if missing:
                raise ProtocolError(f"the peft-tar holds no {' or '.join(missing)} (it holds {sorted(files)})",
                                    type="invalid_adapter")
            config_bytes, weights = (tar.extractfile(files[name]).read() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    except tarfile.TarError as e:
        raise ProtocolError(f"the peft-tar is not a readable tar: {e}", type="invalid_adapter") from None
    return weights, _json_object(config_bytes, ADAPTER_CONFIG)


def _json_object(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"{what} is not valid JSON", type="invalid_adapter") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object", type="invalid_adapter")
    return value


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- requests: what each operation sends and how it reads the answer (shared by both clients) ---------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API operation: the request, and how to read a successful answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    body: Any = None  # JSON; None: no body
    params: Mapping[str, str] | None = None
    answers: frozenset[int] = frozenset({200})  # statuses that are an answer, not an error


def _generate_call(task: str | None, document: str | None, embedding: Sequence[float] | None, checkpoint: str | None,
                   dtype: str | None, format: Format | None) -> _Call[Adapter]:
    fmt = _format(format)
    body = {**_one_input(task, document, embedding), **_options(checkpoint=checkpoint, dtype=dtype)}
    if format is not None:
        body["format"] = fmt
    return _Call("POST", "/v1/adapters", partial(_read_adapter, format=fmt), body=body)


def _get_call(adapter_id: str, format: Format | None) -> _Call[Adapter]:
    if not isinstance(adapter_id, str) or not adapter_id:
        raise ValueError(f"adapter_id must be the id a generation answered (64 hex characters), got {adapter_id!r}")
    fmt = _format(format)
    params = {"format": fmt} if format is not None else None
    # quoted whole: an id is one path segment, whatever it holds ("../health" must not reach another route)
    return _Call("GET", f"/v1/adapters/{quote(adapter_id, safe='')}", partial(_read_adapter, format=fmt), params=params)


def _batch_call(inputs: Sequence[BatchInput], checkpoint: str | None, dtype: str | None) -> _Call[list[BatchResult]]:
    if isinstance(inputs, str | bytes | Mapping) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list of task descriptions or input dicts, got {type(inputs).__name__}")
    if not inputs:
        raise ValueError("a batch needs at least one input")
    body = {"inputs": [_batch_input(x, i) for i, x in enumerate(inputs)], **_options(checkpoint=checkpoint, dtype=dtype)}
    return _Call("POST", "/v1/adapters/batch", _read_batch, body=body)


def _combine_call(adapters: Sequence[StackInput], dtype: str | None, format: Format | None) -> _Call[Adapter]:
    if isinstance(adapters, str | bytes | Mapping) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list of adapter ids or (id, weight) pairs, got {type(adapters).__name__}")
    fmt = _format(format)
    body = {"adapters": [_stack_input(x, i) for i, x in enumerate(adapters)], **_options(dtype=dtype)}
    if format is not None:
        body["format"] = fmt
    return _Call("POST", "/v1/adapters/combine", partial(_read_adapter, format=fmt), body=body)


def _stack_input(item: StackInput, i: int) -> dict[str, Any]:
    where = f"adapters[{i}]: "
    if isinstance(item, str):
        adapter_id, weight = item, 1.0
    elif isinstance(item, Sequence) and not isinstance(item, bytes) and len(item) == 2:
        adapter_id, weight = item
    else:
        raise TypeError(f"{where}expected an adapter id or an (id, weight) pair, got {item!r:.80}")
    if not isinstance(adapter_id, str) or not adapter_id:
        raise TypeError(f"{where}the id must be the id a generation answered (64 hex characters), got {adapter_id!r:.80}")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise TypeError(f"{where}the weight must be a number, got {type(weight).__name__}")
    if not math.isfinite(weight):
        raise ValueError(f"{where}the weight is {weight}: every weight must be finite")
    return {"id": adapter_id, "weight": float(weight)}


def _json_call(path: str, key: str | None = None) -> _Call[Any]:
    return _Call("GET", path, partial(_read_json, key=key))


def _ready_call() -> _Call[dict[str, Any]]:
    # a 503 "not_ready" is the answer to "are you ready?", not a failure to retry
    return _Call("GET", "/ready", _read_readiness, answers=frozenset({200, 503}))


def _one_input(task: str | None, document: str | None, embedding: Sequence[float] | None,
               where: str = "") -> dict[str, Any]:
    given = [(k, v) for k, v in (("task", task), ("document", document), ("embedding", embedding)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"{where}give exactly one of task, document, embedding "
                         f"(got {', '.join(k for k, _ in given) or 'none'})")
    kind, value = given[0]
    if kind == "embedding":
        return {"embedding": _embedding(value, where)}
    if not isinstance(value, str):
        raise TypeError(f"{where}{kind} must be a str, got {type(value).__name__}")
    return {kind: value}


def _embedding(value: Any, where: str) -> list[float]:
    if hasattr(value, "tolist"):  # a numpy array or a torch tensor, without importing either
        value = value.tolist()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise TypeError(f"{where}embedding must be a list of numbers, got {type(value).__name__}")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise TypeError(f"{where}embedding[{i}] must be a number, got {type(x).__name__}")
        if not math.isfinite(x):
            raise ValueError(f"{where}embedding[{i}] is {x}: every entry must be finite")
    return [float(x) for x in value]


def _batch_input(item: BatchInput, i: int) -> dict[str, Any]:
    where = f"inputs[{i}]: "
    if isinstance(item, str):
        return _one_input(item, None, None, where)
    if not isinstance(item, Mapping):
        raise TypeError(f"{where}expected a task description or a dict with one of task, document, embedding; "
                        f"got {type(item).__name__}")
    unknown = sorted(set(item) - {"task", "document", "embedding"})
    if unknown:
        raise ValueError(f"{where}unknown field {', '.join(map(str, unknown))}; an input has one of task, document, "
                         "embedding (checkpoint and dtype are given once, for the whole batch)")
    return _one_input(item.get("task"), item.get("document"), item.get("embedding"), where)


def _options(**options: str | None) -> dict[str, str]:
    for name, value in options.items():
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return {name: value for name, value in options.items() if value is not None}  # unset: the server's default


def _format(format: str | None) -> Format:
    if format is None:
        return "safetensors"
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    return format  # type: ignore[return-value]


def _read_adapter(response: httpx.Response, format: Format) -> Adapter:
    adapter_id = response.headers.get("x-adapter-id")
    cache = response.headers.get("x-cache")
    if not adapter_id or cache not in ("hit", "miss"):
        raise ProtocolError(f"an adapter answer without X-Adapter-Id and X-Cache headers (got {adapter_id!r}, "
                            f"{cache!r}): is something between the client and the server?", type="invalid_answer",
                            status=response.status_code, request_id=response.headers.get("x-request-id"))
    return Adapter.from_bytes(response.content, format=format, id=adapter_id, cache=cache,
                              request_id=response.headers.get("x-request-id"))


def _read_json(response: httpx.Response, key: str | None) -> Any:
    try:
        body = response.json()
        return body if key is None else body[key]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError(f"expected a JSON object{f' with {key!r}' if key else ''}, got {response.text[:200]!r}",
                            type="invalid_answer", status=response.status_code,
                            request_id=response.headers.get("x-request-id")) from None


def _read_readiness(response: httpx.Response) -> dict[str, Any]:
    body = _read_json(response, key=None)
    if response.status_code != 200 and not (isinstance(body, dict) and "status" in body):
        raise error_from_response(response)  # a 503 that is an error envelope, not a readiness answer
    return body


def _read_batch(response: httpx.Response) -> list[BatchResult]:
    items = _read_json(response, key="adapters")
    try:
        return [BatchResult(id=str(x["id"]), size=int(x["size"]), cache=x["cache"]) for x in items]
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"unexpected batch answer {response.text[:200]!r}", type="invalid_answer",
                            status=response.status_code, request_id=response.headers.get("x-request-id")) from None


# ---- retries ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Retries:
    """How a call is retried; `for_call()` keeps count of one call's attempts."""

    max_retries: int
    total_timeout: float | None
    timeout: float

    def for_call(self) -> _Attempts:
        return _Attempts(self)


class _Attempts:
    """One call's attempts: each request's timeout, and how long to wait before the next (or to give up)."""

    def __init__(self, retries: _Retries):
        self.retries = retries
        self.made = 0
        self.deadline = None if retries.total_timeout is None else time.monotonic() + retries.total_timeout

    def next_timeout(self) -> float:
        """Count one more request, and give its timeout: the per-request one, cut to what is left of
        total_timeout."""
        self.made += 1
        if self.deadline is None:
            return self.retries.timeout
        return max(min(self.retries.timeout, self.deadline - time.monotonic()), 0.001)

    def delay(self, error: LoragenError) -> float | None:
        """Seconds to wait before trying again after `error`, or None to give up and raise it. Exponential
        backoff with jitter (so clients refused together do not return together), but never sooner than the
        server's Retry-After; never a wait that would end past the deadline. Records on `error` how many
        requests the call has made."""
        error.attempts = self.made
        if not error.retryable or self.made > self.retries.max_retries:
            return None
        backoff = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (self.made - 1))
        wait = max(error.retry_after or 0.0, random.uniform(backoff / 2, backoff))
        if self.deadline is not None and time.monotonic() + wait >= self.deadline:
            return None
        return wait


def _http_options(base_url: str, api_key: str | None, timeout: float, max_retries: int,
                  total_timeout: float | None) -> tuple[dict[str, Any], _Retries]:
    """httpx.Client keyword arguments and the retry policy, from the constructor's arguments, checked."""
    url = httpx.URL(base_url) if isinstance(base_url, str) else None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base_url must be an http(s) URL such as {DEFAULT_URL}, got {base_url!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip() or api_key != api_key.strip()):
        raise ValueError("api_key must be the key itself: a non-empty string without surrounding whitespace")
    for name, value in (("timeout", timeout), ("total_timeout", total_timeout)):
        if name == "total_timeout" and value is None:
            continue  # no bound on a call: its retries and per-request timeouts only
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be a whole number >= 0 (0: never retry), got {max_retries!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    options = {"base_url": base_url.rstrip("/"), "headers": headers, "timeout": timeout}
    return options, _Retries(max_retries, total_timeout, float(timeout))


def _request_id() -> str:
    return uuid.uuid4().hex  # 32 of the 1-64 [A-Za-z0-9_.:-] characters the server keeps


# ---- the clients -------------------------------------------------------------------------------------------------


class Client:
    """The loragen HTTP API, synchronously. A context manager; or call `close()`.

    base_url       where `loragen serve` answers
    api_key        sent as `Authorization: Bearer <key>` (servers with LORAGEN_API_KEYS / LORAGEN_API_KEYS_FILE)
    timeout        seconds httpx waits to connect, and for each read or write of one request
    max_retries    retries of a call after a 429, 503, 504, or a lost or timed-out connection (0: none)
    total_timeout  seconds a call may take with all its retries (None: no bound); no request runs and no
                   wait ends past it
    transport      an httpx transport to send through (a proxy, a test's ASGI app, ...)
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES, total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None):
        options, self._retries = _http_options(base_url, api_key, timeout, max_retries, total_timeout)
        self._http = httpx.Client(**options, transport=transport)

    def generate(self, task: str | None = None, *, document: str | None = None, embedding: Sequence[float] | None = None,
                 checkpoint: str | None = None, dtype: str | None = None, format: Format | None = None) -> Adapter:
        """An adapter for exactly one of: a task description, a document, or a task embedding of the checkpoint's
        size (`checkpoints()` says `task_emb_dim`). `dtype`: float32 (the server's default), bfloat16, float16;
        `format`: safetensors (default) or peft-tar. Answered from the cache when the same request was made."""
        return self._run(_generate_call(task, document, embedding, checkpoint, dtype, format))

    def get(self, adapter_id: str, *, format: Format | None = None) -> Adapter:
        """A cached adapter by id (NotFound if it is not cached: generate it again with the same request)."""
        return self._run(_get_call(adapter_id, format))

    def batch(self, inputs: Sequence[BatchInput], *, checkpoint: str | None = None,
              dtype: str | None = None) -> list[BatchResult]:
        """Many adapters in one request; each input a task description or a dict with one of task, document,
        embedding. Every input is validated before any is generated. Answers ids, in order; `get(id)` the bytes."""
        return self._run(_batch_call(inputs, checkpoint, dtype))

    def combine(self, adapters: Sequence[StackInput], *, dtype: str | None = None,
                format: Format | None = None) -> Adapter:
        """Cached adapters of one base model and modules stacked into one adapter whose update is the sum of
        theirs, each times its weight: `adapters` are ids (weight 1) or (id, weight) pairs, 2 to 32. `dtype`
        default: the sources' own. NotFound names a source that is not cached; InvalidInput says what differs
        between sources that do not stack. Answered from the cache when the same stack was asked for."""
        return self._run(_combine_call(adapters, dtype, format))

    def checkpoints(self) -> list[dict[str, Any]]:
        """The checkpoints served: id, default, base_model, modules, rank, task_emb_dim, encoder, sha256, ..."""
        return self._run(_json_call("/v1/checkpoints", key="checkpoints"))

    def health(self) -> dict[str, Any]:
        """Liveness: `{"status": "ok"}` while the server process runs."""
        return self._run(_json_call("/health"))

    def ready(self) -> dict[str, Any]:
        """Readiness, whatever it is: `status` is ready, degraded (with a `reason`) or not_ready."""
        return self._run(_ready_call())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        attempts, request_id = self._retries.for_call(), _request_id()
        while True:
            try:
                response = self._http.request(call.method, call.path, json=call.body, params=call.params,
                                              headers={"X-Request-Id": request_id}, timeout=attempts.next_timeout())
            except httpx.TransportError as e:
                error: LoragenError = _connection_failed(e, request_id)
            else:
                if response.status_code in call.answers:
                    return call.read(response)
                error = error_from_response(response)
            wait = attempts.delay(error)
            if wait is None:
                raise error
            time.sleep(wait)


class AsyncClient:
    """The loragen HTTP API on asyncio: `Client`'s methods, as coroutines. An async context manager; or
    `await aclose()`. Arguments as for `Client` (`transport`: an httpx.AsyncBaseTransport)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES, total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT_S,
                 transport: httpx.AsyncBaseTransport | None = None):
        options, self._retries = _http_options(base_url, api_key, timeout, max_retries, total_timeout)
        self._http = httpx.AsyncClient(**options, transport=transport)

    async def generate(self, task: str | None = None, *, document: str | None = None,
                       embedding: Sequence[float] | None = None, checkpoint: str | None = None, dtype: str | None = None,
                       format: Format | None = None) -> Adapter:
        """As `Client.generate`."""
        return await self._run(_generate_call(task, document, embedding, checkpoint, dtype, format))

    async def get(self, adapter_id: str, *, format: Format | None = None) -> Adapter:
        """As `Client.get`."""
        return await self._run(_get_call(adapter_id, format))

    async def batch(self, inputs: Sequence[BatchInput], *, checkpoint: str | None = None,
                    dtype: str | None = None) -> list[BatchResult]:
        """As `Client.batch`."""
        return await self._run(_batch_call(inputs, checkpoint, dtype))

    async def combine(self, adapters: Sequence[StackInput], *, dtype: str | None = None,
                      format: Format | None = None) -> Adapter:
        """As `Client.combine`."""
        return await self._run(_combine_call(adapters, dtype, format))

    async def checkpoints(self) -> list[dict[str, Any]]:
        """As `Client.checkpoints`."""
        return await self._run(_json_call("/v1/checkpoints", key="checkpoints"))

    async def health(self) -> dict[str, Any]:
        """As `Client.health`."""
        return await self._run(_json_call("/health"))

    async def ready(self) -> dict[str, Any]:
        """As `Client.ready`."""
        return await self._run(_ready_call())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, call: _Call[T]) -> T:
        attempts, request_id = self._retries.for_call(), _request_id()
        while True:
            try:
                response = await self._http.request(call.method, call.path, json=call.body, params=call.params,
                                                    headers={"X-Request-Id": request_id}, timeout=attempts.next_timeout())
            except httpx.TransportError as e:
                error: LoragenError = _connection_failed(e, request_id)
            else:
                if response.status_code in call.answers:
                    return call.read(response)
                error = error_from_response(response)
            wait = attempts.delay(error)
            if wait is None:
                raise error
            await asyncio.sleep(wait)
