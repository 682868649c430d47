"""Pools of replicas serving one model: balancing, outlier detection across peers, panic.

A replica's own state (breaker, estimates, predictions) is `gateway.replica`; the
background health and load polling is `gateway.poller`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from gateway.backend_api import BackendApi
from gateway.backends import DEFAULTS, Backend
from gateway.estimators import Ewma
from gateway.prefix import PrefixIndex, PrefixSettings
from gateway.replica import Budget, Prediction, Replica, ReplicaSettings
from gateway.request_view import RequestView

__all__ = ["BALANCERS", "Balancer", "Pool"]

Balancer = Literal["slo", "prefix", "least_outstanding", "round_robin"]
BALANCERS: tuple[Balancer, ...] = ("slo", "prefix", "least_outstanding", "round_robin")
# What an unmeasured replica is assumed to take when no replica of its pool is measured yet.
_DEFAULT_LATENCY_S = 0.05
# An outlier's answered-5xx rate is at least this far above its peers' (both over windows of
# `outlier_min_requests` answers or more): far beyond what chance puts between replicas that
# share one tenant's bad requests evenly.
_OUTLIER_MARGIN = 0.5

_logger = logging.getLogger("triage")


@dataclass(eq=False)
class Pool:
    """The replicas of one concrete model, and the name the backend knows that model by.

    `balancer` picks among available replicas: `slo` is power-of-two-choices over
    `Replica.cost` (restricted to replicas predicted to meet a budget, when one is given),
    `prefix` is `slo` that first looks where the prompt's prefix and session already went
    (`_prefix_pick`), `least_outstanding` takes the fewest requests in flight,
    `round_robin` takes turns.

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
    # The prefix balancer's index; none for a pool of one replica (nothing to choose).
    prefix: PrefixIndex | None = field(default=None, repr=False)
    expose_replica: bool = False  # answers say which replica (`x-triage-replica`)
    api: BackendApi = "chat"  # the API its servers are sent chat in (gateway/backend_api/)

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
        prefix: PrefixSettings | None = None,
    ) -> Pool:
        """`capacity`: each replica's sequence slots, if known before its load reports.
        `prefix`: the prefix balancer's settings (its defaults when None)."""
        settings = settings or ReplicaSettings()
        replicas = [Replica(url, settings=settings, capacity=capacity) for url in urls]
        pool = cls(model, served_name or model, replicas, api_key, balancer, backend)
        prefix = prefix or PrefixSettings()
        pool.expose_replica = prefix.replica_header
        if balancer == "prefix" and len(replicas) > 1:
            pool.prefix = PrefixIndex(prefix)
        return pool

    def pick(
        self,
        exclude: Iterable[Replica] = (),
        *,
        budget: Budget | None = None,
        explore: float = 0.0,
        request: RequestView | None = None,
    ) -> Replica | None:
        """An available replica not in `exclude`; with a `budget`, only one predicted to
        meet it (`slo` and `prefix` balancers). None when there is none. `request` is what
        the `prefix` balancer keys on; the others do not look at it."""
        now = time.monotonic()
        excluded = set(exclude)
        first = not excluded  # not a retry or a hedge
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
        index = self.prefix
        if index is not None and request is not None:
            return self._prefix_pick(now, index, eligible, request, first=first)
        if len(eligible) <= 1:
            return eligible[0] if eligible else None
        return self._two_choices(now, eligible)

    def _two_choices(self, now: float, eligible: list[Replica]) -> Replica:
        """The cheaper of two drawn at random; at equal cost, one not measured yet. It costs
        the best measured latency, which ties with that replica's own until an answer long
        enough to sample its decode speed comes: a coin's toss, each request, would leave
        it untried for ten requests one time in a thousand."""
        first, second = self.rng.sample(eligible, 2)
        latency = self.default_latency(now)
        cheaper = (first.cost(now, latency), first.latency.value(now) is not None) <= (
            second.cost(now, latency),
            second.latency.value(now) is not None,
        )
        return first if cheaper else second

    def _prefix_pick(
        self,
        now: float,
        index: PrefixIndex,
        eligible: list[Replica],
        request: RequestView,
        *,
        first: bool,
    ) -> Replica | None:
        """The session's replica, else the one holding the longest prefix of the prompt
        (ties: the cheaper), else power of two choices; always among replicas under the load
        bound (consistent hashing with bounded loads), so a hot prefix spills over to the
        next best. A first pick keeps the session here until an answer says otherwise
        (`answered_by`); a retry or hedge (`first` False) excludes the replicas tried
        already, so it goes to the second best, and moves the session only if it answers."""
        for replica in self.replicas:
            if not replica.available(now):
                index.forget(replica.url)  # it may come back with an empty cache
        if not eligible:
            return None
        settings = index.settings
        loads = [r.outstanding(now) for r in eligible]
        bound = max(settings.load_factor * (sum(loads) + 1) / len(eligible), settings.min_bound)
        under = [r for r, load in zip(eligible, loads, strict=True) if load + 1 <= bound]
        if not under:
            under = eligible
        keys = request.prefix_keys(settings.chunk_chars)
        session = request.session_from(settings.session)
        chosen: Replica | None = None
        if session is not None:
            url = index.session(session)
            chosen = next((r for r in under if r.url == url), None)
        matched = 0
        if chosen is None and keys:
            matches = [index.match(r.url, keys) for r in under]
            matched = max(matches)
            if matched:
                best = [r for r, m in zip(under, matches, strict=True) if m == matched]
                latency = self.default_latency(now)
                chosen = min(best, key=lambda r: r.cost(now, latency))
        if chosen is None:
            chosen = self._roomiest(now, index, under)
            matched = index.match(chosen.url, keys)
        elif session is not None and not matched:
            matched = index.match(chosen.url, keys)
        index.sent(chosen.url, keys, matched)
        request.matched[chosen.url] = matched * settings.chunk_chars
        if session is not None and first:
            index.stick(session, chosen.url)
        return chosen

    def answered_by(self, request: RequestView, replica: Replica) -> None:
        """`replica` answered `request`: its session lives there from now on. The first
        pick may have been a dead replica not yet ejected, the answer a retry elsewhere;
        a session left on the dead one would send its next turn to a third replica."""
        index = self.prefix
        if index is None:
            return
        session = request.session_from(index.settings.session)
        if session is not None and index.session(session) != replica.url:
            index.stick(session, replica.url)

    def _roomiest(self, now: float, index: PrefixIndex, under: list[Replica]) -> Replica:
        """Where a prompt nothing has matched goes: of the replicas under the bound with the
        fewest requests outstanding, two drawn at random, and of those the one the index
        holds least on (then the cheaper). Its prefix (a new tenant, a new session) lives
        where it lands from then on: two choices by cost alone put 3 of 8 agent sessions
        starting together on one replica (its cache thrashing, p90 TTFT 2.5x the others').
        Random draws, ties either way, not the cheapest of all: else one client's bad
        requests (5xx from llama-cpp-python) all go one way and their retries the other,
        and a replica is ejected as an outlier (tests/integration/test_health.py)."""
        fewest = min(r.outstanding(now) for r in under)
        least = [r for r in under if r.outstanding(now) <= fewest]
        # In random order: ties go either way, as in `_two_choices`.
        drawn = self.rng.sample(least, min(len(least), 2))
        latency = self.default_latency(now)
        return min(drawn, key=lambda r: (index.held(r.url), r.cost(now, latency)))

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
