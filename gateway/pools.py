"""Pools of replicas serving one model: balancing, latency estimates, health, circuit breaking."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
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


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """How replicas are judged: outlier ejection, recovery, and how fast estimates move."""

    failures_to_open: int = 5  # consecutive failed requests that open the breaker
    initial_cooldown_s: float = INITIAL_COOLDOWN_S
    max_cooldown_s: float = MAX_COOLDOWN_S
    slow_start_s: float = 10.0  # a recovered replica's share ramps up over this long
    latency_decay_s: float = 10.0  # memory of the latency estimates
    load_stale_s: float = 1.0  # load reports older than this count as saturation


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


@dataclass(eq=False)
class Replica:
    """One backend server, addressed by its OpenAI base URL (`http://host:port/v1`).

    Its breaker is closed (normal), open (ejected until `down_until`) or half-open (one
    probe request at a time; an open breaker past its cooldown is half-open too). A refused
    connection or a failed health check opens it at once, `failures_to_open` failed requests
    in a row open it too; each opening doubles the cooldown (capped). A probe that succeeds
    closes it, and the replica's share of traffic then ramps up over `slow_start_s`.
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
    recovered_at: float = -math.inf
    throttled_until: float = 0.0  # it answered 429 with Retry-After
    load: Load | None = field(default=None, repr=False)
    load_at: float = -math.inf
    # None until a scrape tells whether the replica reports its load at all.
    reports_load: bool | None = None
    capacity: float | None = None  # sequences it runs at once, as far as its reports show
    typical_events: float = 0.0  # events in an average answer of its pool (the pool sets it)
    _ejected_by_health: bool = field(default=False, repr=False)
    _in_flight_at_load: int = field(default=0, repr=False)
    _progress: list[Progress] = field(default_factory=list, repr=False)  # ours, oldest first
    latency: PeakEwma = field(init=False, repr=False)
    ttft: Ewma = field(init=False, repr=False)
    itl: LoadCurve = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cooldown_s = self.settings.initial_cooldown_s
        self._new_estimates()

    def _new_estimates(self) -> None:
        decay = self.settings.latency_decay_s
        self.latency = PeakEwma(decay)  # first byte, for the balancer's cost
        self.ttft = Ewma(decay)  # first token when it did not queue, for predictions
        self.itl = LoadCurve(decay)  # between stream events, by batch, learnt as they arrive

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/v1")

    # --- breaker ---------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """May a request be sent here now? Half-open replicas take one probe at a time."""
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
        if self.state == "closed":
            return False
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

    def mark_down(self, now: float) -> None:
        """Eject at once: the replica refused a connection or failed its health check."""
        self.failures += 1
        self._open(now)

    def mark_up(self, now: float | None = None) -> None:
        """Close the breaker and forget past failures; with `now`, start the slow ramp-up."""
        if self.state != "closed" and now is not None:
            self._recover(now)
        self.failures = 0
        self.state = "closed"
        self.down_until = 0.0
        self.cooldown_s = self.settings.initial_cooldown_s
        self._ejected_by_health = False

    def succeeded(self, now: float) -> None:
        self.failures = 0
        if self.state != "closed":
            self.mark_up(now)

    def failed(self, now: float) -> None:
        """A request failed here (error status, reset, timeout): maybe an outlier."""
        self.failures += 1
        if self.state != "closed" or self.failures >= self.settings.failures_to_open:
            self._open(now)

    def throttle(self, now: float, seconds: float) -> None:
        """It answered 429: until its Retry-After has passed, `Pool.pick` sends elsewhere
        when it can. It is not ejected: when every replica is throttled, the next request
        still goes, and the client gets the 429 and a fresh Retry-After."""
        self.throttled_until = max(self.throttled_until, now + seconds)

    def health_failed(self, now: float) -> None:
        # An open breaker's cooldown is not extended on every failed check, only renewed.
        if self.state != "open" or now >= self.down_until:
            self.mark_down(now)
            self._ejected_by_health = True

    def health_passed(self, now: float) -> None:
        # A passing /health ends an ejection a failed check caused. It does not end one that
        # failed requests caused: a replica can answer /health and still fail every request,
        # so those wait out their cooldown and then have to pass a real probe.
        if self.state == "open" and self._ejected_by_health:
            self.state = "half_open"

    def _open(self, now: float) -> None:
        if self.state != "open":
            self.ejections += 1
        self.state = "open"
        self._ejected_by_health = False
        self.down_until = now + self.cooldown_s
        self.cooldown_s = min(self.cooldown_s * 2, self.settings.max_cooldown_s)

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
        if first_byte_s is not None:
            self.latency.observe(first_byte_s, now)
        if ttft_s is not None and not queued:
            self.ttft.observe(ttft_s, now)
        if itl_s is not None:
            self.itl.observe(self.batch(now), itl_s, now)

    def observe_wait(self, now: float, waited_s: float, stream: bool) -> None:
        """A request here was given up on after `waited_s` without a first byte: the latency
        is at least that. Only a wait longer than the estimate says anything."""
        latency = self.latency.value(now)
        if latency is None or waited_s > latency:
            self.latency.observe(waited_s, now)
        ttft = self.ttft.value(now)
        if stream and (ttft is None or waited_s > ttft):
            self.ttft.observe(waited_s, now)

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
        base = 0.0 if base is None else base + self.ttft.spread()
        itl = _or(self.itl.value(self.batch(now, 1), now, explore), 0.0)
        # What one request holds a slot for, on average: what a queued request waits on.
        service = base + itl * self.typical_events
        wait = self._queue_wait(now, base, itl, service, reserve)
        if self.saturated(now):
            wait += service
        ttft = base + wait
        return Prediction(ttft, ttft + itl * max(events - 1.0, 0.0))

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
        now = time.monotonic()
        return any(replica.available(now) for replica in self.replicas)

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


class HealthChecker:
    """Polls each replica's `/health` in the background; ejects it or lets it be probed again."""

    def __init__(self, pools: Iterable[Pool], interval_s: float, timeout_s: float = 1.0) -> None:
        self.pools = list(pools)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self, client: httpx.AsyncClient) -> None:
        replicas = [replica for pool in self.pools for replica in pool.replicas]
        results = await asyncio.gather(*(self._probe(client, r) for r in replicas))
        now = time.monotonic()
        for replica, ok in zip(replicas, results, strict=True):
            if ok:
                replica.health_passed(now)
            else:
                replica.health_failed(now)

    async def _probe(self, client: httpx.AsyncClient, replica: Replica) -> bool:
        try:
            response = await client.get(replica.root_url + "/health", timeout=self.timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                await self.check_all(client)
                await asyncio.sleep(self.interval_s)
