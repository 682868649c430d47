from __future__ import annotations

import orjson
import pytest

from gateway.api.dialect_routes import _in_shape
from gateway.dialects.messages import MessagesDialect
from gateway.dialects.responses import ResponsesDialect
from gateway.errors import NotFound


async def _broken() -> object:
    raise RuntimeError("a bug")


async def _missing() -> object:
    raise NotFound("No response with id 'x'.", param="response_id")


async def test_a_bug_in_a_messages_endpoint_is_answered_in_anthropics_shape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = await _in_shape(MessagesDialect(), _broken())  # type: ignore[arg-type]
    body = orjson.loads(response.body)
    assert response.status_code == 500
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "unexpected error" in caplog.text


async def test_a_responses_endpoints_errors_are_openai_shaped() -> None:
    response = await _in_shape(ResponsesDialect(), _missing())  # type: ignore[arg-type]
    body = orjson.loads(response.body)
    assert response.status_code == 404
    assert body["error"]["param"] == "response_id"
