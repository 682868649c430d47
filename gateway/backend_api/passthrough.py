"""What a client gets from a native pass-through: the backend's answer as it was sent, in
place of the client dialect's `Translation` of a chat answer (`gateway.dialects`).

Messages answers pass untouched. A Responses answer gets the gateway's response id
(`resp_<request id>`, as a translated answer has) and says what the client asked for
(`store`, `previous_response_id`), not what the backend was sent; the gateway keeps it
for `previous_response_id` as it keeps a translated one (`stored`). A stream that fails
after it started ends with the dialect's own error event(s).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.dialects import DialectContext, Translation
from gateway.dialects.messages_answer import error_answer
from gateway.dialects.responses import response_id
from gateway.dialects.responses_answer import failure_code
from gateway.dialects.responses_request import input_items
from gateway.errors import TriageError

__all__ = ["NativeMessages", "NativeResponses", "passthrough"]

_SEQUENCE = re.compile(rb'"sequence_number":\s*(\d+)')
_ENDS = (b"response.completed", b"response.incomplete", b"response.failed")


class NativeMessages:
    """A Messages backend's answer for a Messages client: as sent."""

    def json(self, chat: bytes) -> bytes:
        return chat

    def events(self, chat_events: bytes) -> bytes:
        return chat_events

    def error_event(self, error: TriageError) -> bytes:
        return b"event: error\ndata: " + error_answer(error).body + b"\n\n"


class NativeResponses:
    """A Responses backend's answer for a Responses client, under the gateway's id."""

    def __init__(self, body: Mapping[str, Any], context: DialectContext) -> None:
        self.id = response_id(context)
        self._store = body.get("store", True) is not False
        previous = body.get("previous_response_id")
        self._previous = orjson.dumps(previous) if isinstance(previous, str) else None
        self._input = input_items(body)
        self._pairs: tuple[tuple[bytes, bytes], ...] | None = None
        self._final: dict[str, Any] | None = None
        self._next_sequence = 0

    def stored(self) -> dict[str, Any] | None:
        """What `ResponseStore.save` keeps, as `ResponseTranslation.stored` gives it."""
        if not self._store or self._final is None:
            return None
        return {"id": self.id, "response": self._final, "input": self._input}

    def json(self, chat: bytes) -> bytes:
        response = orjson.loads(chat)
        self._learn(response)
        answer = self._rewrite(chat)
        self._final = orjson.loads(answer)
        return answer

    def events(self, chat_events: bytes) -> bytes:
        if self._pairs is None:
            for event in chat_events.split(b"\n\n")[:-1]:
                data = _data(event)
                if data and b'"response"' in data:
                    self._learn(orjson.loads(data).get("response") or {})
                    break
        out = self._rewrite(chat_events)
        numbers = _SEQUENCE.findall(out)
        if numbers:
            self._next_sequence = int(numbers[-1]) + 1
        if any(end in out for end in _ENDS):
            for event in out.split(b"\n\n")[:-1]:
                data = _data(event)
                if data and any(end in data for end in _ENDS[:2]):
                    payload = orjson.loads(data)
                    if payload.get("type") in ("response.completed", "response.incomplete"):
                        self._final = payload.get("response")
        return out

    def error_event(self, error: TriageError) -> bytes:
        fields = {"code": error.code, "message": error.message, "param": error.param}
        failed = {
            "id": self.id,
            "object": "response",
            "status": "failed",
            "output": [],
            "error": {"code": failure_code(error.code, error.error_type), "message": error.message},
        }
        return self._event("error", fields) + self._event("response.failed", {"response": failed})

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self._next_sequence}
        self._next_sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _learn(self, response: Mapping[str, Any]) -> None:
        """The rewrites, from the backend's first response object: its id made the
        gateway's, and `store` and `previous_response_id` the client's (a JSON string
        inside a value has its quotes escaped, so these never match inside one)."""
        if self._pairs is not None:
            return
        pairs: list[tuple[bytes, bytes]] = []
        backend_id = response.get("id")
        if isinstance(backend_id, str) and backend_id:
            pairs.append((orjson.dumps(backend_id), orjson.dumps(self.id)))
        if self._store:
            pairs += [(b'"store":false', b'"store":true'), (b'"store": false', b'"store": true')]
        if self._previous is not None:
            for colon in (b":", b": "):
                pairs.append(
                    (b'"previous_response_id"' + colon + b"null",
                     b'"previous_response_id"' + colon + self._previous)
                )  # fmt: skip
        self._pairs = tuple(pairs)

    def _rewrite(self, data: bytes) -> bytes:
        for old, new in self._pairs or ():
            data = data.replace(old, new)
        return data


def passthrough(dialect: str, body: Mapping[str, Any], context: DialectContext) -> Translation:
    """The client-facing side of a native answer for a `dialect` client."""
    if dialect == "messages":
        return NativeMessages()
    return NativeResponses(body, context)


def _data(event: bytes) -> bytes | None:
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
