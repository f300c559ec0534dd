"""The playground: the page at / and its assets, what the page needs to know, adapter stats and novelty, and
try-it. Parse, call service.playground, respond."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from service.errors import ErrorResponse, NotFound
from service.playground import STATIC, AdapterStats, Novelty, Playground, PlaygroundInfo, TryRequest, TryResponse
from service.routes.adapters import _ID, _json_body

_ERRORS = {"default": {"model": ErrorResponse, "description": "an error"}}
# about adapters, always served
router = APIRouter(tags=["adapters"], responses=_ERRORS)
# the page and try-it, served while the playground setting is on
page_router = APIRouter(tags=["playground"], responses=_ERRORS)

ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
# the page and its assets need no API key: the page asks for one and sends it with each request it makes
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in ASSETS)})
_PAGE_HEADERS = {
    # no inline script, nothing from elsewhere: the page works offline, and text it shows cannot run as code
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


# documented as the pattern it is, but checked here, so that any other text is the 404 a fetch by id gives
AdapterId = Annotated[str, Path(description="an adapter id: 64 lowercase hex characters",
                                json_schema_extra={"pattern": "^[0-9a-f]{64}$"})]


def _playground(request: Request) -> Playground:
    return request.app.state.playground


def _checked_id(adapter_id: str) -> str:
    if not _ID.fullmatch(adapter_id):
        raise NotFound(f"no adapter {adapter_id[:80]!r}: ids are 64 lowercase hex characters")
    return adapter_id


@router.get("/v1/adapters/{adapter_id}/stats", response_model=AdapterStats,
            summary="a cached adapter's ΔW norm per layer and module")
async def stats(request: Request, adapter_id: AdapterId) -> AdapterStats:
    return await _playground(request).stats(_checked_id(adapter_id))


@router.get("/v1/adapters/{adapter_id}/novelty", response_model=Novelty,
            summary="a cached adapter's ΔW distance to its checkpoint's training adapters")
async def novelty(request: Request, adapter_id: AdapterId) -> Novelty:
    return await _playground(request).novelty(_checked_id(adapter_id))


@page_router.get("/v1/playground", response_model=PlaygroundInfo, response_model_by_alias=True,
                 summary="what the playground page can do per checkpoint")
async def info(request: Request) -> PlaygroundInfo:
    return _playground(request).info()


@page_router.post("/v1/try", response_model=TryResponse, dependencies=[Depends(_json_body)],
                  summary="a cached adapter on its base model: answers with and without it")
async def try_adapter(request: Request, body: TryRequest) -> TryResponse:
    from service.app import _client_id

    playground = _playground(request)
    return await playground.try_adapter(body, _client_id(request, playground.by_key))


def _file(name: str, media_type: str):
    body = (STATIC / name).read_bytes()  # read once: a few kilobytes, part of the package

    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=_PAGE_HEADERS)

    return serve


page_router.add_api_route("/", _file("index.html", "text/html; charset=utf-8"), methods=["GET", "HEAD"],
                         include_in_schema=False)
for _name, _type in ASSETS.items():
    page_router.add_api_route(f"/static/{_name}", _file(_name, _type), methods=["GET"], include_in_schema=False)
