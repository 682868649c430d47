"""Metric updates added up in plain dicts, handed to prometheus-client's metrics in bulk.

prometheus-client takes a lock on every increment and walks a histogram's buckets in
Python on every observation. A request makes about fifteen such updates; in the gateway
under load they cost ~25 µs of its ~360 µs of CPU, against ~10 µs for the same updates
added to dicts (paired rounds in one process). The event loop is the only writer, so
the request path adds to a dict and `flush` passes the totals on: before every scrape,
and once a second under several workers, whose scrapes read the shared files.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["BufferedCounter", "BufferedHistogram", "Labels"]

Labels = tuple[str, ...]
_Summed = TypeVar("_Summed", Counter, Gauge)


class BufferedCounter(Generic[_Summed]):
    """Amounts added per label values; a gauge's `inc` takes negative ones too."""

    __slots__ = ("_children", "_pending", "metric")

    def __init__(self, metric: _Summed) -> None:
        self.metric: _Summed = metric
        self._children: dict[Labels, _Summed] = {}
        self._pending: dict[Labels, float] = {}

    def add(self, labels: Labels = (), amount: float = 1.0) -> None:
        pending = self._pending
        pending[labels] = pending.get(labels, 0.0) + amount

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for labels, amount in pending.items():
            child = self._children.get(labels)
            if child is None:
                child = self._children[labels] = _child(self.metric, labels)
            child.inc(amount)


class BufferedHistogram:
    """Observations per label values, kept as bucket counts and a sum."""

    __slots__ = ("_bounds", "_children", "_pending", "metric")

    def __init__(self, metric: Histogram) -> None:
        self.metric = metric
        self._bounds: list[float] = metric._upper_bounds  # ends with +Inf
        self._children: dict[Labels, Histogram] = {}
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
            child = self._children.get(labels)
            if child is None:
                child = self._children[labels] = _child(self.metric, labels)
            # prometheus-client has no bulk `observe`: add to the values it would update.
            for bucket, count in zip(child._buckets, row, strict=False):
                if count:
                    bucket.inc(count)
            child._sum.inc(row[-1])


_M = TypeVar("_M", Counter, Gauge, Histogram)


def _child(metric: _M, labels: Labels) -> _M:
    return metric.labels(*labels) if labels else metric
