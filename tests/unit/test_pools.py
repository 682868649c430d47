"""Pools: balancers, predictions across replicas, outliers among peers, the panic."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest

from gateway.pools import Pool
from gateway.replica import Budget, Prediction
from tests.unit.test_replica import SETTINGS, pool

# --- pools -----------------------------------------------------------------------------


def test_round_robin_takes_turns_and_skips_unavailable_replicas() -> None:
    p = pool(3, "round_robin")
    picks = [p.pick() for _ in range(4)]
    assert picks == [p.replicas[0], p.replicas[1], p.replicas[2], p.replicas[0]]
    p.replicas[1].mark_down(time.monotonic())
    assert [p.pick(), p.pick()] == [p.replicas[2], p.replicas[0]]
    assert p.pick(exclude=[p.replicas[0], p.replicas[2]]) is None


def test_least_outstanding_picks_the_fewest_in_flight() -> None:
    p = pool(3, "least_outstanding")
    p.replicas[0].in_flight = 2
    p.replicas[1].in_flight = 1
    p.replicas[2].in_flight = 3
    assert p.pick() is p.replicas[1]
    assert p.pick(exclude=[p.replicas[1]]) is p.replicas[0]


def test_slo_balancer_prefers_the_cheaper_of_two() -> None:
    p = pool(2)
    now = time.monotonic()
    p.replicas[0].observe(now, first_byte_s=0.5)
    p.replicas[1].observe(now, first_byte_s=0.1)
    assert {p.pick() for _ in range(20)} == {p.replicas[1]}
    p.replicas[1].in_flight = 9  # 0.1 x 10 > 0.5 x 1
    assert p.pick() is p.replicas[0]


def test_slo_balancer_spreads_over_equal_replicas() -> None:
    p = pool(4)
    counts = {r.url: 0 for r in p.replicas}
    for _ in range(400):
        chosen = p.pick()
        assert chosen is not None
        counts[chosen.url] += 1
    assert min(counts.values()) > 50


def test_budget_keeps_only_replicas_predicted_to_meet_it() -> None:
    p = pool(2)
    now = time.monotonic()
    p.replicas[0].observe(now, ttft_s=1.0, itl_s=0.1)
    p.replicas[1].observe(now, ttft_s=0.1, itl_s=0.01)
    assert {p.pick(budget=Budget(0.5, 2.0)) for _ in range(10)} == {p.replicas[1]}
    assert p.pick(budget=Budget(0.05, 2.0)) is None
    assert p.pick(exclude=[p.replicas[1]], budget=Budget(0.5, 2.0)) is None
    best = p.predict(now, Budget(0.5, 2.0))
    assert best is not None and best.ttft_s == pytest.approx(0.1)
    assert p.predict(now, Budget(0.5, 2.0), exclude=p.replicas) is None


def test_the_pools_prediction_is_the_replica_that_fits_best() -> None:
    p = pool(2)
    now = time.monotonic()
    p.replicas[0].observe(now, ttft_s=0.2, itl_s=0.1)  # starts sooner, streams slowly
    p.replicas[1].observe(now, ttft_s=0.3, itl_s=0.01)
    best = p.predict(now, Budget(0.5, 1.0, max_tokens=21))
    assert best is not None and best.ttft_s == pytest.approx(0.3)
    assert best.overrun(Budget(0.6, 1.0)) == pytest.approx(0.5)
    assert Prediction(1.0, 1.0).overrun(Budget(0.0, 1.0)) == math.inf


def test_answer_length_and_max_tokens_shape_the_e2e_prediction() -> None:
    p = pool(1)
    now = time.monotonic()
    p.replicas[0].observe(now, ttft_s=0.1, itl_s=0.01)
    assert p.expected_events(now, None) == 0.0  # nothing streamed yet
    assert p.expected_events(now, 20) == 20
    p.observe_answer(now, 101)
    assert p.replicas[0].typical_events == 101
    assert p.expected_events(now, None) == 101
    assert p.expected_events(now, 20) == 20
    prediction = p.predict(now, Budget(1.0, 1.0, max_tokens=20))
    assert prediction is not None and prediction.e2e_s == pytest.approx(0.1 + 19 * 0.01)
    assert p.pick(budget=Budget(0.5, 0.5, max_tokens=20)) is p.replicas[0]
    assert p.pick(budget=Budget(0.5, 0.5)) is None  # 0.1 + 100 x 0.01


def test_the_cost_of_unmeasured_replicas_is_the_best_measured() -> None:
    p = pool(3)
    now = time.monotonic()
    assert p.default_latency(now) == 0.05
    p.replicas[0].observe(now, first_byte_s=0.2)
    p.replicas[1].observe(now, first_byte_s=0.4)
    assert p.default_latency(now) == pytest.approx(0.2)


def test_a_slow_first_measurement_does_not_shut_out_an_unmeasured_replica() -> None:
    p = pool(2)
    now = time.monotonic()
    slow, unmeasured = p.replicas
    slow.observe(now, first_byte_s=0.3, ttft_s=0.3, itl_s=0.06)
    assert p.pick(budget=Budget(0.25, 2.0)) is unmeasured


def test_an_unmeasured_replica_is_tried_next_though_short_answers_tie_its_cost() -> None:
    """Answers too short to sample the decode speed leave the measured replica's cost equal
    to the unmeasured one's (the best measured latency): the tie goes to the unmeasured."""
    p = pool(2)
    measured, unmeasured = p.replicas
    now = time.monotonic()
    measured.observe(now, first_byte_s=0.01, ttft_s=0.01)
    p.observe_answer(now, 8)
    latency = p.default_latency(now)
    assert measured.cost(now, latency) == unmeasured.cost(now, latency)
    assert {p.pick() for _ in range(20)} == {unmeasured}
    assert {p.pick(budget=Budget(1.0, 5.0)) for _ in range(20)} == {unmeasured}


def test_healthy() -> None:
    p = pool(2)
    now = time.monotonic()
    assert p.healthy()
    for r in p.replicas:
        r.mark_down(now)
    assert not p.healthy()


def test_answered_errors_never_eject_a_replica_alone_in_its_pool() -> None:
    p = pool(1)
    r = p.replicas[0]
    for i in range(500):
        r.errored(float(i) / 100)
    assert r.state == "closed" and r.failures == 0 and r.ejections == 0


def test_answered_errors_every_replica_gives_alike_eject_none() -> None:
    p = pool(3)
    for i in range(300):
        now = i / 100
        for r in p.replicas:
            if i % 3:
                r.errored(now)
            else:
                r.succeeded(now)
    assert all(r.state == "closed" for r in p.replicas)


def test_a_replica_failing_far_more_than_its_peers_is_an_outlier(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = pool(2)
    broken, good = p.replicas
    for i in range(19):
        good.succeeded(i / 100)
        broken.errored(i / 100)
    good.succeeded(0.2)
    assert broken.state == "closed"  # 19 answers: too few to judge
    with caplog.at_level("WARNING", logger="triage"):
        broken.errored(0.2)
    assert broken.state == "open" and not broken.hard_down
    assert broken.ejections_by_reason == {"outlier": 1}
    (line,) = [r.getMessage() for r in caplog.records if r.name == "triage"]
    assert broken.url in line and "model m" in line and "outlier" in line
    assert "cooldown 1.0 s" in line


def test_unanswered_failures_still_eject_at_once_after_failures_to_open() -> None:
    p = pool(2)
    r = p.replicas[0]
    for _ in range(3):
        r.failed(1.0)
    assert r.state == "open" and r.ejections_by_reason == {"failures": 1}


def test_ejection_on_suspicion_is_capped_but_refused_connections_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = pool(2)  # max_ejected_percent 50: one of two
    first, second = p.replicas
    for _ in range(3):
        first.failed(1.0)
    with caplog.at_level("WARNING", logger="triage"):
        for _ in range(3):
            second.failed(1.0)
    assert (first.state, second.state) == ("open", "closed")
    assert any("is kept" in r.getMessage() for r in caplog.records)
    second.mark_down(1.0)  # nothing listens: out whatever the cap
    assert second.state == "open" and second.hard_down


def test_a_pool_of_suspects_panics_and_keeps_serving() -> None:
    p = Pool.from_urls(
        "m",
        ["http://r0:8000/v1", "http://r1:8000/v1", "http://r2:8000/v1"],
        None,
        None,
        settings=dataclasses.replace(SETTINGS, max_ejected_percent=100),
    )
    now = time.monotonic()
    refused, *suspects = p.replicas
    refused.mark_down(now)
    for r in suspects:
        for _ in range(3):
            r.failed(now)
    assert all(r.state == "open" for r in p.replicas)
    assert p.panicking(now) and p.healthy()
    assert {p.pick() for _ in range(20)} == set(suspects)  # never the one that refused
    chosen = p.pick()
    assert chosen is not None and chosen.begin(now) is False  # not taken for a probe
    chosen.end(False)
    refused_only = pool(1)
    refused_only.replicas[0].mark_down(now)
    assert not refused_only.panicking(now) and not refused_only.healthy()


def test_a_panic_ends_when_a_breaker_lets_a_probe_through() -> None:
    p = pool(1)
    r = p.replicas[0]
    for _ in range(3):
        r.failed(0.0)
    assert p.panicking(0.5) and r.available(0.5)
    assert not p.panicking(1.0) and r.takes_probe(1.0)  # its cooldown ended: a probe
    r.failed(0.6)  # a request sent in the panic: the ejection already runs
    assert r.down_until == 1.0


def test_an_answer_ends_an_ejection_for_no_answer_and_the_return_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = pool(2)
    r = p.replicas[0]
    r.mark_down(0.0)
    r.begin(1.0)
    r.end(probe=True)
    caplog.clear()
    with caplog.at_level("INFO", logger="triage"):
        r.errored(1.0)  # it answers again: what it answers is the outlier check's business
    assert r.state == "closed"
    assert [m.getMessage() for m in caplog.records] == [
        "replica http://r0:8000/v1 (model m) is back in rotation"
    ]
