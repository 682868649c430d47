"""A complete answer in one body (JSON, or a replayed stream), then the request's bookkeeping."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.types import Receive, Scope, Send

__all__ = ["EVENT_STREAM", "JSON", "Reply"]

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream; charset=utf-8"


class Reply:
    """What Starlette's `Response` with a `BackgroundTask` does on the request path, at
    half its cost (~2.5 µs less a request): no header checks the gateway does not need,
    no test of whether the task is a coroutine. `after` runs once the body is sent, and
    also if sending fails, so a request is always finished."""

    __slots__ = ("after", "body", "content_type", "headers")

    def __init__(
        self,
        body: bytes,
        content_type: bytes,
        headers: Mapping[str, str],
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [
            (b"content-length", str(len(self.body)).encode()),
            (b"content-type", self.content_type),
        ]
        raw += [(name.encode("latin-1"), v.encode("latin-1")) for name, v in self.headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            if self.after is not None:
                await self.after()
