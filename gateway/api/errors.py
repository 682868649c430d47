"""The one place a `TriageError` becomes an OpenAI-shaped error body."""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.responses import Response

from gateway.errors import TriageError

__all__ = ["error_payload", "error_response", "internal_error", "sse_error_event"]


def error_payload(error: TriageError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(error: TriageError, headers: dict[str, str] | None = None) -> Response:
    all_headers = dict(headers or {})
    if error.retry_after is not None:
        all_headers["retry-after"] = str(max(0, math.ceil(error.retry_after)))
    return Response(
        orjson.dumps(error_payload(error)),
        status_code=error.status_code,
        headers=all_headers,
        media_type="application/json",
    )


def sse_error_event(error: TriageError) -> bytes:
    """How a stream that already started reports failure: an error event, then [DONE]."""
    return b"data: " + orjson.dumps(error_payload(error)) + b"\n\ndata: [DONE]\n\n"


def internal_error() -> TriageError:
    """What a client is told of a bug in the gateway (its log line says the same)."""
    return TriageError("The gateway hit an internal error.", code="internal_error")
