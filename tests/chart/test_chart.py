"""The Helm chart: it renders, lints, validates for Kubernetes, and agrees with the gateway.

Rendering and linting use Helm 4 as a library (helm-python-sdk); validation uses the Kubernetes
JSON schemas (1.30, and 1.27, the oldest the chart supports) bundled with kubernetes-validate.
No cluster, helm binary or network is needed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.policy import Policy, hash_key, parse_policy
from gateway.sim.profile import PROFILES

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "triage"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
OLDEST_KUBE_VERSION = "1.27.0"  # Chart.yaml's kubeVersion
RELEASE = "prod"  # does not contain "triage": resources are named prod-triage-*
NAMESPACE = "llm"

# Custom resources: kubernetes-validate has no schema for them; checked by hand below.
CRD_API_VERSIONS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
}

# Everything optional switched on, so every template's output gets validated.
EVERYTHING = {
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "tls": [{"secretName": "triage-tls", "hosts": ["triage.example.com"]}],
    },
    "httpRoute": {
        "enabled": True,
        "parentRefs": [{"name": "gw", "namespace": "infra"}],
        "hostnames": ["triage.example.com"],
        "timeouts": {"request": "600s"},
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "networkPolicy": {"egress": {"restrict": True}},
    "service": {"type": "LoadBalancer", "nodePort": 30080},
    "redis": {"enabled": True, "persistence": {"enabled": True, "storageClassName": "fast"}},
    "sim": {"enabled": True, "pools": {"small": {"profile": "small", "replicas": 0}}},
    "secrets": {"env": {"ADMIN_KEY_HASH": hash_key("admin")}},
    "gateway": {"workers": 4, "gracefulShutdownSeconds": 20},
    "extraEnv": [{"name": "OTEL_SERVICE_NAME", "value": "triage"}],
    "extraVolumes": [{"name": "classifier", "configMap": {"name": "my-classifier"}}],
    "extraVolumeMounts": [{"name": "classifier", "mountPath": "/opt/classifier"}],
    "priorityClassName": "high",
    "imagePullSecrets": [{"name": "regcred"}],
    "podDisruptionBudget": {"minAvailable": "50%"},
}


def _load_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


CASES = {
    "default": {},
    "everything": EVERYTHING,
    **{f"examples/{path.name}": _load_yaml(path) for path in EXAMPLES},
}


class Rendered:
    """The manifests of one render, by kind and name."""

    def __init__(self, manifests: list[dict[str, Any]]) -> None:
        self.manifests = manifests

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.all(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
        return found[0]

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for m in self.manifests:
            if m["kind"] in ("Deployment", "StatefulSet"):
                yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]
            elif m["kind"] == "Pod":
                yield f"Pod/{m['metadata']['name']}", m["spec"]

    @property
    def pod_template(self) -> dict[str, Any]:
        template: dict[str, Any] = self.get("Deployment", f"{RELEASE}-triage")["spec"]["template"]
        return template

    @property
    def gateway(self) -> dict[str, Any]:
        container: dict[str, Any] = self.pod_template["spec"]["containers"][0]
        return container

    @property
    def policy_text(self) -> str:
        text: str = self.get("ConfigMap", f"{RELEASE}-triage")["data"]["policy.yaml"]
        return text


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    loaded = helm.Chart.load(CHART)
    yield loaded
    loaded.close()


def render(chart: Any, values: dict[str, Any], name: str = RELEASE) -> Rendered:
    files = chart.render(values, name=name, namespace=NAMESPACE)
    manifests = [
        doc
        for path, text in sorted(files.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return Rendered(manifests)


def gateway_env(rendered: Rendered, values: dict[str, Any]) -> tuple[dict[str, str], bool]:
    """The environment the chart gives the gateway, and whether Secrets it cannot see add to it."""
    container = rendered.gateway
    env: dict[str, str] = {}
    unseen = False
    for source in container.get("envFrom", []):
        name = source["secretRef"]["name"]
        if name == f"{RELEASE}-triage":
            env.update(rendered.get("Secret", name)["stringData"])
        else:
            unseen = True
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", fake_value(var["name"]))
    return env, unseen or bool(values.get("extraEnvFrom"))


def fake_value(name: str) -> str:
    """A stand-in for a variable an existing Secret provides, in the shape the policy needs."""
    if name.endswith("_HASH"):
        return hash_key(name)  # distinct per variable: tenants may not share keys
    if "REDIS" in name:
        return "redis://redis.example:6379/0"
    return f"fake-{name.lower()}"


# --- the chart as a whole --------------------------------------------------------------


def test_app_version_follows_the_package_version() -> None:
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_meta["appVersion"] == package
    assert chart_meta["kubeVersion"] == f">={OLDEST_KUBE_VERSION}-0"


@pytest.mark.parametrize("case", CASES)
def test_lints_clean_in_strict_mode(case: str) -> None:
    report = helm.lint(CHART, CASES[case], strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert (problems, report["errors"]) == ([], [])


@pytest.mark.parametrize("kube_version", [KUBE_VERSION, OLDEST_KUBE_VERSION])
@pytest.mark.parametrize("case", CASES)
def test_every_manifest_is_valid_for_kubernetes(chart: Any, case: str, kube_version: str) -> None:
    rendered = render(chart, CASES[case])
    assert rendered.manifests
    for manifest in rendered.manifests:
        kind = manifest["kind"]
        if kind in CRD_API_VERSIONS:
            assert manifest["apiVersion"] == CRD_API_VERSIONS[kind]
            continue
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{kind}/{manifest['metadata']['name']}: {path}: {exc.message}")


@pytest.mark.parametrize("case", CASES)
def test_services_select_exactly_one_workload(chart: Any, case: str) -> None:
    rendered = render(chart, CASES[case])
    workloads = rendered.all("Deployment") + rendered.all("StatefulSet")
    for service in rendered.all("Service"):
        selector = service["spec"]["selector"].items()
        selected = [
            w["metadata"]["name"]
            for w in workloads
            if selector <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service/{service['metadata']['name']} selects {selected}"
        target = service["spec"]["ports"][0]["targetPort"]
        (workload,) = (w for w in workloads if w["metadata"]["name"] == selected[0])
        ports = workload["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert target in {p["name"] for p in ports}


def test_every_schema_section_is_documented_in_values_yaml() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    documented = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(schema["properties"]) - {"global"} == set(documented)


# --- safe defaults ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default", "everything"])
def test_pods_run_locked_down(chart: Any, case: str) -> None:
    rendered = render(chart, CASES[case])
    specs = dict(rendered.pod_specs())
    assert specs
    for where, spec in specs.items():
        assert spec["automountServiceAccountToken"] is False, where
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"], where


def test_gateway_runs_as_the_image_user_with_a_writable_tmp(chart: Any) -> None:
    rendered = render(chart, {})
    spec = rendered.pod_template["spec"]
    assert spec["securityContext"]["runAsUser"] == 10001
    mounts = {m["mountPath"]: m["name"] for m in rendered.gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/triage"]]["configMap"]["name"] == f"{RELEASE}-triage"


def test_probes_check_what_they_mean(chart: Any) -> None:
    gateway = render(chart, {}).gateway
    assert gateway["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    paths = {
        probe: (gateway[probe]["httpGet"]["path"], gateway[probe]["httpGet"]["port"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": ("/healthz", "http"),
        "livenessProbe": ("/healthz", "http"),
        "readinessProbe": ("/readyz", "http"),
    }


def test_gateway_command_line(chart: Any) -> None:
    args = render(chart, {"gateway": {"workers": 3, "logLevel": "debug"}}).gateway["args"]
    assert args == [
        "serve", "--policy", "/etc/triage/policy.yaml", "--host", "0.0.0.0", "--port", "8080",
        "--workers", "3", "--log-level", "debug",
    ]  # fmt: skip


def test_shutdown_drains_within_the_grace_period(chart: Any) -> None:
    rendered = render(chart, {})
    spec = rendered.pod_template["spec"]
    sleep = rendered.gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == ["sleep", "10"]
    assert "--timeout-graceful-shutdown" not in rendered.gateway["args"]  # the gateway's 30 s
    assert spec["terminationGracePeriodSeconds"] > 10 + 30

    args = render(chart, {"gateway": {"gracefulShutdownSeconds": 20}}).gateway["args"]
    assert args[-2:] == ["--timeout-graceful-shutdown", "20"]
    assert "lifecycle" not in render(chart, {"gateway": {"preStopSleepSeconds": 0}}).gateway


def test_policy_change_rolls_the_pods(chart: Any) -> None:
    rendered = render(chart, {})
    annotations = rendered.pod_template["metadata"]["annotations"]
    digest = hashlib.sha256(rendered.policy_text.encode()).hexdigest()
    assert annotations["checksum/policy"] == digest
    assert "checksum/secret" not in annotations

    policy = _load_yaml(CHART / "values.yaml")["policy"]
    changed = render(chart, {"policy": policy.replace("ttft_ms: 300", "ttft_ms: 250")})
    changed_annotations = changed.pod_template["metadata"]["annotations"]
    assert changed_annotations["checksum/policy"] != annotations["checksum/policy"]

    with_secret = render(chart, {"secrets": {"env": {"LARGE_POOL_KEY": "k"}}})
    assert "checksum/secret" in with_secret.pod_template["metadata"]["annotations"]


def test_hpa_owns_the_replica_count(chart: Any) -> None:
    rendered = render(chart, {"autoscaling": {"enabled": True, "minReplicas": 3}})
    assert "replicas" not in rendered.get("Deployment", f"{RELEASE}-triage")["spec"]
    hpa = rendered.get("HorizontalPodAutoscaler", f"{RELEASE}-triage")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    assert rendered.get("PodDisruptionBudget", f"{RELEASE}-triage")["spec"]["maxUnavailable"] == 1


# --- the schema rejects typos and wrong types -------------------------------------------

REJECTED = {
    "unknown top-level key": {"replicaCounts": 3},
    "unknown image key": {"image": {"tagg": "1.0"}},
    "unknown gateway key": {"gateway": {"worker": 2}},
    "unknown redis key": {"redis": {"enable": True}},
    "unknown security key": {"securityContext": {"readOnlyRootFileSystem": True}},
    "unknown probe key": {"livenessProbe": {"httpget": {"path": "/healthz", "port": "http"}}},
    "unknown sim pool key": {"sim": {"pools": {"small": {"profile": "small", "replica": 2}}}},
    "string replica count": {"replicaCount": "three"},
    "string workers": {"gateway": {"workers": "2"}},
    "policy as a map": {"policy": {"version": 1}},
    "non-string secret": {"secrets": {"env": {"LARGE_POOL_KEY": 123}}},
    "bad env var name": {"secrets": {"env": {"large-pool-key": "k"}}},
    "non-redis url": {"redis": {"url": "http://redis:6379"}},
    "unknown sim profile": {"sim": {"pools": {"small": {"profile": "medium"}}}},
    "bad log level": {"gateway": {"logLevel": "verbose"}},
    "bad quantity": {"resources": {"limits": {"memory": "1 GB"}}},
}


@pytest.mark.parametrize("case", REJECTED)
def test_schema_rejects_bad_values(chart: Any, case: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema"):
        chart.render(REJECTED[case], name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART, REJECTED[case], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"]


TEMPLATE_CHECKS = {
    "two redis sources": (
        {"redis": {"enabled": True, "url": "redis://r:6379"}},
        "set only one of redis.url",
    ),
    "grace period too short": (
        {"terminationGracePeriodSeconds": 30},
        r"terminationGracePeriodSeconds \(30\) must exceed",
    ),
    "policy section typo": (
        {"policy": "version: 1\nmodels: {}\ntiers: {}\nroutnig: {}\n"},
        "policy.routnig: unknown section",
    ),
    "policy missing tiers": ({"policy": "version: 1\nmodels: {}\n"}, "policy.tiers: required"),
    "unprovided variable": (
        {"policy": "version: 1\nmodels: {m: {api_key: '${POOL_KEY}'}}\ntiers: {}\n"},
        "needs environment variable\\(s\\) POOL_KEY",
    ),
    "redis unused by the policy": (
        {"redis": {"enabled": True}, "policy": "version: 1\nmodels: {}\ntiers: {}\n"},
        "policy.store.redis_url: redis is configured",
    ),
    "sim without pools": ({"sim": {"enabled": True}}, "sim.enabled: define at least one pool"),
    "hpa bounds": (
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
        "minReplicas must not exceed maxReplicas",
    ),
    "route without gateway": ({"httpRoute": {"enabled": True}}, "httpRoute.parentRefs"),
    "quotas on two pods without redis": (
        {
            "policy": "version: 1\nmodels: {}\ntiers: {}\n"
            "auth: {anonymous: {limits: {rpm: 60}}}\nstore: {redis_url: '${REDIS_URL:-}'}\n"
        },
        "budgets or rate limits with more than one gateway process",
    ),
}


@pytest.mark.parametrize("case", TEMPLATE_CHECKS)
def test_install_fails_with_a_message_that_says_what_to_fix(chart: Any, case: str) -> None:
    values, message = TEMPLATE_CHECKS[case]
    with pytest.raises(helm.HelmError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_chart_accepts_every_policy_section_the_gateway_knows(chart: Any) -> None:
    sections = {name: "{}" for name in Policy.model_fields}
    sections["version"] = "1"
    policy = "".join(f"{name}: {value}\n" for name, value in sections.items())
    render(chart, {"policy": policy})  # no "unknown section" (templates/_helpers.tpl)


# --- the policy the chart ships is one the gateway accepts -------------------------------


@pytest.mark.parametrize("case", CASES)
def test_configmap_policy_passes_gateway_validation(chart: Any, case: str) -> None:
    rendered = render(chart, CASES[case])
    env, unseen = gateway_env(rendered, CASES[case])
    raw = yaml.safe_load(rendered.policy_text)
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", rendered.policy_text))
    faked = needed - set(env)
    if faked:
        assert unseen, f"the chart provides no {sorted(faked)}"
    env.update({name: fake_value(name) for name in faked})
    policy = parse_policy(raw, env, source=case)
    # Tiers keep the order the policy text gives them (cheapest first).
    assert list(policy.tiers) == list(raw["tiers"])


def test_demo_needs_nothing_outside_the_chart(chart: Any) -> None:
    values = CASES["examples/demo.yaml"]
    rendered = render(chart, values)
    env, unseen = gateway_env(rendered, values)
    assert not unseen
    policy = parse_policy(yaml.safe_load(rendered.policy_text), env, source="demo")
    assert policy.store.redis_url == f"redis://{RELEASE}-triage-redis:6379/0"
    assert policy.server.admin_key == hash_key("sk-triage-demo-admin")


@pytest.mark.parametrize("release", ["demo", "triage", "my-triage-demo"])
def test_demo_policy_urls_reach_the_sim_services(chart: Any, release: str) -> None:
    rendered = render(chart, CASES["examples/demo.yaml"], name=release)
    config = yaml.safe_load(
        next(m for m in rendered.all("ConfigMap") if "policy.yaml" in m["data"])["data"][
            "policy.yaml"
        ]
    )
    services = {s["metadata"]["name"]: s for s in rendered.all("Service")}
    deployments = rendered.all("Deployment")
    for model, spec in config["models"].items():
        for url in spec["replicas"]:
            parts = urlsplit(url)
            assert parts.hostname in services, f"{url}: no Service {parts.hostname}"
            service = services[parts.hostname]
            assert parts.port in {p["port"] for p in service["spec"]["ports"]}
            selector = service["spec"]["selector"].items()
            (sim,) = (
                d
                for d in deployments
                if selector <= d["spec"]["template"]["metadata"]["labels"].items()
            )
            args = sim["spec"]["template"]["spec"]["containers"][0]["args"]
            served = (
                args[args.index("--model") + 1]
                if "--model" in args
                else PROFILES[args[args.index("--profile") + 1]].model
            )
            assert spec.get("served_name", model) == served


# --- wiring of Redis, Secrets and optional resources ---------------------------------------


def test_external_redis_and_secrets_come_from_existing_secrets(chart: Any) -> None:
    rendered = render(chart, CASES["examples/vllm-external-redis.yaml"])
    gateway = rendered.gateway
    assert gateway["env"] == [
        {
            "name": "REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": "triage-redis", "key": "redis-url"}},
        }
    ]
    assert gateway["envFrom"] == [{"secretRef": {"name": "triage-keys"}}]
    assert rendered.all("Secret") == []


def test_redis_url_value_goes_into_the_chart_secret(chart: Any) -> None:
    url = "rediss://:pw@redis.example:6380/0"
    rendered = render(chart, {"redis": {"url": url}})
    assert rendered.get("Secret", f"{RELEASE}-triage")["stringData"] == {"REDIS_URL": url}
    assert rendered.gateway["envFrom"] == [{"secretRef": {"name": f"{RELEASE}-triage"}}]


def test_in_chart_redis_admits_only_the_gateway(chart: Any) -> None:
    rendered = render(chart, CASES["examples/demo.yaml"])
    gateway_labels = rendered.get("Deployment", f"{RELEASE}-triage")["spec"]["selector"]
    for name, port in ((f"{RELEASE}-triage-redis", 6379), (f"{RELEASE}-triage-sim", 8000)):
        ingress = rendered.get("NetworkPolicy", name)["spec"]["ingress"]
        allowed = {"from": [{"podSelector": gateway_labels}], "ports": [{"port": port}]}
        ingress[0]["ports"][0].pop("protocol")
        assert ingress == [allowed]


def test_custom_resources_point_at_the_gateway_service(chart: Any) -> None:
    rendered = render(chart, EVERYTHING)
    service = rendered.get("Service", f"{RELEASE}-triage")
    route = rendered.get("HTTPRoute", f"{RELEASE}-triage")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    port = service["spec"]["ports"][0]
    assert backend == {"name": service["metadata"]["name"], "port": port["port"]}
    monitor = rendered.get("ServiceMonitor", f"{RELEASE}-triage")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_grafana_dashboard_is_labelled_for_the_sidecar(chart: Any) -> None:
    rendered = render(chart, {})
    configmap = rendered.get("ConfigMap", f"{RELEASE}-triage-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboards = sorted(path.name for path in (CHART / "dashboards").glob("*.json"))
    assert sorted(configmap["data"]) == dashboards
    for text in configmap["data"].values():
        assert json.loads(text)["uid"]


def dashboard_metrics() -> set[str]:
    """Every triage_* and gen_ai_* metric name the dashboards' queries use."""
    names: set[str] = set()
    for path in (CHART / "dashboards").glob("*.json"):
        for expr in re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', path.read_text()):
            names.update(re.findall(r"\b(?:triage|gen_ai)_\w+", expr))
    return names


def test_dashboards_query_metrics_the_gateway_exports() -> None:
    metrics = pytest.importorskip("gateway.telemetry.metrics")
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        family.name + suffix
        for family in metrics.Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    used = dashboard_metrics()
    assert used
    assert used - exported == set()


# --- the image the chart runs ------------------------------------------------------------


def test_image_matches_what_the_chart_expects(chart: Any) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if re.match(r"^[A-Z]+ ", line)]
    assert [i for i in instructions if i.startswith("FROM ")] == [
        "FROM python:3.11-slim AS build",
        "FROM python:3.11-slim",
    ]
    assert 'ENTRYPOINT ["triage"]' in instructions
    assert "USER 10001:10001" in instructions
    cmd = json.loads(next(i for i in instructions if i.startswith("CMD "))[4:])
    args = render(chart, {}).gateway["args"]
    assert cmd == args[: len(cmd)]  # the chart adds --workers and --log-level
    context = set((ROOT / ".dockerignore").read_text().split())
    copied = {"!pyproject.toml", "!README.md", "!gateway/", "!classifiers/", "!policies/demo.yaml"}
    assert copied <= context


def test_quotas_without_redis_render_on_one_process_or_with_redis(chart: Any) -> None:
    policy = (
        "version: 1\nmodels: {}\ntiers: {}\nauth: {anonymous: {limits: {rpm: 60}}}\n"
        "store: {redis_url: '${REDIS_URL:-}'}\n"
    )
    one_pod = {"policy": policy, "replicaCount": 1}
    assert render(chart, one_pod).gateway is not None
    with_redis = {"policy": policy, "redis": {"enabled": True}}
    assert render(chart, with_redis).gateway is not None
