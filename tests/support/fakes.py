"""Stand-ins for aiohttp's response, for unit tests of the relay without a socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

# What `UpstreamResponse` needs of a replica: where it is, for error messages.
REPLICA: Any = type("Replica", (), {"url": "http://replica"})()


class FakeContent:
    """Stands in for aiohttp's StreamReader: hands out the given pieces, one a read."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def iter_any(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece


class FakeResponse:
    """Stands in for aiohttp's ClientResponse: a body read whole, or streamed in pieces of
    `piece` bytes (events split across reads); remembers how it was let go."""

    def __init__(self, body: bytes, piece: int | None = 7) -> None:
        self.body = body
        size = piece or max(len(body), 1)
        self.content = FakeContent([body[i : i + size] for i in range(0, len(body), size)])
        self.released = self.closed = False

    async def read(self) -> bytes:
        return self.body

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True
