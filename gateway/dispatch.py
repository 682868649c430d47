"""Getting one request answered: SLO admission, tier fallback, replica choice, retries, hedging."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import aiohttp

from gateway.api.request import ParsedRequest
from gateway.api.schemas import UPSTREAM_PATHS
from gateway.errors import (
    RateLimited,
    TriageError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pools import Balancer, Budget, Pool, Progress, Replica
from gateway.router import Decision
from gateway.slo import (
    Deadline,
    LatencyTracker,
    Priority,
    RatioBudget,
    SloTarget,
    WaitingRoom,
    request_priority,
    request_target,
)
from gateway.telemetry.tracing import NOOP_TRACE, AttemptKind, RequestTrace, Span
from gateway.upstream import ConnectFailed, Outcome

__all__ = ["SHED_CODES", "DispatchSettings", "Dispatched", "Dispatcher", "Sender", "TierRules"]

# The error codes of requests refused on purpose: 429 over capacity, 503 deadline passed.
SHED_CODES = frozenset({"over_capacity", "deadline_expired"})

_T = TypeVar("_T")
# A waiting request re-checks the pools this often even without a wake-up: load reports
# and latency estimates change without any request finishing.
_RECHECK_S = 0.025
# Stream events per inter-token latency sample.
_ITL_SAMPLE_EVENTS = 8
_COALESCED_S = 0.0005
# The attribute on each send's span that says how it ended: answered (the winner, to its
# last byte), failed, client_closed (the winner, cut off by the client), lost (answered
# after another send had won), cancelled (no answer yet when the request stopped waiting).
_OUTCOME = "triage.attempt.outcome"
_EXPLORE_AFTER_S: dict[Priority, float] = {
    "critical": 60.0,
    "standard": 60.0,
    "sheddable": 10.0,
}


class Sender(Protocol):
    """What dispatching needs from `upstream.Upstream`."""

    async def post(
        self, pool: Pool, replica: Replica, path: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse: ...

    def events(
        self, replica: Replica, response: aiohttp.ClientResponse
    ) -> AsyncGenerator[bytes, None]: ...


@dataclass(frozen=True, slots=True)
class TierRules:
    """What the policy says about the requests routed to one tier.

    A request goes to the first of its tier's models, then its fallback tiers' models,
    predicted to meet its SLO. When none is: a critical request goes at once to the one
    predicted fastest; a standard one waits up to `max_queue_s` for capacity (a sheddable
    one does not wait); then, with `shed`, it is refused with 429 (or 503 when its TTFT
    deadline passed while it waited), and without, it goes to the one predicted fastest.
    """

    target: SloTarget | None = None
    max_queue_s: float = 0.5
    shed: bool = True
    # Sending a request twice is harmless: hedging is allowed, and retries after 5xx.
    idempotent: bool = True


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Balancing and resilience settings; the baselines (`least_outstanding`, `round_robin`)
    send each request once, to one replica, with no SLO admission, hedging or retries."""

    balancer: Balancer = "slo"
    tiers: Mapping[str, TierRules] = field(default_factory=dict)
    max_attempts: int = 3  # sends of one request before the first byte, hedges excluded
    retry_ratio: float = 0.1  # retries per request, at most, over the last 10 s
    retry_floor_per_s: float = 1.0
    hedge: bool = True
    hedge_ratio: float = 0.05  # hedged requests per request, at most, over the last 10 s
    hedge_floor_per_s: float = 0.2
    min_hedge_delay_s: float = 0.02
    timeout_factor: float = 2.0  # upstream timeouts, as a multiple of the SLO's times
    # Admission wants a prediction within this share of the time left: predictions are
    # averages, and a request that only just fits on average misses half the time.
    headroom: float = 0.85
    sheddable_headroom: float = 0.7  # less for sheddable requests: they go first
    # Share of each replica's slots that only critical requests may be admitted into: a
    # critical request that arrives in a burst finds one free.
    critical_reserve: float = 0.2


@dataclass(eq=False, slots=True)
class _Job:
    tier: str
    options: list[tuple[str, Pool]]
    parsed: ParsedRequest
    headers: Mapping[str, str]
    deadline: Deadline
    priority: Priority
    rules: TierRules
    max_tokens_cap: int | None = None  # sent when the client set none (a budget's cap)
    trace: RequestTrace = NOOP_TRACE  # each send is a span of the request's trace
    hedged: bool = False
    retries: int = 0
    # Where it got an answered 5xx (see `_attempt_failed`): its retries stay in that pool.
    answered_in: tuple[str, Pool] | None = None
    last_sent: _Attempt | None = None  # a failure no send claimed (a timeout) is put on it
    _bodies: dict[str, bytes] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return self.parsed.stream

    @property
    def max_tokens(self) -> int | None:
        body = self.parsed.body
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is None:
            limit = self.max_tokens_cap
        return limit if isinstance(limit, int) and limit > 0 else None

    @property
    def explore(self) -> float:
        """After how long idle a replica's estimates fade for this request (see `predict`):
        the replica left alone because it looked slow is re-tried with the least important
        requests first, with the others after a long while."""
        return _EXPLORE_AFTER_S[self.priority]

    def body(self, pool: Pool) -> bytes:
        body = self._bodies.get(pool.served_name)
        if body is None:
            body = self.parsed.upstream_body(pool.served_name, self.max_tokens_cap)
            self._bodies[pool.served_name] = body
        return body


@dataclass(eq=False, slots=True)
class _Attempt:
    tier: str
    pool: Pool
    replica: Replica
    probe: bool
    queued: bool  # the replica was full when this was sent: its TTFT includes a queue
    progress: Progress
    span: Span  # ended with the send's outcome, in its `_OUTCOME` attribute

    @property
    def sent_at(self) -> float:
        return self.progress.sent_at


@dataclass(eq=False, slots=True)
class _Started:
    response: aiohttp.ClientResponse
    first_event: bytes | None
    events: AsyncGenerator[bytes, None] | None
    first_byte_at: float


@dataclass(eq=False, slots=True)
class Dispatched:
    """The replica that answered and its response, headers read (for streams, the first
    event too). Call `finish(outcome)` exactly once when the response is done with, even
    when it failed or the client left: it frees the replica and records the latency."""

    tier: str  # the tier that serves it: the routed tier or one of its fallbacks
    pool: Pool
    replica: Replica
    response: aiohttp.ClientResponse
    hedged: bool
    attempts: int  # sends of this request: the first, retries and hedges
    _dispatcher: Dispatcher = field(repr=False)
    _job: _Job = field(repr=False)
    _attempt: _Attempt = field(repr=False)
    _started: _Started = field(repr=False)
    _finished: bool = field(default=False, repr=False)

    @property
    def retries(self) -> int:
        """Sends after the first that were not hedges."""
        return self._job.retries

    def events(self) -> AsyncIterator[bytes]:
        """The stream's events, starting with the one already read; for `Upstream.relay`.

        A stream that outlives the request's e2e timeout ends with `UpstreamTimeout`.
        """
        started = self._started
        assert started.events is not None and started.first_event is not None, "not a stream"
        return self._relay(started.first_event, started.events)

    async def _relay(
        self, first: bytes, events: AsyncGenerator[bytes, None]
    ) -> AsyncIterator[bytes]:
        timeout_at = self._job.deadline.e2e_timeout_at
        replica = self.replica
        progress = self._attempt.progress
        last = self._started.first_byte_at
        paced, paced_s = 0, 0.0
        try:
            progress.events = 1
            yield first
            while True:
                remaining = timeout_at - time.monotonic()
                try:
                    async with asyncio.timeout(
                        None if remaining == math.inf else max(remaining, 0)
                    ):
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    raise _late_answer() from exc
                now = time.monotonic()
                # Events that come together (the role and first token, the finish and the
                # usage) are one decode step: count paced events only, in ITLs and lengths.
                if now - last >= _COALESCED_S:
                    progress.events += 1
                    paced += 1
                    paced_s += now - last
                    last = now
                if paced >= _ITL_SAMPLE_EVENTS:
                    # Learn the decode speed as it streams, not when the answer ends: a
                    # replica that turned slow is avoided a second later, not a minute.
                    replica.observe(now, itl_s=paced_s / paced)
                    paced, paced_s = 0, 0.0
                yield event
        finally:
            await events.aclose()

    async def within_deadline(self, work: Awaitable[_T]) -> _T:
        """`work` (reading a non-streamed body), cut off at the request's e2e timeout."""
        remaining = self._job.deadline.e2e_timeout_at - time.monotonic()
        if remaining == math.inf:
            return await work
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await work
        except TimeoutError as exc:
            raise _late_answer() from exc

    def finish(self, outcome: Outcome) -> None:
        if not self._finished:
            self._finished = True
            self._dispatcher._finish(self, outcome)


class Dispatcher:
    """Sends requests to pools on behalf of the app; one per runtime (policy)."""

    def __init__(
        self,
        pools: Mapping[str, Pool],
        sender: Sender,
        settings: DispatchSettings,
        tracker: LatencyTracker | None = None,
    ) -> None:
        self.pools = pools
        self.sender = sender
        self.settings = settings
        targets = {name: rules.target for name, rules in settings.tiers.items()}
        self.tracker = tracker if tracker is not None else LatencyTracker(targets)
        self.room = WaitingRoom()
        self._retries = RatioBudget(settings.retry_ratio, settings.retry_floor_per_s)
        self._hedges = RatioBudget(settings.hedge_ratio, settings.hedge_floor_per_s)

    async def dispatch(
        self,
        decision: Decision,
        parsed: ParsedRequest,
        client_headers: Mapping[str, str],
        forward_headers: Mapping[str, str],
        tenant_priority: Priority = "standard",
        started: float | None = None,
        max_tokens_cap: int | None = None,
        trace: RequestTrace = NOOP_TRACE,
    ) -> Dispatched:
        """Send the request and return the first replica to answer, or raise a TriageError.

        `started` is when the request arrived (`time.monotonic()`); its deadlines count
        from then. `max_tokens_cap` is sent as `max_tokens` when the client set none.
        Each send (the first, retries, hedges) is a span of `trace`, and carries that
        span's `traceparent` to the backend. Bad `x-slo-*` / `x-triage-priority` headers
        raise `InvalidRequest`.
        """
        now = time.monotonic()
        rules = self.settings.tiers.get(decision.tier, TierRules())
        slo = self.settings.balancer == "slo"
        job = _Job(
            tier=decision.tier,
            options=[(tier, self.pools[model]) for tier, model in decision.candidates],
            parsed=parsed,
            headers=forward_headers,
            deadline=Deadline(
                now if started is None else started,
                request_target(rules.target, client_headers),
                self.settings.timeout_factor if slo else math.inf,
            ),
            priority=request_priority(client_headers, tenant_priority),
            rules=rules,
            max_tokens_cap=max_tokens_cap,
            trace=trace,
        )
        try:
            if not slo:
                return await self._send_once(job)
            self._retries.deposit(now)
            self._hedges.deposit(now)
            tier, pool = await self._admit(job)
            return await self._send(job, tier, pool)
        except TriageError as error:
            self._refused(job, error)
            raise

    # --- admission: which tier, or wait, or refuse -----------------------------------

    async def _admit(self, job: _Job) -> tuple[str, Pool]:
        waiter = None
        try:
            while True:
                now = time.monotonic()
                live = _live(job.options, now)
                if not live:
                    raise UpstreamUnavailable(
                        f"No healthy replica for tier '{job.tier}'.", code="no_healthy_replica"
                    )
                if job.deadline.target is None:
                    return live[0]
                budget = self._budget(job)
                assert budget is not None
                if waiter is None or self.room.may_go(waiter):
                    for tier, pool in live:
                        prediction = pool.predict(now, budget, explore=job.explore)
                        if prediction is not None and prediction.fits(budget):
                            return tier, pool
                    # Nothing is predicted to fit, but a prediction alone never keeps work
                    # from an idle replica it cannot vouch for: the request re-measures it.
                    for tier, pool in live:
                        if pool.probe_target(now) is not None:
                            return tier, pool
                if job.priority == "critical" or not job.rules.shed:
                    # Critical requests are never shed while any tier can serve them.
                    return _fastest(live, now, job, budget)
                queue_until = min(
                    job.deadline.started + job.rules.max_queue_s, job.deadline.ttft_at
                )
                full = waiter is None and self.room.full()
                if job.priority == "sheddable" or now >= queue_until or full:
                    raise _refusal(job, now, live)
                if waiter is None:
                    waiter = self.room.enter(job.priority, (pool for _, pool in live))
                await self.room.wait(waiter, min(queue_until - now, _RECHECK_S))
        finally:
            if waiter is not None:
                self.room.leave(waiter)

    # --- sending: retries before the first byte, hedging -----------------------------

    async def _send(self, job: _Job, tier: str, pool: Pool) -> Dispatched:
        race: dict[asyncio.Task[_Started], _Attempt] = {}
        tried: list[Replica] = []
        last_error: TriageError | None = None
        replica = (
            pool.pick(budget=self._budget(job), explore=job.explore)
            or pool.probe_target(time.monotonic())
            or pool.pick()
        )
        if replica is None:  # it went down since admission
            raise UpstreamUnavailable(
                f"No healthy replica for tier '{job.tier}'.", code="no_healthy_replica"
            )
        self._start(job, tier, pool, replica, race, tried)
        hedge_at = self._hedge_at(job, tier, time.monotonic())
        timeout_at = job.deadline.first_byte_timeout_at(job.stream)
        try:
            while True:
                if not race:
                    target = self._retry_target(job, tried, last_error)
                    if target is None:
                        assert last_error is not None
                        raise last_error
                    job.retries += 1
                    self._start(job, *target, race, tried, "retry")
                    hedge_at = self._hedge_at(job, target[0], time.monotonic())
                    continue
                wake_at = timeout_at
                if not job.hedged:
                    wake_at = min(wake_at, hedge_at)
                timeout = wake_at - time.monotonic()
                await _first_done(race, None if timeout == math.inf else max(timeout, 0.0))
                done = [task for task in race if task.done()]
                for task in done:
                    attempt = race.pop(task)
                    error = task.exception()
                    if error is None:
                        return self._won(job, attempt, task.result(), race, len(tried))
                    if not isinstance(error, TriageError):
                        attempt.span.end(error)
                        raise error
                    last_error = error
                    if not self._attempt_failed(job, attempt, error):
                        raise error
                if done:
                    continue
                now = time.monotonic()
                if now >= timeout_at:
                    for attempt in race.values():
                        attempt.replica.failed(now)
                    raise UpstreamTimeout(
                        "No backend replica sent a first token within the request's deadline."
                        if job.stream
                        else "No backend replica answered within the request's deadline."
                    )
                if not job.hedged and now >= hedge_at:
                    job.hedged = self._hedge(job, race, tried, now)
                    if not job.hedged:
                        hedge_at = math.inf
        finally:
            await self._abandon(job, race)

    def _start(
        self,
        job: _Job,
        tier: str,
        pool: Pool,
        replica: Replica,
        race: dict[asyncio.Task[_Started], _Attempt],
        tried: list[Replica],
        kind: AttemptKind = "first",
    ) -> None:
        now = time.monotonic()
        queued = replica.queue_full(now)
        progress = Progress(now, pool.expected_events(now, job.max_tokens))
        span = job.trace.attempt(pool.model, replica.url, kind, len(tried) + 1)
        probe = replica.begin(now, progress)
        attempt = _Attempt(tier, pool, replica, probe, queued, progress, span)
        job.last_sent = attempt
        tried.append(replica)
        race[asyncio.get_running_loop().create_task(self._attempt(job, attempt))] = attempt

    async def _attempt(self, job: _Job, attempt: _Attempt) -> _Started:
        """One send, to its first byte; a failure says which send it was (`failed_at`)."""
        try:
            return await self._post(job, attempt)
        except TriageError as error:
            error.failed_at(attempt.tier, attempt.pool.model, attempt.replica.url)
            raise

    async def _post(self, job: _Job, attempt: _Attempt) -> _Started:
        path = UPSTREAM_PATHS[job.parsed.kind]
        body = job.body(attempt.pool)
        headers = attempt.span.inject(job.headers)  # this send's own traceparent
        response = await self.sender.post(attempt.pool, attempt.replica, path, body, headers)
        if not job.stream:
            return _Started(response, None, None, time.monotonic())
        # For a stream, the first byte that counts is the first event, not the headers:
        # vLLM sends its headers at once, before the request has even left its queue.
        events = self.sender.events(attempt.replica, response)
        try:
            first = await anext(events, None)
        except BaseException:
            await events.aclose()
            response.close()
            raise
        if first is None:
            response.close()
            raise UpstreamError("The backend replica ended the stream before its first event.")
        return _Started(response, first, events, time.monotonic())

    def _attempt_failed(self, job: _Job, attempt: _Attempt, error: TriageError) -> bool:
        """Account for a failed send; True when another replica may be tried.

        A refused connection ejects the replica, and the request may go anywhere (nothing
        reached the replica); so may one answered 503 (the replica did not start it). Any
        other answered 5xx is the replica's answer to this very request, maybe the one
        every replica gives to a malformed request (llama-cpp-python answers those with
        500): it is tried once more, on another replica of the same pool, and never on
        another tier; a second answered 5xx ends it. No answer (reset, timeout) counts
        towards ejection, and the request may be retried anywhere, as before.
        """
        now = time.monotonic()
        replica = attempt.replica
        replica.end(attempt.probe, attempt.progress)
        self.room.wake(attempt.pool)
        attempt.span.set(_OUTCOME, "failed")
        attempt.span.end(error)
        if isinstance(error, ConnectFailed):
            replica.mark_down(now)
            return True  # nothing reached the replica
        if not isinstance(error, UpstreamStatus):
            replica.failed(now)  # no answer: reset, timeout, a stream ended before it began
            return job.rules.idempotent
        if error.status_code < 500:
            if error.status_code != 429:
                return False  # the request's own fault: any replica would say the same
            replica.throttle(now, error.retry_after or 1.0)
            return True
        replica.errored(now)
        if error.status_code == 503:
            return True  # the replica did not start it
        if job.answered_in is not None:
            return False  # failed the same way twice: it is the request, most likely
        job.answered_in = (attempt.tier, attempt.pool)
        return job.rules.idempotent

    def _retry_target(
        self, job: _Job, tried: list[Replica], error: TriageError | None
    ) -> tuple[str, Pool, Replica] | None:
        """Another replica for a failed request, within the attempt and retry budgets."""
        if error is None or len(tried) >= self.settings.max_attempts:
            return None
        # A replica that answered 429 is not asked again before its Retry-After: when no
        # other is left, the client gets the 429 and the Retry-After.
        target = self._retry_choice(job, tried)
        if target is None or not self._retries.try_spend(time.monotonic()):
            return None
        return target

    def _retry_choice(self, job: _Job, exclude: list[Replica]) -> tuple[str, Pool, Replica] | None:
        """Replicas predicted to meet the SLO first, then any; a request that got an answered
        5xx only within the pool that answered it. A pool taking requests only because it
        panics (`Pool.panicking`) comes after every other."""
        budget = self._budget(job)
        options = job.options if job.answered_in is None else [job.answered_in]
        now = time.monotonic()
        for fits in (budget, None):
            for tier, pool in _live(options, now):
                replica = pool.pick(exclude, budget=fits, explore=job.explore)
                if replica is not None:
                    return tier, pool, replica
        return None

    def _hedge_at(self, job: _Job, tier: str, sent_at: float) -> float:
        """When to send a second copy if the first byte has not come: the tier's recent p95."""
        if not (self.settings.hedge and job.rules.idempotent):
            return math.inf
        delay = self.tracker.hedge_delay(tier, job.stream)
        target = job.deadline.target
        if delay is None and target is not None:
            delay = target.ttft_s if job.stream else target.e2e_s
        if delay is None:
            return math.inf
        return sent_at + max(delay, self.settings.min_hedge_delay_s)

    def _hedge(
        self,
        job: _Job,
        race: dict[asyncio.Task[_Started], _Attempt],
        tried: list[Replica],
        now: float,
    ) -> bool:
        """Send a second copy to another replica of a tier already tried; True if sent."""
        tiers = {attempt.tier for attempt in race.values()}
        budget = self._budget(job)
        if budget is not None:
            # By now the first byte may be late already; the copy must still beat the
            # timeout, and make the e2e target.
            timeout_at = job.deadline.first_byte_timeout_at(job.stream)
            budget = dataclasses.replace(budget, ttft_s=timeout_at - now)
        for tier, pool in job.options:
            if tier not in tiers:
                continue
            # Only to a replica predicted to meet the SLO: a copy on a slow replica could win
            # the race to the first token, then lose the one to the last.
            replica = pool.pick(tried, budget=budget, explore=job.explore)
            if replica is not None:
                if not self._hedges.try_spend(now):
                    return False
                self._start(job, tier, pool, replica, race, tried, "hedge")
                return True
        return False

    def _won(
        self,
        job: _Job,
        attempt: _Attempt,
        started: _Started,
        race: dict[asyncio.Task[_Started], _Attempt],
        attempts: int,
    ) -> Dispatched:
        first_byte_s = started.first_byte_at - attempt.sent_at
        attempt.replica.observe(
            started.first_byte_at,
            first_byte_s=first_byte_s,
            ttft_s=first_byte_s if job.stream else None,
            queued=attempt.queued,
        )
        self.tracker.first_byte(attempt.tier, job.stream, first_byte_s)
        return Dispatched(
            attempt.tier,
            attempt.pool,
            attempt.replica,
            started.response,
            job.hedged,
            attempts,
            self,
            job,
            attempt,
            started,
        )

    async def _abandon(self, job: _Job, race: dict[asyncio.Task[_Started], _Attempt]) -> None:
        """Cancel the sends still racing (the losers, or all if the request gave up)."""
        if not race:
            return
        for task in race:
            task.cancel()
        await asyncio.wait(race)
        now = time.monotonic()
        for task, attempt in race.items():
            if not task.cancelled() and task.exception() is None:
                started = task.result()  # answered just too late
                if started.events is not None:
                    await started.events.aclose()
                started.response.close()
                attempt.span.set(_OUTCOME, "lost")
                attempt.span.end()
            elif not task.cancelled() and isinstance(task.exception(), TriageError):
                error = task.exception()
                assert isinstance(error, TriageError)
                self._attempt_failed(job, attempt, error)
                continue
            else:
                # Given up on with no first byte: it would have taken at least this long.
                # Remember that, or the balancer keeps choosing a replica that never answers.
                attempt.replica.observe_wait(now, now - attempt.sent_at, job.stream)
                attempt.span.set(_OUTCOME, "cancelled")
                attempt.span.end(None if task.cancelled() else task.exception())
            attempt.replica.end(attempt.probe, attempt.progress)
            self.room.wake(attempt.pool)
        race.clear()

    # --- the baselines: one send, no SLO machinery -----------------------------------

    async def _send_once(self, job: _Job) -> Dispatched:
        for tier, pool in job.options:
            replica = pool.pick()
            if replica is None:
                continue
            race: dict[asyncio.Task[_Started], _Attempt] = {}
            self._start(job, tier, pool, replica, race, [])
            try:
                await _first_done(race, None)
                task, attempt = next(iter(race.items()))
                error = task.exception()
                if error is None:
                    del race[task]
                    return self._won(job, attempt, task.result(), race, 1)
                if isinstance(error, TriageError):
                    del race[task]
                    self._attempt_failed(job, attempt, error)
                raise error
            finally:
                await self._abandon(job, race)
        raise UpstreamUnavailable(
            f"No healthy replica for tier '{job.tier}'.", code="no_healthy_replica"
        )

    # --- bookkeeping -----------------------------------------------------------------

    def _budget(self, job: _Job) -> Budget | None:
        """What a replica must be predicted to meet, headroom taken off the time left."""
        if job.deadline.target is None or self.settings.balancer != "slo":
            return None
        sheddable = job.priority == "sheddable"
        headroom = self.settings.sheddable_headroom if sheddable else self.settings.headroom
        ttft, e2e = job.deadline.budget(time.monotonic(), headroom)
        reserve = 0.0 if job.priority == "critical" else self.settings.critical_reserve
        return Budget(ttft, e2e, job.max_tokens, reserve)

    def _finish(self, dispatched: Dispatched, outcome: Outcome) -> None:
        now = time.monotonic()
        job, attempt, started = dispatched._job, dispatched._attempt, dispatched._started
        replica = attempt.replica
        replica.end(attempt.probe, attempt.progress)
        self.room.wake(attempt.pool)
        attempt.span.set(_OUTCOME, _answer_outcome(outcome))
        attempt.span.end(outcome=outcome)
        fell_back = attempt.tier != job.tier
        if outcome.error is not None:
            if not _client_fault(outcome.error):
                # Cut short or garbled after a good start: the replica stopped answering.
                replica.failed(now)
                self.tracker.refused(
                    job.tier, "failed", hedged=job.hedged, retries=job.retries, fell_back=fell_back
                )
            return
        if not outcome.completed:
            return  # the client went away: says nothing about the replica or the SLO
        replica.succeeded(now)
        if job.stream:
            attempt.pool.observe_answer(now, attempt.progress.events)
        self.tracker.answered(
            job.tier,
            target=job.deadline.target,
            ttft_s=started.first_byte_at - job.deadline.started if job.stream else None,
            e2e_s=now - job.deadline.started,
            hedged=job.hedged,
            retries=job.retries,
            fell_back=fell_back,
        )

    def _refused(self, job: _Job, error: TriageError) -> None:
        """Count a request that got no answer, and say on `error` where it failed: the send
        that failed it, else the last one sent (a timeout), else, with nothing sent (shed,
        no healthy replica), the routed tier and its first model."""
        sent = job.last_sent
        if sent is not None:
            error.failed_at(sent.tier, sent.pool.model, sent.replica.url)
        else:
            error.failed_at(job.tier, job.options[0][1].model if job.options else None)
        if _client_fault(error):
            return
        if isinstance(error, RateLimited):
            self.tracker.refused(job.tier, "shed")
        elif error.code == "deadline_expired":
            self.tracker.refused(job.tier, "expired")
        else:
            self.tracker.refused(job.tier, "failed", hedged=job.hedged, retries=job.retries)


def _live(options: list[tuple[str, Pool]], now: float) -> list[tuple[str, Pool]]:
    """The options that can take a request, those only panicking (`Pool.panicking`) only
    when there is no other: a tier out on suspicion yields to a fallback tier that is not."""
    live = [(tier, pool) for tier, pool in options if pool.healthy()]
    calm = [(tier, pool) for tier, pool in live if not pool.panicking(now)]
    return calm or live


def _fastest(
    options: list[tuple[str, Pool]], now: float, job: _Job, budget: Budget
) -> tuple[str, Pool]:
    """The option that would miss the SLO by the least (as a share of what is left)."""

    def overrun(option: tuple[str, Pool]) -> float:
        prediction = option[1].predict(now, budget, explore=job.explore)
        return math.inf if prediction is None else prediction.overrun(budget)

    return min(options, key=overrun)


def _refusal(job: _Job, now: float, live: list[tuple[str, Pool]]) -> TriageError:
    if now >= job.deadline.ttft_at:
        return UpstreamUnavailable(
            f"Tier '{job.tier}' could not start the request before its deadline.",
            code="deadline_expired",
            retry_after=1.0,
        )
    target = job.deadline.target
    budget = Budget(job.deadline.ttft_at - now, job.deadline.e2e_at - now, job.max_tokens)
    prediction = _fastest(live, now, job, budget)[1].predict(now, budget)
    wait = 1.0
    if prediction is not None and target is not None:
        wait = max(prediction.ttft_s - target.ttft_s, 1.0)
    return RateLimited(
        f"Tier '{job.tier}' is over capacity: it cannot meet the request's latency SLO now.",
        code="over_capacity",
        retry_after=wait,
    )


def _answer_outcome(outcome: Outcome) -> str:
    if outcome.error is not None:
        return "failed"
    return "answered" if outcome.completed else "client_closed"


def _client_fault(error: TriageError) -> bool:
    return (
        isinstance(error, UpstreamStatus) and error.status_code < 500 and error.status_code != 429
    )


def _late_answer() -> UpstreamTimeout:
    return UpstreamTimeout("The backend replica did not finish the answer before its deadline.")


async def _first_done(tasks: Collection[asyncio.Future[_Started]], timeout: float | None) -> None:
    """Until one of `tasks` is done or `timeout` passes. `asyncio.wait(FIRST_COMPLETED)`
    without the sets it builds and checks: ~2 µs less, on every request's path."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for task in tasks:
        task.add_done_callback(wake)
    timer = None if timeout is None else loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for task in tasks:
            task.remove_done_callback(wake)
