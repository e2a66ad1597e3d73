"""`POST /generate`: synchronous (PNG or JSON) or asynchronous (202 + Location); a JSON body (images as base64) or
multipart/form-data (images as file uploads)."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api.deps import Authenticated, ServiceDep
from service.errors import InvalidRequest, UnsupportedMediaType
from service.schemas import ErrorBody, GeneratedImages, GenerateForm, GenerateRequest, JobAccepted

router = APIRouter(tags=["generate"], dependencies=[Authenticated])

_ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 415, 422, 429, 500, 503, 504)}
_FILE_FIELDS = ("init_image", "mask")
_MAX_FORM_FIELDS = 32


def _schema(model: type) -> dict:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


# The route reads its body itself (JSON or a form), so the schema names both kinds here.
_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _schema(GenerateRequest)},
        "multipart/form-data": {"schema": _schema(GenerateForm)},
    },
}


async def _read_body(request: Request) -> tuple[GenerateRequest, dict[str, bytes]]:
    """The request body as a `GenerateRequest` and its uploaded files (multipart), validated.

    Raises:
        RequestValidationError: the body does not validate (answered 422 naming the fields).
        InvalidRequest: a form field other than the images is a file.
        UnsupportedMediaType: neither JSON nor multipart/form-data.
    """
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    try:
        if content_type == "multipart/form-data":
            form = await request.form(max_files=len(_FILE_FIELDS), max_fields=_MAX_FORM_FIELDS)
            fields = dict(form.multi_items())
            files = {name: await fields.pop(name).read() for name in _FILE_FIELDS
                     if isinstance(fields.get(name), UploadFile)}
            texts = [name for name, value in fields.items() if isinstance(value, UploadFile)]
            if texts:
                raise InvalidRequest(f"{', '.join(texts)}: only init_image and mask may be files; send the other "
                                     "fields as text")
            return GenerateRequest.model_validate(fields), files
        if content_type in ("application/json", ""):
            return GenerateRequest.model_validate_json(await request.body()), {}
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from error
    raise UnsupportedMediaType(
        f"a body of type {content_type!r} cannot be read: send application/json (images base64) or "
        "multipart/form-data (images as files)"
    )


@router.post(
    "/generate",
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={
        200: {"content": {"image/png": {}}, "model": GeneratedImages,
              "description": "One image as image/png; several as JSON with base64 PNGs."},
        202: {"model": JobAccepted, "description": 'With "async": true or "Prefer: respond-async".'},
        **_ERRORS,
    },
)
async def generate(request: Request, service: ServiceDep, prefer: Annotated[str | None, Header()] = None) -> Response:
    """Text-to-image; image-to-image with `init_image` (and `strength`); inpainting with `init_image` and `mask`."""
    body, files = await _read_body(request)
    if body.respond_async or "respond-async" in (prefer or ""):
        state = await service.submit(body, files)
        location = f"/jobs/{state.id}"
        accepted = JobAccepted(id=state.id, status=state.status, location=location)
        return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers={"Location": location})
    generated = await service.generate(body, files)
    state = generated.state
    headers = {"X-Job-Id": state.id, "Location": f"/jobs/{state.id}"}
    if len(generated.pngs) == 1:
        return Response(generated.pngs[0], media_type="image/png", headers=headers)
    body_json = GeneratedImages(
        id=state.id, seeds=state.seeds, timings=state.timings,
        images=[base64.b64encode(png).decode() for png in generated.pngs],
    )
    return JSONResponse(body_json.model_dump(mode="json"), headers=headers)
