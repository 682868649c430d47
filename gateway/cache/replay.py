"""A cache hit as the client asked for it: a JSON body, or an SSE stream of chunks.

Streams follow OpenAI's usage rule: only when the request set
`stream_options.include_usage` does every chunk carry `"usage": null` and a last chunk
with `"choices": []` carry the usage. An entry first streamed replays its own chunks; an
entry first answered as JSON is cut into chunks: the role, the content in pieces, tool
calls, and a last chunk with the finish reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from gateway.cache.entry import CachedEntry

__all__ = ["render_events", "render_json"]

_DONE_EVENT = b"data: [DONE]\n\n"
_CHUNK_OBJECTS = {"chat": "chat.completion.chunk", "completions": "text_completion"}
_PIECE_CHARS = 24  # a synthesized content piece: whole words, at least this many characters
_WORDS = re.compile(r"\s*\S+\s*|\s+")
_CHOICE_KEYS = ("index", "message", "text", "logprobs", "finish_reason")

_Json = dict[str, Any]


def render_json(entry: CachedEntry) -> bytes:
    """The response body of a non-stream request."""
    return orjson.dumps(entry.response)


def render_events(entry: CachedEntry, include_usage: bool) -> list[bytes]:
    """The SSE events of a stream request, each ending in a blank line, the last `[DONE]`."""
    if entry.kind not in _CHUNK_OBJECTS:
        raise ValueError(f"{entry.kind} responses are never streamed")
    stored = entry.stream_chunks()
    if stored is not None and entry.envelope is not None:
        envelope = dict(entry.envelope)
        chunks: Iterable[bytes] = stored
    else:
        envelope = {k: v for k, v in entry.response.items() if k not in ("choices", "usage")}
        envelope["object"] = _CHUNK_OBJECTS[entry.kind]
        choices = _synthesized_choices(entry)
        chunks = (orjson.dumps({**envelope, "choices": [c]}) for c in choices)
    events = [_event(chunk, include_usage) for chunk in chunks]
    usage = entry.response.get("usage")
    if include_usage and usage is not None:
        usage_chunk = orjson.dumps({**envelope, "choices": [], "usage": usage})
        events.append(b"data: " + usage_chunk + b"\n\n")
    events.append(_DONE_EVENT)
    return events


def _event(chunk: bytes, include_usage: bool) -> bytes:
    """`chunk` is a JSON object without `usage`: OpenAI adds `"usage": null` when asked."""
    if include_usage:
        return b"data: " + chunk[:-1] + b',"usage":null}\n\n'
    return b"data: " + chunk + b"\n\n"


def _synthesized_choices(entry: CachedEntry) -> Iterator[_Json]:
    """Stream choices, one per chunk, that assemble back into the entry's choices."""
    for choice in entry.response.get("choices") or ():
        index = choice.get("index", 0)
        logprobs = choice.get("logprobs")
        whole = logprobs is not None  # one piece of text, so its logprobs stay unsplit
        if entry.kind == "chat":
            parts: list[_Json] = [
                {"delta": d} for d in _chat_deltas(choice.get("message") or {}, whole)
            ]
            end: _Json = {"delta": {}}
        else:
            text = choice.get("text") or ""
            parts = [{"text": piece} for piece in ([text] if whole else _pieces(text))]
            end = {"text": ""}
        for position, part in enumerate(parts):
            first_logprobs = logprobs if position == 0 else None
            yield {"index": index, **part, "logprobs": first_logprobs, "finish_reason": None}
        extras = {k: v for k, v in choice.items() if k not in _CHOICE_KEYS}
        yield {
            "index": index,
            **end,
            "logprobs": None,
            **extras,
            "finish_reason": choice.get("finish_reason"),
        }


def _chat_deltas(message: Mapping[str, Any], whole: bool) -> Iterator[_Json]:
    content = message.get("content")
    split = isinstance(content, str) and bool(content) and not whole
    first: _Json = {"role": message.get("role") or "assistant", "content": "" if split else content}
    later: list[_Json] = []
    for name, value in message.items():
        if name in ("role", "content", "tool_calls"):
            continue
        if isinstance(value, str):
            later.append({name: value})  # refusal, reasoning_content: whole, before content
        else:
            first[name] = value  # null refusal, annotations, audio: with the role
    yield first
    yield from later
    if split:
        yield from ({"content": piece} for piece in _pieces(str(content)))
    for index, call in enumerate(message.get("tool_calls") or ()):
        yield {"tool_calls": [{"index": index, **call}]}


def _pieces(text: str) -> list[str]:
    pieces, current = [], ""
    for word in _WORDS.findall(text):
        current += word
        if len(current) >= _PIECE_CHARS:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces
