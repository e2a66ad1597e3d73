"""How a job's parts are written between processes, in Redis: its spec and timings as JSON, each event as its name
and JSON data, a worker's memory profile as JSON, an edit job's images as safetensors (`encode_edit_images`). The
prompt conditioning a job carries is the library's format (`dgq_core.pack_prompt_pair`: safetensors), its results
are PNGs; nothing is pickled."""

from __future__ import annotations

import json

from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from service.images import EditImages
from service.memory import MemoryProfile
from service.schemas import JobEvent, JobSpec


def encode_spec(spec: JobSpec) -> str:
    return spec.model_dump_json()


def decode_spec(data: bytes | str) -> JobSpec:
    """Raises `pydantic.ValidationError` for anything `encode_spec` did not write."""
    return JobSpec.model_validate_json(data)


def encode_timings(timings: dict[str, float]) -> str:
    return json.dumps(timings)


def decode_timings(data: bytes | str | None) -> dict[str, float]:
    """The stored timings; none stored yet reads as empty."""
    return json.loads(data or "{}")


def encode_event(event: JobEvent) -> dict[str, str]:
    """The fields of an event's stream entry (the enqueue script of `redis_streams` writes `queued` this way)."""
    return {"event": event.event, "data": json.dumps(event.data)}


def decode_event(fields: dict[bytes, bytes]) -> JobEvent:
    return JobEvent(event=fields[b"event"].decode(), data=json.loads(fields[b"data"]))


def encode_memory_profile(profile: MemoryProfile) -> str:
    return profile.model_dump_json()


def decode_memory_profile(data: bytes | str) -> MemoryProfile:
    """Raises `pydantic.ValidationError` for anything `encode_memory_profile` did not write."""
    return MemoryProfile.model_validate_json(data)


def encode_edit_images(images: EditImages) -> bytes:
    """An edit job's image (and mask) as one safetensors blob of uint8 arrays at the output size."""
    tensors = {"image": images.image}
    if images.mask is not None:
        tensors["mask"] = images.mask
    return save_safetensors(tensors)


def decode_edit_images(data: bytes) -> EditImages:
    """Inverse of `encode_edit_images`; raises `safetensors.SafetensorError` or `KeyError` for other bytes."""
    tensors = load_safetensors(data)
    return EditImages(tensors["image"], tensors.get("mask"))
