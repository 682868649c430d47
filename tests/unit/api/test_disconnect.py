"""The disconnect watch: by the server's signal, or by waiting on `receive`."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Scope

from gateway.api.disconnect import EXTENSION, ConnectionLost, unless_client_leaves
from gateway.errors import ClientClosedRequest


def scope_with(signal: ConnectionLost | None) -> Scope:
    scope: Scope = {"type": "http"}
    if signal is not None:
        scope["extensions"] = {EXTENSION: {"signal": signal}}
    return scope


async def never_disconnects() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_signal_cancels_the_work_and_raises_499() -> None:
    watched: list[str] = []
    signal = ConnectionLost(on_watch=lambda: watched.append("resume reading"))
    work = asyncio.Event()
    task = asyncio.ensure_future(
        unless_client_leaves(scope_with(signal), never_disconnects, work.wait())
    )
    await asyncio.sleep(0)
    assert watched == ["resume reading"]
    signal.fire()
    with pytest.raises(ClientClosedRequest):
        await asyncio.wait_for(task, 2)


async def test_signal_after_the_work_is_done_changes_nothing() -> None:
    signal = ConnectionLost()

    async def work() -> str:
        return "answer"

    assert await unless_client_leaves(scope_with(signal), never_disconnects, work()) == "answer"
    signal.fire()
    await asyncio.sleep(0)
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


async def test_connection_lost_before_the_watch_cancels_at_once() -> None:
    signal = ConnectionLost()
    signal.fire()
    with pytest.raises(ClientClosedRequest):
        work = unless_client_leaves(scope_with(signal), never_disconnects, asyncio.sleep(5))
        await asyncio.wait_for(work, 2)


async def test_without_a_signal_receive_is_watched() -> None:
    messages = [{"type": "http.disconnect"}]
    received = asyncio.Event()

    async def receive() -> Message:
        await received.wait()
        return messages.pop()

    task = asyncio.ensure_future(unless_client_leaves(scope_with(None), receive, asyncio.sleep(5)))
    await asyncio.sleep(0)
    received.set()
    with pytest.raises(ClientClosedRequest):
        await asyncio.wait_for(task, 2)


async def test_cancelled_from_outside_is_not_a_disconnect() -> None:
    signal = ConnectionLost()
    task = asyncio.ensure_future(
        unless_client_leaves(scope_with(signal), never_disconnects, asyncio.sleep(5))
    )
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    signal.fire()  # the watch is over: nothing to call
