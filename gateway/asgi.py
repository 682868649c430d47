"""ASGI entry point for multi-worker servers: `TRIAGE_POLICY` names the policy file."""

from __future__ import annotations

import os

from gateway.app import build_app

app = build_app(os.environ.get("TRIAGE_POLICY", "policies/demo.yaml"))
