"""Real servers on loopback: simulated GPU replicas and the gateway, each its own process."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.support.processes import free_port, start_process, stop_process
from tests.support.redis import RedisServer

SMALL, LARGE = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"
TRIAGE = [sys.executable, "-m", "gateway.cli"]
ERROR_FIELDS = {"message", "type", "param", "code"}  # an OpenAI error body, no more


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    config: Path | None = None

    def stop(self) -> None:
        stop_process(self.process)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# What the `services` fixture gives: keeps a service, to stop when the module ends.
Services = Callable[[Service], Service]
# A small and a large replica, in that order.
SimPair = tuple[Service, Service]


def start_service(
    name: str,
    args: list[str],
    health_url: str,
    url: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> Service:
    log = log_dir / f"{name}.log"
    process = start_process(args, health_url, log, name=name, env=env)
    return Service(name, url, process, log)


def start_sim(log_dir: Path, profile: str, *flags: str) -> Service:
    port = free_port()
    args = [*TRIAGE, "sim", "--profile", profile, "--port", str(port), *flags]
    root = f"http://127.0.0.1:{port}"
    return start_service(f"sim-{port}", args, root + "/health", root + "/v1", log_dir)


def start_sim_pair(log_dir: Path, services: Services, *flags: str) -> SimPair:
    """A `small` and a `large` profile sim with the same `flags`, kept by `services`."""
    return (
        services(start_sim(log_dir, "small", *flags)),
        services(start_sim(log_dir, "large", *flags)),
    )


def start_gateway(
    log_dir: Path, policy: dict[str, Any], env: dict[str, str] | None = None, workers: int = 1
) -> Service:
    port = free_port()
    path = log_dir / f"policy-{port}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    args = [*TRIAGE, "serve", "--policy", str(path), "--port", str(port), "--workers", str(workers)]
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
def services() -> Iterator[Services]:
    """Collects services to stop when the module ends."""
    started: list[Service] = []

    def keep(service: Service) -> Service:
        started.append(service)
        return service

    yield keep
    for service in reversed(started):
        service.stop()


@pytest.fixture(scope="module")
def prefix(request: pytest.FixtureRequest) -> str:
    """Redis keys of the module's own, on the redis-server all modules share."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    return f"{module}-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="module")
def store_section(redis_server: RedisServer, prefix: str) -> dict[str, Any]:
    """A policy's `store` section: the shared redis-server, under the module's `prefix`."""
    return {"redis_url": redis_server.url, "key_prefix": prefix, "timeout_ms": 1000}


def set_faults(sim: Service, **faults: Any) -> None:
    root = sim.url.removesuffix("/v1")
    httpx.post(root + "/admin/faults", json=faults, timeout=5).raise_for_status()


def sim_stats(sim: Service) -> dict[str, Any]:
    root = sim.url.removesuffix("/v1")
    stats: dict[str, Any] = httpx.get(root + "/admin/stats", timeout=5).json()
    return stats


def metric(gateway: Service, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the gateway's /metrics whose labels include `labels`."""
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    total = 0.0
    for found, value in re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.MULTILINE):
        if all(f'{key}="{want}"' in found for key, want in labels.items()):
            total += float(value)
    return total


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll `check` until it holds or `seconds` pass; the last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def request_lines(gateway: Service, request_id: str) -> list[dict[str, Any]]:
    """The gateway's request log lines for one request (waits for the line to be written)."""
    deadline = time.monotonic() + 5
    while True:
        lines = []
        for line in gateway.output().splitlines():
            if line.startswith("{") and request_id in line:
                entry = orjson.loads(line)
                if entry.get("logger") == "triage.request":
                    lines.append(entry)
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def request_line(gateway: Service, request_id: str) -> dict[str, Any]:
    """The request's log line, once the gateway has written it (after the answer)."""
    lines = request_lines(gateway, request_id)
    if not lines:
        raise AssertionError(f"no request log line for {request_id}")
    return lines[0]


def assert_openai_error(
    response: httpx.Response, status: int, param: str | None = None
) -> dict[str, Any]:
    """The response is `status` with an OpenAI error body (and, if given, that `param`)."""
    assert response.status_code == status, response.text[:500]
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == ERROR_FIELDS
    if param is not None:
        assert error["param"] == param
    return error
