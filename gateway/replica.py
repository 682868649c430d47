"""One backend server as the gateway sees it: its breaker, its ejections, its estimates.

The module is ~590 lines, `Replica` ~430 of them, on purpose: its breaker and its
estimates share state (a recovery resets the estimates; a prediction reads the load
reports and our own requests in flight). `Pool` judges it across its peers
(`gateway.pools`); `gateway.poller` feeds it health and load.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gateway.estimators import Ewma, LoadCurve, PeakEwma

if TYPE_CHECKING:
    from gateway.pools import Pool

__all__ = [
    "INITIAL_COOLDOWN_S",
    "MAX_COOLDOWN_S",
    "BreakerState",
    "Budget",
    "EjectionReason",
    "Load",
    "Prediction",
    "Progress",
    "Replica",
    "ReplicaSettings",
]

BreakerState = Literal["closed", "open", "half_open"]
# Why a replica was taken out: a refused connection, its health probe, failed requests that
# got no answer (resets, timeouts) in a row, or answered 5xx well above its peers' rate.
EjectionReason = Literal["connect_refused", "health_probe_failed", "failures", "outlier"]

INITIAL_COOLDOWN_S = 1.0
MAX_COOLDOWN_S = 30.0
# A replica whose load reports stopped is treated as this many times busier than it looks.
_SATURATED_PENALTY = 8.0
# A full KV cache means new sequences wait or preempt others even with no queue showing yet.
_FULL_CACHE = 0.95
_SLOW_START_FLOOR = 0.1
_MAX_SIMULATED_QUEUE = 1024
_OUTLIER_WINDOW_S = 60.0  # how far back answers count towards an outlier's error rate
_HEALTH_MISSES = 2  # timed-out probes in a row that eject: a busy server answers late

_logger = logging.getLogger("triage")


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """How replicas are judged: outlier ejection, recovery, and how fast estimates move."""

    failures_to_open: int = 5  # consecutive failed requests that open the breaker
    initial_cooldown_s: float = INITIAL_COOLDOWN_S
    max_cooldown_s: float = MAX_COOLDOWN_S
    slow_start_s: float = 10.0  # a recovered replica's share ramps up over this long
    latency_decay_s: float = 10.0  # memory of the latency estimates
    load_stale_s: float = 1.0  # load reports older than this count as saturation
    # Share of a pool that suspicion alone (failures, outliers, slow probes) may eject.
    max_ejected_percent: float = 50.0
    outlier_min_requests: int = 20  # answers in a window before its error rate counts


@dataclass(frozen=True, slots=True)
class Load:
    """A replica's own account of its load, from its `/metrics`."""

    running: float
    waiting: float
    cache_usage: float | None = None  # 0..1
    # vLLM's prefix-cache counters (prompt tokens looked up, and found cached) since it started.
    prefix_queries: float | None = None
    prefix_hits: float | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """Seconds a request has left for its first token and its last, and its `max_tokens`.

    `reserve` is the share of each replica's sequence slots the request may not count on:
    held back for more important requests (at least one slot when it is not zero).
    """

    ttft_s: float
    e2e_s: float
    max_tokens: int | None = None
    reserve: float = 0.0


@dataclass(frozen=True, slots=True)
class Prediction:
    """When a request sent to a replica now would see its first token, and its last."""

    ttft_s: float
    e2e_s: float

    def fits(self, budget: Budget) -> bool:
        return self.ttft_s <= budget.ttft_s and self.e2e_s <= budget.e2e_s

    def overrun(self, budget: Budget) -> float:
        """By how much it misses the budget, as a share of it (<= 1: it fits)."""
        ttft = self.ttft_s / budget.ttft_s if budget.ttft_s > 0 else math.inf
        e2e = self.e2e_s / budget.e2e_s if budget.e2e_s > 0 else math.inf
        return max(ttft, e2e)


@dataclass(eq=False, slots=True)
class Progress:
    """How far one of our requests at a replica has got; the dispatcher counts the events."""

    sent_at: float
    expected_events: float  # how many the answer is expected to have in all
    events: int = 0


class _Answers:
    """A replica's recent answers (the last `limit`, none older than `window_s`): how many,
    and how many were 5xx errors."""

    __slots__ = ("_errors", "_events", "limit", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: deque[tuple[float, bool]] = deque()
        self._errors = 0

    def add(self, now: float, error: bool) -> None:
        self._events.append((now, error))
        self._errors += error
        if len(self._events) > self.limit:
            self._errors -= self._events.popleft()[1]

    def counts(self, now: float) -> tuple[int, int]:
        """(answers, errors) within the window."""
        events = self._events
        while events and events[0][0] < now - self.window_s:
            self._errors -= events.popleft()[1]
        return len(events), self._errors

    def forgive(self) -> None:
        """The latest error still counted becomes a plain answer."""
        events = self._events
        for index in range(len(events) - 1, -1, -1):
            at, error = events[index]
            if error:
                events[index] = (at, False)
                self._errors -= 1
                return

    def clear(self) -> None:
        self._events.clear()
        self._errors = 0


@dataclass(eq=False)
class Replica:
    """One backend server, addressed by its OpenAI base URL (`http://host:port/v1`).

    Its breaker is closed (normal), open (ejected until `down_until`) or half-open (one
    probe request at a time; an open breaker past its cooldown is half-open too). Each
    opening doubles the cooldown (capped); a probe that succeeds closes it, and the
    replica's share of traffic then ramps up over `slow_start_s`. What opens it:

    - hard evidence, at once: a refused connection (nothing listens), or a health probe
      that could not connect or that the server answered with a 5xx (it says it cannot
      serve: loading, engine dead);
    - suspicion, within the pool's cap (see `Pool.may_eject`): `failures_to_open` requests
      in a row that got no answer (reset, timeout), two health probes in a row timed out,
      or answered 5xx at a rate far above its peers' (`Pool.outlier`).

    An answered 5xx never counts as a failure in a row: a server that answers is up, and
    one client's malformed requests get a 5xx from every replica alike (llama-cpp-python
    answers validation errors with 500). A replica out on suspicion alone (not `hard_down`)
    still serves when its pool panics (`Pool.panicking`). Every ejection is logged (WARNING)
    and counted in `ejections` and `ejections_by_reason`; every return is logged (INFO).
    """

    url: str
    in_flight: int = 0
    down_until: float = 0.0
    cooldown_s: float = INITIAL_COOLDOWN_S
    failures: int = 0  # consecutive failures since the last success
    settings: ReplicaSettings = field(default_factory=ReplicaSettings, repr=False)
    state: BreakerState = "closed"
    probing: bool = False  # a half-open probe is in flight
    ejections: int = 0
    ejections_by_reason: dict[str, int] = field(default_factory=dict)
    reason: EjectionReason | None = None  # of the current ejection (None when closed)
    hard_down: bool = False  # out on hard evidence: not served even in a panic
    pool: Pool | None = field(default=None, repr=False)  # set by the pool that holds it
    recovered_at: float = -math.inf
    throttled_until: float = 0.0  # it answered 429 with Retry-After
    load: Load | None = field(default=None, repr=False)
    load_at: float = -math.inf
    # None until a scrape tells whether the replica reports its load at all.
    reports_load: bool | None = None
    capacity: float | None = None  # sequences it runs at once, as far as its reports show
    typical_events: float = 0.0  # events in an average answer of its pool (the pool sets it)
    _ejected_by_health: bool = field(default=False, repr=False)
    _health_misses: int = field(default=0, repr=False)  # probes timed out in a row
    _answers: _Answers = field(init=False, repr=False)
    _in_flight_at_load: int = field(default=0, repr=False)
    _progress: list[Progress] = field(default_factory=list, repr=False)  # ours, oldest first
    latency: PeakEwma = field(init=False, repr=False)
    ttft: Ewma = field(init=False, repr=False)
    ttft_floor: PeakEwma = field(init=False, repr=False)
    itl: LoadCurve = field(init=False, repr=False)
    _answered_at: float = field(default=-math.inf, repr=False)  # its last first byte

    def __post_init__(self) -> None:
        self.cooldown_s = self.settings.initial_cooldown_s
        minimum = self.settings.outlier_min_requests
        self._answers = _Answers(max(5 * minimum, 100), _OUTLIER_WINDOW_S)
        self._new_estimates()

    def _new_estimates(self) -> None:
        decay = self.settings.latency_decay_s
        self.latency = PeakEwma(decay)  # first byte, for the balancer's cost
        self.ttft = Ewma(decay)  # first token when it did not queue, for predictions
        # At least this long to a first token: streams given up on since the last answer.
        self.ttft_floor = PeakEwma(decay)
        self.itl = LoadCurve(decay)  # between stream events, by batch, learnt as they arrive

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/v1")

    # --- breaker ---------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """May a request be sent here now? Half-open replicas take one probe at a time; a
        replica out on suspicion alone takes any request while its pool panics."""
        if self.state == "closed" or self.takes_probe(now):
            return True
        pool = self.pool
        return not self.hard_down and pool is not None and pool.panicking(now)

    def takes_probe(self, now: float) -> bool:
        """Would its breaker, alone, let a request through now (closed, or a probe's turn)?"""
        if self.state == "closed":
            return True
        if self.probing:
            return False
        return self.state == "half_open" or now >= self.down_until

    def begin(self, now: float, progress: Progress | None = None) -> bool:
        """Count a request sent here; True when it is the half-open breaker's probe."""
        self.in_flight += 1
        if progress is not None:
            self._progress.append(progress)
        if self.state == "closed" or not self.takes_probe(now):
            return False  # closed, or sent while its pool panics: not a probe
        self.state = "half_open"
        self.probing = True
        return True

    def end(self, probe: bool, progress: Progress | None = None) -> None:
        """Count a request done, whatever its result (see `succeeded` and `failed`)."""
        self.in_flight -= 1
        if progress is not None and progress in self._progress:
            self._progress.remove(progress)
        if probe:
            self.probing = False

    def mark_down(self, now: float, reason: EjectionReason = "connect_refused") -> None:
        """Eject at once, on hard evidence: it refused a connection (or failed its check)."""
        self.failures += 1
        self._open(now, reason, hard=True)

    def mark_up(self, now: float | None = None) -> None:
        """Close the breaker and forget past failures; with `now`, start the slow ramp-up."""
        if self.state != "closed":
            if not (self.state == "half_open" and self._ejected_by_health):  # logged then
                _logger.info("replica %s (model %s) is back in rotation", self.url, self._model)
            if now is not None:
                self._recover(now)
        self.failures = 0
        self.state = "closed"
        self.reason = None
        self.hard_down = False
        self.down_until = 0.0
        self.cooldown_s = self.settings.initial_cooldown_s
        self._ejected_by_health = False

    def succeeded(self, now: float) -> None:
        """A request was answered here: passive health, whatever any probe says."""
        self._answers.add(now, False)
        self.failures = 0
        if self.state != "closed":
            self.mark_up(now)

    def failed(self, now: float) -> None:
        """A request got no answer here (reset, timeout, a stream cut short)."""
        self.failures += 1
        if self.state != "closed":
            if not self.takes_probe(now) and self.down_until > now:
                return  # a request sent in a panic: the ejection already runs
            self._open(now, self.reason or "failures", hard=self.hard_down)
        elif self.failures >= self.settings.failures_to_open and self._may_eject(now):
            self._open(now, "failures")

    def errored(self, now: float) -> None:
        """It answered a request with a 5xx. It is up; it is ejected only as an outlier of its
        pool (`Pool.outlier`). While out, an answer (even an error) ends an ejection for no
        answer (refused connections, failures in a row); an outlier's stays."""
        self._answers.add(now, True)
        if self.state != "closed":
            if self.reason in ("connect_refused", "failures"):
                self.mark_up(now)
            elif self.takes_probe(now) or self.down_until <= now:
                self._open(now, self.reason or "outlier", hard=self.hard_down)
            return
        pool = self.pool
        if pool is not None and pool.outlier(self, now) and self._may_eject(now):
            self._open(now, "outlier")

    def answered(self, now: float) -> None:
        """It answered, and the answer (even a 5xx) says nothing against it."""
        self._answers.add(now, False)

    def forgive(self) -> None:
        """A 5xx it answered turned out to be the request's fault: another replica answered
        the same. It counts as an answer, not an error, towards its outlier rate."""
        self._answers.forgive()

    def answers(self, now: float) -> tuple[int, int]:
        """(answers, 5xx errors among them) in its recent window."""
        return self._answers.counts(now)

    def throttle(self, now: float, seconds: float) -> None:
        """It answered 429: until its Retry-After has passed, `Pool.pick` sends elsewhere
        when it can. It is not ejected: when every replica is throttled, the next request
        still goes, and the client gets the 429 and a fresh Retry-After."""
        self.throttled_until = max(self.throttled_until, now + seconds)

    def health_failed(
        self, now: float, hard: bool = True, reason: EjectionReason = "health_probe_failed"
    ) -> None:
        """Its health probe failed: `hard` when it could not connect (`reason`
        connect_refused) or the server answered 5xx (eject at once), else (a timeout) only
        after `_HEALTH_MISSES` in a row."""
        if not hard:
            self._health_misses += 1
            if self._health_misses < _HEALTH_MISSES:
                return
            if self.state == "closed" and not self._may_eject(now):
                return
        # An open breaker's cooldown is not extended on every failed check, only renewed.
        if self.state != "open" or now >= self.down_until:
            self.failures += 1
            self._open(now, reason, hard=hard)
            self._ejected_by_health = True

    def health_passed(self, now: float) -> None:
        self._health_misses = 0
        # A passing /health ends an ejection a failed check caused. It does not end one that
        # failed requests caused: a replica can answer /health and still fail every request,
        # so those wait out their cooldown and then have to pass a real probe.
        if self.state == "open" and self._ejected_by_health:
            _logger.info(
                "replica %s (model %s) passed its health probe: taking requests again",
                self.url,
                self._model,
            )
            self.state = "half_open"
            self.hard_down = False

    @property
    def _model(self) -> str:
        return "?" if self.pool is None else self.pool.model

    def _may_eject(self, now: float) -> bool:
        return self.pool is None or self.pool.may_eject(self, now)

    def _open(self, now: float, reason: EjectionReason, hard: bool = False) -> None:
        if self.state != "open":
            self.ejections += 1
            self.ejections_by_reason[reason] = self.ejections_by_reason.get(reason, 0) + 1
            _logger.warning(
                "replica %s (model %s) ejected: %s; cooldown %.1f s",
                self.url,
                self._model,
                self._describe(reason, now),
                self.cooldown_s,
            )
            self._answers.clear()  # judged afresh when it is back
        self.state = "open"
        self.reason = reason
        self.hard_down = hard
        self._ejected_by_health = False
        self.down_until = now + self.cooldown_s
        self.cooldown_s = min(self.cooldown_s * 2, self.settings.max_cooldown_s)

    def _describe(self, reason: EjectionReason, now: float) -> str:
        if reason == "connect_refused":
            return "connection refused"
        if reason == "health_probe_failed":
            return "health probe failed"
        if reason == "failures":
            return f"{self.failures} requests in a row got no answer"
        answers, errors = self._answers.counts(now)
        return f"outlier: {errors} of its last {answers} answers were 5xx, far above its peers'"

    def _recover(self, now: float) -> None:
        self.recovered_at = now
        # What it measured while failing says nothing about it now.
        self._new_estimates()

    def weight(self, now: float) -> float:
        """Its share of traffic: ramps from 10 % to 100 % over the slow start after recovery."""
        elapsed = now - self.recovered_at
        ramp = self.settings.slow_start_s
        if elapsed >= ramp:
            return 1.0
        return _SLOW_START_FLOOR + (1.0 - _SLOW_START_FLOOR) * max(elapsed, 0.0) / ramp

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    # --- load and latency ------------------------------------------------------------

    def observe_load(self, load: Load, now: float) -> None:
        self.load = load
        self.load_at = now
        self.reports_load = True
        self._in_flight_at_load = self.in_flight
        if load.waiting > 0 and load.running >= 1:
            self.capacity = load.running  # a queue means every slot is taken
        elif load.cache_usage is not None and load.cache_usage >= 0.05 and load.running >= 1:
            # vLLM's KV-cache share is how full it is: running / share is how many fit.
            estimate = load.running / load.cache_usage
            previous = self.capacity
            self.capacity = estimate if previous is None else 0.8 * previous + 0.2 * estimate

    def load_unreported(self) -> None:
        """The replica has no `/metrics` (a hosted API, say): judge it by its latency alone."""
        self.reports_load = False
        self.load = None

    def saturated(self, now: float) -> bool:
        """It used to report its load and stopped: assume the worst."""
        return self.reports_load is True and now - self.load_at > self.settings.load_stale_s

    def outstanding(self, now: float) -> float:
        """Requests at the replica now, from every gateway: its last report plus ours since."""
        own = float(self.in_flight)
        load = self.load
        if load is None or self.saturated(now):
            return own
        since = self.in_flight - self._in_flight_at_load
        return max(own, load.running + load.waiting + since)

    def observe(
        self,
        now: float,
        *,
        first_byte_s: float | None = None,
        ttft_s: float | None = None,
        itl_s: float | None = None,
        queued: bool = False,
    ) -> None:
        """Feed one request's timings; a TTFT that includes queueing is not a base TTFT."""
        if first_byte_s is not None or ttft_s is not None:
            self._answered_at = now
            self.ttft_floor.reset()  # it answers again: what it measures now counts
        if first_byte_s is not None:
            self.latency.observe(first_byte_s, now)
        if ttft_s is not None and not queued:
            self.ttft.observe(ttft_s, now)
        if itl_s is not None:
            self.itl.observe(self.batch(now), itl_s, now)

    def observe_wait(self, now: float, waited_s: float, stream: bool) -> None:
        """A request here was given up on after `waited_s` without a first byte: the latency
        is at least that. Only a wait longer than the estimate says anything.

        A stream's wait is not averaged into the TTFT estimate: it is a floor under it
        (`ttft_floor`) that fades, and that the next answer removes. One request that hung
        must not outweigh what the replica measures once it answers again.
        """
        latency = self.latency.value(now)
        if latency is None or waited_s > latency:
            self.latency.observe(waited_s, now)
        if stream:
            self.ttft_floor.observe(waited_s, now)

    def batch(self, now: float, extra: int = 0) -> float:
        """Sequences decoding together now, with `extra` more: queued ones do not count."""
        outstanding = self.outstanding(now) + extra
        return outstanding if self.capacity is None else min(outstanding, self.capacity)

    def queue_full(self, now: float) -> bool:
        """Would one more request wait for a free slot (as far as we can tell)?"""
        if self.capacity is None:
            return self.load is not None and self.load.waiting > 0 and not self.saturated(now)
        return self.outstanding(now) >= self.capacity

    def cost(self, now: float, default_latency_s: float) -> float:
        """Peak-EWMA latency x (requests outstanding + 1), weighed by load and slow start.

        The latency is the first byte's plus a typical answer's decode time: a replica quick
        to start and slow to stream is no bargain.
        """
        latency = _or(self.latency.value(now), default_latency_s)
        latency += _or(self.itl.value(self.batch(now, 1), now), 0.0) * self.typical_events
        pressure = 1.0
        if self.saturated(now):
            pressure = _SATURATED_PENALTY
        elif self.load is not None and (self.load.cache_usage or 0.0) >= _FULL_CACHE:
            pressure = 2.0
        return latency * (self.outstanding(now) + 1.0) * pressure / self.weight(now)

    def predict(
        self, now: float, events: float, explore: float = 0.0, reserve: float = 0.0
    ) -> Prediction:
        """Expected TTFT and e2e of a request sent now that streams `events` events: its base
        TTFT, plus time queued for a slot, plus one inter-event latency per event.

        What it has not measured yet counts as no time at all: a replica nobody has tried
        is tried, and measured, at once. (Taking the pool's other replicas' figures instead
        can shut a fast replica out for good when the first one measured is a slow one.)
        Estimates idle for longer than `explore` seconds fade, so that a replica left alone
        because it looked slow is tried again (`math.inf`: never). `reserve`: see `Budget`.
        """
        # A TTFT near its SLO should not pass for one under it half the time: take the
        # estimate plus its usual deviation.
        base = self.ttft.value(now, explore)
        base = 0.0 if base is None else base + self.ttft.spread(now, explore)
        base = max(base, _or(self.ttft_floor.value(now), 0.0))
        itl = _or(self.itl.value(self.batch(now, 1), now, explore), 0.0)
        # What one request holds a slot for, on average: what a queued request waits on.
        service = base + itl * self.typical_events
        wait = self._queue_wait(now, base, itl, service, reserve)
        if self.saturated(now):
            wait += service
        ttft = base + wait
        return Prediction(ttft, ttft + itl * max(events - 1.0, 0.0))

    def vouched(self, now: float) -> bool:
        """Do its estimates rest on a recent answer: one within `latency_decay_s`, and no
        request given up on since?"""
        if self.ttft_floor.value(now) is not None:
            return False
        return now - self._answered_at <= self.settings.latency_decay_s

    def needs_probe(self, now: float) -> bool:
        """Idle (nothing of ours in flight, no queue reported) and not `vouched` for: only
        an answer re-measures it, so a prediction alone must not keep work from it for
        good. One at a time, as a half-open breaker's probe: once one is sent, the replica
        is no longer idle."""
        if self.in_flight or self.queue_full(now) or self.throttled_until > now:
            return False
        return not self.vouched(now)

    def _queue_wait(
        self, now: float, base: float, itl: float, service: float, reserve: float
    ) -> float:
        """How long a request sent now waits for a sequence slot.

        Each of our requests here frees its slot when the rest of its answer has streamed,
        as far as its progress says: after a burst fills every slot at once, none frees for
        a while, which an average would hide. Requests we know nothing of (other gateways')
        are taken as half done.
        """
        capacity = self.capacity
        load = self.load
        if capacity is None or capacity < 1:
            if load is None or self.saturated(now):
                return 0.0
            return load.waiting * service / max(load.running, 1.0)
        slots = int(capacity)
        if reserve > 0:
            slots = max(slots - max(round(slots * reserve), 1), 1)
        queued = int(self.outstanding(now)) - slots
        if queued < 0:
            return 0.0
        frees = [_remaining(p, now, base, itl) for p in self._progress[:slots]]
        frees += [service / 2] * (slots - len(frees))
        heapq.heapify(frees)
        for _ in range(min(queued, _MAX_SIMULATED_QUEUE)):
            heapq.heapreplace(frees, frees[0] + service)
        return frees[0]


def _remaining(progress: Progress, now: float, base: float, itl: float) -> float:
    """Until a request of ours frees its slot: the events still to come, one ITL each (an
    answer longer than expected is taken to be nearly done)."""
    left = max(progress.expected_events - max(progress.events, 1), 1.0) * itl
    if progress.events == 0:
        left += max(progress.sent_at + base - now, 0.0)
    return left


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
