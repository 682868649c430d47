from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.telemetry import TelemetrySettings


def test_defaults_are_quiet() -> None:
    settings = TelemetrySettings()
    assert settings.otlp_endpoint is None
    assert settings.traces_url() is None
    assert settings.sample_ratio == 1.0
    assert settings.log_prompts is False
    assert settings.request_log is True


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("https://collector:4318/", "https://collector:4318/v1/traces"),
        ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
        ("http://gw/otlp", "http://gw/otlp/v1/traces"),
    ],
)
def test_traces_url(endpoint: str, url: str) -> None:
    assert TelemetrySettings(otlp_endpoint=endpoint).traces_url() == url


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"otlp_endpoint": "collector:4318"}, "must be an http(s) URL like http://collector:4318"),
        ({"sample_ratio": 1.5}, "less than or equal to 1"),
        ({"log_level": "loud"}, "'debug', 'info', 'warning' or 'error'"),
        ({"exporter": "jaeger"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_rejected(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        TelemetrySettings.model_validate(raw)
    assert message in str(info.value)


def test_frozen_and_headers_kept_out_of_repr() -> None:
    settings = TelemetrySettings(otlp_headers={"authorization": "Bearer secret"})
    assert "secret" not in repr(settings)
    with pytest.raises(ValidationError):
        settings.sample_ratio = 0.5  # type: ignore[misc]
