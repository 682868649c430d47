"""ASGI entry point for multi-worker servers: `TRIAGE_POLICY` names the policy file.

Each worker is a fresh interpreter (uvicorn spawns them): it sets up Triage's JSON logging
itself, at `TRIAGE_LOG_LEVEL`, or its request lines would go nowhere.
"""

from __future__ import annotations

import os

from gateway.app import build_app
from gateway.telemetry.logs import configure_logging

__all__ = ["app"]

configure_logging()
app = build_app(os.environ.get("TRIAGE_POLICY", "policies/demo.yaml"))
