"""A stream as its client gets it: relayed by the gateway's own SSE response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.types import Message

from gateway.api.streaming import EventStreamResponse

__all__ = ["client_sees"]


async def client_sees(events: AsyncIterator[bytes]) -> list[bytes]:
    """The bodies `EventStreamResponse` sends of `events` (empty ones left out), a client
    that stays to the end: a failed stream's last is its error event."""
    sent: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            sent.append(message["body"])

    async def receive() -> Message:
        await asyncio.Event().wait()  # never disconnects
        raise AssertionError("unreachable")

    await EventStreamResponse(events, {})({"type": "http"}, receive, send)
    return sent
