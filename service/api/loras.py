"""`GET /v1/loras?model=`: the LoRA adapters requests to a model may name in `loras` (name, rank, targets, size,
description)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import Authenticated, ServiceDep
from service.schemas import LoRAListing

router = APIRouter(prefix="/v1", tags=["loras"], dependencies=[Authenticated])


@router.get("/loras")
async def list_loras(
    service: ServiceDep,
    model: Annotated[str | None, Query(description="The served model (`GET /v1/models`); none = the default one.")]
    = None,
) -> LoRAListing:
    # reads each adapter's file header: off the event loop
    return LoRAListing(data=await asyncio.to_thread(service.loras, model))
