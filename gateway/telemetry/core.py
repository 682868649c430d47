"""`Telemetry`: the one object an app holds for traces, metrics and request logs."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from gateway.slo import SloTarget
from gateway.telemetry.logs import REQUEST_LOGGER, log_request
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.record import RequestRecord
from gateway.telemetry.settings import TelemetrySettings
from gateway.telemetry.tracing import build_tracing, trace_id_from_traceparent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from gateway.policy import Policy
    from gateway.pools import Pool

__all__ = ["ANONYMOUS", "Telemetry"]

ANONYMOUS = "anonymous"  # the tenant of callers without a key (gateway.auth's name for them)

_request_log = logging.getLogger(REQUEST_LOGGER)


class Telemetry:
    """Built once per app, before the first request; lives across policy reloads.

    Per request: `start()` makes a `RequestRecord` (and the root span, when tracing is
    on), the request path fills it in and opens child spans from `record.trace`, and
    `finish(record)` updates the metrics, ends the root span and writes the log line.
    """

    def __init__(
        self,
        settings: TelemetrySettings | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        span_processor: SpanProcessor | None = None,
    ) -> None:
        """`environ` defaults to `os.environ`, read here and never again."""
        self.settings = settings = settings or TelemetrySettings()
        environ = os.environ if environ is None else environ
        self.metrics = Metrics(environ.get("PROMETHEUS_MULTIPROC_DIR") or None)
        self.tracing = build_tracing(settings, environ, span_processor)
        self._log_requests = settings.request_log
        self._capture_content = settings.log_prompts
        if settings.log_level is not None:
            logging.getLogger("triage").setLevel(settings.log_level.upper())

    @property
    def tracing_enabled(self) -> bool:
        return self.tracing is not None

    def bind(self, policy: Policy, pools: Mapping[str, Pool]) -> None:
        """Take a (re)loaded policy's tenants, SLOs and pools; call at start and on reload.

        Only these follow a reload: the `telemetry:` settings themselves apply at start.
        """
        slos = {
            name: SloTarget(tier.slo.ttft_ms / 1000, tier.slo.e2e_ms / 1000, tier.slo.percentile)
            for name, tier in policy.tiers.items()
            if tier.slo is not None
        }
        tenants = frozenset((*policy.tenants, ANONYMOUS))
        self.metrics.bind(pools, slos, tenants)

    # --- per request -----------------------------------------------------------------------

    def start(self, operation: str, headers: Mapping[str, str], request_id: str) -> RequestRecord:
        """A new request's record; its trace continues the client's `traceparent`, if any.

        Every record started must be finished: the in-flight gauge counts the difference.
        """
        self.metrics.in_flight.add()
        if self.tracing is None:
            trace_id = trace_id_from_traceparent(headers.get("traceparent"))
            return RequestRecord(request_id, operation, trace_id=trace_id)
        trace = self.tracing.start(operation, headers, request_id)
        return RequestRecord(request_id, operation, trace=trace, trace_id=trace.trace_id)

    def finish(self, record: RequestRecord) -> None:
        """Account for a finished request: metrics, root span, log line. Idempotent."""
        if record.ended_at is not None:
            return
        record.ended_at = time.perf_counter()
        self.metrics.in_flight.add(amount=-1)
        self.metrics.observe(record)
        record.trace.close(record, self._capture_content)
        if self._log_requests and _request_log.isEnabledFor(logging.INFO):
            log_request(_request_log, record, self._capture_content)

    # --- outside the request path ----------------------------------------------------------

    def budget_remaining(
        self, tenant: str | None, tier: str | None, window: str, usd: float
    ) -> None:
        """USD left in one budget window, holds of requests in flight deducted.

        `tier=None`: the tenant's overall budget; `tenant=None`: a tier's budget shared by
        all tenants (label `*`).
        """
        label = "*" if tenant is None else self.metrics.tenant_label(tenant)
        self.metrics.budget(label, tier or "all", window).set(usd)

    async def metrics_endpoint(self, request: Request) -> Response:
        """`GET /metrics`: Prometheus text, or OpenMetrics if the scraper asks for it."""
        accept = request.headers.get("accept", "")
        self.metrics.flush()
        if self.metrics.multiprocess_dir is None:
            body, content_type = self.metrics.scrape(accept)
        else:  # reads every worker's files from disk: keep it off the event loop
            body, content_type = await asyncio.to_thread(self.metrics.scrape, accept)
        return Response(body, headers={"content-type": content_type})

    async def close(self) -> None:
        """Stop the replica sampler and flush spans not yet exported."""
        await self.metrics.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
