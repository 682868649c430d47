"""Metric updates added up in plain dicts, handed to prometheus-client's metrics in bulk.

prometheus-client takes a lock on every increment and walks a histogram's buckets in
Python on every observation, and a request makes about fifteen updates: buffering them
took 5-9 % off a plain request's CPU in the gateway (`bench/ab.py`). The event loop is
the only writer, so the request path adds to a dict and `flush` passes the totals on:
before every scrape, and once a second under several workers, whose scrapes read the
shared files.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["BufferedCounter", "BufferedHistogram", "Labels"]

Labels = tuple[str, ...]
_M = TypeVar("_M", bound=MetricWrapperBase)


class _Buffered(Generic[_M]):
    """A prometheus-client metric and its children by label values, made once each."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: _M) -> None:
        self.metric: _M = metric
        self._children: dict[Labels, _M] = {}

    def _child(self, labels: Labels) -> _M:
        child = self._children.get(labels)
        if child is None:
            child = self.metric.labels(*labels) if labels else self.metric
            self._children[labels] = child
        return child


class BufferedCounter(_Buffered[Counter | Gauge]):
    """Amounts added per label values; a gauge's `inc` takes negative ones too."""

    __slots__ = ("_pending",)

    def __init__(self, metric: Counter | Gauge) -> None:
        super().__init__(metric)
        self._pending: dict[Labels, float] = {}

    def add(self, labels: Labels = (), amount: float = 1.0) -> None:
        pending = self._pending
        pending[labels] = pending.get(labels, 0.0) + amount

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for labels, amount in pending.items():
            self._child(labels).inc(amount)


class BufferedHistogram(_Buffered[Histogram]):
    """Observations per label values, kept as bucket counts and a sum."""

    __slots__ = ("_bounds", "_pending")

    def __init__(self, metric: Histogram) -> None:
        super().__init__(metric)
        self._bounds: list[float] = metric._upper_bounds  # ends with +Inf
        self._pending: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        row = self._pending.get(labels)
        if row is None:
            row = self._pending[labels] = [0.0] * (len(self._bounds) + 1)
        row[bisect_left(self._bounds, value)] += 1  # the first bucket with value <= bound
        row[-1] += value

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for labels, row in pending.items():
            child = self._child(labels)
            # prometheus-client has no bulk `observe`: add to the values it would update.
            for bucket, count in zip(child._buckets, row, strict=False):
                if count:
                    bucket.inc(count)
            child._sum.inc(row[-1])
