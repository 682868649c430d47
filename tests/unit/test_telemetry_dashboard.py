"""The Grafana dashboard shipped in the Helm chart: it must query what the gateway exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.telemetry import Telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "charts/triage/dashboards/triage.json"
# The operator's questions (issue 7), and the panel that answers each.
QUESTIONS = {
    "what did each tier cost today": "Cost by tier (time range)",
    "which tenant spends most": "Top tenants by spend (time range)",
    "is the large tier inside its SLO": "SLO attainment by tier (time range)",
    "how often does the cache hit": "Cache hit ratio (time range)",
    "how many requests did the classifier send up": "Classifier decisions by tier (time range)",
    "which replica is sick": "Replica health",
}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def exported_series() -> set[str]:
    """Every series name the gateway can expose (collector families included)."""
    names: set[str] = set()
    for family in Telemetry(environ={}).metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def test_identity_the_chart_relies_on(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "triage-gateway"
    assert dashboard["time"] == {"from": "now/d", "to": "now"}  # "today" by default
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "namespace", "tier", "tenant"]


def test_every_metric_queried_is_exported(dashboard: dict[str, Any]) -> None:
    used = {n for e in expressions(dashboard) for n in re.findall(r"\b(?:triage|gen_ai)_\w+", e)}
    assert used
    assert used <= exported_series()


def test_each_question_has_its_panel(dashboard: dict[str, Any]) -> None:
    titles = {p["title"] for p in panels(dashboard)}
    for question, title in QUESTIONS.items():
        assert title in titles, question


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]


def test_no_per_request_labels_in_queries(dashboard: dict[str, Any]) -> None:
    for expr in expressions(dashboard):
        assert "request_id" not in expr and "trace_id" not in expr


def test_the_deploy_guide_lists_every_metric() -> None:
    """docs/deploy.md's metrics table: the names a scrape shows, no more and no fewer."""
    guide = (DASHBOARD.parents[3] / "docs/deploy.md").read_text()
    listed = set(re.findall(r"^\| `((?:triage|gen_ai)_\w+)` \|", guide, re.MULTILINE))
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Telemetry(environ={}).metrics.registry.collect()
    }
    assert listed == exported
