"""Observability: OpenTelemetry traces, Prometheus metrics and one JSON log line per request.

The app holds one `Telemetry`; the request path fills one `RequestRecord` per request.
"""

from gateway.telemetry.core import Telemetry
from gateway.telemetry.record import RequestRecord
from gateway.telemetry.settings import TelemetrySettings

__all__ = ["RequestRecord", "Telemetry", "TelemetrySettings"]
