"""The dispatched answer: read whole or relayed, the outcome fed, the connection let go
and the replica freed once, at `finish`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.api.request import ParsedRequest
from gateway.dispatch import Dispatched, Dispatcher, DispatchSettings, TierRules
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.pools import Pool
from gateway.slo import SloTarget
from gateway.upstream import Outcome
from tests.unit.test_exchange import BODY, DECISION, STREAM, USAGE, ScriptedResponse, Sender


async def answer(
    stream: bool, response: ScriptedResponse, served: str | None = None, **rules: Any
) -> Dispatched:
    pool = Pool.from_urls("small", ["http://s0:8000/v1"], served, None)
    settings = DispatchSettings(tiers={"cheap": TierRules(**rules)})
    dispatcher = Dispatcher({"small": pool}, Sender(response), settings)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    parsed = ParsedRequest("chat", body, "auto", stream, False)
    return await dispatcher.dispatch(DECISION, parsed, {})


async def test_read_feeds_the_outcome_and_names_the_model_as_the_policy_does() -> None:
    response = ScriptedResponse()
    dispatched = await answer(False, response, served="small-srv")
    response.body = BODY.replace(b'"small"', b'"small-srv"')
    outcome = Outcome()
    payload = await dispatched.read(outcome)
    assert orjson.loads(payload)["model"] == "small"
    assert outcome.completed and outcome.usage == USAGE and outcome.finish_reasons == ("stop",)
    dispatched.finish(outcome)
    dispatched.finish(outcome)  # a second call changes nothing
    assert response.released and not response.closed
    assert dispatched.replica.in_flight == 0 and dispatched.replica.failures == 0


async def test_a_read_that_fails_is_on_the_outcome_and_drops_the_connection() -> None:
    response = ScriptedResponse(body=b"<html>")
    dispatched = await answer(False, response)
    outcome = Outcome()
    with pytest.raises(UpstreamError) as failed:
        await dispatched.read(outcome)
    assert outcome.error is failed.value
    dispatched.finish(outcome)
    assert response.closed and not response.released
    assert dispatched.replica.failures == 1


async def test_relay_renames_strips_our_usage_chunk_and_keeps_the_connection() -> None:
    served = [event.replace(b'"small"', b'"small-srv"') for event in STREAM]
    response = ScriptedResponse(events_=served)
    dispatched = await answer(True, response, served="small-srv")
    outcome = Outcome()
    relayed = b"".join([batch async for batch in dispatched.relay(outcome, True)])
    assert b"small-srv" not in relayed and b'"model":"small"' in relayed
    assert b'"usage"' not in relayed and relayed.endswith(b"data: [DONE]\n\n")
    assert outcome.completed and outcome.usage == USAGE and outcome.events == 3
    dispatched.finish(outcome)
    assert response.released and not response.closed and dispatched.replica.in_flight == 0


async def test_a_relay_cut_short_raises_with_the_error_on_the_outcome() -> None:
    response = ScriptedResponse(events_=STREAM[:2])
    dispatched = await answer(True, response)
    outcome = Outcome()
    relayed = dispatched.relay(outcome, False)
    assert await anext(relayed) == STREAM[0]
    assert await anext(relayed) == STREAM[1]
    with pytest.raises(UpstreamError) as failed:
        await anext(relayed)
    assert outcome.error is failed.value and not outcome.completed
    dispatched.finish(outcome)
    assert response.closed and not response.released  # the backend stops generating
    assert dispatched.replica.failures == 1


async def test_a_relay_past_the_e2e_timeout_ends_late() -> None:
    import asyncio

    stall = asyncio.Event()
    response = ScriptedResponse(stall=stall)
    dispatched = await answer(True, response, target=SloTarget(0.5, 0.05))
    outcome = Outcome()
    relayed = dispatched.relay(outcome, False)
    assert await anext(relayed) == STREAM[0]
    with pytest.raises(UpstreamTimeout):
        await anext(relayed)
    assert isinstance(outcome.error, UpstreamTimeout)
    dispatched.finish(outcome)
    assert response.closed
