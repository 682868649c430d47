"""Real servers on loopback: simulated GPU replicas and the gateway, each its own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMALL, LARGE = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"
TRIAGE = [sys.executable, "-m", "gateway.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    config: Path | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(
    name: str,
    args: list[str],
    health_url: str,
    url: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> Service:
    log = log_dir / f"{name}.log"
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    service = Service(name, url, process, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{service.output()}")
        try:
            if httpx.get(health_url, timeout=0.5).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"{name} did not become healthy:\n{service.output()}")


def start_sim(log_dir: Path, profile: str, *flags: str) -> Service:
    port = free_port()
    args = [*TRIAGE, "sim", "--profile", profile, "--port", str(port), *flags]
    root = f"http://127.0.0.1:{port}"
    return start_service(f"sim-{port}", args, root + "/health", root + "/v1", log_dir)


def start_gateway(
    log_dir: Path, policy: dict[str, Any], env: dict[str, str] | None = None
) -> Service:
    port = free_port()
    path = log_dir / f"policy-{port}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    args = [*TRIAGE, "serve", "--policy", str(path), "--port", str(port)]
    root = f"http://127.0.0.1:{port}"
    service = start_service(f"gateway-{port}", args, root + "/healthz", root, log_dir, env)
    service.config = path
    return service


def policy_for(small: list[str], large: list[str], **sections: Any) -> dict[str, Any]:
    """A two-tier policy over the given replica URLs; `sections` override top-level keys."""
    policy: dict[str, Any] = {
        "version": 1,
        "server": {"upstream_timeout_s": 5, "health_check_interval_s": 0.5},
        "models": {
            SMALL: {"replicas": small, "price": {"input_per_mtok": 0.05, "output_per_mtok": 0.1}},
            LARGE: {"replicas": large, "price": {"input_per_mtok": 0.6, "output_per_mtok": 0.8}},
        },
        "tiers": {"cheap": {"models": [SMALL]}, "large": {"models": [LARGE]}},
        "routing": {
            "default_tier": "cheap",
            "fallback": {"cheap": ["large"]},
            "rules": [{"when": {"prompt_tokens_over": 2000}, "tier": "large"}],
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    return policy


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="module")
def services() -> Iterator[Callable[[Service], Service]]:
    """Collects services to stop when the module ends."""
    started: list[Service] = []

    def keep(service: Service) -> Service:
        started.append(service)
        return service

    yield keep
    for service in reversed(started):
        service.stop()


def set_faults(sim: Service, **faults: Any) -> None:
    root = sim.url.removesuffix("/v1")
    httpx.post(root + "/admin/faults", json=faults, timeout=5).raise_for_status()


def sim_stats(sim: Service) -> dict[str, Any]:
    root = sim.url.removesuffix("/v1")
    stats: dict[str, Any] = httpx.get(root + "/admin/stats", timeout=5).json()
    return stats
