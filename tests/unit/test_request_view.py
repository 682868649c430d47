"""Replica choice sees the request: every pick of a dispatch gets the same view of it."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.api.hints import read_hints
from gateway.api.request import ParsedRequest
from gateway.dispatch import Dispatcher, DispatchSettings
from gateway.pools import Pool
from gateway.replica import Replica
from gateway.request_view import RequestView, session_key
from tests.unit.test_exchange import DECISION, ScriptedResponse, Sender


@pytest.mark.parametrize(
    ("headers", "body", "key"),
    [
        ({"x-session-id": "s-1"}, {"user": "u-1"}, "s-1"),  # the header wins
        ({}, {"user": "u-1"}, "u-1"),
        ({}, {"user": 7}, None),
        ({"x-session-id": ""}, {}, None),
    ],
)
def test_session_key(headers: dict[str, str], body: dict[str, Any], key: str | None) -> None:
    parsed = ParsedRequest("chat", body, "auto", False, False, read_hints(headers))
    assert session_key(parsed) == key


class Seen(Pool):
    views: list[RequestView | None]

    def pick(self, *args: Any, request: RequestView | None = None, **kwargs: Any) -> Replica | None:
        self.views.append(request)
        return super().pick(*args, request=request, **kwargs)


@pytest.mark.parametrize("balancer", ["slo", "round_robin"])
async def test_every_pick_gets_the_requests_view(balancer: Any) -> None:
    pool = Seen.from_urls("small", ["http://s0:8000/v1"], None, None, balancer=balancer)
    assert isinstance(pool, Seen)
    pool.views = []
    dispatcher = Dispatcher(
        {"small": pool}, Sender(ScriptedResponse()), DispatchSettings(balancer=balancer)
    )
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi " * 40}]}
    parsed = ParsedRequest("chat", body, "auto", False, False, read_hints({"x-session-id": "s-9"}))
    answer = await dispatcher.dispatch(DECISION, parsed, {})
    answer.finish(await _read(answer))
    (view,) = set(pool.views)
    assert view is not None and (view.tier, view.session, view.matched) == ("cheap", "s-9", {})
    assert view.prompt_tokens == parsed.estimated_prompt_tokens() > 1


async def _read(answer: Any) -> Any:
    from gateway.upstream import Outcome

    outcome = Outcome()
    await answer.read(outcome)
    return outcome
