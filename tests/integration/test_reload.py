"""Policy reload without restart: admin endpoint and SIGHUP, in-flight requests unharmed."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.policy import hash_key
from tests.integration.conftest import Service, policy_for, start_gateway, start_sim

pytestmark = pytest.mark.integration
ADMIN_KEY = "sk-admin-test"


@pytest.fixture(scope="module")
def sim(log_dir: Path, services: Callable[[Service], Service]) -> tuple[Service, Service]:
    fast = ("--ttft-ms", "5", "--itl-ms", "20")
    return (
        services(start_sim(log_dir, "small", *fast)),
        services(start_sim(log_dir, "large", *fast)),
    )


def make_policy(sim: tuple[Service, Service], default_tier: str) -> dict[str, Any]:
    small, large = sim
    policy = policy_for([small.url], [large.url], server={"admin_key": hash_key(ADMIN_KEY)})
    policy["routing"]["default_tier"] = default_tier
    return policy


def tier_of_next_request(gateway: Service) -> str:
    body = {"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    return response.headers["x-triage-tier"]


def reload(gateway: Service, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gateway.url + "/admin/reload", headers=headers, timeout=10)


def write(gateway: Service, policy: dict[str, Any]) -> None:
    assert gateway.config is not None
    gateway.config.write_text(yaml.safe_dump(policy, sort_keys=False))


def test_reload_requires_admin_key(
    log_dir: Path, services: Callable[[Service], Service], sim: tuple[Service, Service]
) -> None:
    gateway = services(start_gateway(log_dir, make_policy(sim, "cheap")))
    assert reload(gateway, None).status_code == 401
    assert reload(gateway, "sk-wrong").status_code == 401
    assert reload(gateway).status_code == 200


def test_admin_is_off_without_a_key(
    log_dir: Path, services: Callable[[Service], Service], sim: tuple[Service, Service]
) -> None:
    gateway = services(start_gateway(log_dir, policy_for([sim[0].url], [sim[1].url])))
    response = reload(gateway)
    assert response.status_code == 404 and "admin_key" in response.json()["error"]["message"]


def test_reload_applies_new_policy_and_rejects_invalid_one(
    log_dir: Path, services: Callable[[Service], Service], sim: tuple[Service, Service]
) -> None:
    gateway = services(start_gateway(log_dir, make_policy(sim, "cheap")))
    assert tier_of_next_request(gateway) == "cheap"

    write(gateway, make_policy(sim, "large"))
    assert reload(gateway).json() == {"reloaded": True, "workers_restarting": False}
    assert tier_of_next_request(gateway) == "large"

    broken = make_policy(sim, "cheap")
    broken["tiers"]["cheap"]["slo"] = {"ttft_ms": -1, "e2e_ms": 10}
    write(gateway, broken)
    response = reload(gateway)
    assert response.status_code == 400
    assert response.json()["errors"] == ["tiers.cheap.slo.ttft_ms: must be > 0"]
    assert tier_of_next_request(gateway) == "large"  # the old policy stays
    assert "policy reload rejected" in gateway.output()


def test_a_reload_that_fails_on_a_file_says_why_and_keeps_the_old_policy(
    tmp_path: Path,
    log_dir: Path,
    services: Callable[[Service], Service],
    sim: tuple[Service, Service],
) -> None:
    """A corrupt classifier file or a feedback path that cannot be opened: a 400 with the
    reason, not a 500, and the old policy goes on serving."""
    gateway = services(start_gateway(log_dir, make_policy(sim, "cheap")))
    model = tmp_path / "classifier"
    model.mkdir()
    (model / "model.json").write_text("{not json")
    corrupt = make_policy(sim, "large")
    corrupt["routing"] |= {"classifier": str(model), "strong_fraction": 0.5}
    write(gateway, corrupt)
    response = reload(gateway)
    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert error.startswith(f"routing.classifier: {model / 'model.json'}: corrupted model file")
    assert tier_of_next_request(gateway) == "cheap"

    unwritable = make_policy(sim, "large")
    missing = tmp_path / "no-such-dir" / "feedback.jsonl"
    unwritable["routing"]["feedback"] = {"path": str(missing)}
    write(gateway, unwritable)
    response = reload(gateway)
    assert response.status_code == 400
    assert response.json()["errors"] == [
        f"routing.feedback.path: cannot open {missing}: No such file or directory"
    ]
    assert tier_of_next_request(gateway) == "cheap"
    assert gateway.output().count("policy reload rejected") == 2


def test_sighup_reloads(
    log_dir: Path, services: Callable[[Service], Service], sim: tuple[Service, Service]
) -> None:
    gateway = services(start_gateway(log_dir, make_policy(sim, "cheap")))
    write(gateway, make_policy(sim, "large"))
    gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and tier_of_next_request(gateway) != "large":
        time.sleep(0.05)
    assert tier_of_next_request(gateway) == "large"


def test_in_flight_stream_survives_reload(
    log_dir: Path, services: Callable[[Service], Service], sim: tuple[Service, Service]
) -> None:
    gateway = services(start_gateway(log_dir, make_policy(sim, "cheap")))
    lines: list[str] = []
    headers: dict[str, str] = {}
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 40,
        "stream": True,
    }

    streaming = threading.Event()

    def consume() -> None:
        with httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", json=body, timeout=10
        ) as response:
            headers.update(response.headers)
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if '"content"' in line:
                    streaming.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert streaming.wait(10)  # mid-stream: 40 tokens at 20 ms each, the first one read
    write(gateway, make_policy(sim, "large"))
    assert reload(gateway).status_code == 200
    reader.join(timeout=10)
    assert headers["x-triage-tier"] == "cheap"
    assert lines[-1] == "data: [DONE]"
    assert sum(1 for line in lines if '"content"' in line) >= 40


def test_reload_reaches_every_worker(
    log_dir: Path, services: Callable[[Service], Service], sim: tuple[Service, Service]
) -> None:
    """Under `--workers 2` the reload request reaches one worker; the supervisor then
    replaces every worker, so none keeps serving the old policy."""
    gateway = services(start_gateway(log_dir, make_policy(sim, "cheap"), workers=2))
    assert {tier_of_next_request(gateway) for _ in range(10)} == {"cheap"}
    write(gateway, make_policy(sim, "large"))
    response = reload(gateway)
    assert response.json() == {"reloaded": True, "workers_restarting": True}
    deadline = time.monotonic() + 30
    tiers: list[str] = []
    while time.monotonic() < deadline:
        tiers = [tier_of_next_request(gateway) for _ in range(10)]
        if set(tiers) == {"large"}:
            break
        time.sleep(0.2)
    time.sleep(1)  # and it stays so once the restart is over
    tiers += [tier_of_next_request(gateway) for _ in range(30)]
    assert set(tiers) == {"large"}, tiers
