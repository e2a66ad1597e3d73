"""The JSON error answer every failure gets: a `ServiceError` turned into its status, body and headers."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from service.errors import ServiceError
from service.schemas import ErrorBody


def error_response(error: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    """`ErrorBody` with the error's status; `Retry-After` when it has one, `Location` of the job where it helps.

    Args:
        error (`ServiceError`): what went wrong.
        headers (`dict[str, str] | None`): more headers (e.g. `Allow` of a 405).
    """
    headers = dict(headers or {})
    if error.retry_after_s:
        headers["Retry-After"] = str(error.retry_after_s)
    if error.job_id and error.status in (409, 500, 504):
        headers["Location"] = f"/jobs/{error.job_id}"
    body = ErrorBody.of(error.status, error.message, error.type, error.job_id)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=error.status, headers=headers)
