"""Prometheus metrics: definitions, the per-request update, replica gauges, the scrape.

(~540 lines, mostly the families' definitions and their label sets, kept beside the one
per-request update that fills them so that a label added here is added there.)

Each app has its own `CollectorRegistry` (several apps can share a test process). The
request path's updates are buffered (`buffered.py`) and reach the registry at each
scrape. With `PROMETHEUS_MULTIPROC_DIR` set, values live in prometheus-client's shared
files and a scrape merges every worker's: each worker then flushes its buffers, and
copies its replica gauges into those files, once a second, so a scrape sees all
workers' counts up to a second late. Labels are bounded: tiers, models, replicas and
tenants come from the policy (an unknown tenant is counted as "other"), and nothing per
request becomes a label. A request that failed after routing is counted on the tier
(and model, replica) it failed at, not as "none".

No `_created` series: prometheus-client would stamp each with the time its labels were
first seen (here, the first scrape after the first request, as updates are buffered),
and the Prometheus text format shows them as separate gauge families.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.pools import Pool
from gateway.replica import EjectionReason
from gateway.slo import SloTarget
from gateway.telemetry.buffered import BufferedCounter, BufferedHistogram
from gateway.telemetry.record import RequestRecord
from gateway.telemetry.tracing import OPERATION_NAMES

__all__ = ["NONE", "OTHER", "Metrics", "reset_multiprocess_dir"]

NONE = "none"  # label value where a request never got that far (no tier, no model)
OTHER = "other"  # label value for a tenant the policy does not name

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 600)
_TOKEN_BUCKETS = tuple(4.0**i for i in range(12))  # GenAI's advice: 1, 4, 16 ... 4^11
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
_GEN_AI_LABELS = ("gen_ai_operation_name", "gen_ai_response_model", "tier")
_REPLICA_SAMPLE_INTERVAL_S = 1.0
_M = TypeVar("_M", Counter, Gauge, Histogram)
_GaugeSpec = tuple[str, str, tuple[str, ...]]
_MultiprocessMode = Literal["livemin", "livesum", "livemax"]
_REPLICA_UP: _GaugeSpec = (
    "triage_replica_up",
    "1 if the replica is in rotation (its breaker closed), 0 if ejected (open, or waiting "
    "for its probe).",
    ("model", "replica"),
)
_REPLICA_IN_FLIGHT: _GaugeSpec = (
    "triage_replica_in_flight",
    "Requests in flight to the replica.",
    ("model", "replica"),
)
_REPLICA_FAILURES: _GaugeSpec = (
    "triage_replica_consecutive_failures",
    "Failures since the replica last passed a check.",
    ("model", "replica"),
)
_REPLICA_EJECTIONS: _GaugeSpec = (
    "triage_replica_ejections",
    "Times a replica was taken out of rotation, by reason: connect_refused, "
    "health_probe_failed, failures (requests in a row got no answer), outlier (5xx rate).",
    ("model", "replica", "reason"),
)
_EJECTION_REASONS: tuple[str, ...] = get_args(EjectionReason)


@dataclass(frozen=True, slots=True)
class _Bound:
    """What the current policy says about labels and objectives; swapped whole on reload."""

    pools: Mapping[str, Pool]
    slos: Mapping[str, SloTarget]
    tenants: frozenset[str] | None


class Metrics:
    """Every metric of one app; `observe(record)` is the whole per-request update."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide switch
        self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        self._bound = _Bound({}, {}, None)
        self._sampler: asyncio.Task[None] | None = None
        self._policy_collector = _PolicyCollector(self, replicas=multiprocess_dir is None)
        r = self.registry
        self.in_flight = BufferedCounter(
            Gauge(
                "triage_requests_in_flight",
                "Requests the gateway is working on (started, not yet finished).",
                multiprocess_mode="livesum",
                registry=r,
            )
        )
        self.requests = BufferedCounter(
            Counter(
                "triage_requests",
                "Requests answered, by tier, model, tenant, HTTP status and cache result.",
                ("tier", "model", "tenant", "status", "cache"),
                registry=r,
            )
        )
        self.tokens = BufferedCounter(
            Counter(
                "triage_tokens",
                "Tokens processed by the backends, by tenant, tier, model and type (input/output).",
                ("tenant", "tier", "model", "type"),
                registry=r,
            )
        )
        self.tokens_unreported = BufferedCounter(
            Counter(
                "triage_tokens_unreported",
                "Tokens the backend did not report, counted by the gateway (a part of "
                "triage_tokens): source tokenized (the backend's tokenizer) or estimated.",
                ("tenant", "tier", "model", "type", "source"),
                registry=r,
            )
        )
        self.cost = BufferedCounter(
            Counter(
                "triage_cost_usd",
                "Backend cost in USD at the policy's prices, by tenant, tier and model.",
                ("tenant", "tier", "model"),
                registry=r,
            )
        )
        self.saved = BufferedCounter(
            Counter(
                "triage_cache_saved_usd",
                "USD not spent because the cache answered, by tenant and tier.",
                ("tenant", "tier"),
                registry=r,
            )
        )
        self.token_usage = BufferedHistogram(
            Histogram(
                "gen_ai_client_token_usage",
                "Tokens per backend call (OpenTelemetry GenAI gen_ai.client.token.usage).",
                (*_GEN_AI_LABELS, "gen_ai_token_type"),
                buckets=_TOKEN_BUCKETS,
                registry=r,
            )
        )
        self.ttft = BufferedHistogram(
            Histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Streams: arrival to the first token sent (gen_ai.server.time_to_first_token).",
                _GEN_AI_LABELS,
                buckets=_TTFT_BUCKETS,
                registry=r,
            )
        )
        self.inter_token = BufferedHistogram(
            Histogram(
                "gen_ai_server_time_per_output_token_seconds",
                "Streams: mean time per output token after the first "
                "(gen_ai.server.time_per_output_token).",
                _GEN_AI_LABELS,
                buckets=_ITL_BUCKETS,
                registry=r,
            )
        )
        self.duration = BufferedHistogram(
            Histogram(
                "gen_ai_server_request_duration_seconds",
                "Successful requests: arrival to last byte (gen_ai.server.request.duration).",
                _GEN_AI_LABELS,
                buckets=_E2E_BUCKETS,
                registry=r,
            )
        )
        self.slo = BufferedCounter(
            Counter(
                "triage_slo_requests",
                "Requests judged against their tier's SLO: met, ttft_missed, e2e_missed, "
                "error, or refused by admission: shed (429 over capacity) or expired (503 "
                "deadline passed).",
                ("tier", "result"),
                registry=r,
            )
        )
        self.decisions = BufferedCounter(
            Counter(
                "triage_routing_decisions",
                "Routing decisions by chosen tier and reason (model, tier, header, rule:N, "
                "classifier, default).",
                ("tier", "reason"),
                registry=r,
            )
        )
        self.classifier_score = BufferedHistogram(
            Histogram(
                "triage_classifier_score",
                "Difficulty scores the classifier gave (0 easy .. 1 hard).",
                buckets=_SCORE_BUCKETS,
                registry=r,
            )
        )
        self.reroutes = BufferedCounter(
            Counter(
                "triage_tier_reroutes",
                "Requests served by another tier than the router chose (reason: fallback, budget).",
                ("from_tier", "to_tier", "reason"),
                registry=r,
            )
        )
        self.retries = BufferedCounter(
            Counter("triage_retries", "Upstream retries, by tier.", ("tier",), registry=r)
        )
        self.hedges = BufferedCounter(
            Counter("triage_hedges", "Hedged upstream requests, by tier.", ("tier",), registry=r)
        )
        self.shed = BufferedCounter(
            Counter(
                "triage_requests_shed", "Requests shed by admission control.", ("tier",), registry=r
            )
        )
        self.upstream_requests = BufferedCounter(
            Counter(
                "triage_upstream_requests",
                "Requests each replica served, by HTTP status the client saw.",
                ("model", "replica", "status"),
                registry=r,
            )
        )
        self.upstream_duration = BufferedHistogram(
            Histogram(
                "triage_upstream_duration_seconds",
                "Successful requests per replica: arrival to last byte.",
                ("model", "replica"),
                buckets=_E2E_BUCKETS,
                registry=r,
            )
        )
        self.budget = _Labeled(
            Gauge(
                "triage_budget_remaining_usd",
                "USD left in a budget window, by tenant, tier ('all': the tenant's whole budget) "
                "and window.",
                ("tenant", "tier", "window"),
                multiprocess_mode="mostrecent",
                registry=r,
            )
        )
        # Replica state is the pools' own (`Replica.ejections_by_reason` counts ejections):
        # read at scrape time in one process, copied into the shared files once a second
        # in many.
        self._ejections_seen: dict[tuple[str, str, str], int] = {}
        if multiprocess_dir is None:
            r.register(self._policy_collector)
            self._replica_gauges: (
                tuple[_Labeled[Gauge], _Labeled[Gauge], _Labeled[Gauge]] | None
            ) = None
            self._replica_ejections: _Labeled[Counter] | None = None
        else:
            self._replica_gauges = (
                _Labeled(_gauge(_REPLICA_UP, "livemin", r)),
                _Labeled(_gauge(_REPLICA_IN_FLIGHT, "livesum", r)),
                _Labeled(_gauge(_REPLICA_FAILURES, "livemax", r)),
            )
            name, documentation, labels = _REPLICA_EJECTIONS
            self._replica_ejections = _Labeled(Counter(name, documentation, labels, registry=r))
        self._buffered = tuple(
            metric
            for metric in vars(self).values()
            if isinstance(metric, BufferedCounter | BufferedHistogram)
        )

    # --- per request -----------------------------------------------------------------------

    def observe(self, record: RequestRecord) -> None:
        tenant = self.tenant_label(record.tenant)
        tier, model, status = record.tier or NONE, record.model or NONE, str(record.status)
        self.requests.add((tier, model, tenant, status, record.cache))
        if record.decided_tier is not None and record.decision_reason is not None:
            self.decisions.add((record.decided_tier, record.decision_reason))
            if record.tier is not None and record.tier != record.decided_tier:
                reason = "budget" if record.budget_downgraded else "fallback"
                self.reroutes.add((record.decided_tier, record.tier, reason))
        if record.difficulty is not None:
            self.classifier_score.observe((), record.difficulty)
        if record.retries:
            self.retries.add((tier,), record.retries)
        if record.hedges:
            self.hedges.add((tier,), record.hedges)
        if record.shed:
            self.shed.add((tier,))
        if record.cache == "hit":
            if record.saved_usd:
                self.saved.add((tenant, tier), record.saved_usd)
            return  # no backend work, and not the tier's latency
        if record.model is not None:
            self._observe_usage(record, tenant, tier, record.model)
        if record.replica is not None and record.model is not None:
            self.upstream_requests.add((record.model, record.replica, status))
        if record.status < 400 and record.model is not None:
            self._observe_latency(record, tier, record.model)
        slo = self._bound.slos.get(tier)
        if slo is not None:
            result = _slo_result(record, slo)
            if result is not None:
                self.slo.add((tier, result))

    def tenant_label(self, tenant: str | None) -> str:
        """The tenant as a label value: "none" before auth, "other" if the policy lacks it."""
        if tenant is None:
            return NONE
        tenants = self._bound.tenants
        return OTHER if tenants is not None and tenant not in tenants else tenant

    def _observe_usage(self, record: RequestRecord, tenant: str, tier: str, model: str) -> None:
        operation = OPERATION_NAMES.get(record.operation, record.operation)
        source = record.usage_source
        for kind, count in (("input", record.prompt_tokens), ("output", record.completion_tokens)):
            if count:
                self.tokens.add((tenant, tier, model, kind), count)
                self.token_usage.observe((operation, model, tier, kind), count)
                if source is not None and source != "backend":
                    self.tokens_unreported.add((tenant, tier, model, kind, source), count)
        if record.cost_usd:
            self.cost.add((tenant, tier, model), record.cost_usd)

    def _observe_latency(self, record: RequestRecord, tier: str, model: str) -> None:
        operation = OPERATION_NAMES.get(record.operation, record.operation)
        e2e = record.e2e_s
        if e2e is not None:
            self.duration.observe((operation, model, tier), e2e)
            if record.replica is not None:
                self.upstream_duration.observe((model, record.replica), e2e)
        if record.stream and (ttft := record.ttft_s) is not None:
            self.ttft.observe((operation, model, tier), ttft)
        if (inter_token := record.inter_token_s) is not None:
            self.inter_token.observe((operation, model, tier), inter_token)

    def flush(self) -> None:
        """Hand the request path's buffered updates to prometheus-client's metrics."""
        for buffered in self._buffered:
            buffered.flush()

    # --- outside the request path ----------------------------------------------------------

    def bind(
        self,
        pools: Mapping[str, Pool],
        slos: Mapping[str, SloTarget],
        tenants: frozenset[str] | None,
    ) -> None:
        """Take the labels, objectives and pools of a newly loaded policy.

        In multiprocess mode this starts the replica sampler: call it on the event loop.
        """
        self._bound = _Bound(dict(pools), dict(slos), tenants)
        if self._replica_gauges is not None:
            self.sample_replicas()
            if self._sampler is None:
                self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    def sample_replicas(self) -> None:
        """Multiprocess mode: copy this worker's view of each replica into the shared files."""
        assert self._replica_gauges is not None and self._replica_ejections is not None
        up, in_flight, failures = self._replica_gauges
        seen = self._ejections_seen
        for model, url, is_up, flight, failed, ejections in _replica_states(self._bound.pools):
            up(model, url).set(is_up)
            in_flight(model, url).set(flight)
            failures(model, url).set(failed)
            for reason, ejected in ejections:
                new = ejected - seen.get((model, url, reason), 0)
                if new < 0:  # a reload built the replica anew: its count started again
                    new = ejected
                # Every reason's series exists from the start, at 0: `rate()` sees the first.
                self._replica_ejections(model, url, reason).inc(new)
                seen[model, url, reason] = ejected

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(_REPLICA_SAMPLE_INTERVAL_S)
            self.sample_replicas()
            self.flush()

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        self.flush()

    def scrape(self, accept: str) -> tuple[bytes, str]:
        """The exposition body for a scrape, in the format the `Accept` header asks for.

        Call `flush` first, on the event loop: it is the buffers' only writer."""
        encoder, content_type = choose_encoder(accept)
        if self.multiprocess_dir is None:
            return encoder(self.registry), content_type
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(self._policy_collector)
        return encoder(registry), content_type

    @property
    def bound(self) -> _Bound:
        return self._bound


def _gauge(spec: _GaugeSpec, mode: _MultiprocessMode, registry: CollectorRegistry) -> Gauge:
    name, documentation, labels = spec
    return Gauge(name, documentation, labels, multiprocess_mode=mode, registry=registry)


class _Labeled(Generic[_M]):
    """A labelled metric whose children are kept by label values.

    prometheus-client's `labels()` checks and converts its arguments on every call
    (~3 µs); a dict probe is ~0.1 µs. Label values are bounded, and so is this dict.
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: _M) -> None:
        self.metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class _PolicyCollector(Collector):
    """Read at scrape time, so the request path pays nothing: SLO targets, replica state."""

    def __init__(self, metrics: Metrics, replicas: bool) -> None:
        self._metrics = metrics
        self._replicas = replicas

    def collect(self) -> Iterable[Metric]:
        bound = self._metrics.bound
        ratio = GaugeMetricFamily(
            "triage_slo_target_ratio",
            "The share of a tier's requests that must meet its SLO (percentile / 100).",
            labels=("tier",),
        )
        objective = GaugeMetricFamily(
            "triage_slo_objective_seconds",
            "A tier's latency objective, by objective (ttft, e2e).",
            labels=("tier", "objective"),
        )
        for tier, slo in bound.slos.items():
            ratio.add_metric((tier,), slo.percentile / 100)
            objective.add_metric((tier, "ttft"), slo.ttft_s)
            objective.add_metric((tier, "e2e"), slo.e2e_s)
        yield ratio
        yield objective
        if not self._replicas:
            return
        families = [
            GaugeMetricFamily(name, text, labels=labels)
            for name, text, labels in (_REPLICA_UP, _REPLICA_IN_FLIGHT, _REPLICA_FAILURES)
        ]
        name, text, labels = _REPLICA_EJECTIONS
        ejected = CounterMetricFamily(name, text, labels=labels)
        for model, url, is_up, flight, failed, ejections in _replica_states(bound.pools):
            for family, value in zip(families, (is_up, flight, failed), strict=True):
                family.add_metric((model, url), value)
            for reason, count in ejections:
                ejected.add_metric((model, url, reason), count)
        yield from families
        yield ejected
        yield from _prefix_families(bound.pools)


def _prefix_families(pools: Mapping[str, Pool]) -> Iterable[Metric]:
    """The prefix balancer's predicted cache hits against those its replicas report: the
    index's hit and queried prompt characters, and the sum of the replicas' last scraped
    `vllm:prefix_cache_hits_total` and `_queries_total` (tokens)."""
    predicted = CounterMetricFamily(
        "triage_prefix_predicted_chars",
        "Prompt characters the prefix balancer sent (kind=query) and expected cached on the "
        "replica it chose (kind=hit).",
        labels=("model", "kind"),
    )
    reported = CounterMetricFamily(
        "triage_prefix_reported_tokens",
        "Prompt tokens the pool's replicas report looked up (kind=query) and found cached "
        "(kind=hit) in their prefix cache, as last scraped.",
        labels=("model", "kind"),
    )
    for model, pool in pools.items():
        index = pool.prefix
        if index is not None:
            predicted.add_metric((model, "query"), index.queried_chars)
            predicted.add_metric((model, "hit"), index.predicted_chars)
        loads = [r.load for r in pool.replicas if r.load and r.load.prefix_queries is not None]
        if loads:
            reported.add_metric((model, "query"), sum(load.prefix_queries or 0.0 for load in loads))
            reported.add_metric((model, "hit"), sum(load.prefix_hits or 0.0 for load in loads))
    yield predicted
    yield reported


def reset_multiprocess_dir(path: str | Path) -> None:
    """Create `PROMETHEUS_MULTIPROC_DIR` or empty it: once, in the parent, before workers start.

    Files left by an earlier run would add its counts to this one's, and its workers'
    gauges would look alive.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def _replica_states(
    pools: Mapping[str, Pool],
) -> Iterable[tuple[str, str, int, int, int, list[tuple[str, int]]]]:
    """model, URL, up, in flight, consecutive failures, (reason, ejections): of each replica.

    Up is its breaker closed: an ejected replica is not back because its cooldown has
    passed, only once a probe (or a passing health check, then a probe) brings it back.
    """
    for model, pool in pools.items():
        for replica in pool.replicas:
            up = 1 if replica.state == "closed" else 0
            by_reason = replica.ejections_by_reason
            ejections = [(reason, by_reason.get(reason, 0)) for reason in _EJECTION_REASONS]
            ejections += [(r, n) for r, n in by_reason.items() if r not in _EJECTION_REASONS]
            yield model, replica.url, up, replica.in_flight, replica.failures, ejections


def _slo_result(record: RequestRecord, slo: SloTarget) -> str | None:
    """met / ttft_missed / e2e_missed / error, or shed / expired for a request admission
    refused; None for client errors, which say nothing."""
    if record.shed:
        return "expired" if record.error_code == "deadline_expired" else "shed"
    if record.status >= 500:
        return "error"
    if record.status >= 400:
        return None
    ttft_met, e2e_met = slo.met(record.ttft_s if record.stream else None, record.e2e_s)
    if not ttft_met:
        return "ttft_missed"
    return "met" if e2e_met else "e2e_missed"
