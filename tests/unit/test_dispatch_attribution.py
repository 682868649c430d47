"""Where a dispatched request failed: the tier, model and replica its error names, for logs,
metrics and spans (`TriageError.failed_at`), against the scripted fake upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp
import pytest

from gateway.dispatch import TierRules
from gateway.errors import (
    RateLimited,
    TriageError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pools import Pool
from gateway.replica import Replica
from gateway.slo import SloTarget
from gateway.upstream import status_error
from tests.unit.test_dispatch import (
    FakeSender,
    Script,
    dispatch,
    make,
    overloaded,
    replica_of,
    url,
)


def where(error: TriageError) -> tuple[str | None, str | None, str | None]:
    return error.tier, error.model, error.replica


async def test_a_backend_error_names_the_replica_that_answered_it() -> None:
    sender = FakeSender({url("s0"): [Script("status", status=400)]})
    dispatcher = make(sender, small=("s0",))
    with pytest.raises(UpstreamStatus) as caught:
        await dispatch(dispatcher)
    assert where(caught.value) == ("cheap", "small", url("s0"))


async def test_a_retried_error_names_the_last_replica() -> None:
    """An answered 500 is tried once more in its pool; the second one is the client's."""
    scripts = {url("s0"): [Script("status", status=500)], url("s1"): [Script("status")]}
    sender = FakeSender(scripts)
    with pytest.raises(UpstreamStatus) as caught:
        await dispatch(make(sender))
    assert caught.value.status_code == 502
    assert sorted(sender.sent) == [url("s0"), url("s1")]
    assert where(caught.value) == ("cheap", "small", sender.sent[-1])


async def test_a_timeout_names_the_replica_that_did_not_answer() -> None:
    sender = FakeSender({url("s0"): [Script("hang")]})
    rules = TierRules(target=SloTarget(0.05, 2.0), idempotent=False)
    dispatcher = make(sender, rules=rules)
    replica_of(dispatcher, "s1").latency.observe(0.5, time.monotonic())
    with pytest.raises(UpstreamTimeout) as caught:
        await dispatch(dispatcher)
    assert where(caught.value) == ("cheap", "small", url("s0"))


class _LateRefusal(FakeSender):
    """s0 answers 400 after 0.3 s; s1 (the hedge, sent at 0.2 s) never answers."""

    async def post(
        self, pool: Pool, replica: Replica, path: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        self.sent.append(replica.url)
        if replica.url == url("s0"):
            await asyncio.sleep(0.3)
            raise status_error(400, b'{"error": {"message": "bad"}}', None)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_the_send_that_failed_is_named_not_the_last_one_sent() -> None:
    sender = _LateRefusal()
    dispatcher = make(sender, rules=TierRules(target=SloTarget(0.2, 2.0)))  # timeout 0.4 s
    replica_of(dispatcher, "s1").latency.observe(0.5, time.monotonic())
    with pytest.raises(UpstreamStatus) as caught:
        await dispatch(dispatcher)
    assert sender.sent == [url("s0"), url("s1")]  # hedged, then s0 refused it
    assert where(caught.value) == ("cheap", "small", url("s0"))


async def test_a_request_refused_before_any_send_names_the_decision() -> None:
    dispatcher = make(FakeSender())
    overloaded(dispatcher, "s0", "s1", "b0")
    with pytest.raises(RateLimited) as caught:
        await dispatch(dispatcher, {"x-triage-priority": "sheddable"})
    assert where(caught.value) == ("cheap", "small", None)

    for pool in dispatcher.pools.values():
        for replica in pool.replicas:
            replica.mark_down(time.monotonic())
    with pytest.raises(UpstreamUnavailable) as no_replica:
        await dispatch(dispatcher)
    assert no_replica.value.code == "no_healthy_replica"
    assert where(no_replica.value) == ("cheap", "small", None)
