"""Client dialects other than OpenAI's chat completions: Anthropic's Messages API and
OpenAI's Responses API.

A dialect is a translation at the edge, nothing more. Its request becomes a chat
completions body (`Dialect.parse`), which routing, the cache, budgets and dispatch read
as they read any chat request; the chat answer, JSON or stream, becomes the dialect's
answer again (`Translation`) just before it is sent. The cache stores the chat answer,
so a hit is translated the same way a fresh answer is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import TriageError

__all__ = ["Dialect", "DialectContext", "ErrorAnswer", "Translation"]


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error as the dialect's clients expect it: status, JSON body, extra headers."""

    status: int
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class DialectContext:
    """What a dialect may need beyond the body: who is calling (to scope stored state
    to the tenant), the request id (the answer's id is derived from it), and the context
    edits the gateway applied to a Messages request (its answer reports them)."""

    request_id: str
    scope: str
    context_edits: list[dict[str, Any]] | None = None


class Translation(Protocol):
    """One request's answer rendered in its client's dialect."""

    def json(self, chat: bytes) -> bytes:
        """A whole chat completion (OpenAI JSON) as the dialect's response body."""

    def events(self, chat_events: bytes) -> bytes:
        """One batch of chat completion SSE events (`data: {...}\\n\\n` each, possibly
        `data: [DONE]\\n\\n` last) as the dialect's SSE bytes; b"" when nothing is due."""

    def error_event(self, error: TriageError) -> bytes:
        """The dialect's last event(s) for a stream that failed after it started."""


class Dialect(Protocol):
    name: str  # "messages" | "responses": part of the cache key and telemetry

    def parse(self, body: dict[str, Any]) -> dict[str, Any]:
        """The client's JSON object, checked, as a chat completions body. Raises
        `InvalidRequest` naming the field (`param`) for anything it cannot honour."""

    def translation(self, body: Mapping[str, Any], context: DialectContext) -> Translation:
        """The renderer for this request's answer (`body` as the client sent it)."""

    def error(self, error: TriageError) -> ErrorAnswer:
        """A gateway error in the dialect's error shape and status."""
