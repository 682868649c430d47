from __future__ import annotations

from typing import Any

import pytest

from gateway.api.reply import JSON, Reply


async def test_sends_head_and_body_then_runs_after() -> None:
    sent: list[dict[str, Any]] = []
    finished: list[bool] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def after() -> None:
        finished.append(len(sent) == 2)

    await Reply(b'{"a":1}', JSON, {"x-triage-tier": "cheap"}, after)({}, None, send)  # type: ignore[arg-type]
    head, body = sent
    assert head["status"] == 200
    assert head["headers"] == [
        (b"content-length", b"7"),
        (b"content-type", b"application/json"),
        (b"x-triage-tier", b"cheap"),
    ]
    assert body == {"type": "http.response.body", "body": b'{"a":1}'}
    assert finished == [True]


async def test_after_runs_when_sending_fails() -> None:
    finished: list[bool] = []

    async def send(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    async def after() -> None:
        finished.append(True)

    with pytest.raises(OSError):
        await Reply(b"{}", JSON, {}, after)({}, None, send)  # type: ignore[arg-type]
    assert finished == [True]
