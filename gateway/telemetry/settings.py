"""The policy's `telemetry:` section: where traces go, how much is sampled, what is logged."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

__all__ = ["TelemetrySettings"]


class TelemetrySettings(BaseModel, extra="forbid", frozen=True):
    """Read once when the app starts; a policy reload does not change them.

    Tracing is on when an OTLP endpoint is known: `otlp_endpoint` here, or the standard
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` variables.
    `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turns it off regardless.
    """

    # OTLP/HTTP base URL (`http://collector:4318`; `/v1/traces` is appended) or the full
    # traces URL. None: the OTEL_EXPORTER_OTLP_* variables decide.
    otlp_endpoint: str | None = None
    otlp_headers: dict[str, str] = Field({}, repr=False)  # e.g. an auth header for the collector
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "triage"
    sample_ratio: float = Field(1.0, ge=0, le=1)  # of new traces; a client's sampled flag wins
    log_prompts: bool = False  # prompt and completion text in spans and request log lines
    log_level: Literal["debug", "info", "warning", "error"] | None = None  # None: TRIAGE_LOG_LEVEL
    request_log: bool = True  # one JSON line per request, at level info

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must be an http(s) URL like http://collector:4318, got {url!r}")
        return url

    def traces_url(self) -> str | None:
        """The full OTLP/HTTP traces URL from `otlp_endpoint`, or None."""
        if self.otlp_endpoint is None:
            return None
        url = self.otlp_endpoint.rstrip("/")
        return url if url.endswith("/v1/traces") else url + "/v1/traces"
