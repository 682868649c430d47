"""Chat completion answers, whole or streamed, as Anthropic Messages answers; gateway
errors in Anthropic's error shape and statuses.

Shapes follow the `anthropic` SDK's types (`Message`, `RawMessageStreamEvent`,
`ErrorResponse`), the ground truth its clients parse with. Choices made where chat and
Messages differ:

- A thinking block's `signature` is "": nothing here signs thinking, and a constant keeps
  a cached answer's replay identical to the fresh one.
- Tool arguments that are not a JSON object become `input: {}` in a whole answer (the
  agent's tool then fails on missing input and the model can try again); a stream passes
  the argument text on as it comes, as Anthropic does, so it is the SDK that rejects it.
- `usage.input_tokens` is the prompt's uncached tokens and `cache_read_input_tokens` its
  cached ones (vLLM's `prompt_tokens_details.cached_tokens`): Anthropic's total input is
  their sum. Nothing here writes a cache on request, so `cache_creation_input_tokens` is 0.
- A stream's `message_start` says 0 input tokens: the backend counts them only in its
  usage chunk, and `message_delta` then carries them (the SDK overwrites with them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson

from gateway.dialects import ErrorAnswer
from gateway.dispatch import SHED_CODES
from gateway.errors import TriageError, UpstreamError

__all__ = ["MessagesTranslation", "error_answer", "error_kind"]

# Anthropic's error types by status; any other 4xx is `invalid_request_error`, as
# Anthropic documents, and any other 5xx `api_error`. 504 is the SDK's `timeout_error`.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_OVERLOADED = 529


def error_kind(status: int, code: str | None) -> tuple[int, str]:
    """The status and Anthropic error type for a gateway error's status and code.

    Shed requests (no capacity to meet the SLO, deadline passed) and 503s (no healthy
    replica, or the backend's own 503) are Anthropic's 529 `overloaded_error`: the one
    status its clients, Claude Code included, read as "busy, retry later"."""
    if code in SHED_CODES or status == 503:
        return _OVERLOADED, _ERROR_TYPES[_OVERLOADED]
    if status in _ERROR_TYPES:
        return status, _ERROR_TYPES[status]
    return status, "invalid_request_error" if 400 <= status < 500 else "api_error"


def _error_payload(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


def error_answer(error: TriageError) -> ErrorAnswer:
    status, error_type = error_kind(error.status_code, error.code)
    headers = {}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(0, math.ceil(error.retry_after)))
    return ErrorAnswer(status, _error_payload(error_type, error.message), headers)


def _event(kind: str, payload: Mapping[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _data(event: bytes) -> bytes | None:
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _usage(usage: object) -> dict[str, int]:
    prompt = completion = cached = 0
    if isinstance(usage, dict):
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            cached = min(_count(details.get("cached_tokens")), prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _tool_input(arguments: object) -> dict[str, Any]:
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _reasoning(message: Mapping[str, Any]) -> str:
    # vLLM's field was `reasoning_content` and is now `reasoning`; SGLang's is the former.
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) else ""


_BlockKind = Literal["text", "thinking", "tool_use"]


class MessagesTranslation:
    """One request's answer as Anthropic Messages: `json` for a whole answer, `events`
    for a stream (stateful: one instance per stream)."""

    def __init__(
        self,
        message_id: str,
        stop_sequences: Sequence[str],
        context_edits: list[dict[str, Any]] | None = None,
    ) -> None:
        self._id = message_id
        self._stops = frozenset(stop_sequences)
        # Reported as Anthropic reports its own: on the message, and on `message_delta`.
        self._context = None if context_edits is None else {"applied_edits": context_edits}
        # Stream state.
        self._started = False
        self._ended = False
        self._delta_sent = False
        self._model = ""
        self._next_index = 0
        self._open: tuple[_BlockKind, int] | None = None
        self._tools: dict[int, int] = {}  # chat tool call index -> content block index
        self._finish: str | None = None
        self._matched: object = None
        self._usage: object = None

    def _stop(self, finish: object, matched: object, tools: bool) -> tuple[str, str | None]:
        # vLLM ends a named tool_choice with "stop": the calls decide, not the reason.
        if tools and finish in ("stop", "tool_calls", "function_call"):
            return "tool_use", None
        if finish == "length":
            return "max_tokens", None
        if finish in ("tool_calls", "function_call"):
            return "tool_use", None
        if finish == "content_filter":
            return "refusal", None
        # vLLM's `stop_reason` is the stop string it matched (or the stop token's id).
        if isinstance(matched, str) and matched in self._stops:
            return "stop_sequence", matched
        return "end_turn", None

    def json(self, chat: bytes) -> bytes:
        try:
            answer = orjson.loads(chat)
            choice = answer["choices"][0]
            message: dict[str, Any] = choice.get("message") or {}
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamError("The backend's answer is not a chat completion.") from exc
        content: list[dict[str, Any]] = []
        if reasoning := _reasoning(message):
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        calls = message.get("tool_calls") or []
        for i, call in enumerate(calls):
            function = call.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or self._tool_id(i),
                    "name": function.get("name") or "",
                    "input": _tool_input(function.get("arguments")),
                }
            )
        stop_reason, stop_sequence = self._stop(
            choice.get("finish_reason"), choice.get("stop_reason"), bool(calls)
        )
        reply = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": answer.get("model") or "",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _usage(answer.get("usage")),
        }
        if self._context is not None:
            reply["context_management"] = self._context
        return orjson.dumps(reply)

    def _tool_id(self, index: int) -> str:
        return f"toolu_{self._id.removeprefix('msg_')}_{index}"

    def events(self, chat_events: bytes) -> bytes:
        out: list[bytes] = []
        for event in chat_events.split(b"\n\n"):
            data = _data(event)
            if data is None or self._ended:
                continue
            if data == b"[DONE]":
                self._end(out)
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                chunk = None
            if not isinstance(chunk, dict):
                self._fail(out, "api_error", "The backend sent an event that is not JSON.")
            elif isinstance(error := chunk.get("error"), dict):
                kind = error_kind(_status_of(error), _str(error.get("code")) or None)[1]
                self._fail(out, kind, _str(error.get("message")) or "The backend failed.")
            else:
                self._chunk(chunk, out)
        return b"".join(out)

    def error_event(self, error: TriageError) -> bytes:
        if self._ended:
            return b""
        out: list[bytes] = []
        self._fail(out, error_kind(error.status_code, error.code)[1], error.message)
        return b"".join(out)

    def _fail(self, out: list[bytes], kind: str, message: str) -> None:
        out.append(_event("error", {"type": "error", "error": {"type": kind, "message": message}}))
        self._ended = True

    def _start(self, out: list[bytes]) -> None:
        self._started = True
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(None),
        }
        out.append(_event("message_start", {"type": "message_start", "message": message}))
        out.append(_event("ping", {"type": "ping"}))

    def _chunk(self, chunk: Mapping[str, Any], out: list[bytes]) -> None:
        if not self._started:
            model = chunk.get("model")
            self._model = model if isinstance(model, str) else ""
            self._start(out)
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]  # a dialect request never asks for n > 1
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._matched = choice.get("stop_reason")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
            if self._finish is not None and not self._delta_sent:
                self._message_delta(out)

    def _delta(self, delta: Mapping[str, Any], out: list[bytes]) -> None:
        if reasoning := _reasoning(delta):
            index = self._block("thinking", out)
            self._content_delta(out, index, {"type": "thinking_delta", "thinking": reasoning})
        text = delta.get("content")
        if isinstance(text, str) and text:
            index = self._block("text", out)
            self._content_delta(out, index, {"type": "text_delta", "text": text})
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                self._tool_delta(call, out)

    def _tool_delta(self, call: Mapping[str, Any], out: list[bytes]) -> None:
        position = call.get("index")
        position = position if isinstance(position, int) else 0
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        index = self._tools.get(position)
        if index is None:
            index = self._tools[position] = self._open_block("tool_use", out)
            block = {
                "type": "tool_use",
                "id": _str(call.get("id")) or self._tool_id(position),
                "name": _str(function.get("name")),
                "input": {},
            }
            out.append(_content_block_start(index, block))
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            # A call's pieces arrive together (vLLM and SGLang stream calls one by one),
            # so its block is the open one.
            self._content_delta(out, index, {"type": "input_json_delta", "partial_json": arguments})

    def _block(self, kind: Literal["text", "thinking"], out: list[bytes]) -> int:
        """The index of the open block of this kind, started after closing another."""
        if self._open is not None and self._open[0] == kind:
            return self._open[1]
        index = self._open_block(kind, out)
        empty: dict[str, Any] = {"type": "text", "text": ""}
        if kind == "thinking":
            empty = {"type": "thinking", "thinking": "", "signature": ""}
        out.append(_content_block_start(index, empty))
        return index

    def _open_block(self, kind: _BlockKind, out: list[bytes]) -> int:
        self._close(out)
        index = self._next_index
        self._next_index += 1
        self._open = (kind, index)
        return index

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            index = self._open[1]
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
            self._open = None

    def _content_delta(self, out: list[bytes], index: int, delta: Mapping[str, Any]) -> None:
        payload = {"type": "content_block_delta", "index": index, "delta": delta}
        out.append(_event("content_block_delta", payload))

    def _message_delta(self, out: list[bytes]) -> None:
        self._close(out)
        stop_reason, stop_sequence = self._stop(self._finish, self._matched, bool(self._tools))
        payload = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": _usage(self._usage),
        }
        if self._context is not None:
            payload["context_management"] = self._context
        out.append(_event("message_delta", payload))
        self._delta_sent = True

    def _end(self, out: list[bytes]) -> None:
        if not self._started:
            self._start(out)
        if not self._delta_sent:
            self._message_delta(out)  # a backend that sent no usage chunk
        out.append(_event("message_stop", {"type": "message_stop"}))
        self._ended = True


def _content_block_start(index: int, block: Mapping[str, Any]) -> bytes:
    payload = {"type": "content_block_start", "index": index, "content_block": block}
    return _event("content_block_start", payload)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


_TYPE_STATUS = {kind: status for status, kind in _ERROR_TYPES.items()}


def _status_of(error: Mapping[str, Any]) -> int:
    """A chat error event's status: its `code` where that is one (vLLM's), else what its
    `type` says (OpenAI's types share names with Anthropic's where it matters), else 500."""
    code, kind = error.get("code"), error.get("type")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return code
    return _TYPE_STATUS.get(kind, 500) if isinstance(kind, str) else 500
