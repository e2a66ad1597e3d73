"""OpenAI-compatible `GET /v1/models`: every model this deployment serves, with its quantization, native size,
request limits and samplers (fields beyond OpenAI's, which its clients keep)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import Authenticated, ServiceDep
from service.schemas import ModelQuantization, OpenAIModel, OpenAIModelList

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Authenticated])


@router.get("/models")
async def list_models(service: ServiceDep) -> OpenAIModelList:
    default = service.settings.default_model
    return OpenAIModelList(data=[
        OpenAIModel(
            id=name, created=service.started_at, default=name == default,
            quantization=ModelQuantization(**model.quantization_info()), native_width=model.native_size[0],
            native_height=model.native_size[1], limits=model.limits, samplers=model.samplers,
            default_sampler=model.default_sampler,
        )
        for name, model in service.models.items()
    ])
