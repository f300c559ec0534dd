"""Stacking endpoint: POST /v1/adapters/combine, cached adapters stacked into one (generator/stack.py). Parse,
call, respond."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from service.adapters import AdapterService
from service.errors import ErrorResponse
from service.routes.adapters import _json_body, adapter_response
from service.schemas import CombineRequest

router = APIRouter(tags=["adapters"], responses={"default": {"model": ErrorResponse, "description": "an error"}})


def _service(request: Request) -> AdapterService:
    return request.app.state.service


ServiceDep = Annotated[AdapterService, Depends(_service)]


@router.post("/v1/adapters/combine", summary="stack cached adapters, a weight each, into one adapter",
             operation_id="combine_adapters", response_class=Response, dependencies=[Depends(_json_body)],
             responses={200: {"description": "the stacked adapter (headers as POST /v1/adapters)",
                              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def combine(body: CombineRequest, service: ServiceDep) -> Response:
    result = await service.combine([(a.id, a.weight) for a in body.adapters], body.dtype)
    return adapter_response(result, body.format)
