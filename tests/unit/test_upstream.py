from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.dispatch.answer import read_answer, relay_events
from gateway.errors import UpstreamError
from gateway.upstream import (
    ModelRename,
    Outcome,
    UpstreamResponse,
    event_data,
    iter_event_batches,
    status_error,
)
from tests.support.fakes import REPLICA, FakeContent, FakeResponse
from tests.support.relay import client_sees


async def relay(
    response: Any, outcome: Outcome, strip: bool, rename: ModelRename | None = None
) -> list[bytes]:
    """What the client gets of `response`, relayed as `Dispatched.relay` does."""
    events = UpstreamResponse(response, REPLICA).events()
    return await client_sees(relay_events(events, outcome, strip, rename))


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
    relayed = b"".join(await relay(response, outcome, strip))
    # The connection is let go by the answer's finish (see test_dispatch): not cut here.
    assert outcome.completed and not response.closed
    assert outcome.usage == usage and outcome.finish_reasons == ("stop",)
    assert relayed.endswith(b"data: [DONE]\n\n") and b"after the end" not in relayed
    assert (b'"usage":null' in relayed) is not strip
    assert (b'"completion_tokens"' in relayed) is not strip


async def test_relay_passes_plain_token_batches_through() -> None:
    body = chunk("a") + chunk("b")  # no [DONE]: the stream was cut
    outcome = Outcome()
    response: Any = FakeResponse(body, piece=None)
    relayed = await relay(response, outcome, True)
    assert relayed[0] == body.replace(b',"usage":null', b"")
    assert b'"error"' in relayed[1] and relayed[1].endswith(b"data: [DONE]\n\n")
    assert isinstance(outcome.error, UpstreamError)
    assert outcome.events == 2 and not outcome.completed


async def test_relay_reads_json_written_with_spaces() -> None:
    """Python's json.dumps (as some servers write) puts a space after each colon."""
    import json

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
    response: Any = FakeResponse(body, piece=None)
    relayed = b"".join(await relay(response, outcome, True))
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
        assert isinstance(response, UpstreamResponse)  # nothing of aiohttp's leaves
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


# --- the model name clients see -----------------------------------------------------------


def test_no_rename_when_the_backend_knows_the_model_by_the_policy_name() -> None:
    from gateway.upstream import model_rename

    assert model_rename("tiny-large", "tiny-large") is None


@pytest.mark.parametrize(
    "written",
    [
        b'{"id":"c","model":"tiny-large-srv","choices":[]}',
        b'{"id": "c", "model": "tiny-large-srv", "choices": []}',
    ],
    ids=["compact", "json.dumps"],
)
def test_the_served_name_becomes_the_policy_name(written: bytes) -> None:
    from gateway.upstream import model_rename

    rename = model_rename("tiny-large-srv", "tiny-large")
    assert rename is not None
    assert orjson.loads(rename(written))["model"] == "tiny-large"


def test_a_served_name_inside_generated_text_is_left_alone() -> None:
    from gateway.upstream import model_rename

    rename = model_rename("srv", "public")
    assert rename is not None
    text = orjson.dumps({"model": "srv", "choices": [{"text": '{"model":"srv"} and srv'}]})
    renamed = orjson.loads(rename(text))
    assert renamed == {"model": "public", "choices": [{"text": '{"model":"srv"} and srv'}]}


def test_a_non_ascii_served_name_written_with_escapes_is_renamed() -> None:
    import json

    from gateway.upstream import model_rename

    rename = model_rename("modèle", "m")
    assert rename is not None
    for written in (json.dumps({"model": "modèle"}), orjson.dumps({"model": "modèle"}).decode()):
        assert orjson.loads(rename(written.encode())) == {"model": "m"}


async def test_relay_renames_the_model_in_every_chunk() -> None:
    from gateway.upstream import model_rename

    def named(content: str | None, finish: str | None = None) -> bytes:
        choices = [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
        return b"data: " + orjson.dumps({"model": "srv", "choices": choices}) + b"\n\n"

    body = named("a") + named("b") + named("", "stop") + b"data: [DONE]\n\n"
    response: Any = FakeResponse(body)  # events split across reads
    rename = model_rename("srv", "public")
    relayed = b"".join(await relay(response, Outcome(), True, rename))
    chunks = [orjson.loads(e[6:]) for e in relayed.split(b"\n\n") if e.startswith(b"data: {")]
    assert [c["model"] for c in chunks] == ["public"] * 3


@pytest.mark.parametrize("answered", ["srv", "/models/tiny.gguf"])
async def test_read_gives_a_json_answer_the_policy_name(answered: str) -> None:
    """Whatever name the backend answers with (its served name, a model path)."""
    body = orjson.dumps({"model": answered, "choices": [], "usage": {"prompt_tokens": 1}})
    response: Any = FakeResponse(body)
    read = await UpstreamResponse(response, REPLICA).read()
    assert response.released and not response.closed
    payload = read_answer(read, Outcome(), "public")
    assert orjson.loads(payload)["model"] == "public"
    unchanged = read_answer(body, Outcome(), answered)
    assert unchanged is body


def test_usage_source_says_who_counted() -> None:
    assert Outcome().usage_source is None
    assert Outcome(usage={"prompt_tokens": 1}).usage_source == "backend"
    assert Outcome(usage={"prompt_tokens": 1}, counted="tokenized").usage_source == "tokenized"


def test_a_flat_error_body_keeps_its_message() -> None:
    """SGLang (and vLLM before ~0.9) answer `{"object": "error", "message", ...}`."""
    body = b'{"object": "error", "message": "bad penalty", "type": "Bad Request", "code": 400}'
    error = status_error(400, body, None)
    assert (error.status_code, error.message) == (400, "bad penalty")


@pytest.mark.parametrize(("api", "expected"), [("chat", None), ("messages", "2023-06-01")])
async def test_a_messages_backend_is_sent_its_version_and_key_headers(
    api: str, expected: str | None
) -> None:
    """A real server on loopback records what an `api: messages` pool is sent: Anthropic's
    version header and the key as `x-api-key` beside the Bearer one; a chat pool gets
    neither."""
    from aiohttp import web

    from gateway.pools import Pool
    from gateway.upstream import Upstream

    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/messages", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pool = Pool.from_urls("m", [f"http://127.0.0.1:{port}/v1"], None, "sk-backend")
    pool.api = api  # type: ignore[assignment]
    upstream = Upstream.open(4, 5.0, 5.0)
    try:
        response = await upstream.post(pool, pool.replicas[0], "/messages", b"{}", {})
        await response.read()
    finally:
        await upstream.close()
        await runner.cleanup()
    (headers,) = seen
    assert headers.get("anthropic-version") == expected
    assert headers.get("x-api-key") == ("sk-backend" if expected else None)
    assert headers["Authorization"] == "Bearer sk-backend"
