"""OpenAI-compatible `GET /v1/models`: the one model this deployment serves, with its native size, request
limits and samplers (fields beyond OpenAI's, which its clients keep)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import Authenticated, ServiceDep
from service.schemas import OpenAIModel, OpenAIModelList

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Authenticated])


@router.get("/models")
async def list_models(service: ServiceDep) -> OpenAIModelList:
    model = service.model
    width, height = model.native_size
    return OpenAIModelList(data=[OpenAIModel(
        id=model.name, created=service.started_at, native_width=width, native_height=height, limits=model.limits,
        samplers=model.samplers, default_sampler=model.default_sampler,
    )])
