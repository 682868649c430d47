"""Tenants cannot cross into each other's data, and no request can send the gateway anywhere
the policy did not name: cache and budget keys namespaced per tenant in a real Redis, forged
identities, keys presented as their stored hashes, metrics and logs that carry no client
strings or keys, refusals that say nothing of other tenants' spend, admin endpoints that need
the admin key (and are off without one), and SSRF attempts through model names, headers and
body fields against a canary listener that must never see a connection.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import yaml

from gateway.policy import hash_key
from tests.integration.conftest import (
    LARGE,
    SMALL,
    Service,
    Services,
    SimPair,
    assert_openai_error,
    free_port,
    policy_for,
    sim_stats,
    start_gateway,
    start_sim,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

KEYS = {
    "team-a": "sk-team-a-0123456789",
    "team-b": "sk-team-b-9876543210",
    "narrow": "sk-narrow-5555555555",
    "x:y": "sk-colon-1111111111",
    "x%3Ay": "sk-percent-2222222222",  # what "x:y" becomes once percent-escaped
}
ADMIN = "sk-admin-0000000000"
# Large costs $1 per thousand tokens here, so a few requests move the budgets visibly.
EXPENSIVE = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}
GLOBAL_LARGE_USD = 1.0


class Canary:
    """A TCP listener no policy names: any connection to it is an SSRF."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._markers: set[int] = set()  # local ports of the test's own marker connections
        self._marked = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def connections_so_far(self) -> int:
        """Connections (other than the test's own) made before this call: a marker connection
        is accepted after every connection that reached the listener before it."""
        with socket.socket() as marker:
            marker.bind(("127.0.0.1", 0))
            port = marker.getsockname()[1]
            with self._marked:
                self._markers.add(port)
            marker.connect(self.sock.getsockname())
            with self._marked:
                assert self._marked.wait_for(lambda: port not in self._markers, timeout=5)
        return self.connections

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._marked:
                if peer[1] in self._markers:
                    self._markers.discard(peer[1])
                    self._marked.notify_all()
                else:
                    self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


_HTTP: dict[str, httpx.Client] = {}


@pytest.fixture(scope="module", autouse=True)
def http() -> Iterator[httpx.Client]:
    """One keep-alive client for the module's many small requests."""
    with httpx.Client(timeout=10) as client:
        _HTTP["client"] = client
        yield client
        _HTTP.clear()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    listener = Canary()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> SimPair:
    return (
        services(start_sim(log_dir, "instant")),
        services(start_sim(log_dir, "instant", "--model", LARGE)),
    )


@pytest.fixture(scope="module")
def gateway(
    log_dir: Path, services: Services, sims: SimPair, store_section: dict[str, Any]
) -> Service:
    small, large = sims
    tenants: dict[str, Any] = {
        name: {"keys": [hash_key(key)], "budget": {"usd_per_day": 50.0}}
        for name, key in KEYS.items()
    }
    tenants["team-a"]["limits"] = {"rpm": 100_000}
    tenants["narrow"]["tiers"] = ["cheap"]
    policy = policy_for(
        [small.url],
        [large.url],
        models={LARGE: {"replicas": [large.url], "price": EXPENSIVE}},
        tenants=tenants,
        auth={"anonymous": None},
        store=store_section,
        budgets={"tiers": {"large": {"usd_per_day": GLOBAL_LARGE_USD}}},
        server={"admin_key": hash_key(ADMIN)},
    )
    return services(start_gateway(log_dir, policy))


def ask(
    gateway: Service,
    key: str | None,
    content: str = "hello",
    model: str = "cheap",
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "max_tokens": 4, "temperature": 0, **extra}
    if path.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt" if path.endswith("/completions") else "input"] = content
    sent = dict(headers or {})
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    return _HTTP["client"].post(gateway.url + path, json=body, headers=sent)


def admin(gateway: Service, method: str, path: str, key: str | None = ADMIN) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return _HTTP["client"].request(method, gateway.url + path, headers=headers)


def backend_requests(sims: SimPair) -> int:
    return sum(int(sim_stats(sim)["requests_total"]) for sim in sims)


# --- SSRF ------------------------------------------------------------------------------------


def hostile_models(canary: str) -> list[str]:
    return [
        f"http://{canary}/v1",
        f"https://{canary}",
        f"//{canary}/v1",
        canary,
        f"http://{canary}/v1/chat/completions#",
        f"{SMALL}@{canary}",
        f"http://{SMALL}@{canary}/v1",
        f"{SMALL}/../../{canary}",
        f"cheap/{canary}",
        f"auto:{canary}",
        "../admin/faults",
        "../../health",
        f"{SMALL}/../{LARGE}",
        f"{SMALL}?x=1",
        f"{SMALL}#x",
        f"{SMALL}\r\nHost: {canary}",
        f" {SMALL}",
        f"{SMALL} ",
        SMALL.upper(),
        "file:///etc/passwd",
        "unix:///var/run/docker.sock",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:1/v1",
        "gopher://127.0.0.1:6379/_FLUSHALL",
    ]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_model_names_cannot_name_a_url(
    gateway: Service, sims: SimPair, canary: Canary, path: str
) -> None:
    before = backend_requests(sims)
    for model in hostile_models(canary.host):
        error = assert_openai_error(ask(gateway, KEYS["team-a"], model=model, path=path), 404)
        assert error["param"] == "model"
    header = {"x-triage-tier": f"http://{canary.host}/v1"}
    auto = "auto" if path != "/v1/embeddings" else "cheap"
    response = ask(gateway, KEYS["team-a"], model=auto, path=path, headers=header)
    assert response.status_code in (200, 404), response.text[:300]
    assert canary.connections_so_far() == 0
    # Unknown names stop at the router: no backend saw any of them.
    assert backend_requests(sims) - before == (1 if response.status_code == 200 else 0)


def test_headers_and_body_fields_cannot_redirect_upstream(
    gateway: Service, sims: SimPair, canary: Canary
) -> None:
    url = f"http://{canary.host}/v1"
    headers = {
        "host": canary.host,
        "x-forwarded-host": canary.host,
        "x-forwarded-proto": "http",
        "forwarded": f"host={canary.host};proto=http",
        "x-triage-replica": url,
        "x-triage-upstream": url,
        "x-triage-model": url,
        "x-original-url": url,
        "x-rewrite-url": url,
        "x-real-ip": "127.0.0.1",
        "x-triage-tenant": "team-b",
    }
    fields = {
        "api_base": url,
        "base_url": url,
        "url": url,
        "endpoint": url,
        "extra_body": {"base_url": url},
        "metadata": {"replica": url},
    }
    response = ask(gateway, KEYS["team-a"], content="redirect me", headers=headers, **fields)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["x-triage-model"] == SMALL
    forwarded = sim_stats(sims[0])["last_request"]
    assert forwarded["model"] == SMALL
    assert forwarded["api_base"] == url  # passed through as data, never used as an address
    stream = ask(gateway, KEYS["team-a"], content="redirect me too", headers=headers, stream=True)
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    assert canary.connections_so_far() == 0


# --- identity ------------------------------------------------------------------------------


def test_presenting_a_stored_hash_is_not_a_key(gateway: Service) -> None:
    for presented in (hash_key(KEYS["team-a"]), hash_key(KEYS["team-a"]).removeprefix("sha256:")):
        assert_openai_error(ask(gateway, presented), 401)
        assert_openai_error(admin(gateway, "POST", "/admin/reload", presented), 401)
    assert_openai_error(admin(gateway, "POST", "/admin/reload", hash_key(ADMIN)), 401)
    # The admin key is not a tenant key either.
    assert_openai_error(ask(gateway, ADMIN), 401)


def test_keys_differing_in_case_or_whitespace_are_other_keys(gateway: Service) -> None:
    key = KEYS["team-a"]
    assert ask(gateway, key).status_code == 200
    for variant in (key.upper(), key + "x", key[:-1], key.replace("-", "_")):
        assert_openai_error(ask(gateway, variant), 401)


def test_admin_endpoints_need_the_admin_key(gateway: Service) -> None:
    paths = [
        ("POST", "/admin/reload"),
        ("DELETE", "/admin/cache?tenant=team-b"),
        ("GET", "/admin/tenants/team-b/usage"),
    ]
    for method, path in paths:
        for key in (None, KEYS["team-a"], KEYS["team-b"], "", ADMIN.upper(), ADMIN[:-1]):
            assert_openai_error(admin(gateway, method, path, key or None), 401)
        headers = {"authorization": f"Basic {ADMIN}", "x-triage-admin": ADMIN}
        response = httpx.request(method, gateway.url + path, headers=headers, timeout=10)
        assert_openai_error(response, 401)
    assert admin(gateway, "GET", "/admin/tenants/team-b/usage").status_code == 200


@pytest.fixture(scope="module")
def plain_gateway(log_dir: Path, services: Services, sims: SimPair) -> Service:
    """Two tenants, no admin key."""
    tenants = {
        name: {"keys": [hash_key(KEYS[name])], "budget": {"usd_per_day": 1}}
        for name in ("team-a", "team-b")
    }
    policy = policy_for([sims[0].url], [sims[1].url], tenants=tenants, auth={"anonymous": None})
    return services(start_gateway(log_dir, policy))


def test_admin_endpoints_are_off_without_an_admin_key(plain_gateway: Service) -> None:
    for method, path in [
        ("POST", "/admin/reload"),
        ("DELETE", "/admin/cache"),
        ("GET", "/admin/tenants/team-a/usage"),
    ]:
        for key in (None, ADMIN, KEYS["team-a"]):
            error = assert_openai_error(admin(plain_gateway, method, path, key), 404)
            assert "admin_key" in error["message"]


def test_a_key_removed_by_a_reload_is_refused_at_once(plain_gateway: Service) -> None:
    assert plain_gateway.config is not None
    assert ask(plain_gateway, KEYS["team-b"]).status_code == 200
    policy = yaml.safe_load(plain_gateway.config.read_text())
    policy["tenants"]["team-b"]["keys"] = [hash_key("sk-team-b-rotated")]
    plain_gateway.config.write_text(yaml.safe_dump(policy, sort_keys=False))
    plain_gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ask(plain_gateway, KEYS["team-b"]).status_code == 200:
        time.sleep(0.05)
    assert_openai_error(ask(plain_gateway, KEYS["team-b"]), 401)
    assert ask(plain_gateway, "sk-team-b-rotated").status_code == 200
    assert ask(plain_gateway, KEYS["team-a"]).status_code == 200


def test_restricted_tenant_cannot_reach_other_tiers(gateway: Service) -> None:
    key = KEYS["narrow"]
    assert ask(gateway, key).headers["x-triage-tier"] == "cheap"
    for model, headers in [
        (LARGE, {}),
        ("large", {}),
        ("auto", {"x-triage-tier": "large"}),
        ("cheap", {"x-triage-tier": "large"}),
    ]:
        response = ask(gateway, key, model=model, headers=headers)
        if model == "cheap":  # a pinned tier ignores the header
            assert response.headers["x-triage-tier"] == "cheap"
            continue
        assert_openai_error(response, 403)


def test_restricted_tenant_does_not_fall_back_into_a_forbidden_tier(
    log_dir: Path, services: Services, sims: SimPair
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    tenants = {
        "narrow": {"keys": [hash_key(KEYS["narrow"])], "tiers": ["cheap"]},
        "team-a": {"keys": [hash_key(KEYS["team-a"])]},
    }
    policy = policy_for([dead], [sims[1].url], tenants=tenants, auth={"anonymous": None})
    gateway = services(start_gateway(log_dir, policy))
    # The policy falls back from cheap to large; the narrow tenant may not follow it there.
    assert ask(gateway, KEYS["team-a"], model="auto").headers["x-triage-tier"] == "large"
    response = ask(gateway, KEYS["narrow"], model="auto")
    assert response.status_code in (403, 503), response.text[:300]
    assert response.headers.get("x-triage-tier") != "large"


# --- data: cache, budgets, usage ----------------------------------------------------------


def test_cache_and_budget_keys_are_namespaced_per_tenant(
    gateway: Service, redis_server: RedisServer, prefix: str
) -> None:
    prompt = f"shared prompt {uuid.uuid4().hex}"
    for tenant in ("team-a", "team-b", "x:y", "x%3Ay"):
        first = ask(gateway, KEYS[tenant], content=prompt)
        assert first.headers["x-triage-cache"] == "miss", tenant  # nobody else's entry
        assert ask(gateway, KEYS[tenant], content=prompt).headers["x-triage-cache"] == "hit"
    client = redis_server.client()
    keys = [key.decode() for key in client.scan_iter(match=prefix + "*", count=1000)]
    cache = [key.removeprefix(prefix) for key in keys if key.startswith(prefix + "cache:")]
    scopes = {key.split(":")[1] for key in cache}
    assert {"team-a", "team-b", "x%3Ay", "x%253Ay"} <= scopes
    budget = {key.removeprefix(prefix) for key in keys if key.startswith(prefix + "bud:")}
    for tenant in ("team-a", "team-b", "x%3Ay", "x%253Ay"):
        assert any(key.startswith(f"bud:{{t:{tenant}}}") for key in budget), (tenant, budget)
    assert_no_secrets_in(client, keys)


def assert_no_secrets_in(client: redis.Redis, keys: list[str]) -> None:
    secrets = [key.encode() for key in (*KEYS.values(), ADMIN)]
    for key in keys:
        assert not any(secret in key.encode() for secret in secrets), key
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [b"%s=%s" % item for item in client.hgetall(key).items()]
        elif kind == b"zset":
            values = list(client.zrange(key, 0, -1))
        else:
            values = []
        for value in values:
            assert not any(secret in value for secret in secrets), (key, value[:200])


def test_forged_identity_headers_do_not_move_spend_or_cache(gateway: Service) -> None:
    before_a, before_b = spent(gateway, "team-a"), spent(gateway, "team-b")
    forged = {"x-triage-tenant": "team-b", "x-tenant": "team-b", "x-api-key": KEYS["team-b"]}
    prompt = f"forged {uuid.uuid4().hex}"
    response = ask(gateway, KEYS["team-a"], content=prompt, model="large", headers=forged)
    assert response.status_code == 200
    assert ask(gateway, KEYS["team-b"], content=prompt).headers["x-triage-cache"] == "miss"
    # The large request (~$0.01 at these prices) is team-a's; team-b paid only for its
    # own cheap one (a fraction of a micro-dollar).
    assert spent(gateway, "team-a") - before_a > 0.001
    assert spent(gateway, "team-b") - before_b < 0.0001


def spent(gateway: Service, tenant: str) -> float:
    usage = admin(gateway, "GET", f"/admin/tenants/{tenant}/usage").json()
    return sum(
        row["spent_usd"]
        for row in usage["budgets"]
        if row["scope"] == "tenant" and row["window"] == "day"
    )


def test_usage_endpoint_answers_for_the_named_tenant_only(gateway: Service) -> None:
    ask(gateway, KEYS["team-a"], model="large", content=f"spend {uuid.uuid4().hex}")
    usage_a = admin(gateway, "GET", "/admin/tenants/team-a/usage").json()
    usage_b = admin(gateway, "GET", "/admin/tenants/team-b/usage").json()
    assert usage_a["tenant"] == "team-a" and usage_b["tenant"] == "team-b"
    assert usage_a != usage_b
    assert_openai_error(admin(gateway, "GET", "/admin/tenants/nobody/usage"), 404)
    for sneaky in ("team-a%2F..%2Fteam-b", "..%2Fteam-b", "team-a%00", "*"):
        response = admin(gateway, "GET", f"/admin/tenants/{sneaky}/usage")
        assert response.status_code == 404, (sneaky, response.text[:200])


def _without_times(message: str) -> str:
    return re.sub(r"\d+h\d+m\d+s|\d+m\d+s|\d+s\b", "<time>", message)


def test_refusals_say_nothing_of_other_tenants_spend(gateway: Service) -> None:
    """A request that can never fit the shared large-tier budget is refused the same way
    before and after another tenant spends on that tier."""

    def refusal() -> str:
        response = ask(gateway, KEYS["team-b"], model="large", max_tokens=5000)
        error = assert_openai_error(response, 429)
        assert error["code"] == "insufficient_quota"
        assert int(response.headers["retry-after"]) > 0
        leaked = [h for h in response.headers if "global" in h.lower()]
        assert not leaked, leaked
        return _without_times(error["message"])

    before = refusal()
    for i in range(3):
        response = ask(gateway, KEYS["team-a"], model="large", content=f"spend {i} {uuid.uuid4()}")
        assert response.status_code == 200, response.text[:300]
    assert spent(gateway, "team-a") > 0.005
    assert refusal() == before


# --- what telemetry shows -------------------------------------------------------------------


def test_metrics_and_logs_carry_no_keys_or_client_strings(gateway: Service, canary: Canary) -> None:
    hostile = f'http://{canary.host}/evil"}} injected_total 1'
    ask(gateway, KEYS["team-a"], model=hostile)
    ask(gateway, "sk-not-a-tenant-key")
    ask(gateway, KEYS["team-b"], headers={"x-triage-tenant": "mallory", "x-triage-tier": hostile})
    ask(gateway, None)
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    for secret in (*KEYS.values(), ADMIN, "sk-not-a-tenant-key"):
        assert secret not in text
        assert hash_key(secret).removeprefix("sha256:")[:16] not in text
    assert canary.host not in text and "mallory" not in text and "injected_total" not in text
    tenants = set(re.findall(r'tenant="([^"]*)"', text))
    # "*": a tier budget shared by all tenants (triage_budget_remaining_usd)
    assert tenants <= {*KEYS, "anonymous", "other", "none", "*"}, tenants
    models = set(re.findall(r'(?<![a-z_])model="([^"]*)"', text))
    assert models <= {SMALL, LARGE, "none"}, models
    log = gateway.output()
    for secret in (*KEYS.values(), ADMIN, "sk-not-a-tenant-key"):
        assert secret not in log
    for line in log.splitlines():
        if line.startswith("{"):
            orjson.loads(line)  # a hostile model name cannot break a log line apart


def test_admin_key_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: the admin check hashes what it is given and compares digests with
    `hmac.compare_digest`, so response times say nothing about how much of a key matched."""
    import hmac

    from starlette.testclient import TestClient

    from gateway.app import build_app

    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    policy = policy_for([dead], [dead], server={"admin_key": hash_key(ADMIN)})
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    with TestClient(build_app(path)) as client:
        prefix_of_the_key = ADMIN[:-1] + "X"
        headers = {"authorization": f"Bearer {prefix_of_the_key}"}
        assert client.post("/admin/reload", headers=headers).status_code == 401
    assert compared == [(hash_key(prefix_of_the_key), hash_key(ADMIN))]
