"""`gen_ai.response.finish_reasons`: read from replies and streams, copied to the record."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.dispatch.answer import read_answer, relay_events
from gateway.telemetry import RequestRecord
from gateway.upstream import Outcome, UpstreamResponse, finish_reasons
from tests.support.fakes import REPLICA, FakeResponse
from tests.support.relay import client_sees


def chunk(**fields: Any) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", **fields})


def choice(index: int, reason: str | None, content: str = "x") -> dict[str, Any]:
    return {"index": index, "delta": {"content": content}, "finish_reason": reason}


async def relay(events: list[bytes]) -> tuple[Outcome, list[bytes]]:
    outcome = Outcome()
    body = b"".join(event + b"\n\n" for event in events)
    response: Any = FakeResponse(body)
    batches = UpstreamResponse(response, REPLICA).events()
    relayed = await client_sees(relay_events(batches, outcome, True))
    return outcome, relayed


@pytest.mark.parametrize(
    ("reply", "reasons"),
    [
        ({"choices": [{"index": 0, "finish_reason": "stop"}]}, ("stop",)),
        (
            {"choices": [{"finish_reason": "length"}, {"finish_reason": "tool_calls"}]},
            ("length", "tool_calls"),
        ),
        ({"choices": [{"index": 0, "finish_reason": None}]}, ()),
        ({"choices": [{"finish_reason": 3}, "junk"]}, ()),
        ({"choices": "junk"}, ()),
        ({"data": [{"embedding": [0.1]}]}, ()),  # embeddings have none
        ([1, 2], ()),
        (None, ()),
    ],
)
def test_finish_reasons_of_a_reply(reply: object, reasons: tuple[str, ...]) -> None:
    assert finish_reasons(reply) == reasons


async def test_read_takes_the_non_streamed_replys_reasons() -> None:
    outcome = Outcome()
    body = orjson.dumps(
        {
            "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )
    response: Any = FakeResponse(body)
    assert read_answer(await UpstreamResponse(response, REPLICA).read(), outcome) == body
    assert outcome.finish_reasons == ("length",)


async def test_relay_takes_each_choices_reason_from_its_last_chunk() -> None:
    outcome, relayed = await relay(
        [
            chunk(choices=[choice(0, None, "a")]),
            chunk(choices=[choice(1, None, "b")]),
            chunk(choices=[choice(1, "stop", "")]),
            chunk(choices=[choice(0, "length", "")], usage=None),
            chunk(choices=[], usage={"prompt_tokens": 2, "completion_tokens": 2}),
            b"data: [DONE]",
        ]
    )
    assert outcome.completed and outcome.error is None
    assert outcome.finish_reasons == ("stop", "length")
    assert relayed[-1] == b"data: [DONE]\n\n"


async def test_relay_of_a_stream_cut_short_has_no_reason() -> None:
    outcome, relayed = await relay([chunk(choices=[choice(0, None)])])
    assert outcome.error is not None
    assert outcome.finish_reasons == ()
    assert b"error" in relayed[-1]


async def test_relay_copes_with_spaced_json() -> None:
    spaced = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'
    nulls = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": null}]}'
    outcome, _ = await relay([nulls, spaced, b"data: [DONE]"])
    assert outcome.finish_reasons == ("stop",)


def test_the_record_takes_the_outcomes_reasons() -> None:
    record = RequestRecord("r", "chat")
    record.add_outcome(Outcome(completed=True, finish_reasons=("stop",)))
    assert record.finish_reasons == ("stop",)
