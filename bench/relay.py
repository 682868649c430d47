"""The floor for any Python proxy: Starlette + one aiohttp session, forwarding bodies as is.

Usage: python bench/relay.py UPSTREAM_BASE_URL PORT   (e.g. http://127.0.0.1:9001/v1 9002)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    async def relay(request: Request) -> Response:
        body = await request.body()
        session = sessions[0]
        response = await session.post(
            upstream + request.url.path.removeprefix("/v1"),
            data=body,
            headers={"content-type": "application/json"},
        )
        if response.headers.get("content-type", "").startswith("text/event-stream"):

            async def events() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.content.iter_any():
                        yield chunk
                finally:
                    response.release()

            return StreamingResponse(events(), media_type="text/event-stream")
        payload = await response.read()
        response.release()
        return Response(payload, status_code=response.status, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        yield
        await sessions[0].close()

    return Starlette(
        routes=[Route("/v1/{path:path}", relay, methods=["POST"])],
        lifespan=lifespan,
    )


if __name__ == "__main__":
    uvicorn.run(
        build(sys.argv[1]),
        host="127.0.0.1",
        port=int(sys.argv[2]),
        log_level="warning",
        access_log=False,
    )
