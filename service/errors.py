"""Typed errors of the serving layer; the API maps each to its HTTP status (see `service.api.app`)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, the message says what is wrong and how to fix it."""

    status: int = 500
    retry_after_s: int | None = None

    def __init__(self, message: str, *, job_id: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return type(self).__name__


class InvalidRequest(ServiceError):
    status = 422


class InsufficientMemory(ServiceError):
    """The request needs more memory than a worker has for it, even alone: fewer images or a smaller size would
    fit (the message says which)."""

    status = 422


class Unauthorized(ServiceError):
    status = 401


class JobNotFound(ServiceError):
    status = 404


class UnknownModel(ServiceError):
    """A request names a model this deployment does not serve (the message lists the served ones)."""

    status = 404


class UnknownAdapter(ServiceError):
    """A request names a LoRA adapter the deployment does not have (the message lists the available ones)."""

    status = 404


class JobExpired(ServiceError):
    status = 410


class JobCancelled(ServiceError):
    status = 409


class QueueFull(ServiceError):
    status = 429


class QueueUnavailable(ServiceError):
    status = 503


class NotReady(ServiceError):
    status = 503


class GenerationFailed(ServiceError):
    status = 500


class GenerationTimeout(ServiceError):
    status = 504


class RateLimited(ServiceError):
    status = 429


class BodyTooLarge(ServiceError):
    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


JOB_FAILURES: dict[str, type[ServiceError]] = {error.__name__: error for error in (InsufficientMemory, GenerationFailed)}
"""The errors a failed job's `error_type` names, which a synchronous request answers with; others read as
`GenerationFailed`."""


def job_failure(error_type: str | None, reason: str, job_id: str) -> ServiceError:
    """The error a synchronous request answers when its job failed with `error_type` and `reason`."""
    error = JOB_FAILURES.get(error_type or "", GenerationFailed)
    if error is GenerationFailed and not reason.startswith("generation failed"):
        reason = f"generation failed: {reason}"
    return error(reason, job_id=job_id)
