"""What replica choice may know of a request: a small, read-only view the balancer gets.

Today's balancers (`Pool.pick`) choose by load and predicted latency alone; the view is
where a request-aware one (session affinity, prefix-cache locality) finds what it keys on,
without the race that sends the request having to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.api.request import ParsedRequest

__all__ = ["RequestView", "session_key"]


@dataclass(frozen=True, slots=True, eq=False)
class RequestView:
    """One request as a balancer sees it. `prefix` is for a prefix key (a hash of the
    prompt's start), left None until a balancer wants one."""

    tier: str
    parsed: ParsedRequest
    session: str | None = None
    prefix: str | None = None

    @property
    def prompt_tokens(self) -> int:
        """An estimate, counted only when a balancer asks."""
        return self.parsed.estimated_prompt_tokens()


def session_key(parsed: ParsedRequest) -> str | None:
    """The client's session: its `x-session-id` header (read at the edge, in
    `parsed.hints`), else the body's `user`."""
    if parsed.hints.session is not None:
        return parsed.hints.session
    user = parsed.body.get("user")
    return user if isinstance(user, str) and user else None
