"""Operations: liveness, readiness, metrics, what is served."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from service.errors import ErrorResponse

router = APIRouter(tags=["operations"], responses={"default": {"model": ErrorResponse, "description": "an error"}})
_READY_BODY = {"type": "object", "required": ["status", "checkpoints"], "properties": {
    "status": {"type": "string", "enum": ["ready", "degraded", "not_ready"]},
    "checkpoints": {"type": "array", "items": {"type": "string"}},
    "cache": {"type": "object"},
    "workers": {"type": ["object", "null"], "description": "queue=redis: live workers per checkpoint",
                "additionalProperties": {"type": "array", "items": {"type": "string"}}},
    "reason": {"type": "string", "description": "why the status is not ready"}}}


@router.get("/health", summary="liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="readiness: checkpoints loaded, generator up, cache reachable when configured",
            responses={200: {"content": {"application/json": {"schema": _READY_BODY}}},
                       503: {"description": "not ready", "content": {"application/json": {"schema": _READY_BODY}}}})
async def ready(request: Request) -> JSONResponse:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.checkpoints:
        return JSONResponse({"status": "not_ready", "checkpoints": []}, status_code=503)
    cache_ok = await service.cache.ping()
    service.cache_ok = cache_ok
    backend_ok, backend_info = await service.backend.readiness()
    reasons = [] if cache_ok else ["the cache is unreachable (generating uncached)"]
    if not backend_ok:
        reasons.append(backend_info.pop("reason", "the generation backend is not ready"))
    consumers = request.app.state.consumers  # --embedded-worker
    if consumers is not None and consumers.failure is not None:
        reasons.append(f"embedded worker: {consumers.failure}")
    body = {
        # degraded: still answering (uncached, or through other workers), but something needs a look
        "status": "degraded" if reasons else "ready",
        "checkpoints": list(service.checkpoints),
        "cache": {"backend": service.cache.backend, "reachable": cache_ok},
        **backend_info,
    }
    if reasons:
        body["reason"] = "; ".join(reasons)
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    service = getattr(request.app.state, "service", None)
    if service is not None and service.cache.backend == "memory":
        m.cache_bytes.set(service.cache.stats.bytes)
    await m.refresh()  # gauges read from Redis (queue=redis)
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/checkpoints", summary="the checkpoints this server generates from")
async def checkpoints(request: Request) -> dict:
    service = request.app.state.service
    return {"checkpoints": [{"id": cid, "default": cid == service.default, **ckpt.describe()}
                            for cid, ckpt in service.checkpoints.items()]}
