"""Every way a request ends finishes its exchange exactly once: the replica freed, the
reservation settled, the record handed to telemetry, each once.

Driven through `Gateway._respond` and the responses it returns, against a scripted
upstream: a JSON body read, a stream relayed to `[DONE]`, an upstream that fails a
stream or a body, a client that leaves mid-stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from starlette.types import Message

from gateway.api.request import ParsedRequest
from gateway.app import Gateway
from gateway.auth import Caller
from gateway.dispatch import Dispatched, Dispatcher, DispatchSettings
from gateway.errors import UpstreamError
from gateway.exchange import Exchange
from gateway.policy import Price, Tenant
from gateway.pools import Pool
from gateway.replica import Replica
from gateway.router import Decision
from gateway.telemetry import RequestRecord
from gateway.upstream import UpstreamResponse

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
DECISION = Decision("cheap", (("cheap", "small"),), "test")


def sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


STREAM = [
    sse({"id": "c", "model": "small", "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
    sse({"id": "c", "model": "small", "choices": [{"index": 0, "finish_reason": "stop"}]}),
    sse({"id": "c", "model": "small", "choices": [], "usage": USAGE}),
    b"data: [DONE]\n\n",
]
BODY = orjson.dumps({"model": "small", "choices": [{"finish_reason": "stop"}], "usage": USAGE})


@dataclass(eq=False)
class ScriptedResponse:
    """Stands in for `UpstreamResponse`."""

    body: bytes = BODY
    events_: list[bytes] = field(default_factory=lambda: list(STREAM))
    stall: asyncio.Event | None = None  # the stream waits on it after its first event
    released: bool = False
    closed: bool = False

    async def read(self) -> bytes:
        return self.body

    async def events(self) -> AsyncGenerator[bytes, None]:
        for index, event in enumerate(self.events_):
            if index and self.stall is not None:
                await self.stall.wait()
            yield event

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


@dataclass
class Sender:
    response: ScriptedResponse

    async def post(
        self, pool: Pool, replica: Replica, path: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamResponse:
        return cast(UpstreamResponse, self.response)


@dataclass
class Ledger:
    settled: int = 0
    released: int = 0

    async def settle(self, reservation: object, **counts: Any) -> None:
        self.settled += 1

    async def release(self, reservation: object) -> None:
        self.released += 1


@dataclass
class Telemetry:
    finished: list[RequestRecord] = field(default_factory=list)

    def finish(self, record: RequestRecord) -> None:
        self.finished.append(record)


@dataclass
class Ended:
    """One request, dispatched, and what its ending did."""

    exchange: Exchange
    dispatched: Dispatched
    dispatcher: Dispatcher
    ledger: Ledger
    telemetry: Telemetry
    response: ScriptedResponse
    sent: list[bytes] = field(default_factory=list)

    def assert_finished_once(self, *, settled: bool = True) -> None:
        assert (self.ledger.settled, self.ledger.released) == ((1, 0) if settled else (0, 1))
        assert self.telemetry.finished == [self.exchange.record]
        assert self.dispatched.replica.in_flight == 0
        # The connection is let go once: kept after a complete answer, else dropped.
        assert self.response.released != self.response.closed


async def dispatched(stream: bool, response: ScriptedResponse | None = None) -> Ended:
    response = response or ScriptedResponse()
    pool = Pool.from_urls("small", ["http://s0:8000/v1"], None, None)
    dispatcher = Dispatcher({"small": pool}, Sender(response), DispatchSettings())
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    parsed = ParsedRequest("chat", body, "auto", stream, False)
    ledger, telemetry = Ledger(), Telemetry()
    exchange = Exchange(
        parsed,
        Caller("team", Tenant()),
        DECISION,
        RequestRecord("r1", "chat"),
        cast(Any, telemetry),
        {"small": Price()},
        cast(Any, ledger),
        reservation=cast(Any, object()),
    )
    answer = await dispatcher.dispatch(DECISION, parsed, {})
    exchange.served_by(answer)
    return Ended(exchange, answer, dispatcher, ledger, telemetry, response)


async def respond(ended: Ended, disconnect: asyncio.Event | None = None) -> None:
    """Serve the answer as `Gateway.generate` does, then finish twice more, as every
    `finally` that might would: nothing changes after the first."""
    gateway = Gateway(Path("policies/demo.yaml"))
    gateway.tokenizer = cast(Any, None)  # usage the backend did not report is estimated
    app = await gateway._respond(ended.exchange, ended.dispatched)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            ended.sent.append(message["body"])

    async def receive() -> Message:
        await (disconnect or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    await app({"type": "http"}, receive, send)
    await ended.exchange.finish()
    ended.dispatched.finish(ended.exchange.outcome)


async def test_a_json_answer_finishes_once_after_it_is_sent() -> None:
    ended = await dispatched(stream=False)
    await respond(ended)
    assert orjson.loads(ended.sent[0])["usage"] == USAGE
    ended.assert_finished_once()
    assert ended.response.released
    # The balancer learns of the answer once, as a success.
    assert ended.dispatched.replica.answers(time.monotonic()) == (1, 0)


async def test_a_stream_to_done_finishes_once() -> None:
    ended = await dispatched(stream=True)
    await respond(ended)
    assert b"".join(ended.sent).endswith(b"data: [DONE]\n\n")
    assert ended.exchange.outcome.completed
    ended.assert_finished_once()
    assert ended.response.released


async def test_a_stream_the_upstream_cut_ends_with_an_error_event_and_finishes_once() -> None:
    ended = await dispatched(stream=True, response=ScriptedResponse(events_=STREAM[:1]))
    await respond(ended)
    last = ended.sent[-1]
    assert b'"error"' in last and last.endswith(b"data: [DONE]\n\n")
    assert isinstance(ended.exchange.outcome.error, UpstreamError)
    ended.assert_finished_once()  # the token it relayed is paid for
    assert ended.response.closed and ended.dispatched.replica.failures == 1


async def test_a_body_that_is_not_json_fails_the_read_and_finishes_once() -> None:
    ended = await dispatched(stream=False, response=ScriptedResponse(body=b"<html>"))
    gateway = Gateway(Path("policies/demo.yaml"))
    with pytest.raises(UpstreamError):
        await gateway._respond(ended.exchange, ended.dispatched)
    assert isinstance(ended.exchange.outcome.error, UpstreamError)
    for _ in range(2):  # `Gateway.generate`'s except, then any other `finally`
        await ended.exchange.finish()
    ended.assert_finished_once(settled=False)
    assert ended.response.closed and ended.dispatched.replica.failures == 1


async def test_a_client_that_leaves_mid_stream_finishes_once() -> None:
    stall, gone = asyncio.Event(), asyncio.Event()
    ended = await dispatched(stream=True, response=ScriptedResponse(stall=stall))
    serving = asyncio.ensure_future(respond(ended, gone))
    while not ended.sent:  # the first event
        await asyncio.sleep(0.001)
    gone.set()
    await asyncio.wait_for(serving, 5)
    outcome = ended.exchange.outcome
    assert not outcome.completed and outcome.error is None
    assert b"[DONE]" not in b"".join(ended.sent)
    ended.assert_finished_once(settled=True)  # a token was generated: it is paid for
    assert ended.response.closed  # the backend sees the disconnect
    # Says nothing about the replica.
    assert ended.dispatched.replica.failures == 0
    assert ended.dispatched.replica.answers(time.monotonic()) == (0, 0)
