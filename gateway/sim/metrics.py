"""Prometheus metrics of one sim app, under vLLM's, SGLang's or llama.cpp's names, in the app's own
registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.sim.engine import SimEngine
from gateway.sim.quirks import MetricsStyle

__all__ = ["METRICS_CONTENT_TYPE", "SimMetrics"]

METRICS_CONTENT_TYPE: str = _CONTENT_TYPE

# vLLM's own bucket boundaries, so dashboards built for vLLM read the sim the same way.
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class SimMetrics:
    """The gauges read the engine at scrape time; the rest are observed by the request path.

    Each app owns a fresh CollectorRegistry: several sims share one process in tests and in
    the demo, and the global default registry would reject their duplicate names. `style`
    picks the server whose names are used; only vLLM's also get the latency histograms.
    """

    def __init__(self, engine: SimEngine, style: MetricsStyle = "vllm") -> None:
        self.registry = CollectorRegistry()
        model = engine.profile.model
        labels = ("model_name",)
        self._ttft: _Observer = _NOTHING
        self._e2e: _Observer = _NOTHING
        if style == "sglang":
            # SGLang with --enable-metrics (python/sglang/srt/metrics/collector.py).
            self._gauge(
                "sglang:num_running_reqs", "Running requests.", model, _read(engine, "running")
            )
            self._gauge(
                "sglang:num_queue_reqs", "Queued requests.", model, _read(engine, "waiting")
            )
            self._gauge("sglang:token_usage", "KV-cache use, 0..1.", model, _read(engine, "kv"))
            self._counters("sglang:prompt_tokens", "sglang:generation_tokens", model)
            return
        if style == "llama_cpp":
            # llama-server with --metrics: unlabelled gauges (tools/server/README.md).
            self._plain_gauge(
                "llamacpp:requests_processing", "Requests processing.", _read(engine, "running")
            )
            self._plain_gauge(
                "llamacpp:requests_deferred", "Requests deferred.", _read(engine, "waiting")
            )
            self._prompt_tokens = Counter(
                "llamacpp:prompt_tokens", "Prompt tokens processed.", registry=self.registry
            )
            self._generation_tokens = Counter(
                "llamacpp:tokens_predicted", "Tokens predicted.", registry=self.registry
            )
            return
        self._gauge(
            "vllm:num_requests_running",
            "Requests in the running batch.",
            model,
            lambda: engine.running,
        )
        self._gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            model,
            lambda: engine.waiting,
        )
        # vllm-project/vllm `vllm/v1/metrics/loggers.py` @005a810 (PrometheusStatLogger): the
        # gauge is the block pool's usage (blocks held by running requests); the two counters
        # are in tokens, declared without `_total`, which prometheus_client adds on the wire.
        self._gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage, 1 means 100 percent.",
            model,
            lambda: engine.kv_cache_usage,
        )
        self.registry.register(_PrefixCacheCounters(engine, model))
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token in seconds.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name=model)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name=model)
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=self.registry
        ).labels(model_name=model)
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", labels, registry=self.registry
        ).labels(model_name=model)

    def _gauge(self, name: str, doc: str, model: str, read: Callable[[], float]) -> None:
        gauge = Gauge(name, doc, ("model_name",), registry=self.registry)
        gauge.labels(model_name=model).set_function(read)

    def _plain_gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        Gauge(name, doc, registry=self.registry).set_function(read)

    def _counters(self, prompt: str, generation: str, model: str) -> None:
        labels = ("model_name",)
        self._prompt_tokens = Counter(
            prompt, "Prefill tokens processed.", labels, registry=self.registry
        ).labels(model_name=model)
        self._generation_tokens = Counter(
            generation, "Generation tokens processed.", labels, registry=self.registry
        ).labels(model_name=model)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_finished(self, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Record a request that got its whole answer."""
        self._e2e.observe(seconds)
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _PrefixCacheCounters(Collector):
    """vLLM's prefix-cache counters, read from the engine's KV cache at scrape time."""

    def __init__(self, engine: SimEngine, model: str) -> None:
        self._engine = engine
        self._model = model

    def collect(self) -> Iterator[Metric]:
        kv = self._engine.kv
        for name, doc, value in (
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                kv.queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                kv.hits,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=("model_name",))
            family.add_metric((self._model,), value)
            yield family


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class _Nothing:
    def observe(self, amount: float) -> None:
        pass


_NOTHING = _Nothing()


def _read(engine: SimEngine, what: str) -> Callable[[], float]:
    if what == "running":
        return lambda: engine.running
    if what == "waiting":
        return lambda: engine.waiting
    return lambda: engine.kv_cache_usage
