"""One request being dispatched, and each of its sends: the state the race and the
bookkeeping share."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

from gateway.api.request import ParsedRequest
from gateway.api.schemas import UPSTREAM_PATHS
from gateway.backend_api import API_PATHS, mode
from gateway.backend_api.messages_request import messages_request
from gateway.backend_api.native import native_body
from gateway.backend_api.responses_request import responses_request
from gateway.dispatch.settings import TierRules
from gateway.errors import TriageError, UpstreamStatus, UpstreamTimeout
from gateway.pools import Pool
from gateway.replica import Progress, Replica
from gateway.request_view import RequestView
from gateway.slo import Deadline, Priority
from gateway.telemetry.tracing import NOOP_TRACE, RequestTrace, Span
from gateway.upstream import UpstreamResponse

__all__ = ["OUTCOME", "Attempt", "Job", "Started", "client_fault", "late_answer"]

# The attribute on each send's span that says how it ended: answered (the winner, to its
# last byte), failed, client_closed (the winner, cut off by the client), lost (answered
# after another send had won), cancelled (no answer yet when the request stopped waiting).
OUTCOME = "triage.attempt.outcome"
_EXPLORE_AFTER_S: dict[Priority, float] = {
    "critical": 60.0,
    "standard": 60.0,
    "sheddable": 10.0,
}


@dataclass(eq=False, slots=True)
class Job:
    """One request on its way to a replica: where it may go, by when, and what it cost."""

    tier: str
    options: list[tuple[str, Pool]]
    parsed: ParsedRequest
    headers: Mapping[str, str]
    deadline: Deadline
    priority: Priority
    rules: TierRules
    view: RequestView  # what the balancer sees of it (`Pool.pick`)
    max_tokens_cap: int | None = None  # sent when the client set none (a budget's cap)
    trace: RequestTrace = NOOP_TRACE  # each send is a span of the request's trace
    hedged: bool = False
    retries: int = 0
    # Where it got an answered 5xx (see `Books.attempt_failed`): its retries stay in that pool.
    answered_in: tuple[str, Pool] | None = None
    # The replica whose 5xx answer that was: forgiven if another replica answers the same.
    errored_on: Replica | None = None
    last_sent: Attempt | None = None  # a failure no send claimed (a timeout) is put on it
    _bodies: dict[tuple[str, str], bytes] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return self.parsed.stream

    @property
    def max_tokens(self) -> int | None:
        """The output limit the backend is sent: the client's, else the budget's cap."""
        limit = self.parsed.max_tokens
        return self.max_tokens_cap if limit is None else limit

    @property
    def explore(self) -> float:
        """After how long idle a replica's estimates fade for this request (see `predict`):
        the replica left alone because it looked slow is re-tried with the least important
        requests first, with the others after a long while."""
        return _EXPLORE_AFTER_S[self.priority]

    def body(self, pool: Pool) -> bytes:
        """What `pool` is sent: built once per served name and API, as each pool speaks
        (`gateway.backend_api`); a field its API cannot carry raises the client's 400."""
        key = (pool.served_name, pool.api)
        body = self._bodies.get(key)
        if body is None:
            body = self._build(pool)
            self._bodies[key] = body
        return body

    def path(self, pool: Pool) -> str:
        """Where under a replica's base URL the request goes for `pool`."""
        if pool.api == "chat":
            return UPSTREAM_PATHS[self.parsed.kind]
        return API_PATHS[pool.api]

    def _build(self, pool: Pool) -> bytes:
        parsed, served = self.parsed, pool.served_name
        how = mode(pool.api, parsed.dialect)
        if how == "chat":
            return parsed.upstream_body(served, self.max_tokens_cap)
        if how == "native":
            assert parsed.native_body is not None, "a dialect's request keeps its own body"
            return native_body(pool.api, parsed.native_body, served, self.max_tokens_cap)
        if pool.api == "messages":
            return messages_request(parsed.body, served, self.max_tokens)
        return responses_request(parsed.body, served, self.max_tokens)


@dataclass(eq=False, slots=True)
class Attempt:
    """One send of a job to one replica."""

    tier: str
    pool: Pool
    replica: Replica
    probe: bool
    queued: bool  # the replica was full when this was sent: its TTFT includes a queue
    progress: Progress
    span: Span  # ended with the send's outcome, in its `OUTCOME` attribute

    @property
    def sent_at(self) -> float:
        return self.progress.sent_at


@dataclass(eq=False, slots=True)
class Started:
    """A send that got its first byte: the response, and for a stream its first event."""

    response: UpstreamResponse
    first_event: bytes | None
    events: AsyncGenerator[bytes, None] | None
    first_byte_at: float


def client_fault(error: TriageError) -> bool:
    return (
        isinstance(error, UpstreamStatus) and error.status_code < 500 and error.status_code != 429
    )


def late_answer() -> UpstreamTimeout:
    return UpstreamTimeout("The backend replica did not finish the answer before its deadline.")
