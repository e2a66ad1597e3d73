"""`GET /v1/loras`: the LoRA adapters requests may name in `loras` (name, rank, targets, size, description)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from service.api.deps import Authenticated, ServiceDep
from service.schemas import LoRAListing

router = APIRouter(prefix="/v1", tags=["loras"], dependencies=[Authenticated])


@router.get("/loras")
async def list_loras(service: ServiceDep) -> LoRAListing:
    # reads each adapter's file header: off the event loop
    return LoRAListing(data=await asyncio.to_thread(service.loras))
