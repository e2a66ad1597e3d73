"""Request bodies larger than `max_body_bytes` (`max_upload_bytes` on the routes that take images) are answered 413
before the app reads them.

A declared `Content-Length` above the limit is refused at once; a body without one (chunked) is read only up to
the limit. The body is buffered here (it is bounded by construction) and handed to the app whole.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.responses import error_response
from service.errors import BodyTooLarge

UPLOAD_PATHS = frozenset({"/generate", "/v1/images/edits"})
"""The routes whose bodies may carry images."""


class BodySizeLimit:
    """ASGI middleware enforcing `max_bytes` on HTTP request bodies, `upload_max_bytes` on those of `UPLOAD_PATHS`."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes

    @staticmethod
    def _too_large(size: str, limit: int, setting: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"the request body is {size} bytes, above the limit of {limit} bytes ({setting}): send a smaller body"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in UPLOAD_PATHS
        limit, setting = (self.upload_max_bytes, "max_upload_bytes") if upload else (self.max_bytes, "max_body_bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            await error_response(self._too_large(declared, limit, setting))(scope, receive, send)
            return
        body, more, first = bytearray(), True, None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left; the app sees that
                break
            body += message.get("body", b"")
            if len(body) > limit:
                await error_response(self._too_large(f"more than {limit}", limit, setting))(scope, receive, send)
                return
            more = message.get("more_body", False)
        first = first or {"type": "http.request", "body": bytes(body), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)
