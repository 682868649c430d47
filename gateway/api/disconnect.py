"""Stop working for a client that has gone: a non-streamed answer can take minutes of GPU.

A stream notices a disconnect through `EventStreamResponse`; a plain response is sent
only at the end, so without this its backend call runs to completion for nobody (and an
SDK that timed out and retried has two running).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Message, Receive

from gateway.errors import ClientClosedRequest

_T = TypeVar("_T")


async def unless_client_leaves(receive: Receive, work: Awaitable[_T]) -> _T:
    """Await `work` in this task; if the client disconnects first, cancel it and raise
    `ClientClosedRequest`. Call once the request body is read: the next ASGI message can
    then only be `http.disconnect`."""
    task = asyncio.current_task()
    assert task is not None
    watcher: asyncio.Future[Message] = asyncio.ensure_future(receive())
    watching, left = True, False

    def on_message(done: asyncio.Future[Message]) -> None:
        nonlocal left
        if (
            watching
            and not done.cancelled()
            and done.exception() is None
            and done.result()["type"] == "http.disconnect"
        ):
            left = True
            task.cancel()

    watcher.add_done_callback(on_message)
    try:
        return await work
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:
            raise ClientClosedRequest("The client closed the connection.") from None
        raise
    finally:
        watching = False  # a disconnect from now on is the response's business
        watcher.cancel()
