"""`create_app(settings)`: the FastAPI app. Nothing heavy at import; the lifespan loads checkpoints and
opens the cache; serving objects live on `app.state`."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from generator import __version__  # light: generator/__init__ imports no torch
from service.errors import ApiError, HeadersTooLarge, PayloadTooLarge, envelope, rate_limited
from service.logctx import REQUEST_ID, request_id_var, tag_log_lines
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("loragen")


def devices_for(setting: str) -> list[str]:
    """'auto' → every visible CUDA device, else ['cpu']; otherwise the comma-separated list as given."""
    import torch

    from generator.errors import LoragenError

    if setting == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    devices = [d.strip() for d in setting.split(",") if d.strip()]
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise LoragenError(f"device {d}: no CUDA device is available here; use --device cpu or auto")
    return devices or ["cpu"]


def load_checkpoints(settings: Settings) -> dict:
    """{id: Checkpoint} for every checkpoint the settings name; LoragenError (one line) for a bad one."""
    from generator.checkpoint import load_checkpoint

    checkpoints = {}
    for cid, src in settings.checkpoints.items():
        checkpoints[cid] = ckpt = load_checkpoint(src, hf_allow=settings.hf_allow)
        log.info("read checkpoint %s from %s (sha256 %s)", cid, src, ckpt.sha256[:12])
    return checkpoints


def load_generators(settings: Settings, checkpoints: dict | None = None) -> list[dict]:
    """The checkpoints loaded once per device: [{id: LoraGenerator}], one dict per worker."""
    import torch

    from generator.errors import EncoderError
    from generator.pipeline import LoraGenerator

    checkpoints = checkpoints if checkpoints is not None else load_checkpoints(settings)
    per_device = []
    for device in devices_for(settings.device):
        generators = {}
        for cid, ckpt in checkpoints.items():
            if ckpt.kind == "d2l":
                generators[cid] = gen = doc_generator(settings, cid, ckpt, device)
                log.info("loaded Doc-to-LoRA checkpoint %s on %s from %s with its base %s (%.1f MB, sha256 %s)", cid,
                         device, settings.checkpoints[cid], gen.base.path, gen.base.n_bytes / 1e6, gen.base.sha256[:12])
                continue
            gen = LoraGenerator(ckpt, device=device, compute_dtype=getattr(torch, settings.compute_dtype),
                                trust_remote_code=settings.trust_remote_code)
            try:
                _ = gen.encoder  # load now: the first text request should not pay for it
            except EncoderError as e:  # e.g. an encoder that needs remote code: a pooled checkpoint still takes embeddings
                accepted = "no input can be served" if gen.config.reader is not None else "only embeddings accepted"
                log.warning("checkpoint %s: task encoder unavailable, %s: %s", cid, accepted, e)
            generators[cid] = gen
            log.info("loaded checkpoint %s on %s from %s (variant %s, base %s, sha256 %s)", cid, device,
                     settings.checkpoints[cid], gen.config.variant, gen.config.base_model, ckpt.sha256[:12])
        per_device.append(generators)
    return per_device


def doc_generator(settings: Settings, cid: str, ckpt, device: str):
    """A Doc-to-LoRA checkpoint with its base model on `device`, under the settings' chunking and limits."""
    import torch

    from generator.d2l.generator import DocLoraGenerator

    return DocLoraGenerator(ckpt, device=device, compute_dtype=getattr(torch, settings.compute_dtype),
                            trust_remote_code=settings.trust_remote_code, base_dir=settings.base_dirs.get(cid),
                            chunk_tokens=settings.chunk_tokens, max_tokens=settings.max_document_tokens,
                            max_chunks=settings.max_chunks)


def identities(settings: Settings, checkpoints: dict, generators: dict | None = None) -> dict[str, dict]:
    """Per Doc-to-LoRA checkpoint id, what besides the checkpoint decides its adapters' bytes (the base model's
    hash and the chunking), from its loaded generator or, on an API node that holds none, from the base's files."""
    from generator.d2l.generator import adapter_identity

    out = {}
    for cid, ckpt in checkpoints.items():
        if ckpt.kind != "d2l":
            continue
        gen = (generators or {}).get(cid)
        out[cid] = gen.identity if gen is not None else adapter_identity(
            ckpt.config, settings.base_dirs.get(cid), settings.chunk_tokens)
    return out


def create_app(settings: Settings | None = None, loaded: dict | list | None = None) -> FastAPI:
    """The app for `settings`. `loaded` (checkpoints for an API node of the distributed mode, generators
    per device otherwise) lets a caller load before the server starts, so that a bad checkpoint fails
    fast; without it the lifespan loads."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from service.adapters import AdapterService
        from service.cache import make_cache

        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        queue_url = settings.queue_url()  # coordination: job stream, heartbeats, locks, rate limits
        cache = make_cache(redis_url, max_bytes=settings.memory_cache_bytes, prefix=settings.cache_prefix,
                           ttl_s=settings.cache_ttl_s, socket_timeout_s=settings.redis_timeout_s, lock_url=queue_url)
        metrics.count_near_hits(lambda: cache.stats.near_hits)
        consumers = None
        if settings.queue == "redis":  # API node: jobs go to `loragen worker` processes through Redis
            from service.queue import Consumers, StreamQueue, make_workers

            if settings.embedded_worker:  # and this node is one of those workers
                generators = loaded if loaded is not None else load_generators(settings)
                checkpoints = {cid: gen.checkpoint for cid, gen in generators[0].items()}
                consumers = app.state.consumers = Consumers(make_workers(settings, generators, cache, metrics))
            else:
                checkpoints = loaded if loaded is not None else load_checkpoints(settings)
            backend = StreamQueue(queue_url, settings.cache_prefix, cache, max_pending=settings.max_pending,
                                  socket_timeout_s=settings.redis_timeout_s, metrics=metrics,
                                  checkpoints={cid: ckpt.sha256 for cid, ckpt in checkpoints.items()})
            await backend.warn_if_evicting()
            if consumers is not None:
                consumers.start()
        else:
            from service.pool import WorkerPool

            generators = loaded if loaded is not None else load_generators(settings)
            checkpoints = {cid: gen.checkpoint for cid, gen in generators[0].items()}
            backend = WorkerPool(generators, metrics, max_batch_size=settings.max_batch_size,
                                 max_wait_ms=settings.max_wait_ms, max_queue=settings.max_pending)
        backend.start()
        held = generators[0] if settings.queue != "redis" or settings.embedded_worker else None
        app.state.service = AdapterService(settings, checkpoints, cache, metrics, backend,
                                           identities(settings, checkpoints, held))
        from service.playground import Playground

        app.state.playground = Playground(settings, app.state.service, devices_for(settings.device)[0])
        limit = settings.rate_limit()
        if limit is not None:
            from service.ratelimit import RateLimiter

            app.state.limiter = RateLimiter(*limit, redis_url=queue_url, prefix=settings.cache_prefix,
                                            socket_timeout_s=settings.redis_timeout_s)
        tag_log_lines()  # uvicorn has configured its loggers by now
        try:
            yield
        finally:
            if consumers is not None:
                await consumers.close()  # embedded stream workers finish the batch in hand
            await app.state.playground.close()
            await backend.close()
            await cache.close()
            if app.state.limiter is not None:
                await app.state.limiter.close()

    app = FastAPI(title="loragen", version=__version__, lifespan=lifespan,
                  description="Generated LoRA adapters on demand (Text-to-LoRA).")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.limiter = None
    app.state.consumers = None  # with --embedded-worker: this node's stream consumers (service.queue.Consumers)
    app.state.playground = None  # service.playground.Playground, made in the lifespan

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return envelope(e.status, e.type, e.message, request.state.request_id, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return envelope(422, "invalid_input", f"{where}: {first['msg']}" if where else first["msg"],
                        request.state.request_id)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect):
        # the client hung up (or broke the connection) while its body was read: nobody to answer, nothing wrong
        metrics.disconnects.inc()
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        type_ = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return envelope(e.status_code, type_, str(e.detail), getattr(request.state, "request_id", None),
                        getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        rid = getattr(request.state, "request_id", None)
        log.exception("unhandled error in %s %s (request %s)", request.method, request.url.path, rid)
        # this handler runs outside RequestId (Starlette's error middleware is outermost): add the header here
        return envelope(500, "internal_error", "internal error; quote the request id when reporting it", rid,
                        {"X-Request-Id": rid} if rid else None)

    key_hashes = settings.api_key_hashes()
    open_paths = {"/health", "/ready"} | ({"/metrics"} if settings.metrics_public else set())

    from service.routes import adapters, combine, ops, playground

    app.include_router(adapters.router)
    app.include_router(combine.router)
    app.include_router(playground.router)
    app.include_router(ops.router)
    if settings.playground:  # the page asks for the key itself: it and its assets are open
        app.include_router(playground.page_router)
        open_paths |= playground.PAGE_PATHS
    app.add_middleware(Gate, metrics=metrics, key_hashes=key_hashes, open_paths=open_paths)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, max_header_bytes=settings.max_header_bytes)
    app.add_middleware(RequestId)  # outermost: every response, even a 413 from BodyLimit, carries an id
    return app


def _client_id(request: Request, by_key: bool) -> str:
    """Whom a rate limit counts: the API key (as a digest prefix, never the key) or, on an open service,
    the client address."""
    if by_key:
        key = request.headers.get("authorization", "").partition(" ")[2].strip()
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return "ip:" + (request.client.host if request.client else "unknown")


class RequestId:
    """Give every request an id (the client's X-Request-Id if sane, else a new one), echo it back, and
    make it the log context of the request's task."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        request_id_var.set(rid)  # not reset: uvicorn logs an app's crash after the app returns, in this task

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _check_key(header: str, key_hashes: list[bytes]) -> tuple[int, str, str] | None:
    """None if `Authorization: Bearer <key>` holds an accepted key; else (status, type, message).
    Keys are compared as sha256 digests with a constant-time comparison against every accepted one."""
    scheme, _, key = header.partition(" ")
    if scheme and scheme.lower() != "bearer":
        return 401, "unauthorized", f"this request sent a {scheme} credential; API keys go in Authorization: Bearer <key>"
    if not key.strip():
        return 401, "unauthorized", "missing API key: send Authorization: Bearer <key>"
    digest = hashlib.sha256(key.strip().encode()).digest()
    ok = False
    for h in key_hashes:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(digest, h)
    return None if ok else (403, "forbidden", "API key not accepted")


class Gate:
    """API keys and rate limits on every route but the open ones, then request counts and latency by route.
    Plain ASGI (not BaseHTTPMiddleware, which passed every piece of a ~14 MB response through a memory
    stream and a task of its own)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, key_hashes: list[bytes], open_paths: set[str]):
        self.app, self.metrics, self.key_hashes, self.open_paths = app, metrics, key_hashes, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request = Request(scope)
        rid = scope.get("state", {}).get("request_id")
        guarded = request.url.path not in self.open_paths
        if self.key_hashes and guarded:
            denied = _check_key(request.headers.get("authorization", ""), self.key_hashes)
            if denied is not None:
                status, type_, message = denied
                self.metrics.requests.labels("auth", request.method, str(status)).inc()
                response = envelope(status, type_, message, rid, {"WWW-Authenticate": "Bearer"} if status == 401 else None)
                return await response(scope, receive, send)
        limiter = scope["app"].state.limiter
        if limiter is not None and guarded:
            wait_s = await limiter.take(_client_id(request, bool(self.key_hashes)))
            if wait_s > 0:
                self.metrics.requests.labels("rate_limit", request.method, "429").inc()
                e = rate_limited("rate limit reached", limiter.rate, limiter.burst, wait_s)
                return await envelope(e.status, e.type, e.message, rid, e.headers)(scope, receive, send)
        status = 500  # unless the app starts a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, request.method, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - start)


class BodyLimit:
    """Refuse headers over `max_header_bytes` in all with 431, and bodies over `max_bytes` with 413: at once
    from Content-Length, else while they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_header_bytes: int = 16 * 1024):
        self.app, self.max_bytes, self.max_header_bytes = app, max_bytes, max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:
            response = envelope(431, HeadersTooLarge.type, f"request headers of {header_bytes} bytes, over the "
                                f"{self.max_header_bytes}-byte limit", scope.get("state", {}).get("request_id"))
            return await response(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = envelope(413, PayloadTooLarge.type, f"request body over {self.max_bytes} bytes",
                                scope.get("state", {}).get("request_id"))
            return await response(scope, receive, send)
        seen, refused = 0, False

        async def limited() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not refused:
                refused = True  # answer now; the app sees a disconnect and its own response is dropped
                rid = scope.get("state", {}).get("request_id")
                await envelope(413, PayloadTooLarge.type, f"request body over {self.max_bytes} bytes", rid)(
                    scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not refused:  # after a refusal the app's complaint about the cut body is expected
                raise

