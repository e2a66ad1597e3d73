"""OpenAI-compatible `POST /v1/images/generations` and `POST /v1/images/edits` (multipart), each answering JSON or,
with `stream=true`, OpenAI's server-sent events: up to `partial_images` `*.partial_image` previews, then one
`*.completed` event per image."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.deps import Authenticated, ServiceDep
from service.errors import GenerationTimeout, ServiceError
from service.schemas import (
    ErrorBody,
    JobState,
    OpenAIImage,
    OpenAIImageEditRequest,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from service.serving import GenerationService, default_strength

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Authenticated])

_RESPONSES = {
    200: {"model": OpenAIImagesResponse, "content": {"text/event-stream": {}},
          "description": "The images as JSON; with `stream=true` server-sent events."},
    **{code: {"model": ErrorBody} for code in (401, 404, 413, 422, 429, 500, 503, 504)},
}
_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
             "total_tokens": 0}
"""OpenAI's token usage, which has no meaning here; its completed events carry it."""


def _sse(event: str, data: dict[str, object]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _error_event(error: ServiceError) -> str:
    """An error event the OpenAI client raises as `APIError` with the message."""
    return _sse("error", {"type": "error", "error": {"message": error.message, "type": error.type,
                                                     "code": error.status}})


async def _stream(
    service: GenerationService, state: JobState, kind: str, partial_images: int, size: str
) -> AsyncIterator[str]:
    """The job's events as OpenAI's streaming images events (`kind`: "image_generation" or "image_edit")."""
    shape = {"background": "opaque", "output_format": "png", "quality": "auto", "size": size}
    sent = 0
    try:
        async with asyncio.timeout(service.settings.request_timeout_s):
            async for event in await service.events(state.id):
                if event.event == "preview" and sent < partial_images:
                    yield _sse(f"{kind}.partial_image", {
                        "type": f"{kind}.partial_image", "b64_json": event.data["image"], "partial_image_index": sent,
                        "created_at": int(time.time()), **shape,
                    })
                    sent += 1
                elif event.event == "succeeded":
                    for index in range(state.num_images):
                        png = await service.image(state.id, index)
                        yield _sse(f"{kind}.completed", {
                            "type": f"{kind}.completed", "b64_json": base64.b64encode(png).decode(),
                            "created_at": int(time.time()), "usage": _NO_USAGE, **shape,
                        })
                    return
                elif event.event in ("failed", "cancelled"):
                    reason = event.data.get("reason") or event.event
                    yield _error_event(ServiceError(f"generation {event.event}: {reason}", job_id=state.id))
                    return
    except TimeoutError:
        yield _error_event(GenerationTimeout(
            f"the job did not finish within {service.settings.request_timeout_s:g} s: poll /jobs/{state.id}",
            job_id=state.id,
        ))
    except ServiceError as error:
        yield _error_event(error)


async def _answer(
    body: OpenAIImageRequest, service: GenerationService, request: Request, kind: str,
    files: dict[str, bytes] | None = None, strength: float = 1.0,
) -> Response:
    """The JSON answer, or the event stream; `strength` is the share of the steps that runs."""
    preview_every = service.preview_spacing(body.steps, strength, body.partial_images) if body.stream else 0
    generate_request = body.to_generate_request(preview_every)
    if body.stream:
        state = await service.submit(generate_request, files)
        size = body.size or "x".join(str(side) for side in service.models[state.model].native_size)
        return StreamingResponse(
            _stream(service, state, kind, body.partial_images, size), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Id": state.id},
        )
    generated = await service.generate(generate_request, files)
    if body.response_format == "url":
        data = [OpenAIImage(url=str(request.url_for("job_image", job_id=generated.state.id, index=n)))
                for n in range(len(generated.pngs))]
    else:
        data = [OpenAIImage(b64_json=base64.b64encode(png).decode()) for png in generated.pngs]
    answer = OpenAIImagesResponse(created=int(generated.state.created_at), data=data)
    return JSONResponse(answer.model_dump(mode="json"), headers={"X-Job-Id": generated.state.id})


@router.post("/images/generations", response_model=OpenAIImagesResponse, responses=_RESPONSES)
async def images_generations(body: OpenAIImageRequest, service: ServiceDep, request: Request) -> Response:
    return await _answer(body, service, request, "image_generation")


@router.post("/images/edits", response_model=OpenAIImagesResponse, responses=_RESPONSES)
async def images_edits(
    body: Annotated[OpenAIImageEditRequest, Form(media_type="multipart/form-data")], service: ServiceDep,
    request: Request,
) -> Response:
    """Image-to-image (no mask) or inpainting (the mask's transparent pixels are redrawn) of one image."""
    files = {"init_image": await body.image.read()}
    if body.mask is not None:
        files["mask"] = await body.mask.read()
    strength = body.strength or default_strength(body.mask is not None)
    return await _answer(body, service, request, "image_edit", files, strength)
