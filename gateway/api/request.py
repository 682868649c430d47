"""Read one OpenAI request off the wire: size limit, JSON, shape, the gateway's headers.

Every value the gateway acts on is read here, once, so a bad one is a 400 before the
request touches any state; the stages after take the typed values and never look again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from gateway.api.hints import NO_HINTS, RequestHints, read_hints
from gateway.api.schemas import MAX_MESSAGES, SCHEMAS, RequestKind, describe_location
from gateway.errors import BodyTooLarge, InvalidRequest

__all__ = [
    "ParsedRequest",
    "chat_prompt_chars",
    "checked_request",
    "read_json_object",
    "read_request",
]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated request. `body` is the client's JSON as sent; the gateway forwards it.

    `max_tokens` is the output limit per choice: `max_completion_tokens` where set, else
    `max_tokens` (vLLM's rule and OpenAI's), 0 for embeddings, None when the client set
    none. `choices` is how many completions the backend generates (`n`, `best_of`); each
    may use `max_tokens`. Both are derived from the body once, as validated.
    """

    kind: RequestKind
    body: Mapping[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    hints: RequestHints = NO_HINTS
    dialect: str = "chat"  # the client's API: chat | messages | responses (gateway.dialects)
    # A dialect's body as the client sent it (a Responses conversation expanded): what a
    # backend of the same API is sent instead of `body` (gateway/backend_api/native.py).
    native_body: Mapping[str, Any] | None = None
    # The stored Responses conversation this request continues: its first response's id.
    conversation: str | None = None
    max_tokens: int | None = field(init=False)
    choices: int = field(init=False)
    _prompt_chars: int = field(default=-1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_tokens", _max_tokens(self.kind, self.body))
        object.__setattr__(self, "choices", _choices(self.kind, self.body))

    def prompt_chars(self) -> int:
        """Characters of prompt: a bounded, cheap stand-in for a token count, what budgets
        reserve for and length rules route by; counted once (`chat_prompt_chars`)."""
        if self._prompt_chars < 0:
            object.__setattr__(self, "_prompt_chars", self._count_prompt_chars())
        return self._prompt_chars

    def _count_prompt_chars(self) -> int:
        if self.kind == "chat":
            return chat_prompt_chars(self.body)
        prompt = self.body.get("prompt", self.body.get("input"))
        if isinstance(prompt, str):
            return len(prompt)
        if isinstance(prompt, list):
            return sum(len(p) if isinstance(p, str | list) else 4 for p in prompt)
        return 0

    def estimated_prompt_tokens(self) -> int:
        return self.prompt_chars() // 4 + 1

    def upstream_body(self, model: str, max_tokens: int | None = None) -> bytes:
        """The client's body with `model` rewritten, usage asked for on streams, and a
        `max_tokens` cap when the budget reserved one the client did not set."""
        body = dict(self.body)
        body["model"] = model
        if max_tokens is not None and self.max_tokens is None:
            body["max_tokens"] = max_tokens
        if self.stream and not self.client_wants_usage:
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return orjson.dumps(body)


def chat_prompt_chars(body: Mapping[str, Any]) -> int:
    """Characters a chat template renders into the prompt: the messages' text, reasoning
    handed back, tool calls' names and arguments, and the tool definitions, which run to
    tens of thousands of characters in a coding agent's request: leaving them out let a
    budget reserve a fraction of an agent request's cost. Images count nothing."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
        for name in ("reasoning", "reasoning_content"):
            reasoning = message.get(name)
            if isinstance(reasoning, str):
                chars += len(reasoning)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                chars += len(str(function.get("name") or ""))
                chars += len(str(function.get("arguments") or ""))
    tools = body.get("tools")
    if tools:
        with contextlib.suppress(orjson.JSONEncodeError):  # too deep: refused before sending
            chars += len(orjson.dumps(tools))
    return chars


def _max_tokens(kind: RequestKind, body: Mapping[str, Any]) -> int | None:
    if kind == "embeddings":
        return 0
    limit: int | None = body.get("max_completion_tokens")
    return body.get("max_tokens") if limit is None else limit


def _choices(kind: RequestKind, body: Mapping[str, Any]) -> int:
    if kind == "embeddings":
        return 1
    n: int = body.get("n") or 1
    if kind == "completions":
        return max(n, body.get("best_of") or 1)
    return n


async def read_request(
    request: Request,
    kind: RequestKind,
    max_body_bytes: int,
    headers: Mapping[str, str] | None = None,
) -> ParsedRequest:
    """The request, checked; `headers` (lower-case names, as `app.header_map` gives them)
    are read for the gateway's own (`gateway.api.hints`)."""
    body = await read_json_object(request, max_body_bytes)
    return checked_request(body, kind, headers)


async def read_json_object(request: Request, max_body_bytes: int) -> dict[str, Any]:
    """The body as a JSON object the gateway can write again, or an `InvalidRequest`."""
    raw = await _read_body(request, max_body_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    _check_writable(raw, body)
    return body


def checked_request(
    body: dict[str, Any],
    kind: RequestKind,
    headers: Mapping[str, str] | None = None,
    dialect: str = "chat",
    native_body: Mapping[str, Any] | None = None,
    conversation: str | None = None,
) -> ParsedRequest:
    """`body` held to its OpenAI schema. A dialect's request arrives here translated to a
    chat body (`gateway.dialects`) that its own schema checked already: OpenAI's limits
    (four stop strings, say) are not its client's, and an error would name a field the
    client never sent, so only the size bound applies to it."""
    messages = body.get("messages")
    if kind == "chat" and isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        # Refused before validation, which would otherwise check every one of them first.
        raise InvalidRequest(
            f"Invalid value for 'messages': at most {MAX_MESSAGES} messages.", param="messages"
        )
    if dialect == "chat":
        try:
            SCHEMAS[kind].model_validate(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            param = describe_location(first["loc"])
            message = f"Invalid value for '{param}': {first['msg']}"
            raise InvalidRequest(message, param=param) from exc
    hints = NO_HINTS if headers is None else read_hints(headers)
    options = body.get("stream_options")  # checked for generation; embeddings have none
    return ParsedRequest(
        kind=kind,
        body=body,
        model=body["model"],
        stream=body.get("stream") is True,
        client_wants_usage=isinstance(options, dict) and options.get("include_usage") is True,
        hints=hints,
        dialect=dialect,
        native_body=native_body,
        conversation=conversation,
    )


# orjson reads 1,024 levels of nesting but writes only 254, and the gateway writes the body
# again (for the backend, for the cache key). A body it could not write is the client's error.
_ORJSON_WRITE_DEPTH = 254


def _check_writable(raw: bytes, body: dict[str, Any]) -> None:
    if raw.count(b"[") + raw.count(b"{") <= _ORJSON_WRITE_DEPTH:
        return  # cannot be that deep: the usual case costs two C-speed scans
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(
            f"Request body is nested deeper than {_ORJSON_WRITE_DEPTH} levels."
        ) from exc


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, straight from `receive`: Starlette's `stream()` and `Headers` cost more
    per request than this whole function, for nothing the gateway needs."""
    for name, value in request.scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("Client disconnected while sending the request.")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
