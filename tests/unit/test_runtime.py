"""Build, then start: a runtime built from a policy runs nothing until started, so a reload
rejected for any reason leaves nothing running and keeps the old policy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette

from gateway.app import Gateway
from gateway.policy import load_policy
from gateway.runtime import build_runtime


def demo(tmp_path: Path, **routing: Any) -> Path:
    """policies/demo.yaml (simulated replicas), with `routing` keys set, in `tmp_path`."""
    policy = yaml.safe_load(Path("policies/demo.yaml").read_text())
    policy["routing"] |= routing
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def polling() -> int:
    """Tasks polling replicas, whichever runtime started them."""
    running = (getattr(task.get_coro(), "__qualname__", None) for task in asyncio.all_tasks())
    return sum(name == "Poller._run" for name in running)


async def test_building_starts_nothing_and_opens_nothing_start_does(tmp_path: Path) -> None:
    gateway = Gateway(demo(tmp_path))
    async with gateway.lifespan(Starlette()):
        log = tmp_path / "feedback.jsonl"
        policy = load_policy(demo(tmp_path, feedback={"path": "feedback.jsonl"}))
        runtime = await build_runtime(
            policy, tmp_path, gateway.fleet, gateway.stores, gateway.upstream, gateway.first_bytes
        )
        assert not runtime.poller.running and polling() == 1  # the live runtime's alone
        assert not log.exists()
        runtime.start()
        assert runtime.poller.running and polling() == 2
        assert log.exists()
        await runtime.close()
        assert not runtime.poller.running and polling() == 1


async def test_a_reload_rejected_for_its_feedback_path_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    gateway = Gateway(demo(tmp_path))
    async with gateway.lifespan(Starlette()):
        serving = gateway.runtime
        assert polling() == 1
        missing = tmp_path / "no-such-dir" / "feedback.jsonl"
        demo(tmp_path, feedback={"path": str(missing)}, default_tier="large")
        errors = await gateway.reload()
        assert errors == [
            f"routing.feedback.path: cannot open {missing}: No such file or directory"
        ]
        assert gateway.runtime is serving  # the old policy stays
        assert gateway.runtime.policy.routing.default_tier != "large"
        assert polling() == 1  # the rejected runtime's poller never started
    assert polling() == 0


async def test_a_reload_rejected_for_a_corrupt_classifier_keeps_the_old_policy(
    tmp_path: Path,
) -> None:
    gateway = Gateway(demo(tmp_path))
    async with gateway.lifespan(Starlette()):
        serving = gateway.runtime
        model = tmp_path / "classifier"
        model.mkdir()
        (model / "model.json").write_text("{not json")
        demo(tmp_path, classifier=str(model), strong_fraction=0.5)
        (error,) = await gateway.reload()
        assert error.startswith(f"routing.classifier: {model / 'model.json'}: corrupted model")
        assert gateway.runtime is serving
        assert polling() == 1


async def test_a_started_runtime_is_swapped_in_and_the_old_one_stops(tmp_path: Path) -> None:
    gateway = Gateway(demo(tmp_path))
    async with gateway.lifespan(Starlette()):
        old = gateway.runtime
        demo(tmp_path, default_tier="large")
        assert await gateway.reload() == []
        assert gateway.runtime is not old and gateway.runtime.poller.running
        assert not old.poller.running and polling() == 1
        assert gateway.runtime.policy.routing.default_tier == "large"
