"""Latency estimates that follow a moving target: (peak) EWMAs, a load curve, a window.

Each forgets at a set pace (`decay_s`, or a window's size) and fades when left without
samples, so that what a replica measured long ago never keeps traffic from it for good.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Ewma", "LatencyWindow", "LoadCurve", "PeakEwma"]


class Ewma:
    """A mean over roughly the last `decay_s` seconds of samples, however many there were,
    and the mean deviation of the samples from it.

    Read with `fade_after_s`, an estimate left without samples for longer than that fades
    towards zero over `idle_s`: a replica that stopped getting traffic because it looked
    slow is eventually tried again and re-measured.
    """

    __slots__ = ("_idle_s", "_spread", "_stamp", "_value", "decay_s")

    def __init__(self, decay_s: float, idle_s: float | None = None) -> None:
        self.decay_s = decay_s
        self._idle_s = idle_s if idle_s is not None else 3 * decay_s
        self._value: float | None = None
        self._spread = 0.0
        self._stamp = 0.0

    def value(self, now: float, fade_after_s: float = math.inf) -> float | None:
        """The estimate now, faded if it has been idle for longer than `fade_after_s`."""
        return _faded(self._value, now - self._stamp, fade_after_s, self._idle_s)

    def spread(self, now: float, fade_after_s: float = math.inf) -> float:
        """The samples' mean absolute deviation from the estimate, faded as `value` is: a
        deviation left from samples long gone must not keep an estimate high."""
        spread = _faded(self._spread, now - self._stamp, fade_after_s, self._idle_s)
        return 0.0 if spread is None else spread

    def observe(self, sample: float, now: float) -> None:
        current = self._value
        if current is None:
            self._value = sample
        else:
            # At least a tenth of each sample counts, so a burst right after a lull moves it.
            weight = min(math.exp(-max(now - self._stamp, 0.0) / self.decay_s), 0.9)
            self._value = current * weight + sample * (1.0 - weight)
            # The sample's deviation from the estimate it moved (as an exponentially
            # weighted variance is updated): after a long gap the sample mostly is the new
            # estimate, and a level that moved is not taken for noise.
            deviation = abs(sample - self._value)
            self._spread = self._spread * weight + deviation * (1.0 - weight)
        self._stamp = now

    def reset(self) -> None:
        self._value = None
        self._spread = 0.0


def _faded(value: float | None, idle: float, fade_after_s: float, idle_s: float) -> float | None:
    if value is None or idle <= fade_after_s:
        return value
    return value * math.exp(-(idle - fade_after_s) / idle_s)


class PeakEwma(Ewma):
    """Finagle's and Linkerd's peak EWMA: a slower sample is taken at once, a faster one decays in.

    A replica that turns slow is avoided after one slow answer; one that turns fast again
    earns its traffic back gradually. An idle estimate fades (by default), so a replica
    the balancer stopped choosing gets chosen again and re-measured.
    """

    __slots__ = ()

    def __init__(self, decay_s: float) -> None:
        super().__init__(decay_s, idle_s=decay_s)

    def value(self, now: float, fade_after_s: float = 0.0) -> float | None:
        return super().value(now, fade_after_s)

    def observe(self, sample: float, now: float) -> None:
        current = self.value(now)
        if current is None or sample > current:
            self._value = sample
            self._stamp = now
            return
        weight = math.exp(-max(now - self._stamp, 0.0) / self.decay_s)
        self._value = current * weight + sample * (1.0 - weight)
        self._stamp = now


class LoadCurve:
    """A latency that grows with the batch, y = a + b x for x requests at the replica, fitted
    over roughly the last `decay_s` seconds of samples (at least 3 % weight each).

    Decode slows as the batch fills; a request joining a full batch must not be promised
    the inter-token latency measured on an empty one.
    """

    __slots__ = ("_idle_s", "_stamp", "_sums", "decay_s")

    def __init__(self, decay_s: float) -> None:
        self.decay_s = decay_s
        self._idle_s = 3 * decay_s
        self._sums: list[float] | None = None  # weight, x, y, xx, xy
        self._stamp = 0.0

    def observe(self, x: float, y: float, now: float) -> None:
        sums = self._sums or [0.0] * 5
        keep = min(math.exp(-max(now - self._stamp, 0.0) / self.decay_s), 0.97)
        self._sums = [
            value * keep + new for value, new in zip(sums, (1.0, x, y, x * x, x * y), strict=True)
        ]
        self._stamp = now

    def value(self, x: float, now: float, fade_after_s: float = math.inf) -> float | None:
        """The latency at a batch of `x`; faded when idle longer than `fade_after_s`."""
        if self._sums is None:
            return None
        weight, sx, sy, sxx, sxy = self._sums
        mean_x, mean_y = sx / weight, sy / weight
        spread = sxx / weight - mean_x * mean_x
        # Only a batch size that really varied says how latency moves with it.
        slope = (sxy / weight - mean_x * mean_y) / spread if spread > 0.25 else 0.0
        estimate = max(mean_y + max(slope, 0.0) * (x - mean_x), mean_y / 2)
        return _faded(estimate, now - self._stamp, fade_after_s, self._idle_s)

    def reset(self) -> None:
        self._sums = None


class LatencyWindow:
    """The most recent `size` samples, for percentiles."""

    __slots__ = ("_samples", "added")

    def __init__(self, size: int) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.added = 0  # samples ever added

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: float) -> None:
        self._samples.append(sample)
        self.added += 1

    def percentiles(self, *quantiles: float) -> tuple[float | None, ...]:
        """Nearest-rank percentiles (quantiles in 0..1); None for an empty window."""
        if not self._samples:
            return tuple(None for _ in quantiles)
        ordered = sorted(self._samples)
        top = len(ordered) - 1
        return tuple(ordered[min(top, max(0, math.ceil(q * len(ordered)) - 1))] for q in quantiles)
