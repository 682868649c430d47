from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.upstream import event_data, iter_events, status_error


class FakeContent:
    """Stands in for aiohttp's StreamReader: hands out the given pieces one by one."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def iter_any(self):  # type: ignore[no-untyped-def]
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece


async def events(pieces: list[bytes]) -> list[bytes]:
    content = FakeContent(pieces)
    return [e async for e in iter_events(content)]  # type: ignore[arg-type]


async def test_events_split_across_reads() -> None:
    got = await events([b'data: {"a"', b": 1}\n", b"\ndata: [DONE]\n\n"])
    assert got == [b'data: {"a": 1}', b"data: [DONE]"]


async def test_crlf_events_and_trailing_partial_event() -> None:
    got = await events([b"data: 1\r\n\r\ndata: 2\r\n\r\n: keepalive\n\ndata: 3"])
    assert got == [b"data: 1", b"data: 2", b": keepalive", b"data: 3"]


def test_event_data() -> None:
    assert event_data(b"data: [DONE]") == b"[DONE]"
    assert event_data(b"data:{}") == b"{}"
    assert event_data(b": comment") is None
    assert event_data(b"event: x\ndata: 1") == b"1"


@pytest.mark.parametrize(
    ("status", "expected_status", "expected_type"),
    [
        (400, 400, "x"),
        (429, 429, "rate_limit_error"),
        (500, 502, "api_error"),
        (503, 503, "api_error"),
        (504, 502, "api_error"),
    ],
)
def test_status_errors_map_to_client_statuses(
    status: int, expected_status: int, expected_type: str
) -> None:
    body = b'{"error": {"message": "boom", "type": "x", "code": "c", "param": "p"}}'
    error = status_error(status, body, "7")
    assert (error.status_code, error.error_type, error.message) == (
        expected_status,
        expected_type,
        "boom",
    )
    assert error.retry_after == 7.0


def test_status_error_with_unparseable_body() -> None:
    error = status_error(500, b"<html>oops", None)
    assert error.message == "The backend replica returned HTTP 500."
    assert error.retry_after is None


def test_aiohttp_is_the_only_client_on_the_data_path() -> None:
    # A guard for the design choice: the upstream session type is aiohttp's.
    from gateway.upstream import new_session

    async def make() -> None:
        session = new_session(8)
        assert isinstance(session, aiohttp.ClientSession)
        await session.close()

    asyncio.run(make())
