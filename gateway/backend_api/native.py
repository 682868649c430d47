"""Native pass-through: a client's own Messages or Responses body to a backend that
speaks that API, and the backend's answer read for the books (usage, finish reasons,
the end of its stream) while it goes to the client as sent, its model name the policy's.

The body is the client's, with three changes: `model` is the served name; the budget's
output cap goes in the API's own field (`max_tokens`, `max_output_tokens`) when the
client set none; and a Responses request is sent with `store: false` and without
`previous_response_id`: the gateway expanded the stored conversation into `input`
already, and the backend's store is not the gateway's (the gateway keeps the answer for
its client, `passthrough.NativeResponses`).

Usage is put on the `Outcome` in chat's shape (`messages_answer.usage_from_messages`,
`responses_answer.usage_from_responses`), so the budgets, the request log and the
metrics read it as any other: Messages from `message_start` and `message_delta`,
Responses from the response that ends the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import orjson

from gateway.backend_api import BackendApi
from gateway.backend_api.messages_answer import finish_reason as messages_finish
from gateway.backend_api.messages_answer import usage_from_messages
from gateway.backend_api.responses_answer import END_EVENTS, usage_from_responses
from gateway.backend_api.responses_answer import finish_reason as responses_finish
from gateway.errors import TriageError, UpstreamError
from gateway.upstream import ModelRename, Outcome, event_data

__all__ = ["native_body", "read_native", "relay_native"]

# What marks a Messages or Responses event the books need; the others (a token each)
# pass without being parsed.
_MARKERS: dict[str, tuple[bytes, ...]] = {
    "messages": (b"message_start", b"message_delta", b"message_stop", b"error"),
    "responses": (b"response.completed", b"response.incomplete", b"response.failed", b"error"),
}


def native_body(
    api: BackendApi, body: Mapping[str, Any], model: str, max_tokens_cap: int | None
) -> bytes:
    """The client's body as its backend gets it."""
    out = dict(body)
    out["model"] = model
    limit = "max_tokens" if api == "messages" else "max_output_tokens"
    if out.get(limit) is None and max_tokens_cap is not None:
        out[limit] = max_tokens_cap
    if api == "responses":
        out.pop("previous_response_id", None)
        out["store"] = False
    return orjson.dumps(out)


def read_native(
    api: BackendApi, payload: bytes, outcome: Outcome, rename: ModelRename | None
) -> bytes:
    """A whole native answer: its usage and finish reason on `outcome`, its model renamed."""
    outcome.first_token_at = time.perf_counter()
    try:
        reply = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("The backend replica sent a response that is not JSON.") from exc
    if not isinstance(reply, dict):
        raise UpstreamError("The backend replica sent a response that is not a JSON object.")
    _note(api, reply, outcome)
    outcome.completed = True
    return payload if rename is None else rename(payload)


async def relay_native(
    api: BackendApi,
    batches: AsyncIterator[bytes],
    outcome: Outcome,
    rename: ModelRename | None,
) -> AsyncGenerator[bytes, None]:
    """A native stream's batches as they arrive, read for the books on the way; its model
    renamed. A stream that fails (an error event) or ends before its last event raises its
    `TriageError`, set on `outcome.error` first: the client's stream then ends with the
    dialect's error event."""
    markers = _MARKERS[api]
    try:
        async for batch in batches:
            if outcome.first_token_at is None:
                outcome.first_token_at = time.perf_counter()
                if rename is not None:
                    rename = rename.narrowed(batch)
            outcome.events += batch.count(b"\n\n")
            if any(marker in batch for marker in markers):
                for event in batch.split(b"\n\n")[:-1]:
                    data = event_data(event)
                    if data and any(marker in data for marker in markers):
                        _note_event(api, orjson.loads(data), outcome)
            yield batch if rename is None else rename(batch)
            if outcome.completed:
                return
        raise UpstreamError("The backend replica ended the stream before its last event.")
    except TriageError as error:
        outcome.error = error
        raise
    except orjson.JSONDecodeError as exc:
        outcome.error = UpstreamError("The backend replica sent an event that is not JSON.")
        raise outcome.error from exc


def _note(api: BackendApi, reply: Mapping[str, Any], outcome: Outcome) -> None:
    """A whole answer's usage and finish reason; a failed one is an `UpstreamError`."""
    if api == "messages":
        if reply.get("type") == "error":
            raise UpstreamError("The backend replica answered with an error.")
        outcome.usage = usage_from_messages(reply.get("usage"))
        outcome.finish_reasons = (messages_finish(reply.get("stop_reason")),)
        return
    if reply.get("status") == "failed":
        raise UpstreamError("The backend replica failed the response.")
    outcome.usage = usage_from_responses(reply.get("usage"))
    called = any(
        isinstance(item, Mapping) and item.get("type") == "function_call"
        for item in reply.get("output") or ()
    )
    outcome.finish_reasons = (responses_finish(reply, called),)


def _note_event(api: BackendApi, event: object, outcome: Outcome) -> None:
    if not isinstance(event, dict):
        return
    kind = event.get("type")
    if kind == "error" or kind == "response.failed":
        error = event.get("error") or (event.get("response") or {}).get("error") or event
        message = error.get("message") if isinstance(error, Mapping) else None
        detail = f": {message}" if isinstance(message, str) and message else "."
        raise UpstreamError(f"The backend replica failed the stream{detail}")
    if api == "messages":
        if kind == "message_start":
            outcome.usage = usage_from_messages((event.get("message") or {}).get("usage"))
        elif kind == "message_delta":
            # Its counts are cumulative; the input ones may be left out (message_start's).
            delta = event.get("usage") or {}
            given = {name: value for name, value in delta.items() if value is not None}
            outcome.usage = usage_from_messages({**_started(outcome), **given})
            stop = (event.get("delta") or {}).get("stop_reason")
            outcome.finish_reasons = (messages_finish(stop),)
        elif kind == "message_stop":
            outcome.completed = True
    elif kind in END_EVENTS:
        _note(api, event.get("response") or {}, outcome)
        outcome.completed = True


def _started(outcome: Outcome) -> dict[str, int]:
    """message_start's input counts, kept on `outcome.usage` in chat's shape, in
    Messages' names again."""
    usage = outcome.usage or {}
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0) - cached,
        "cache_read_input_tokens": cached,
    }
