"""One cached response, stored in a form that replays both as a JSON body and as a stream.

An entry always holds the complete (non-stream) response. When the original was streamed
it also holds its chunks, ready to send and compact: the fields every chunk shares (id,
created, model, ...) once as `envelope`, then one line per chunk, serialized without
`usage`. A line that starts with `,` holds the chunk's own fields (its `choices`, mostly)
and follows the envelope's JSON minus its closing brace; a line that starts with `{` is
a whole chunk (one whose shared fields differ). Stored, it is one JSON header line (kind,
model, response, envelope) followed by the chunk lines, so a JSON hit parses only the
header and a stream hit parses nothing. A stream that did not end with `[DONE]`, carried
an error, or left a choice without a `finish_reason` never becomes an entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.api.schemas import RequestKind

__all__ = [
    "CachedEntry",
    "CachedUsage",
    "assemble_chunks",
    "decode_entry",
    "encode_entry",
    "entry_from_body",
    "entry_from_stream",
]

_FORMAT_VERSION = 1
_KINDS: frozenset[str] = frozenset({"chat", "completions", "embeddings"})
# A choice that ended like this was cut short: never an answer to replay.
_UNFINISHED = frozenset({None, "abort", "error"})
_OBJECTS = {"chat": "chat.completion", "completions": "text_completion"}
_MISSING = object()

_Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CachedUsage:
    """The tokens the original request consumed: what a hit saves."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """A stored response. Read `usage` and `model`; hand the rest to `replay`."""

    kind: RequestKind
    model: str
    stored_at: float  # unix time
    response: Mapping[str, Any]
    envelope: Mapping[str, Any] | None = None  # these two when the original was streamed
    chunk_lines: bytes | None = None

    def stream_chunks(self) -> list[bytes] | None:
        """The original stream's chunks, each a JSON object without `usage`, if it was one."""
        if self.envelope is None or self.chunk_lines is None:
            return None
        prefix = orjson.dumps(self.envelope)[:-1]  # `{"id":...,"model":"m"`: a line follows
        return [
            line if line.startswith(b"{") else prefix + line
            for line in self.chunk_lines.split(b"\n")
        ]

    @property
    def usage(self) -> CachedUsage | None:
        usage = self.response.get("usage")
        if not isinstance(usage, Mapping):
            return None
        prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        total = _int(usage.get("total_tokens")) or prompt + completion
        return CachedUsage(prompt, completion, total)


def entry_from_body(kind: RequestKind, model: str, body: bytes, now: float) -> CachedEntry | None:
    """An entry from a non-stream response body, or None if it is not a complete answer."""
    try:
        response = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(response, dict) or "error" in response:
        return None
    if kind == "embeddings":
        answered = isinstance(response.get("data"), list)
    else:
        answered = _all_finished(response.get("choices"))
    return CachedEntry(kind, model, now, response) if answered else None


def entry_from_stream(
    kind: RequestKind,
    model: str,
    events: Iterable[bytes],
    usage: Mapping[str, Any] | None,
    now: float,
) -> CachedEntry | None:
    """An entry from the `data:` payloads of a stream that ended with `[DONE]` (excluded).

    `usage` stands in when the stream's usage chunk was not relayed (the client did
    not ask for it).
    """
    if kind not in _OBJECTS:
        return None
    chunks: list[_Json] = []
    for data in events:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
            return None
        if chunk.get("usage"):
            usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return None
        if choices or not chunk.get("usage"):  # the usage-only chunk is rebuilt on replay
            chunks.append(chunk)
    if not chunks:
        return None
    response = assemble_chunks(kind, chunks, usage)
    if not _all_finished(response["choices"]):
        return None
    envelope = {k: v for k, v in chunks[0].items() if k not in ("choices", "usage")}
    lines = b"\n".join(_chunk_line(envelope, chunk) for chunk in chunks)
    return CachedEntry(kind, model, now, response, envelope, lines)


def _chunk_line(envelope: Mapping[str, Any], chunk: Mapping[str, Any]) -> bytes:
    own = {k: v for k, v in chunk.items() if k != "usage"}
    if envelope and all(own.get(k, _MISSING) == v for k, v in envelope.items()):
        rest = {k: v for k, v in own.items() if k not in envelope}
        if rest:
            return b"," + orjson.dumps(rest)[1:]
    return orjson.dumps(own)  # compact JSON never contains a raw newline


def assemble_chunks(
    kind: RequestKind, chunks: Iterable[Mapping[str, Any]], usage: Mapping[str, Any] | None
) -> _Json:
    """The non-stream response a stream of chunks adds up to (content, tool calls, logprobs)."""
    first: Mapping[str, Any] | None = None
    choices: dict[int, _Json] = {}
    for chunk in chunks:
        first = first or chunk
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            state = choices.get(index)
            if state is None:
                state = choices[index] = _empty_choice(kind, index)
            _merge_choice(kind, state, choice)
    response: _Json = {k: v for k, v in (first or {}).items() if k not in ("choices", "usage")}
    response["object"] = _OBJECTS[kind]
    response["choices"] = [_finish_choice(kind, choices[i]) for i in sorted(choices)]
    if usage:
        response["usage"] = dict(usage)
    return response


def encode_entry(entry: CachedEntry) -> bytes:
    header = orjson.dumps(
        {
            "v": _FORMAT_VERSION,
            "kind": entry.kind,
            "model": entry.model,
            "stored_at": entry.stored_at,
            "response": entry.response,
            "envelope": entry.envelope,
        }
    )
    return header if entry.chunk_lines is None else header + b"\n" + entry.chunk_lines


def decode_entry(raw: bytes) -> CachedEntry | None:
    """None for anything that is not an entry of this format version (treat as a miss)."""
    header, streamed, lines = raw.partition(b"\n")
    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        data = orjson.loads(header)
        envelope = data["envelope"]
        if (
            data["v"] == _FORMAT_VERSION
            and data["kind"] in _KINDS
            and (envelope is None or isinstance(envelope, dict))
            and bool(streamed) == bool(lines)
        ):
            return CachedEntry(
                kind=data["kind"],
                model=str(data["model"]),
                stored_at=float(data["stored_at"]),
                response=dict(data["response"]),
                envelope=envelope,
                chunk_lines=lines if streamed else None,
            )
    return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _all_finished(choices: object) -> bool:
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") not in _UNFINISHED for c in choices)


def _empty_choice(kind: RequestKind, index: int) -> _Json:
    if kind == "chat":
        return {"index": index, "message": {}, "logprobs": None, "finish_reason": None}
    return {"index": index, "text": "", "logprobs": None, "finish_reason": None}


def _merge_choice(kind: RequestKind, state: _Json, choice: Mapping[str, Any]) -> None:
    for name, value in choice.items():
        if name == "index":
            continue
        if name == "delta" and kind == "chat":
            _merge_delta(state["message"], value or {})
        elif name == "text" and kind == "completions":
            state["text"] += value or ""
        elif name == "logprobs":
            state["logprobs"] = _merge_logprobs(state["logprobs"], value)
        elif value is not None:
            state[name] = value  # finish_reason, stop_reason, ...: the last one given
        else:
            state.setdefault(name, None)


def _merge_delta(message: _Json, delta: Mapping[str, Any]) -> None:
    """Strings concatenate (content, refusal, reasoning, arguments); tool calls by index."""
    for name, value in delta.items():
        if name == "tool_calls":
            calls = message.setdefault("tool_calls", {})
            for fragment in value or ():
                index = int(fragment.get("index", len(calls)))
                _merge_delta(calls.setdefault(index, {}), fragment)
        elif name in ("role", "index", "type", "id"):
            if value is not None:
                message[name] = value
            else:
                message.setdefault(name, None)
        elif isinstance(value, str):
            message[name] = (message.get(name) or "") + value
        elif isinstance(value, Mapping):
            nested = message.get(name)
            if not isinstance(nested, dict):
                nested = message[name] = {}
            _merge_delta(nested, value)
        elif value is not None or name not in message:
            message[name] = value


def _merge_logprobs(total: Any, part: Any) -> Any:
    # Chat: {"content": [...], "refusal": [...]}; completions: {"tokens": [...], ...}.
    if not isinstance(part, Mapping):
        return total
    merged = dict(total) if isinstance(total, Mapping) else {}
    for name, value in part.items():
        if isinstance(value, list) and isinstance(merged.get(name), list):
            merged[name] = merged[name] + value
        elif value is not None or name not in merged:
            merged[name] = list(value) if isinstance(value, list) else value
    return merged


def _finish_choice(kind: RequestKind, state: _Json) -> _Json:
    if kind != "chat":
        return state
    message = state["message"]
    calls = message.pop("tool_calls", None)
    ordered: _Json = {"role": message.pop("role", None) or "assistant"}
    ordered["content"] = message.pop("content", None)
    ordered.update(message)
    if calls:
        ordered["tool_calls"] = [
            {k: v for k, v in calls[i].items() if k != "index"} for i in sorted(calls)
        ]
    state["message"] = ordered
    return state
