"""Adapter endpoints: generate (JSON or multipart), fetch by id, batch. Parse, call, respond."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterable

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from generator.adapter import adapter_config_json, iter_tar_of_file, read_safetensors_metadata, tar_size
from generator.errors import InputError
from generator.pipeline import TaskInput
from service.adapters import AdapterService, Result
from service.errors import ErrorResponse, InvalidInput, NotFound, UnsupportedMediaType
from service.schemas import AdapterInput, BatchItem, BatchRequest, BatchResponse, GenerateRequest

router = APIRouter(tags=["adapters"], responses={"default": {"model": ErrorResponse, "description": "an error"}})
_ID = re.compile(r"^[0-9a-f]{64}$")
# code points no task text needs, which tokenizers, logs and C strings mishandle: NUL and lone surrogates
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
_FORMATS = ("safetensors", "peft-tar")

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "document": {"type": "string", "format": "binary", "description": "a UTF-8 text file"},
                "task": {"type": "string"}, "checkpoint": {"type": "string"},
                "dtype": {"type": "string", "enum": ["float32", "bfloat16", "float16"]},
                "format": {"type": "string", "enum": list(_FORMATS)}}}},
        },
    },
    "responses": {"200": {"description": "the adapter, streamed",
                          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
}


def _service(request: Request) -> AdapterService:
    return request.app.state.service


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type in ("", "application/json") or (media_type.startswith("application/") and media_type.endswith("+json"))


def _json_body(request: Request) -> None:
    """415 for a body declared as something other than JSON (no Content-Type is taken as JSON)."""
    if not _is_json(_media_type(request)):
        raise UnsupportedMediaType(f"Content-Type {_media_type(request)!r} is not accepted here; send application/json")


def _loads(raw: bytes | str, what: str) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput(f"{what} is not valid JSON") from None
    except RecursionError:  # nesting deeper than the parser's stack: no input of ours is nested like that
        raise InvalidInput(f"{what} is nested too deeply") from None


async def _read_request(request: Request) -> GenerateRequest:
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # malformed multipart, too many parts
            raise InvalidInput(f"malformed multipart body: {e}") from None
        fields: dict = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                try:
                    fields[key] = (await value.read()).decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"uploaded {key} is not UTF-8 text") from None
            else:
                fields[key] = value
        if isinstance(fields.get("embedding"), str):
            fields["embedding"] = _loads(fields["embedding"], "embedding (expected a JSON list of numbers)")
        data = fields
    elif _is_json(media_type):
        data = _loads(await request.body(), "body (send JSON, or multipart/form-data with a document file)")
    else:
        raise UnsupportedMediaType(f"Content-Type {media_type!r} is not accepted; send application/json, "
                                   "or multipart/form-data with a document file")
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as e:
        raise InvalidInput(_first_error(e)) from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"].removeprefix("Value error, ")


def to_task_input(item: AdapterInput, max_chars: int) -> TaskInput:
    try:
        if item.embedding is not None:
            return TaskInput.from_embedding(item.embedding)
        kind, text = ("task", item.task) if item.task is not None else ("document", item.document)
        if len(text) > max_chars:
            raise InvalidInput(f"{kind} has {len(text)} characters; the limit is {max_chars}")
        if (bad := _BAD_TEXT.search(text)) is not None:
            raise InvalidInput(f"{kind} holds {'a NUL character' if bad[0] == chr(0) else 'a lone surrogate'} at "
                               f"position {bad.start()}; send plain UTF-8 text")
        return TaskInput.task(text) if kind == "task" else TaskInput.document(text)
    except InputError as e:
        raise InvalidInput(str(e)) from None


def adapter_response(result: Result, fmt: str, *, head: bool = False) -> Response:
    data = result.data
    if fmt == "safetensors":
        length, name, etag = len(data), f"{result.adapter_id}.safetensors", f'"{result.adapter_id}"'
        body = None  # one write of the bytes in hand (see below)
    else:
        config = adapter_config_json(json.loads(read_safetensors_metadata(data)["adapter_config"]))
        length, name, etag = tar_size(len(config), len(data)), f"{result.adapter_id}.tar", f'"{result.adapter_id}-tar"'
        body = iter_tar_of_file(data, prefix=result.adapter_id)
    headers = _headers(result.adapter_id, length, name, etag, result.hit)
    if head:
        return Response(b"", headers=headers, media_type="application/octet-stream")
    if body is None:
        # the whole file in one send: the event loop keeps the socket fed from the bytes we already hold (in
        # 1 MiB pieces, the socket ran dry while each next piece was scheduled). As a memoryview: what the
        # socket does not take at once, asyncio's transport keeps as data[n:], a copy of ~10 MB for bytes
        return Response(memoryview(data), headers=headers, media_type="application/octet-stream")
    return StreamingResponse(_on_the_loop(body), headers=headers, media_type="application/octet-stream")


def adapter_head(adapter_id: str, size: int | None) -> Response:
    """HEAD of a cached safetensors adapter from its stored size alone."""
    if size is None:
        raise NotFound(f"no cached adapter {adapter_id}; POST /v1/adapters to generate it")
    headers = _headers(adapter_id, size, f"{adapter_id}.safetensors", f'"{adapter_id}"', hit=True)
    return Response(b"", headers=headers, media_type="application/octet-stream")


def _headers(adapter_id: str, length: int, name: str, etag: str, hit: bool) -> dict[str, str]:
    return {
        "Content-Length": str(length),
        "ETag": etag,
        "X-Adapter-Id": adapter_id,
        "X-Cache": "hit" if hit else "miss",
        "Content-Disposition": f'attachment; filename="{name}"',
        "Cache-Control": "public, max-age=31536000, immutable",  # content-addressed: never changes
    }


async def _on_the_loop(pieces: Iterable[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    """The pieces of a body held in memory, from the event loop: Starlette would fetch each piece of a plain
    iterator on a worker thread (a thread hop per MiB, about 1 ms of a 14 MB answer)."""
    for piece in pieces:
        yield piece


async def _generate(request: Request) -> Response:
    req = await _read_request(request)
    service = _service(request)
    item = to_task_input(req, service.settings.max_text_chars)
    result = await until_disconnect(request, service.get_or_generate(req.checkpoint, item, req.dtype))
    if result is None:  # nobody is listening: no response to write
        service.metrics.disconnects.inc()
        return Response(status_code=499)
    return adapter_response(result, req.format)


async def until_disconnect(request: Request, work):
    """Await `work`, or cancel it and return None if the client disconnects first (its queued job is then
    dropped instead of costing a generation)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


router.add_api_route("/generate", _generate, methods=["POST"], summary="generate an adapter (alias of POST /v1/adapters)",
                     openapi_extra=_BODY_DOC, response_class=Response)
router.add_api_route("/v1/adapters", _generate, methods=["POST"], summary="generate an adapter",
                     openapi_extra=_BODY_DOC, response_class=Response)


async def get_adapter(request: Request, adapter_id: str, format: str = "safetensors") -> Response:
    if format not in _FORMATS:
        raise InvalidInput(f"unknown format {format!r}; choose one of {', '.join(_FORMATS)}")
    if not _ID.fullmatch(adapter_id):
        raise NotFound(f"no adapter {adapter_id[:80]!r}: ids are 64 lowercase hex characters")
    service = _service(request)
    etag = f'"{adapter_id}"' if format == "safetensors" else f'"{adapter_id}-tar"'
    tags = [t.strip() for t in request.headers.get("if-none-match", "").split(",")]
    if etag in tags:
        return Response(status_code=304, headers={"ETag": etag})  # content-addressed: a known tag is current
    if "*" in tags and await service.size(adapter_id) is not None:  # any current representation
        return Response(status_code=304, headers={"ETag": etag})
    if request.method == "HEAD" and format == "safetensors":  # the stored size says it all: no need to read 14 MB
        size = await service.size(adapter_id)
        return adapter_head(adapter_id, size)
    data = await service.get(adapter_id)
    return adapter_response(Result(adapter_id, data, hit=True), format, head=request.method == "HEAD")


# GET and HEAD as two operations, each with its own operation id (one route for both would repeat it)
router.add_api_route("/v1/adapters/{adapter_id}", get_adapter, methods=["GET"], summary="a cached adapter by id",
                     response_class=Response, operation_id="get_adapter")
router.add_api_route("/v1/adapters/{adapter_id}", get_adapter, methods=["HEAD"], response_class=Response,
                     summary="a cached adapter's size and headers, without its bytes", operation_id="head_adapter")


@router.post("/v1/adapters/batch", summary="generate many adapters; fetch the bytes by id", response_model=BatchResponse,
             dependencies=[Depends(_json_body)])
async def batch(request: Request, body: BatchRequest) -> BatchResponse:
    service = _service(request)
    if len(body.inputs) > service.settings.max_batch:
        raise InvalidInput(f"{len(body.inputs)} inputs; the limit is {service.settings.max_batch} per batch")
    items = [to_task_input(x, service.settings.max_text_chars) for x in body.inputs]  # validate all first
    service.metrics.batch_size.observe(len(items))
    results = await asyncio.gather(*(service.get_or_generate(body.checkpoint, x, body.dtype) for x in items))
    return BatchResponse(adapters=[BatchItem(id=r.adapter_id, size=len(r.data), cache="hit" if r.hit else "miss")
                                   for r in results])
