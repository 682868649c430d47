"""A bug inside the request path still gets an OpenAI-shaped answer and a finished record."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

import gateway.app
from gateway.app import build_app


def in_flight(client: TestClient) -> float:
    text = client.get("/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("triage_requests_in_flight"))
    return float(line.split()[-1])


def test_unexpected_error_is_a_500_and_the_request_is_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway.app, "read_request", broken)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(build_app("policies/demo.yaml")) as client:
        before = in_flight(client)
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 500
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "a bug" not in error["message"]  # internals stay in the log
        assert response.headers["x-triage-request-id"]
        assert in_flight(client) == before
