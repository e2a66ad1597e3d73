"""The playground at `/`: a plain HTML/JS page (no build step) that submits a job (text-to-image, or an edit of an
uploaded image), follows its server-sent events, shows the previews as the picture forms and then the image.
`/playground/info?model=` tells the page the served models and, for the chosen one, its quantization, native size,
samplers, limits and LoRA adapters."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from service.api.deps import ServiceDep, SettingsDep

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/static/playground.js")
async def playground_script() -> FileResponse:
    return FileResponse(STATIC_DIR / "playground.js", media_type="text/javascript")


@router.get("/static/playground.css")
async def playground_style() -> FileResponse:
    return FileResponse(STATIC_DIR / "playground.css", media_type="text/css")


@router.get("/playground/info")
async def playground_info(
    service: ServiceDep, settings: SettingsDep,
    model: Annotated[str | None, Query(description="A served model; none = the default one.")] = None,
) -> dict[str, object]:
    """Unauthenticated like `/metrics` (which carries the same model info); says whether the API wants a key. The
    limits are the model's (`/v1/models` reports them too); `models` names every served model."""
    served = service.stage(model).model
    width, height = served.native_size
    loras = await asyncio.to_thread(service.loras, served.name)  # reads the adapters' file headers
    return {
        "model": served.name,
        "models": list(service.models),
        "quantization": {**served.quantization_info(), "device": settings.device},
        "native_width": width, "native_height": height,
        **served.limits.model_dump(),
        "samplers": served.samplers, "default_sampler": served.default_sampler,
        "preview_every_steps": settings.preview_every_steps, "max_input_pixels": settings.max_input_pixels,
        "max_upload_bytes": settings.max_upload_bytes,
        "auth_required": bool(settings.api_keys),
        "loras": [{"name": lora.name, "trigger": lora.description.get("trigger")} for lora in loras],
    }
