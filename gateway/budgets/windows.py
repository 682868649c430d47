"""Calendar windows in UTC (minute, hour, day, month): which instance a moment falls in."""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Literal

__all__ = ["WINDOW_KINDS", "Window", "WindowKind", "window_at"]

WindowKind = Literal["minute", "hour", "day", "month"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("minute", "hour", "day", "month")

_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_STAMPS = {"minute": "%Y-%m-%dT%H:%M", "hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d"}


@dataclass(frozen=True, slots=True)
class Window:
    """One window instance: `stamp` names it in keys; `start` and `end` are epoch seconds."""

    kind: WindowKind
    stamp: str
    start: int
    end: int  # exclusive: the moment the window resets

    def reset_in(self, now: float) -> float:
        return max(0.0, self.end - now)


def window_at(kind: WindowKind, now: float) -> Window:
    """The window of `kind` that contains `now` (epoch seconds, UTC; no leap seconds)."""
    if kind == "month":
        t = time.gmtime(now)
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0))
        return Window(kind, f"{t.tm_year:04d}-{t.tm_mon:02d}", start, end)
    size = _SECONDS[kind]
    start = int(now // size) * size
    return Window(kind, time.strftime(_STAMPS[kind], time.gmtime(start)), start, start + size)
