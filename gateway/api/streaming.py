"""An SSE response that relays each event as it arrives and stops work when the client leaves.

Starlette's `StreamingResponse` only notices a disconnect on ASGI 2.4 servers when the
next write fails, so a stalled backend would keep generating for a client that is gone.
Here a disconnect watch (gateway/api/disconnect.py) cancels the relay at once, which
closes the upstream connection: the backend sees the disconnect and frees its GPU slot.
A stream that fails (`events` raises a `TriageError`), or is still running at the shutdown
deadline, ends with an error event and `[DONE]`: this is the one place a stream that has
started reports an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from starlette.types import Receive, Scope, Send

from gateway.api.disconnect import DisconnectWatch
from gateway.api.errors import sse_error_event
from gateway.errors import TriageError, UpstreamUnavailable
from gateway.shutdown import INTERRUPTED, SHUTDOWN

__all__ = ["EventStreamResponse"]

_SHUTTING_DOWN = UpstreamUnavailable(
    "The gateway is shutting down; retry the request.", code="shutting_down"
)


class EventStreamResponse:
    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str],
        on_close: Callable[[], Awaitable[None]] | None = None,
        error_event: Callable[[TriageError], bytes] = sse_error_event,
    ) -> None:
        """`on_close` runs however the response ends, even if `events` never started;
        `error_event` is the stream's last event when it fails (the client's dialect's)."""
        self.events = events
        self.on_close = on_close
        self.error_event = error_event
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        self.raw_headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._relay_until_stopped(scope, receive, send)
        finally:
            if self.on_close is not None:
                await self.on_close()

    async def _relay_until_stopped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Relay in this task until done, the client leaves, or the shutdown deadline
        passes (then the stream ends with an error event)."""
        task = asyncio.current_task()
        assert task is not None
        with DisconnectWatch(scope, receive) as watch:
            try:
                with SHUTDOWN.interrupts(task):
                    await self._relay(send)
            except asyncio.CancelledError as stop:
                ours = watch.client_left or stop.args == (INTERRUPTED,)
                if not ours or task.uncancel() > 0:
                    raise  # cancelled from outside: the server is tearing the request down
                if not watch.client_left:
                    await self._end_with(send, _SHUTTING_DOWN)

    async def _relay(self, send: Send) -> None:
        try:
            try:
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            except TriageError as error:
                await self._end_with(send, error)
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write; the disconnect watch sees it too
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _end_with(self, send: Send, error: TriageError) -> None:
        """End a stream that has started with `error`: an error event (then `[DONE]`, for
        an OpenAI client)."""
        last = self.error_event(error)
        await send({"type": "http.response.body", "body": last, "more_body": False})
