"""Scheduled retraining (gateway/retrain.py): one replica at a time, a failed run changes
nothing, a promotion reloads, and the event loop keeps serving while a model trains."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.policy import PolicyError, RetrainSettings, StoreSettings, parse_policy
from gateway.retrain import (
    LAST_KEY,
    LOCK_KEY,
    Retrainer,
    RetrainPlan,
    count_labels,
    retrainer,
    run_command,
)
from gateway.store import EmbeddedStore, RedisStore, Store
from tests.support.labels import append_labels, write_base
from tests.support.redis import RedisServer

TRAIN = (sys.executable, "-m", "classifiers.commands", "train")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base data and a model trained on it alone (coin-flip outcomes: it knows nothing)."""
    directory = tmp_path_factory.mktemp("base")
    data = write_base(directory / "base.jsonl")
    done = subprocess.run(
        [*TRAIN, "--data", str(data), "--out", str(directory / "model"), "--holdout", "0"],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return directory


@pytest.fixture
def current(base: Path, tmp_path: Path) -> Path:
    """The test's own copy of the current model (promotion replaces it)."""
    directory = tmp_path / "current"
    directory.mkdir()
    (directory / "model.json").write_bytes((base / "model" / "model.json").read_bytes())
    return directory


def plan_for(base: Path, current: Path, labels: Path, **settings: Any) -> RetrainPlan:
    values = {"data": (str(base / "base.jsonl"),), "min_new_labels": 50, "interval_s": 60}
    return RetrainPlan(
        RetrainSettings(**(values | settings)),
        (base / "base.jsonl",),
        (labels,),
        labels.parent / "candidates",
        current,
    )


class Reloads:
    def __init__(self) -> None:
        self.count = 0
        self.done = asyncio.Event()

    async def __call__(self) -> None:
        self.count += 1
        self.done.set()


class BlockedRunner:
    """A training that waits until the test lets it finish, then succeeds."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.commands: list[Sequence[str]] = []

    async def __call__(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
        self.commands.append(argv)
        self.started.set()
        await self.release.wait()
        return 0, "ok"


@pytest.fixture(params=["embedded", "redis"])
def stores(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Store]]:
    """Two replicas' stores: one in-process store shared by two tasks, or two connections
    to a real redis-server under one key prefix."""
    if request.param == "embedded":
        store = EmbeddedStore(StoreSettings())
        yield store, store
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    settings = StoreSettings(redis_url=server.url, key_prefix=f"retrain-{uuid.uuid4().hex[:8]}:")
    yield RedisStore(settings), RedisStore(settings)


async def test_of_two_contending_replicas_only_one_trains(
    stores: tuple[Store, Store], base: Path, current: Path, tmp_path: Path
) -> None:
    labels = append_labels(tmp_path / "labels.jsonl", 100)
    plan = plan_for(base, current, labels)
    runner, reloads = BlockedRunner(), Reloads()
    first = Retrainer(plan, stores[0], reloads, runner)
    second = Retrainer(plan, stores[1], reloads, runner)
    running = asyncio.ensure_future(first.run_once())
    await runner.started.wait()  # the first holds the lock now
    # Bounded: a second run that got in would wait on the same release, and hang.
    assert await asyncio.wait_for(second.run_once(), 10) == "locked"
    runner.release.set()
    assert await running == "promoted"
    assert [argv[3] for argv in runner.commands] == ["train", "promote"]
    assert await stores[0].get(LOCK_KEY) is None  # released
    # The run is recorded: the other replica waits for new labels, not only the lock.
    assert await second.run_once() == "few_labels"
    assert len(runner.commands) == 2
    await reloads.done.wait()
    for store in {id(s): s for s in stores}.values():
        await store.close()


async def test_a_run_waits_for_enough_new_labels_and_the_interval(
    base: Path, current: Path, tmp_path: Path
) -> None:
    store = EmbeddedStore(StoreSettings())
    labels = append_labels(tmp_path / "labels.jsonl", 49)
    runner = BlockedRunner()
    runner.release.set()
    retrain = Retrainer(plan_for(base, current, labels), store, Reloads(), runner)
    assert await retrain.run_once() == "few_labels"  # 49 < 50
    append_labels(labels, 1, seed=3)
    assert await retrain.run_once() == "promoted"
    append_labels(labels, 60, seed=4)
    assert await retrain.run_once() == "not_due"  # 60 new labels, but within interval_s
    assert len(runner.commands) == 2


def test_labels_are_rows_with_both_outcomes() -> None:
    lines = [
        b'{"weak": 0, "strong": 1}',
        b'{"weak": 0.5, "strong": 9}',
        b'{"request_id": "r", "score": 1}',  # feedback: one tier's score only
        b'{"weak": true, "strong": 1}',
        b'{"weak": 0, "strong": 1',  # a torn line
    ]
    assert count_labels(lines) == 2


async def test_a_failed_training_leaves_the_current_model(
    base: Path, current: Path, tmp_path: Path
) -> None:
    store = EmbeddedStore(StoreSettings())
    labels = append_labels(tmp_path / "labels.jsonl", 100)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    plan = plan_for(base, current, labels)
    plan = RetrainPlan(plan.settings, (broken,), plan.labels, plan.candidates, plan.classifier)
    before = (current / "model.json").read_bytes()
    reloads = Reloads()
    retrain = Retrainer(plan, store, reloads)
    assert await retrain.run_once() == "failed"
    assert (current / "model.json").read_bytes() == before
    assert reloads.count == 0
    assert await store.get(LOCK_KEY) is None
    assert await store.get(LAST_KEY) is None  # the labels were not used up
    assert await retrain.run_once() == "not_due"  # and a failure is not retried at once


async def test_a_real_run_promotes_reloads_and_the_loop_keeps_serving(
    base: Path, current: Path, tmp_path: Path
) -> None:
    store = EmbeddedStore(StoreSettings())
    labels = append_labels(tmp_path / "labels.jsonl", 300)
    before = (current / "model.json").read_bytes()
    reloads = Reloads()
    retrain = Retrainer(plan_for(base, current, labels), store, reloads)
    lags: list[float] = []
    finished = asyncio.Event()

    async def ticker() -> None:
        # How late a 5 ms timer fires while the model trains: what a request would wait.
        while not finished.is_set():
            due = time.perf_counter() + 0.005
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - due)

    ticking = asyncio.ensure_future(ticker())
    outcome = await retrain.run_once()
    finished.set()
    await ticking
    assert outcome == "promoted"
    await reloads.done.wait()
    model = orjson.loads((current / "model.json").read_bytes())
    assert model["metadata"]["promotion"]["held_out_rows"] > 0
    assert (current / "model.previous.json").read_bytes() == before
    assert not retrain.watch()  # the file it installed is the one it knows
    lags.sort()
    p99, worst = lags[int(0.99 * (len(lags) - 1))], lags[-1]
    print(f"loop lag during a retrain: {len(lags)} ticks, p99 {p99 * 1e3:.2f} ms, max "
          f"{worst * 1e3:.2f} ms")  # fmt: skip
    assert worst < 0.1, (p99, worst)


async def test_a_model_installed_elsewhere_reloads_once(
    base: Path, current: Path, tmp_path: Path
) -> None:
    labels = tmp_path / "labels.jsonl"
    reloads = Reloads()
    retrain = Retrainer(plan_for(base, current, labels), EmbeddedStore(StoreSettings()), reloads)
    assert not retrain.watch()
    replaced = current / "model.json.new"
    replaced.write_bytes((current / "model.json").read_bytes() + b"\n")
    replaced.replace(current / "model.json")  # as `promote` installs: an atomic rename
    assert retrain.watch()
    await reloads.done.wait()
    assert not retrain.watch()
    assert reloads.count == 1


async def test_closing_mid_run_stops_it_and_frees_the_lock(
    base: Path, current: Path, tmp_path: Path
) -> None:
    store = EmbeddedStore(StoreSettings())
    labels = append_labels(tmp_path / "labels.jsonl", 100)
    runner = BlockedRunner()
    retrain = Retrainer(plan_for(base, current, labels, check_s=0.01), store, Reloads(), runner)
    retrain.start()
    await runner.started.wait()
    assert await store.get(LOCK_KEY) is not None
    await retrain.close()
    assert await store.get(LOCK_KEY) is None
    assert not retrain.running


async def test_a_command_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await run_command([sys.executable, "-c", "import time; time.sleep(60)"], 0.5)
    assert time.monotonic() - started < 10


def policy_with(routing: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "model").mkdir(exist_ok=True)
    return {
        "version": 1,
        "models": {"m": {"replicas": ["http://127.0.0.1:9/v1"]}},
        "tiers": {"cheap": {"models": ["m"]}, "large": {"models": ["m"]}},
        "routing": {"classifier": str(tmp_path / "model"), "strong_fraction": 0.3} | routing,
    }


def test_retrain_needs_a_classifier_and_labels(tmp_path: Path) -> None:
    policy = policy_with({"retrain": {"data": ["base.jsonl"]}}, tmp_path)
    del policy["routing"]["classifier"], policy["routing"]["strong_fraction"]
    with pytest.raises(PolicyError) as raised:
        parse_policy(policy, base_dir=tmp_path)
    assert raised.value.errors == [
        "routing.retrain: needs routing.classifier (the model it replaces)",
        "routing.retrain.labels: required without routing.feedback or shadow",
    ]


def test_labels_default_to_the_feedback_file_and_paths_to_the_policy(tmp_path: Path) -> None:
    routing = {
        "feedback": {"path": "routing.jsonl"},
        "retrain": {"data": ["base.jsonl"], "candidates": "runs"},
    }
    policy = parse_policy(policy_with(routing, tmp_path), base_dir=tmp_path)
    made = retrainer(policy, tmp_path, EmbeddedStore(StoreSettings()))
    assert made is not None
    assert made.plan.labels == (tmp_path / "routing.jsonl",)
    assert made.plan.data == (tmp_path / "base.jsonl",)
    assert made.plan.candidates == tmp_path / "runs"
    assert made.plan.classifier == tmp_path / "model"
    off = parse_policy(policy_with({}, tmp_path), base_dir=tmp_path)
    assert retrainer(off, tmp_path, EmbeddedStore(StoreSettings())) is None
