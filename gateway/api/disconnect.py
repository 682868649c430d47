"""Stop working for a client that has gone: an answer can take minutes of GPU.

A plain response is sent only at the end, so without this its backend call runs to
completion for nobody (and an SDK that timed out and retried has two running); a stream
would go on generating until its next write failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive, Scope

from gateway.errors import ClientClosedRequest

__all__ = ["EXTENSION", "ConnectionLost", "DisconnectWatch", "unless_client_leaves"]

_T = TypeVar("_T")

EXTENSION = "triage.connection_lost"


class ConnectionLost:
    """A server's word that a request's connection is gone, offered in the ASGI scope as
    `extensions[EXTENSION]["signal"]` (gateway/server.py does). With it a watch costs a
    callback; without it, a task that waits on `receive` for `http.disconnect`."""

    __slots__ = ("_callback", "_on_watch", "lost")

    def __init__(self, on_watch: Callable[[], None] | None = None) -> None:
        self.lost = False
        self._callback: Callable[[], None] | None = None
        self._on_watch = on_watch  # e.g. resume reading the socket, to see the close

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the connection is lost (at once if it already is)."""
        if self.lost:
            callback()
            return
        self._callback = callback
        if self._on_watch is not None:
            self._on_watch()

    def unwatch(self) -> None:
        self._callback = None

    def fire(self) -> None:
        """For the server: the connection is gone."""
        self.lost = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class DisconnectWatch:
    """Within the block, this task is cancelled as soon as the client disconnects (then
    `client_left` is set); the work goes on in the request's own task.

    A class rather than a `@contextmanager`: it wraps every request, and a generator
    plus two closures cost more."""

    __slots__ = ("_receive", "_scope", "_stop_watching", "_task", "client_left", "watching")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._scope = scope
        self._receive = receive
        self._stop_watching: Callable[[], object] | None = None
        self.watching = False
        self.client_left = False

    def __enter__(self) -> DisconnectWatch:
        self.watching = True
        signal = (self._scope.get("extensions") or {}).get(EXTENSION, {}).get("signal")
        if isinstance(signal, ConnectionLost):
            signal.watch(self._on_disconnect)
            self._stop_watching = signal.unwatch
        else:
            waiter = asyncio.ensure_future(_disconnected(self._receive))
            waiter.add_done_callback(self._on_receive_done)
            self._stop_watching = waiter.cancel
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.watching = False  # a disconnect from now on is not this block's to act on
        if self._stop_watching is not None:
            self._stop_watching()

    def _on_disconnect(self) -> None:
        if self.watching:
            self.client_left = True
            self._task.cancel()

    def _on_receive_done(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.cancelled() and waiter.exception() is None:
            self._on_disconnect()


async def unless_client_leaves(scope: Scope, receive: Receive, work: Awaitable[_T]) -> _T:
    """Await `work` in this task; if the client disconnects first, cancel it and raise
    `ClientClosedRequest` (recorded as 499)."""
    with DisconnectWatch(scope, receive) as watch:
        try:
            return await work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if watch.client_left and task is not None and task.uncancel() == 0:
                raise ClientClosedRequest("The client closed the connection.") from None
            raise


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
