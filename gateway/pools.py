"""Pools of replicas serving one model: balancing, latency estimates, health, circuit breaking."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import httpx

from gateway.backends import DEFAULTS, Backend
from gateway.slo import Ewma, LoadCurve, PeakEwma

__all__ = [
    "BALANCERS",
    "INITIAL_COOLDOWN_S",
    "MAX_COOLDOWN_S",
    "Balancer",
    "BreakerState",
    "Budget",
    "EjectionReason",
    "HealthChecker",
    "Load",
    "Pool",
    "Prediction",
    "Progress",
    "Replica",
    "ReplicaSettings",
]

Balancer = Literal["slo", "least_outstanding", "round_robin"]
BALANCERS: tuple[Balancer, ...] = ("slo", "least_outstanding", "round_robin")
BreakerState = Literal["closed", "open", "half_open"]
# Why a replica was taken out: a refused connection, its health probe, failed requests that
# got no answer (resets, timeouts) in a row, or answered 5xx well above its peers' rate.
EjectionReason = Literal["connect_refused", "health_probe_failed", "failures", "outlier"]

INITIAL_COOLDOWN_S = 1.0
MAX_COOLDOWN_S = 30.0
# What an unmeasured replica is assumed to take when no replica of its pool is measured yet.
_DEFAULT_LATENCY_S = 0.05
# A replica whose load reports stopped is treated as this many times busier than it looks.
_SATURATED_PENALTY = 8.0
# A full KV cache means new sequences wait or preempt others even with no queue showing yet.
_FULL_CACHE = 0.95
_SLOW_START_FLOOR = 0.1
_MAX_SIMULATED_QUEUE = 1024
# An outlier's answered-5xx rate is at least this far above its peers' (both over windows of
# `outlier_min_requests` answers or more): far beyond what chance puts between replicas that
# share one tenant's bad requests evenly.
_OUTLIER_MARGIN = 0.5
_OUTLIER_WINDOW_S = 60.0
# Health probes: a server that answers this on the probe path has no health endpoint.
_NO_HEALTH_ENDPOINT = frozenset({404, 405, 501})
_HEALTH_RECHECK_S = 60.0  # how often to look again for a health endpoint that was missing
_HEALTH_TIMEOUT_S = 2.5  # SGLang's /health takes a second by design
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


@dataclass(eq=False)
class Pool:
    """The replicas of one concrete model, and the name the backend knows that model by.

    `balancer` picks among available replicas: `slo` is power-of-two-choices over
    `Replica.cost` (restricted to replicas predicted to meet a budget, when one is given),
    `least_outstanding` takes the fewest requests in flight, `round_robin` takes turns.

    Ejection on suspicion is capped (`may_eject`, after Envoy's `max_ejection_percent`),
    and a pool none of whose replicas may take a request panics (`panicking`): then every
    replica out on suspicion alone takes requests again, as Envoy's panic mode does, rather
    than the pool answering 503. Replicas out on hard evidence (a refused connection, a
    failed health probe that connected or answered 5xx) stay out: nothing would answer.
    """

    model: str
    served_name: str
    replicas: list[Replica]
    api_key: str | None = field(default=None, repr=False)
    balancer: Balancer = "slo"
    backend: Backend = DEFAULTS["vllm"]
    rng: random.Random = field(default_factory=random.Random, repr=False)
    events: Ewma = field(default_factory=lambda: Ewma(30.0), repr=False)
    events_spread: Ewma = field(default_factory=lambda: Ewma(30.0), repr=False)
    _next: int = 0

    def __post_init__(self) -> None:
        for replica in self.replicas:
            replica.pool = self

    @classmethod
    def from_urls(
        cls,
        model: str,
        urls: Iterable[str],
        served_name: str | None,
        api_key: str | None,
        *,
        balancer: Balancer = "slo",
        settings: ReplicaSettings | None = None,
        capacity: int | None = None,
        backend: Backend = DEFAULTS["vllm"],
    ) -> Pool:
        """`capacity`: each replica's sequence slots, if known before its load reports."""
        settings = settings or ReplicaSettings()
        replicas = [Replica(url, settings=settings, capacity=capacity) for url in urls]
        return cls(model, served_name or model, replicas, api_key, balancer, backend)

    def pick(
        self,
        exclude: Iterable[Replica] = (),
        *,
        budget: Budget | None = None,
        explore: float = 0.0,
    ) -> Replica | None:
        """An available replica not in `exclude`; with a `budget`, only one predicted to
        meet it (`slo` balancer only). None when there is none."""
        now = time.monotonic()
        excluded = set(exclude)
        throttled = {r for r in self.replicas if r.throttled_until > now}
        if throttled and any(
            r not in excluded and r not in throttled and r.available(now) for r in self.replicas
        ):
            excluded |= throttled  # honour Retry-After while another replica can answer
        if self.balancer == "round_robin":
            return self._round_robin(now, excluded)
        if self.balancer == "least_outstanding":
            return self._least_outstanding(now, excluded)
        eligible = [r for r in self.replicas if r not in excluded and r.available(now)]
        if budget is not None and eligible:
            events = self.expected_events(now, budget.max_tokens)
            eligible = [
                r for r in eligible if r.predict(now, events, explore, budget.reserve).fits(budget)
            ]
        if len(eligible) <= 1:
            return eligible[0] if eligible else None
        first, second = self.rng.sample(eligible, 2)
        latency = self.default_latency(now)
        cheaper = first.cost(now, latency) <= second.cost(now, latency)
        return first if cheaper else second

    def _round_robin(self, now: float, excluded: set[Replica]) -> Replica | None:
        count = len(self.replicas)
        for _ in range(count):
            replica = self.replicas[self._next % count]
            self._next = (self._next + 1) % count
            if replica not in excluded and replica.available(now):
                return replica
        return None

    def _least_outstanding(self, now: float, excluded: set[Replica]) -> Replica | None:
        best: Replica | None = None
        count = len(self.replicas)
        self._next = (self._next + 1) % count
        for offset in range(count):  # ties rotate
            replica = self.replicas[(self._next + offset) % count]
            if replica in excluded or not replica.available(now):
                continue
            if best is None or replica.in_flight < best.in_flight:
                best = replica
        return best

    def healthy(self) -> bool:
        """Can it take a request now (in a panic included)? What `/readyz` reports."""
        now = time.monotonic()
        return any(replica.available(now) for replica in self.replicas)

    def panicking(self, now: float) -> bool:
        """No replica's breaker lets a request through, yet some is out on suspicion alone:
        every such replica takes requests (see the class docstring)."""
        replicas = self.replicas
        return not any(r.takes_probe(now) for r in replicas) and not all(
            r.hard_down for r in replicas
        )

    def may_eject(self, replica: Replica, now: float) -> bool:
        """May `replica` be ejected on suspicion? As Envoy does: yes when no other replica is
        out, else only while the ejected stay within `max_ejected_percent` of the pool; 0
        turns ejection on suspicion off. An ejection the cap refuses is logged."""
        limit = replica.settings.max_ejected_percent
        out = sum(1 for r in self.replicas if r is not replica and r.state != "closed")
        if limit > 0 and (out == 0 or (out + 1) * 100 <= limit * len(self.replicas)):
            return True
        _logger.warning(
            "replica %s (model %s) looks bad but is kept: %d of %d replicas are out already "
            "(max_ejected_percent %g)",
            replica.url,
            self.model,
            out,
            len(self.replicas),
            limit,
        )
        return False

    def outlier(self, replica: Replica, now: float) -> bool:
        """Are `replica`'s answered 5xx far more frequent than its peers'?

        Both it and its peers (together) need `outlier_min_requests` answers in their recent
        windows, and its 5xx rate must exceed theirs by `_OUTLIER_MARGIN`. Relative to peers,
        because the errors one client's bad requests draw come from every replica alike: no
        stream of bad requests, however long, makes one replica an outlier. So a replica
        with no peer (a pool of one) is never ejected for answered errors: nothing tells a
        broken server from a client's bad requests there, and ejecting it would take the
        whole model out (a server that is truly broken is found by its health probe, or by
        failing to answer at all).
        """
        minimum = replica.settings.outlier_min_requests
        answers, errors = replica.answers(now)
        if answers < minimum:
            return False
        peer_answers = peer_errors = 0
        for peer in self.replicas:
            if peer is not replica:
                counted, failed = peer.answers(now)
                peer_answers += counted
                peer_errors += failed
        if peer_answers < minimum:
            return False
        return errors / answers - peer_errors / peer_answers >= _OUTLIER_MARGIN

    def predict(
        self,
        now: float,
        budget: Budget,
        exclude: Iterable[Replica] = (),
        explore: float = 0.0,
    ) -> Prediction | None:
        """The prediction of the available replica that best fits `budget` (the smallest
        `Prediction.overrun`); None when no replica is available."""
        excluded = set(exclude)
        events = self.expected_events(now, budget.max_tokens)
        predictions = [
            r.predict(now, events, explore, budget.reserve)
            for r in self.replicas
            if r not in excluded and r.available(now)
        ]
        return min(predictions, key=lambda p: p.overrun(budget), default=None)

    def probe_target(self, now: float) -> Replica | None:
        """A replica to send a request to whatever the predictions say, or None: one that
        `needs_probe`, in a pool with no available replica `vouched` for. While one is, the
        pool's predictions rest on fresh answers and are believed; a replica they keep
        idle is tried again as its estimates fade (a probe there would go to a replica
        last seen slow, with a request predicted to miss)."""
        available = [r for r in self.replicas if r.available(now)]
        if any(r.vouched(now) for r in available):
            return None
        return next((r for r in available if r.needs_probe(now)), None)

    def observe_answer(self, now: float, events: int) -> None:
        """A streamed answer had `events` events: what the next ones are expected to have."""
        mean = self.events.value(now, math.inf)
        self.events.observe(float(events), now)
        if mean is not None:
            self.events_spread.observe(abs(events - mean), now)
        typical = self.events.value(now, math.inf) or 0.0
        for replica in self.replicas:
            replica.typical_events = typical

    def expected_events(self, now: float, max_tokens: int | None) -> float:
        """Events in the next answer, on the long side (mean + 2 x mean deviation) so that
        its e2e is not underestimated; no more than `max_tokens` allows (a token an event)."""
        mean = self.events.value(now, math.inf)
        if mean is None:
            return 0.0 if max_tokens is None else float(max_tokens)
        long = mean + 2 * (self.events_spread.value(now, math.inf) or 0.0)
        return long if max_tokens is None else min(long, float(max_tokens))

    def default_latency(self, now: float) -> float:
        """Latency for the balancer's cost of unmeasured replicas: the best measured one's
        (so that they get tried, see `Replica.predict`)."""
        known = [r.latency.value(now) for r in self.replicas]
        return min((v for v in known if v is not None), default=_DEFAULT_LATENCY_S)


_Probe = Literal["passed", "absent", "refused", "error", "timeout", "inconclusive"]


class HealthChecker:
    """Probes each replica's health endpoint (`pool.backend.health_path`) in the background;
    ejects it or lets it be probed again.

    A pool whose backend has no health path gets no probe: passive checks only (answers
    count as health, failures eject, see `Replica`). A server that answers the probe path
    with 404, 405 or 501 has no health endpoint (llama-cpp-python, Ollama's `/v1`, hosted
    APIs): it is not probed again for `_HEALTH_RECHECK_S` (it may be upgraded) and is never
    ejected for it. Only a probe that cannot connect, times out or gets a 5xx fails.
    """

    def __init__(
        self, pools: Iterable[Pool], interval_s: float, timeout_s: float = _HEALTH_TIMEOUT_S
    ) -> None:
        self.pools = list(pools)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self._absent: dict[Replica, float] = {}  # no health endpoint: look again then

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self, client: httpx.AsyncClient) -> None:
        now = time.monotonic()
        targets = [
            (replica, pool.backend.health_path)
            for pool in self.pools
            if pool.backend.health_path is not None
            for replica in pool.replicas
            if self._absent.get(replica, -math.inf) <= now
        ]
        results = await asyncio.gather(*(self._probe(client, r, path) for r, path in targets))
        now = time.monotonic()
        for (replica, path), result in zip(targets, results, strict=True):
            if result == "absent":
                if replica not in self._absent:
                    _logger.info(
                        "replica %s (model %s) has no health endpoint at %s: passive checks "
                        "only, looking again every %.0f s",
                        replica.url,
                        replica._model,
                        path,
                        _HEALTH_RECHECK_S,
                    )
                self._absent[replica] = now + _HEALTH_RECHECK_S
                replica.health_passed(now)  # it answered: something listens
                continue
            self._absent.pop(replica, None)
            if result == "passed":
                replica.health_passed(now)
            elif result == "refused":
                replica.health_failed(now, reason="connect_refused")
            elif result != "inconclusive":
                replica.health_failed(now, hard=result == "error")

    async def _probe(self, client: httpx.AsyncClient, replica: Replica, path: str) -> _Probe:
        try:
            response = await client.get(replica.root_url + path, timeout=self.timeout_s)
        except httpx.ConnectError:
            return "refused"
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError:
            return "timeout"  # reset or garbled: as unsure as a timeout
        status = response.status_code
        if status in _NO_HEALTH_ENDPOINT:
            return "absent"
        if status >= 500:
            return "error"
        return "passed" if status < 300 else "inconclusive"

    async def _run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                await self.check_all(client)
                await asyncio.sleep(self.interval_s)
