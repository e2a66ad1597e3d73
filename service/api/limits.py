"""Request bodies larger than `max_body_bytes` are answered 413 before the app reads them.

A declared `Content-Length` above the limit is refused at once; a body without one (chunked) is read only up to
the limit. The body is buffered here (it is small by construction) and handed to the app whole.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.responses import error_response
from service.errors import BodyTooLarge


class BodySizeLimit:
    """ASGI middleware enforcing `max_bytes` on HTTP request bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"the request body is {size} bytes, above the limit of {self.max_bytes} bytes (max_body_bytes): "
            "send a smaller body"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large(declared))(scope, receive, send)
            return
        body, more, first = bytearray(), True, None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left; the app sees that
                break
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await error_response(self._too_large(f"more than {self.max_bytes}"))(scope, receive, send)
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
