"""What replica choice may know of a request: a small view the balancer gets.

The balancers (`Pool.pick`) find here what a request-aware one keys on (its session, its
prompt's prefix keys), without the race that sends the request having to change. The
prefix keys are computed once, on the first pick that asks, and shared by its retries
and hedges; the view also keeps what each pick found, for the request's record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.api.request import ParsedRequest
from gateway.prefix import SessionSource, chunk_keys, render_chat

__all__ = ["RequestView", "client_session", "session_key"]


@dataclass(frozen=True, slots=True, eq=False)
class RequestView:
    """One request as a balancer sees it. `matched` holds, per replica URL it was sent to
    by the prefix balancer, the prompt characters that balancer expected cached there."""

    tier: str
    parsed: ParsedRequest
    session: str | None = None
    matched: dict[str, int] = field(default_factory=dict)
    _keys: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def prompt_tokens(self) -> int:
        """An estimate, counted only when a balancer asks."""
        return self.parsed.estimated_prompt_tokens()

    def prefix_keys(self, chunk_chars: int) -> list[int]:
        """The prompt's chained chunk keys (`gateway.prefix`), computed on first use."""
        keys = self._keys.get(chunk_chars)
        if keys is None:
            keys = self._keys[chunk_chars] = chunk_keys(render_chat(self.parsed.body), chunk_chars)
        return keys

    def session_from(self, source: SessionSource) -> str | None:
        """The session key `source` says to trust: `any` is the `session` the edge read."""
        if source == "any":
            return self.session
        if source == "client":
            return client_session(self.parsed)
        if source == "user":
            return _user(self.parsed)
        return None


def session_key(parsed: ParsedRequest) -> str | None:
    """The request's session: the one its client names, else its end user."""
    return client_session(parsed) or _user(parsed)


def client_session(parsed: ParsedRequest) -> str | None:
    """The session a client names: its `x-session-id` header (read at the edge, in
    `parsed.hints`), else the body's `prompt_cache_key` (OpenAI's field for exactly this;
    Codex sends its conversation id there), else the stored Responses conversation the
    request continues (each turn's `previous_response_id` is new; the conversation is not).
    """
    if parsed.hints.session is not None:
        return parsed.hints.session
    body = parsed.native_body if parsed.native_body is not None else parsed.body
    key = body.get("prompt_cache_key")
    if isinstance(key, str) and key:
        return key
    return parsed.conversation


def _user(parsed: ParsedRequest) -> str | None:
    user = parsed.body.get("user")
    return user if isinstance(user, str) and user else None
