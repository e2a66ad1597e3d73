"""`POST /generate`: synchronous (PNG or JSON) or asynchronous (202 + Location)."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse

from service.api.deps import Authenticated, ServiceDep
from service.schemas import ErrorBody, GeneratedImages, GenerateRequest, JobAccepted

router = APIRouter(tags=["generate"], dependencies=[Authenticated])

_ERRORS = {code: {"model": ErrorBody} for code in (401, 409, 422, 429, 500, 503, 504)}


@router.post(
    "/generate",
    responses={
        200: {"content": {"image/png": {}}, "model": GeneratedImages,
              "description": "One image as image/png; several as JSON with base64 PNGs."},
        202: {"model": JobAccepted, "description": 'With "async": true or "Prefer: respond-async".'},
        **_ERRORS,
    },
)
async def generate(
    body: GenerateRequest, service: ServiceDep, prefer: Annotated[str | None, Header()] = None
) -> Response:
    if body.respond_async or "respond-async" in (prefer or ""):
        state = await service.submit(body)
        location = f"/jobs/{state.id}"
        accepted = JobAccepted(id=state.id, status=state.status, location=location)
        return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers={"Location": location})
    generated = await service.generate(body)
    state = generated.state
    headers = {"X-Job-Id": state.id, "Location": f"/jobs/{state.id}"}
    if len(generated.pngs) == 1:
        return Response(generated.pngs[0], media_type="image/png", headers=headers)
    body_json = GeneratedImages(
        id=state.id, seeds=state.seeds, timings=state.timings,
        images=[base64.b64encode(png).decode() for png in generated.pngs],
    )
    return JSONResponse(body_json.model_dump(mode="json"), headers=headers)
