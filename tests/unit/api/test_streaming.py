"""EventStreamResponse: relays events as they come, ends a failed stream with an error
event, stops the relay when the client leaves, and runs `on_close` once however it ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
from starlette.types import Message

from gateway.api.streaming import EventStreamResponse
from gateway.errors import UpstreamTimeout
from tests.support.relay import client_sees


class Closes:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


async def _events(*batches: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for batch in batches:
        yield batch
    if fail:
        raise UpstreamTimeout("The backend replica did not finish the answer before its deadline.")


async def test_events_are_relayed_in_order_with_sse_headers() -> None:
    started: list[Message] = []
    sent: list[bytes] = []
    closes = Closes()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.append(message)
        elif message["body"]:
            sent.append(message["body"])

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    events = _events(b"data: 1\n\n", b"data: 2\n\ndata: [DONE]\n\n")
    response = EventStreamResponse(events, {"x-triage-tier": "cheap"}, on_close=closes)
    await response({"type": "http"}, receive, send)
    assert sent == [b"data: 1\n\n", b"data: 2\n\ndata: [DONE]\n\n"]
    headers = dict(started[0]["headers"])
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"x-triage-tier"] == b"cheap"
    assert closes.count == 1


async def test_a_failed_stream_ends_with_one_error_event_and_done() -> None:
    sent = await client_sees(_events(b"data: 1\n\n", fail=True))
    assert sent[0] == b"data: 1\n\n"
    last = sent[-1]
    assert last.endswith(b"data: [DONE]\n\n") and len(sent) == 2
    error = orjson.loads(last.split(b"\n\n")[0].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_timeout" and "deadline" in error["message"]


async def test_a_client_that_leaves_stops_the_relay_and_closes_once() -> None:
    """The relay is cancelled at the disconnect (not at the next write), the source is
    closed (so the upstream connection drops), and `on_close` runs once."""
    first_sent = asyncio.Event()
    source_closed = asyncio.Event()
    closes = Closes()

    async def stalled() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.Event().wait()  # a backend that stalls
            yield b"data: never\n\n"
        finally:
            source_closed.set()

    sent: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            sent.append(message["body"])
            first_sent.set()

    async def receive() -> Message:
        await first_sent.wait()
        return {"type": "http.disconnect"}

    response = EventStreamResponse(stalled(), {}, on_close=closes)
    await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=10)
    assert sent == [b"data: 1\n\n"]
    assert source_closed.is_set()
    assert closes.count == 1


async def test_on_close_runs_even_when_the_start_cannot_be_sent() -> None:
    closes = Closes()

    async def send(message: Message) -> None:
        raise OSError("client gone")

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    response = EventStreamResponse(_events(b"data: 1\n\n"), {}, on_close=closes)
    with contextlib.suppress(OSError):  # whether it surfaces is the server's business
        await response({"type": "http"}, receive, send)
    assert closes.count == 1
