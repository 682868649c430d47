"""Low-level ASGI helpers for the sim: bodies, JSON replies, disconnects and connection resets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence
from typing import Protocol

from starlette.types import Receive, Scope, Send

__all__ = [
    "SERVER_SEND_KEY",
    "abort_connection",
    "read_body",
    "reset_connection",
    "send_json",
    "wait_for_disconnect",
    "wait_forever",
]

# The scope key where the sim app keeps the server's own `send`, before Starlette's middleware
# wraps it: uvicorn's `send` is a method of the request cycle, which holds the TCP transport.
SERVER_SEND_KEY = "triage.sim.server_send"

_JSON = (b"content-type", b"application/json")
# SO_LINGER on with a zero timeout makes close() send a TCP RST instead of a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


class _Transport(Protocol):
    def abort(self) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object: ...


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected while sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            return b"".join((*chunks, chunk)) if chunks else chunk
        chunks.append(chunk)


async def send_json(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone; call only after the request body was read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def wait_forever() -> None:
    """Never return; for faults that leave a client hanging until it gives up."""
    await asyncio.get_running_loop().create_future()


def abort_connection(scope: Scope) -> bool:
    """Reset the request's TCP connection at once; False if the server hides its transport."""
    transport = _transport(scope)
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        # If this fails, a plain close still cuts the connection, with a FIN instead of a RST.
        with contextlib.suppress(OSError):
            setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()
    return True


async def reset_connection(scope: Scope, receive: Receive) -> None:
    """Drop the connection without a response, as a crashed or unreachable replica would.

    Under uvicorn the socket is reset. Elsewhere (another server, httpx's ASGI transport) there
    is no transport to reach, so a ConnectionResetError is raised for the server to handle.
    """
    if not abort_connection(scope):
        raise ConnectionResetError("simulated connection reset")
    # Let uvicorn see the connection go, or it would answer with a 500 on our behalf.
    await wait_for_disconnect(receive)


def _transport(scope: Scope) -> _Transport | None:
    owner = getattr(scope.get(SERVER_SEND_KEY), "__self__", None)
    transport = getattr(owner, "transport", None)
    if callable(getattr(transport, "abort", None)) and hasattr(transport, "get_extra_info"):
        return transport
    return None
