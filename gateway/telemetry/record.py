"""`RequestRecord`: what one request did, filled in by the request path and handed over once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gateway.errors import ClientClosedRequest, TriageError
from gateway.telemetry.tracing import NOOP_TRACE, RequestTrace

if TYPE_CHECKING:
    from gateway.api.request import ParsedRequest
    from gateway.router import Decision
    from gateway.upstream import Outcome

__all__ = ["CLIENT_CLOSED", "CacheResult", "RequestRecord"]

CacheResult = Literal["hit", "miss", "bypass"]
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer"


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One request, from arrival to its last byte. `Telemetry.start` makes it.

    Times are `time.perf_counter()` readings; the helpers copy what the request path
    already holds (`ParsedRequest`, `Decision`, `Outcome`) so the handler stays short.
    """

    request_id: str
    operation: str  # chat | completions | embeddings
    trace: RequestTrace = NOOP_TRACE
    trace_id: str | None = None
    started_at: float = field(default_factory=time.perf_counter)
    tenant: str | None = None
    requested_model: str | None = None
    api: str = "chat"  # the client's API: chat | messages | responses (gateway.dialects)
    stream: bool = False
    body: Mapping[str, Any] | None = field(default=None, repr=False)
    decided_tier: str | None = None  # the router's choice
    decided_model: str | None = None  # its first model
    decision_reason: str | None = None  # model | tier | header | rule:N | classifier | default
    difficulty: float | None = None
    budget_downgraded: bool = False  # the budget moved the request off `decided_tier`
    # The tier, the policy's model name and the replica's base URL that served it; of a
    # request that failed after routing, those it failed at (see `fail`).
    tier: str | None = None
    model: str | None = None
    replica: str | None = None
    cache: CacheResult = "bypass"
    status: int = 200
    error_code: str | None = None  # the OpenAI `code` the client was answered with
    error_type: str | None = None  # and its OpenAI `type`
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_source: str | None = None  # backend | tokenized | estimated (gateway/tokenize.py)
    cost_usd: float = 0.0
    saved_usd: float = 0.0  # a cache hit: what the cached answer cost when it was made
    first_token_at: float | None = None
    ended_at: float | None = None
    finish_reasons: tuple[str, ...] = ()
    retries: int = 0
    hedges: int = 0
    # Prompt characters the prefix balancer expected cached on the replica (None: not chosen
    # by it), to compare with the backend's own prefix-cache hits.
    prefix_chars: int | None = None
    shed: bool = False
    completion_text: str | None = field(default=None, repr=False)  # only if prompts are logged
    response_body: bytes | None = field(default=None, repr=False)  # non-streamed reply, ditto

    # --- helpers for the request path ----------------------------------------------------

    def requested(self, parsed: ParsedRequest) -> None:
        self.requested_model = parsed.model
        self.api = parsed.dialect
        self.stream = parsed.stream
        self.body = parsed.body

    def routed(self, decision: Decision) -> None:
        self.decided_tier = decision.tier
        self.decided_model = decision.model if decision.candidates else None
        self.decision_reason = decision.reason
        self.difficulty = decision.difficulty

    def served(self, tier: str, model: str, replica_url: str) -> None:
        self.tier = tier
        self.model = model
        self.replica = replica_url

    def add_outcome(self, outcome: Outcome) -> None:
        """Copy an upstream exchange's usage and timing; a stream cut short counts as failed."""
        self.prompt_tokens = outcome.prompt_tokens
        self.completion_tokens = outcome.completion_tokens
        self.usage_source = outcome.usage_source
        self.first_token_at = outcome.first_token_at
        self.finish_reasons = outcome.finish_reasons
        if outcome.error is not None:
            self.fail(outcome.error)
        elif not outcome.completed and self.status < 400:
            self._client_closed()

    def fail(self, error: BaseException) -> None:
        """Record the error the client was answered with (or the one that ended the request)
        as its status, OpenAI `code` and `type`. A request routed but not served is put on
        where it failed: the tier, model and replica the error names, else the decision's."""
        if self.tier is None and self.decided_tier is not None:
            if isinstance(error, TriageError) and error.tier is not None:
                self.tier, self.model, self.replica = error.tier, error.model, error.replica
            else:
                self.tier, self.model = self.decided_tier, self.decided_model
        if isinstance(error, TriageError):
            self.status = error.status_code
            self.error_code = error.code
            self.error_type = error.error_type
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            self._client_closed()
        else:  # a bug: answered as gateway/app.py's `internal_error`
            self.status = 500
            self.error_code = "internal_error"
            self.error_type = "api_error"

    def _client_closed(self) -> None:
        self.status = CLIENT_CLOSED
        self.error_code = ClientClosedRequest.default_code
        self.error_type = ClientClosedRequest.error_type

    # --- derived figures -------------------------------------------------------------------

    @property
    def e2e_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first token: the client's wait (for non-streamed replies, the whole body)."""
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def inter_token_s(self) -> float | None:
        """Mean time per output token after the first, for streams (GenAI's definition)."""
        if (
            not self.stream
            or self.first_token_at is None
            or self.ended_at is None
            or self.completion_tokens < 2
        ):
            return None
        return (self.ended_at - self.first_token_at) / (self.completion_tokens - 1)
