from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.telemetry.buffered import BufferedCounter, BufferedHistogram

BOUNDS = (0.1, 0.5, 1.0, 5.0)
# On a bound, below the first, between, above the last, and repeats.
VALUES = (0.1, 0.05, 0.3, 0.5, 0.50001, 1.0, 4.99, 5.0, 7.0, 1e9, 0.0, 0.3)


def exposition(registry: CollectorRegistry) -> str:
    return "\n".join(
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    )


def test_a_flushed_histogram_matches_one_observed_value_by_value() -> None:
    direct, buffered = CollectorRegistry(), CollectorRegistry()
    plain = Histogram("h", "h", ("tier",), buckets=BOUNDS, registry=direct)
    batched = BufferedHistogram(Histogram("h", "h", ("tier",), buckets=BOUNDS, registry=buffered))
    for index, value in enumerate(VALUES):
        tier = "cheap" if index % 3 else "large"
        plain.labels(tier).observe(value)
        batched.observe((tier,), value)
    batched.flush()
    assert exposition(buffered) == exposition(direct)
    assert 'h_bucket{le="0.5",tier="cheap"}' in exposition(buffered)


def test_an_unlabelled_histogram_and_repeated_flushes_add_up() -> None:
    registry = CollectorRegistry()
    batched = BufferedHistogram(Histogram("s", "s", buckets=BOUNDS, registry=registry))
    batched.observe((), 0.3)
    batched.flush()
    batched.observe((), 0.3)
    batched.observe((), 2.0)
    batched.flush()
    batched.flush()  # nothing pending: changes nothing
    assert registry.get_sample_value("s_bucket", {"le": "0.5"}) == 2
    assert registry.get_sample_value("s_bucket", {"le": "+Inf"}) == 3
    assert registry.get_sample_value("s_sum") == pytest.approx(2.6)


def test_counters_and_gauges_reach_the_registry_at_flush() -> None:
    registry = CollectorRegistry()
    requests = BufferedCounter(Counter("r", "r", ("tier", "status"), registry=registry))
    in_flight = BufferedCounter(Gauge("f", "f", registry=registry))
    requests.add(("cheap", "200"))
    requests.add(("cheap", "200"), 2)
    requests.add(("large", "500"))
    in_flight.add()
    in_flight.add()
    in_flight.add(amount=-1)
    assert registry.get_sample_value("r_total", {"tier": "cheap", "status": "200"}) is None
    requests.flush()
    in_flight.flush()
    assert registry.get_sample_value("r_total", {"tier": "cheap", "status": "200"}) == 3
    assert registry.get_sample_value("r_total", {"tier": "large", "status": "500"}) == 1
    assert registry.get_sample_value("f") == 1
    in_flight.add(amount=-1)
    in_flight.flush()
    assert registry.get_sample_value("f") == 0
