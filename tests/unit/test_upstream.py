from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.upstream import event_data, iter_event_batches, status_error
from tests.support.fakes import REPLICA, FakeContent, FakeResponse


async def batches(pieces: list[bytes]) -> list[bytes]:
    content = FakeContent(pieces)
    return [e async for e in iter_event_batches(content)]  # type: ignore[arg-type]


async def test_an_event_split_across_reads_leaves_when_complete() -> None:
    got = await batches([b'data: {"a"', b": 1}\n", b"\ndata: [DONE]\n\n", b"data: 2\n\n"])
    assert got == [b'data: {"a": 1}\n\ndata: [DONE]\n\n', b"data: 2\n\n"]


async def test_events_read_together_leave_together() -> None:
    got = await batches([b"data: 1\n\ndata: 2\n\ndata: 3", b"\n\n"])
    assert got == [b"data: 1\n\ndata: 2\n\n", b"data: 3\n\n"]


async def test_crlf_events_and_trailing_partial_event() -> None:
    got = await batches([b"data: 1\r\n\r\ndata: 2\r\n\r\n: keepalive\n\ndata: 3"])
    assert got == [b"data: 1\n\ndata: 2\n\n: keepalive\n\n", b"data: 3\n\n"]


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


def chunk(content: str | None, finish: str | None = None, usage: object = None) -> bytes:
    choices = (
        []
        if content is None
        else [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
    )
    return b"data: " + orjson.dumps({"id": "c", "choices": choices, "usage": usage}) + b"\n\n"


@pytest.mark.parametrize("strip", [True, False], ids=["ours", "client's"])
async def test_relay_accounts_for_every_event_of_a_batch(strip: bool) -> None:
    from gateway.upstream import Outcome, Upstream

    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    body = (
        chunk("a")
        + chunk("b")
        + chunk("c", "stop")
        + chunk(None, usage=usage)
        + b"data: [DONE]\n\n"
        + chunk("after the end")
    )
    response: Any = FakeResponse(body, piece=None)
    outcome = Outcome()
    upstream = Upstream(None, 5, 1)  # type: ignore[arg-type]
    relayed = b"".join([b async for b in upstream.relay(REPLICA, response, outcome, strip)])
    assert outcome.completed and response.released and not response.closed
    assert outcome.usage == usage and outcome.finish_reasons == ("stop",)
    assert relayed.endswith(b"data: [DONE]\n\n") and b"after the end" not in relayed
    assert (b'"usage":null' in relayed) is not strip
    assert (b'"completion_tokens"' in relayed) is not strip


async def test_relay_passes_plain_token_batches_through() -> None:
    from gateway.upstream import Outcome, Upstream

    body = chunk("a") + chunk("b")  # no [DONE]: the stream was cut
    outcome = Outcome()
    upstream = Upstream(None, 5, 1)  # type: ignore[arg-type]
    response: Any = FakeResponse(body, piece=None)
    relayed = [b async for b in upstream.relay(REPLICA, response, outcome, True)]
    assert relayed[0] == body.replace(b',"usage":null', b"")
    assert b'"error"' in relayed[1] and relayed[1].endswith(b"data: [DONE]\n\n")
    assert outcome.events == 2 and not outcome.completed


async def test_relay_reads_json_written_with_spaces() -> None:
    """Python's json.dumps (as some servers write) puts a space after each colon."""
    import json

    from gateway.upstream import Outcome, Upstream

    def spaced(**chunk: Any) -> bytes:
        return b"data: " + json.dumps({"id": "c", **chunk}).encode() + b"\n\n"

    usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    plain = {"index": 0, "delta": {"content": "a"}, "finish_reason": None}
    body = (
        spaced(choices=[plain], usage=None)
        + spaced(choices=[{**plain, "finish_reason": "length"}], usage=None)
        + spaced(choices=[], usage=usage)
        + b"data: [DONE]\n\n"
    )
    outcome = Outcome()
    upstream = Upstream(None, 5, 1)  # type: ignore[arg-type]
    response: Any = FakeResponse(body, piece=None)
    relayed = b"".join([b async for b in upstream.relay(REPLICA, response, outcome, True)])
    assert outcome.completed and outcome.usage == usage
    assert outcome.finish_reasons == ("length",) and outcome.events == 3
    assert b'"completion_tokens"' not in relayed and relayed.endswith(b"data: [DONE]\n\n")


async def test_post_sends_the_body_as_json_with_the_given_headers_and_key() -> None:
    from aiohttp import web

    from gateway.pools import Pool
    from gateway.upstream import Upstream, close_session, new_session

    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers), await request.read()))
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    pool = Pool.from_urls("m", [f"http://127.0.0.1:{port}/v1"], None, "sk-backend")
    session = new_session(4)
    try:
        upstream = Upstream(session, 5.0, 1.0)
        body = b'{"model":"m","messages":[]}'
        response = await upstream.post(
            pool, pool.replicas[0], "/chat/completions", body, {"traceparent": "00-x"}
        )
        response.release()
    finally:
        await close_session(session)
        await runner.cleanup()
    ((path, headers, received),) = seen
    assert (path, received) == ("/v1/chat/completions", body)
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Authorization"] == "Bearer sk-backend"
    assert headers["traceparent"] == "00-x"
