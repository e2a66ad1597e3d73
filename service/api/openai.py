"""OpenAI-compatible `POST /v1/images/generations`."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from service.api.deps import Authenticated, ServiceDep
from service.schemas import (
    ErrorBody,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Authenticated])


@router.post("/images/generations", responses={code: {"model": ErrorBody} for code in (401, 422, 429, 503, 504)})
async def images_generations(body: OpenAIImageRequest, service: ServiceDep, request: Request) -> OpenAIImagesResponse:
    generated = await service.generate(body.to_generate_request())
    if body.response_format == "url":
        data = [OpenAIImage(url=str(request.url_for("job_image", job_id=generated.state.id, index=n)))
                for n in range(len(generated.pngs))]
    else:
        data = [OpenAIImage(b64_json=base64.b64encode(png).decode()) for png in generated.pngs]
    return OpenAIImagesResponse(created=int(generated.state.created_at), data=data)
