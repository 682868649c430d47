"""Replicas: breaker states, slow start, latency estimates, load, predictions."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest

from gateway.pools import Pool
from gateway.replica import Budget, Load, Prediction, Progress, Replica, ReplicaSettings

SETTINGS = ReplicaSettings(
    failures_to_open=3, initial_cooldown_s=1.0, max_cooldown_s=4.0, slow_start_s=10.0
)


def replica(url: str = "http://r0:8000/v1", **settings: float) -> Replica:
    chosen = dataclasses.replace(SETTINGS, **settings)
    return Replica(url, settings=chosen)


def pool(count: int, balancer: str = "slo", seed: int = 1) -> Pool:
    urls = [f"http://r{i}:8000/v1" for i in range(count)]
    built = Pool.from_urls("m", urls, None, None, balancer=balancer, settings=SETTINGS)  # type: ignore[arg-type]
    built.rng = random.Random(seed)
    return built


# --- breaker ---------------------------------------------------------------------------


def test_root_url_and_defaults() -> None:
    r = Replica("http://host:8000/v1")
    assert r.root_url == "http://host:8000"
    assert r.state == "closed" and r.available(time.monotonic())


def test_mark_down_ejects_for_a_cooldown_that_doubles_then_caps() -> None:
    r = replica()
    r.mark_down(100.0)
    assert (r.state, r.failures, r.ejections) == ("open", 1, 1)
    assert not r.available(100.5)
    assert r.available(101.0)  # past the cooldown: the next request is a probe
    r.mark_down(101.0)
    assert r.down_until == 103.0
    r.mark_down(103.0)
    r.mark_down(107.0)
    assert r.down_until == 111.0  # capped at max_cooldown_s
    assert r.ejections == 1  # re-opening an open breaker is not a new ejection


def test_consecutive_failures_open_the_breaker_and_a_success_resets_them() -> None:
    r = replica()
    r.failed(1.0)
    r.failed(1.0)
    r.succeeded(1.0)
    r.failed(2.0)
    r.failed(2.0)
    assert r.state == "closed"
    r.failed(2.0)
    assert r.state == "open" and not r.available(2.5)


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    r = replica()
    r.mark_down(0.0)
    assert r.begin(1.5) is True  # the probe
    assert r.state == "half_open" and r.probing
    assert not r.available(1.6)  # one probe at a time
    r.end(probe=True)
    r.succeeded(2.0)
    assert r.state == "closed" and r.failures == 0 and r.cooldown_s == 1.0
    assert r.begin(2.0) is False


def test_a_failed_probe_opens_again_with_a_longer_cooldown() -> None:
    r = replica()
    r.mark_down(0.0)
    r.begin(1.0)
    r.end(probe=True)
    r.failed(1.0)
    assert r.state == "open" and r.down_until == 3.0


def test_slow_start_after_recovery() -> None:
    r = replica()
    assert r.weight(0.0) == 1.0  # a replica that never failed takes its full share
    r.mark_down(0.0)
    r.begin(2.0)
    r.end(probe=True)
    r.succeeded(2.0)
    assert r.weight(2.0) == pytest.approx(0.1)
    assert r.weight(7.0) == pytest.approx(0.55)
    assert r.weight(12.0) == 1.0


def test_recovery_forgets_latencies_measured_while_failing() -> None:
    r = replica()
    r.observe(0.0, first_byte_s=5.0, ttft_s=5.0)
    r.mark_down(0.0)
    r.mark_up(1.0)
    assert r.latency.value(1.0) is None and r.ttft.value(1.0) is None


def test_health_ends_only_the_ejections_it_caused() -> None:
    by_health = replica()
    by_health.health_failed(0.0)
    assert by_health.state == "open"
    by_health.health_passed(0.2)
    assert by_health.state == "half_open" and by_health.available(0.2)

    by_requests = replica()
    for _ in range(3):
        by_requests.failed(0.0)
    by_requests.health_passed(0.2)
    assert by_requests.state == "open" and not by_requests.available(0.2)


def test_a_failed_check_reopens_a_half_open_replica() -> None:
    r = replica()
    r.health_failed(0.0)
    r.health_passed(0.2)
    r.health_failed(0.4)
    assert r.state == "open" and not r.available(0.5)


def test_failing_health_checks_do_not_extend_a_running_cooldown() -> None:
    r = replica()
    r.health_failed(0.0)
    r.health_failed(0.5)
    assert r.down_until == 1.0
    r.health_failed(1.0)
    assert r.down_until == 3.0


@pytest.mark.parametrize("balancer", ["slo", "least_outstanding", "round_robin"])
def test_a_throttled_replica_is_avoided_while_another_can_answer(balancer: str) -> None:
    p = pool(2, balancer)
    limited, other = p.replicas
    limited.throttle(time.monotonic(), 30.0)
    assert limited.available(time.monotonic())  # not ejected
    assert {p.pick() for _ in range(6)} == {other}
    assert p.pick(exclude=[other]) is limited  # the only one left: it still gets to answer
    other.mark_down(time.monotonic())
    assert p.pick() is limited


def test_track_counts_in_flight() -> None:
    r = replica()
    with r.track():
        assert r.in_flight == 1
    assert r.in_flight == 0


# --- estimates -------------------------------------------------------------------------


def test_a_give_up_is_a_floor_under_the_ttft_until_the_next_answer() -> None:
    r = replica(latency_decay_s=10.0)
    r.observe(0.0, first_byte_s=0.5, ttft_s=0.5)
    r.observe_wait(0.0, 0.1, stream=True)
    assert r.latency.value(0.0) == pytest.approx(0.5)  # a shorter wait says nothing
    assert r.predict(0.0, 1).ttft_s == pytest.approx(0.5)
    r.observe_wait(0.0, 2.0, stream=True)
    assert r.latency.value(0.0) == pytest.approx(2.0)
    # Not averaged into the TTFT estimate: a floor under it, that fades for every request.
    assert r.ttft.value(0.0) == pytest.approx(0.5)
    assert r.predict(0.0, 1, explore=math.inf).ttft_s == pytest.approx(2.0)
    faded = r.predict(10.0, 1, explore=math.inf).ttft_s
    assert faded == pytest.approx(2.0 * math.exp(-1))
    r.observe_wait(10.0, 9.0, stream=False)  # a non-streamed wait is the whole answer's
    assert r.predict(10.0, 1, explore=math.inf).ttft_s == faded
    # The next answer outweighs it: the floor goes, the sample moves the estimate.
    r.observe(10.0, first_byte_s=0.01, ttft_s=0.01)
    assert r.ttft_floor.value(10.0) is None
    keep = math.exp(-1)  # of the last estimate, ten seconds (one decay) old
    estimate = 0.5 * keep + 0.01 * (1 - keep)
    expected = estimate + (estimate - 0.01) * (1 - keep)
    assert r.predict(10.0, 1, explore=math.inf).ttft_s == pytest.approx(expected)


def test_an_idle_replica_needs_a_probe_after_a_give_up_or_a_long_silence() -> None:
    r = replica(latency_decay_s=10.0)
    assert r.needs_probe(0.0)  # never measured
    r.observe(0.0, first_byte_s=0.01, ttft_s=0.01)
    assert not r.needs_probe(5.0)  # a recent answer vouches for its estimates
    assert r.needs_probe(10.5)  # none for `latency_decay_s`
    r.observe(11.0, first_byte_s=0.01, ttft_s=0.01)
    r.observe_wait(11.0, 1.0, stream=True)
    assert r.needs_probe(11.0)  # its TTFT rests on a give-up
    assert r.needs_probe(200.0)  # until an answer, however long ago
    r.begin(11.0)
    assert not r.needs_probe(11.0)  # one at a time: a request of ours is in flight
    r.end(probe=False)
    r.throttle(11.0, 5.0)
    assert not r.needs_probe(12.0)  # its Retry-After is honoured
    r.throttled_until = 0.0
    r.observe_load(Load(running=1, waiting=2), 11.0)
    assert not r.needs_probe(11.5)  # it reports a queue: not idle
    assert r.needs_probe(12.5)  # the report went stale
    r.observe(12.5, ttft_s=0.01)
    assert not r.needs_probe(12.5)


def test_a_pool_is_probed_only_when_no_replica_is_vouched_for() -> None:
    p = pool(2)
    now = time.monotonic()
    for r in p.replicas:
        r.observe(now, first_byte_s=0.01, ttft_s=0.01)
    assert p.probe_target(now) is None
    first, second = p.replicas
    second.observe_wait(now, 1.0, stream=True)
    # The other replica answered just now: the pool's predictions rest on that.
    assert not second.vouched(now) and second.needs_probe(now)
    assert p.probe_target(now) is None
    first.observe_wait(now, 1.0, stream=True)
    assert p.probe_target(now) is first
    first.mark_down(now)
    assert p.probe_target(now) is second
    second.begin(now)
    assert p.probe_target(now) is None


def test_queued_ttft_is_not_a_base_ttft() -> None:
    r = replica()
    r.observe(0.0, first_byte_s=3.0, ttft_s=3.0, queued=True)
    assert r.ttft.value(0.0) is None
    assert r.latency.value(0.0) == 3.0


# --- load ------------------------------------------------------------------------------


def test_load_sets_capacity_from_a_queue_or_from_cache_usage() -> None:
    r = replica()
    r.observe_load(Load(running=8, waiting=3, cache_usage=1.0), 0.0)
    assert r.capacity == 8
    other = replica()
    other.observe_load(Load(running=4, waiting=0, cache_usage=0.25), 0.0)
    assert other.capacity == 16


def test_outstanding_adds_what_we_sent_since_the_last_report() -> None:
    r = replica()
    r.in_flight = 2
    r.observe_load(Load(running=5, waiting=1), 0.0)
    r.in_flight = 4
    assert r.outstanding(0.1) == 8
    assert r.outstanding(5.0) == 4  # the report went stale


def test_stale_reports_count_as_saturated() -> None:
    r = replica()
    assert not r.saturated(100.0)  # never reported: judged by latency alone
    r.observe_load(Load(running=0, waiting=0), 0.0)
    assert not r.saturated(0.5)
    assert r.saturated(1.5)
    fresh = replica()
    fresh.observe_load(Load(running=0, waiting=0), 1.5)
    assert r.cost(1.5, 0.1) == pytest.approx(8 * fresh.cost(1.5, 0.1))
    r.load_unreported()
    assert not r.saturated(100.0)


def test_cost_is_latency_times_outstanding_plus_one() -> None:
    r = replica()
    assert r.cost(0.0, 0.2) == pytest.approx(0.2)  # unmeasured: the pool's default
    r.observe(0.0, first_byte_s=0.1)
    r.in_flight = 3
    assert r.cost(0.0, 0.2) == pytest.approx(0.4)
    r.observe_load(Load(running=3, waiting=0, cache_usage=0.99), 0.0)
    assert r.cost(0.0, 0.2) == pytest.approx(0.8)  # a full KV cache doubles it


def test_prediction_adds_the_wait_for_a_free_slot() -> None:
    r = replica()
    r.observe(0.1, ttft_s=0.1, itl_s=0.01)
    r.typical_events = 31  # a slot is held 0.1 + 0.01 x 31 = 0.41 s on average
    r.capacity = 2
    first, second = Progress(0.0, 31), Progress(0.0, 31)
    r.begin(0.0, first)
    assert r.predict(0.1, 11).ttft_s == pytest.approx(0.1)  # a slot is free
    r.begin(0.0, second)
    # Both slots taken at 0.0 by answers of 31 events that have not started: the first
    # slot frees when one of them has streamed its 30 events after the first.
    p = r.predict(0.1, 11)
    assert p.ttft_s == pytest.approx(0.1 + 0.30)
    assert p.e2e_s == pytest.approx(p.ttft_s + 10 * 0.01)
    assert p.fits(Budget(1.0, 2.0)) and not p.fits(Budget(0.3, 2.0))
    first.events = 21  # two thirds streamed: its slot frees in 0.1 s
    assert r.predict(0.1, 11).ttft_s == pytest.approx(0.1 + 0.1)
    third = Progress(0.1, 31)
    r.begin(0.1, third)  # queued: takes the slot that frees first, then holds it 0.41 s
    assert r.predict(0.1, 11).ttft_s == pytest.approx(0.1 + 0.30)
    r.end(probe=False, progress=first)
    assert r.in_flight == 2
    # The third runs now; it has yet to prefill (0.1 s) and stream its events.
    assert r.predict(0.1, 11).ttft_s == pytest.approx(0.1 + 0.30)
    first.events = 40  # longer than expected: taken to be nearly done
    r.begin(0.1, first)
    r.end(probe=False, progress=second)
    assert r.predict(0.1, 11).ttft_s == pytest.approx(0.1 + 0.01)


def test_a_reserve_keeps_slots_out_of_reach() -> None:
    r = replica()
    r.observe(0.0, ttft_s=0.1, itl_s=0.01)
    r.typical_events = 31
    r.capacity = 10
    for _ in range(9):
        r.begin(0.0, Progress(0.0, 31))
    assert r.predict(0.0, 1).ttft_s == pytest.approx(0.1)  # one slot is free
    waits = r.predict(0.0, 1, reserve=0.1).ttft_s  # not for this request
    assert waits == pytest.approx(0.1 + 0.40)
    assert r.predict(0.0, 1, reserve=0.01).ttft_s == waits  # at least one slot


def test_requests_of_unknown_age_count_as_half_done() -> None:
    r = replica()
    r.observe(0.0, ttft_s=0.1, itl_s=0.01)
    r.typical_events = 31
    r.observe_load(Load(running=4, waiting=0, cache_usage=1.0), 0.0)  # another gateway's
    assert r.capacity == 4
    assert r.predict(0.0, 1).ttft_s == pytest.approx(0.1 + 0.41 / 2)


def test_prediction_without_capacity_uses_the_reported_queue() -> None:
    r = replica()
    r.observe(0.0, ttft_s=0.1, itl_s=0.01)
    r.typical_events = 10
    r.observe_load(Load(running=0, waiting=0), 0.0)
    r.capacity = None
    r.load = Load(running=2, waiting=4)
    assert r.predict(0.0, 1).ttft_s == pytest.approx(0.1 + 4 * 0.2 / 2)
    assert r.queue_full(0.0)


def test_what_is_not_measured_yet_counts_as_no_time() -> None:
    r = replica()
    assert r.predict(0.0, 11) == Prediction(0.0, 0.0)
    r.observe(0.0, ttft_s=0.2)
    assert r.predict(0.0, 11, explore=math.inf) == Prediction(0.2, 0.2)


def test_predictions_with_explore_fade_for_idle_replicas() -> None:
    r = replica(latency_decay_s=1.0)
    r.observe(0.0, ttft_s=1.0)
    assert r.predict(3.0, 1).ttft_s == pytest.approx(math.exp(-1))
    assert r.predict(3.0, 1, explore=math.inf).ttft_s == 1.0
    assert r.predict(3.0, 1, explore=5.0).ttft_s == 1.0
    assert r.predict(8.0, 1, explore=5.0).ttft_s == pytest.approx(math.exp(-1))


def test_ttft_predictions_include_the_usual_deviation() -> None:
    r = replica()
    r.observe(0.0, ttft_s=0.2)
    r.observe(0.0, ttft_s=0.3)
    assert r.ttft.value(0.0) == pytest.approx(0.21)
    assert r.predict(0.0, 1, explore=math.inf).ttft_s == pytest.approx(0.21 + 0.009)


def test_a_known_capacity_queues_a_burst_before_any_load_report() -> None:
    """Without a report that shows a queue, the gateway knows no limit and predicts no wait
    for a burst; `max_num_seqs` in the policy gives it the limit from the start."""

    def third_in_line(capacity: int | None) -> float:
        p = Pool.from_urls("m", ["http://r0:8000/v1"], None, None, capacity=capacity)
        r = p.replicas[0]
        r.observe(0.0, ttft_s=0.1, itl_s=0.02)
        r.typical_events = 20
        for _ in range(2):
            r.begin(0.0, Progress(0.0, 20))
        return r.predict(0.0, 20).ttft_s

    assert third_in_line(None) == pytest.approx(0.1)
    assert third_in_line(2) > 0.3  # waits for a slot: about one answer's worth
