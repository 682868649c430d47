from __future__ import annotations

import calendar

import pytest

from gateway.budgets.windows import window_at


def at(text: str) -> float:
    date, clock = text.split("T")
    y, mo, d = (int(p) for p in date.split("-"))
    h, mi, s = (float(p) for p in clock.split(":"))
    return calendar.timegm((y, mo, d, int(h), int(mi), 0)) + s


@pytest.mark.parametrize(
    ("kind", "moment", "stamp", "start", "end"),
    [
        (
            "minute",
            "2026-11-27T12:05:59.9",
            "2026-11-27T12:05",
            "2026-11-27T12:05:00",
            "2026-11-27T12:06:00",
        ),
        (
            "hour",
            "2026-11-27T23:59:59",
            "2026-11-27T23",
            "2026-11-27T23:00:00",
            "2026-11-28T00:00:00",
        ),
        ("day", "2026-11-27T00:00:00", "2026-11-27", "2026-11-27T00:00:00", "2026-11-28T00:00:00"),
        ("month", "2026-11-30T23:59:59", "2026-11", "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
        ("month", "2026-12-31T23:59:59", "2026-12", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2028-02-29T12:00:00", "2028-02", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
    ],
)
def test_calendar_windows_in_utc(kind, moment, stamp, start, end) -> None:  # type: ignore[no-untyped-def]
    window = window_at(kind, at(moment))
    assert (window.stamp, window.start, window.end) == (stamp, at(start), at(end))


def test_a_window_ends_where_the_next_begins() -> None:
    first = window_at("minute", at("2026-11-27T12:05:59.999"))
    second = window_at("minute", first.end)
    assert second.start == first.end and second.stamp == "2026-11-27T12:06"
    assert first.reset_in(first.end - 1.5) == 1.5
    assert first.reset_in(first.end + 3) == 0.0
