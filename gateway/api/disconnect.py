"""Stop working for a client that has gone: an answer can take minutes of GPU.

A plain response is sent only at the end, so without this its backend call runs to
completion for nobody (and an SDK that timed out and retried has two running); a stream
would go on generating until its next write failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from starlette.types import Receive

from gateway.errors import ClientClosedRequest

_T = TypeVar("_T")


class DisconnectWatch:
    """Whether the client left while watched; see `cancelled_on_disconnect`."""

    def __init__(self) -> None:
        self.watching = True
        self.client_left = False


@contextlib.contextmanager
def cancelled_on_disconnect(receive: Receive) -> Iterator[DisconnectWatch]:
    """Within the block, this task is cancelled as soon as the client disconnects (then
    `client_left` is set). A done-callback does it: one small task waits on `receive`,
    and the work goes on in the request's own task."""
    task = asyncio.current_task()
    assert task is not None
    watch = DisconnectWatch()

    def on_disconnect(waiter: asyncio.Future[None]) -> None:
        if watch.watching and not waiter.cancelled() and waiter.exception() is None:
            watch.client_left = True
            task.cancel()

    waiter = asyncio.ensure_future(_disconnected(receive))
    waiter.add_done_callback(on_disconnect)
    try:
        yield watch
    finally:
        watch.watching = False  # a disconnect from now on is not this block's to act on
        waiter.cancel()


async def unless_client_leaves(receive: Receive, work: Awaitable[_T]) -> _T:
    """Await `work` in this task; if the client disconnects first, cancel it and raise
    `ClientClosedRequest` (recorded as 499)."""
    with cancelled_on_disconnect(receive) as watch:
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
