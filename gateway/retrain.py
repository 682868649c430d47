"""Scheduled retraining (`routing.retrain`): train on the traffic labels, promote only when
better, and reload the classifier, one replica at a time.

Why child processes: training is seconds to minutes of numpy and pure-Python feature
extraction, and a thread would still hold the GIL for most of it, so client requests on this
event loop would wait. `triage classifier train` and `promote` run as children at low CPU
priority; the loop only waits on their exit.

Why a lock in the store: replicas that share a store (Redis) share one schedule. A run takes
`retrain:lock` (`set_if_absent`, a TTL past the run's timeout, so a replica that dies frees
it) and releases it only if it still holds it; the last run's label count and time are
`retrain:last`, so the next replica to look waits for new labels and the interval too.

A new model reaches every replica through the classifier file: each retrainer checks it
every `check_s` and reloads the policy when it changed (replicas must share the classifier
directory for this; otherwise only the one that promoted reloads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson

from gateway.policy import Policy, RetrainSettings, resolve_classifier_path
from gateway.store import Store, StoreUnavailable

__all__ = [
    "LAST_KEY",
    "LOCK_KEY",
    "Outcome",
    "RetrainPlan",
    "Retrainer",
    "Runner",
    "count_labels",
    "logger",
    "retrainer",
    "run_command",
]

logger = logging.getLogger("triage.retrain")

LOCK_KEY = "retrain:lock"
LAST_KEY = "retrain:last"
_LAST_TTL_S = 90 * 86400.0
_NICE = 10  # children run below the gateway's priority
_ROOT = Path(__file__).resolve().parents[1]  # where `classifiers` is importable from

Outcome = Literal[
    "not_due", "few_labels", "locked", "store_unavailable", "failed", "not_better", "promoted"
]
# Runs one command (argv) to its end within `timeout_s`: its exit code and its output.
Runner = Callable[[Sequence[str], float], Awaitable[tuple[int, str]]]
_Reload = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class RetrainPlan:
    """`routing.retrain` with every path resolved."""

    settings: RetrainSettings
    data: tuple[Path, ...]
    labels: tuple[Path, ...]
    candidates: Path
    classifier: Path  # the model directory promote replaces

    def train_command(self, out: Path) -> list[str]:
        return [
            *_CLASSIFIER, "train", "--data", *map(str, self.data), "--traffic",
            *map(str, self.labels), "--out", str(out), "--holdout", f"{self.settings.holdout:g}",
        ]  # fmt: skip

    def promote_command(self, candidate: Path) -> list[str]:
        return [
            *_CLASSIFIER, "promote", "--candidate", str(candidate), "--current",
            str(self.classifier), "--labels", *map(str, self.labels),
        ]  # fmt: skip


_CLASSIFIER = (sys.executable, "-m", "classifiers.commands")


def retrainer(policy: Policy, base_dir: Path | None, store: Store) -> Retrainer | None:
    """The policy's scheduled retraining (not started), or None when it is off."""
    settings = policy.routing.retrain
    classifier = resolve_classifier_path(policy, base_dir)
    if settings is None or classifier is None:
        return None

    def resolved(path: str) -> Path:
        given = Path(path)
        return given if given.is_absolute() or base_dir is None else base_dir / given

    labels = settings.labels
    if not labels:
        routing = policy.routing
        shadow = routing.shadow.path if routing.shadow is not None else None
        assert routing.feedback is not None  # the policy check requires labels or feedback
        labels = (shadow or routing.feedback.path,)
    plan = RetrainPlan(
        settings,
        tuple(resolved(p) for p in settings.data),
        tuple(resolved(p) for p in labels),
        resolved(settings.candidates),
        classifier,
    )
    return Retrainer(plan, store)


async def run_command(argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
    """Run a child at low priority; killed (exit -9) past `timeout_s`. Output: both streams."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=_ROOT,
        start_new_session=True,  # a signal to the gateway's group does not reach it
    )
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, process.pid, _NICE)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@dataclass
class _Counted:
    identity: tuple[int, int] = (0, 0)  # device and inode: a rotated file is read again
    offset: int = 0
    rows: int = 0


@dataclass
class _LabelCounter:
    """Labelled rows (numeric `weak` and `strong`) in files that only grow, read on from
    where the last count stopped."""

    files: dict[Path, _Counted] = field(default_factory=dict)

    def count(self, paths: Sequence[Path]) -> int:
        total = 0
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            state = self.files.setdefault(path, _Counted())
            identity = (stat.st_dev, stat.st_ino)
            if identity != state.identity or stat.st_size < state.offset:
                self.files[path] = state = _Counted(identity)
            with path.open("rb") as handle:
                handle.seek(state.offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1  # a line still being written is counted next time
            state.rows += count_labels(data[:end].splitlines())
            state.offset += end
            total += state.rows
        return total


def count_labels(lines: Sequence[bytes]) -> int:
    """How many JSONL lines carry both outcomes (what `train --traffic` can learn from)."""
    rows = 0
    for line in lines:
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict) and all(
            isinstance(row.get(k), int | float) and not isinstance(row.get(k), bool)
            for k in ("weak", "strong")
        ):
            rows += 1
    return rows


def _model_identity(directory: Path) -> tuple[int, int, int] | None:
    file = directory / "model.json" if directory.is_dir() else directory
    try:
        stat = file.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _signal_reload() -> None:
    """The gateway reloads its policy on SIGHUP (`gateway.server.handle_signals`); only
    sent when something handles it, since SIGHUP's default is to end the process."""
    handler = signal.getsignal(signal.SIGHUP)
    if handler in (signal.SIG_DFL, None):
        logger.warning("a new classifier is installed; reload the policy to use it")
        return
    os.kill(os.getpid(), signal.SIGHUP)


async def _sighup() -> None:
    _signal_reload()


class Retrainer:
    """One gateway's share of the schedule: a background task that checks every `check_s`."""

    def __init__(
        self,
        plan: RetrainPlan,
        store: Store,
        reload: _Reload = _sighup,
        runner: Runner = run_command,
    ) -> None:
        self.plan = plan
        self._store = store
        self._reload = reload
        self._runner = runner
        self._labels = _LabelCounter()
        self._model = _model_identity(plan.classifier)  # what this runtime loaded
        self._next_try = 0.0  # monotonic: after a failed run, wait an interval locally too
        self._task: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Future[object]] = set()
        self.running = False  # a run holds the lock now (for tests and readiness)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="retrain")

    async def close(self) -> None:
        """Stop the schedule; a run in progress is killed and its lock released."""
        task, self._task = self._task, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.plan.settings.check_s)
            try:
                self.watch()
                await self.run_once()
            except Exception:  # the schedule outlives one bad run; the log says why
                logger.exception("scheduled retraining failed")

    def watch(self) -> bool:
        """Reload when the classifier file is no longer the one this runtime loaded (another
        replica, or a hand-run `promote`, installed a model)."""
        now = _model_identity(self.plan.classifier)
        if now is None or now == self._model:
            return False
        self._model = now
        self._trigger_reload()
        return True

    def _trigger_reload(self) -> None:
        # A task of its own: the reload closes this runtime, and with it this retrainer's task.
        task: asyncio.Future[object] = asyncio.ensure_future(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def run_once(self) -> Outcome:
        """Train and promote if the schedule says so and no other replica is at it."""
        settings = self.plan.settings
        if time.monotonic() < self._next_try:
            return "not_due"
        labels = await asyncio.to_thread(self._labels.count, self.plan.labels)
        try:
            due = await self._due(labels)
            if due != "due":
                return due
            token = uuid.uuid4().hex.encode()
            ttl = 2 * settings.timeout_s + 60.0
            if not await self._store.set_if_absent(LOCK_KEY, token, ttl):
                return "locked"
        except StoreUnavailable:
            return "store_unavailable"
        self.running = True
        try:
            if (due := await self._due(labels)) != "due":  # another replica just ran
                return due
            outcome = await self._run(labels)
        except StoreUnavailable:
            return "store_unavailable"
        finally:
            self.running = False
            with contextlib.suppress(StoreUnavailable):
                await self._store.delete_if_equals(LOCK_KEY, token)
        if outcome == "failed":
            self._next_try = time.monotonic() + settings.interval_s
        return outcome

    async def _due(self, labels: int) -> Outcome | Literal["due"]:
        settings = self.plan.settings
        raw = await self._store.get(LAST_KEY)
        last = orjson.loads(raw) if raw else {"labels": 0, "at": 0.0}
        before = int(last["labels"]) if labels >= int(last["labels"]) else 0
        if labels - before < settings.min_new_labels:
            return "few_labels"
        if time.time() - float(last["at"]) < settings.interval_s:
            return "not_due"
        return "due"

    async def _run(self, labels: int) -> Outcome:
        plan = self.plan
        timeout = plan.settings.timeout_s
        started = time.monotonic()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        candidate = plan.candidates / f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        plan.candidates.mkdir(parents=True, exist_ok=True)
        try:
            code, output = await self._runner(plan.train_command(candidate), timeout)
            if code == 0:
                left = max(1.0, timeout - (time.monotonic() - started))
                code, more = await self._runner(plan.promote_command(candidate), left)
                output += more
        except TimeoutError:
            logger.error("retraining took over %gs and was stopped", timeout)
            return "failed"
        finally:
            self._prune()
        last = orjson.dumps({"labels": labels, "at": time.time()})
        if code == 0:
            await self._store.set(LAST_KEY, last, _LAST_TTL_S)
            logger.info("retrained on %d labels and promoted:\n%s", labels, _tail(output))
            self._model = _model_identity(plan.classifier)
            self._trigger_reload()
            return "promoted"
        if code == 1:  # promote's "not better": the labels are used, wait for new ones
            await self._store.set(LAST_KEY, last, _LAST_TTL_S)
            logger.info("retrained on %d labels, not promoted:\n%s", labels, _tail(output))
            return "not_better"
        logger.error("retraining failed (exit %d), model unchanged:\n%s", code, _tail(output))
        return "failed"

    def _prune(self) -> None:
        keep = self.plan.settings.keep_candidates
        runs = sorted(p for p in self.plan.candidates.iterdir() if p.is_dir())
        for old in runs[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _tail(output: str, lines: int = 12) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])
