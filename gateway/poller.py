"""Each replica polled in the background: its health endpoint and its Prometheus `/metrics`.

One task per runtime runs both schedules. A round of each kind runs on its own, so a
slow health probe (up to `_HEALTH_TIMEOUT_S`) never delays the load reports, which go
stale within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import httpx

from gateway.pools import Pool
from gateway.replica import Load, Replica

__all__ = ["Poller", "parse_load"]

# Health probes: a server that answers this on the probe path has no health endpoint.
_NO_HEALTH_ENDPOINT = frozenset({404, 405, 501})
_HEALTH_RECHECK_S = 60.0  # how often to look again for a health endpoint that was missing
_HEALTH_TIMEOUT_S = 2.5  # SGLang's /health takes a second by design
# A replica without `/metrics` is asked again now and then: it may have been upgraded.
_RECHECK_UNREPORTED_S = 60.0

# Names in order of preference: vLLM renamed its KV-cache gauge (gpu_ -> kv_) in v0.10.
# llama.cpp's server (with --metrics) reports slots busy and requests deferred for a slot.
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred")
_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
_PREFIX_HITS = "vllm:prefix_cache_hits_total"
_WANTED = frozenset((*_RUNNING, *_WAITING, *_CACHE, _PREFIX_QUERIES, _PREFIX_HITS))

_Probe = Literal["passed", "absent", "refused", "error", "timeout", "inconclusive"]

_logger = logging.getLogger("triage")


class Poller:
    """Probes each replica's health path every `health_interval_s` and reads its metrics
    path every `metrics_interval_s`, handing what it learns to the replica.

    Health (`pool.backend.health_path`): a pool whose backend has no health path gets no
    probe: passive checks only (answers count as health, failures eject, see `Replica`).
    A server that answers the probe path with 404, 405 or 501 has no health endpoint
    (llama-cpp-python, Ollama's `/v1`, hosted APIs): it is not probed again for
    `_HEALTH_RECHECK_S` (it may be upgraded) and is never ejected for it. Only a probe that
    cannot connect, times out or gets a 5xx fails.

    Load (`pool.backend.metrics_path`): a replica that answers 404 or 501, or without any
    queue gauge, has no load to report and is judged by latency alone (asked again after
    `_RECHECK_UNREPORTED_S`). One that stops answering keeps its last report, which soon
    goes stale: the balancer then treats it as saturated.

    The next health round starts `health_interval_s` after the last one ended; the next
    load round `metrics_interval_s` after the last one started (or when it ended, if later).
    """

    def __init__(
        self,
        pools: Iterable[Pool],
        health_interval_s: float,
        metrics_interval_s: float = 0.25,
        *,
        health_timeout_s: float = _HEALTH_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport`: what the polls go through (tests pass a mock); httpx's by default."""
        self.pools = list(pools)
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.metrics_interval_s = metrics_interval_s
        self.metrics_timeout_s = max(metrics_interval_s * 2, 0.5)
        self._transport = transport
        self._task: asyncio.Task[None] | None = None
        self._absent: dict[Replica, float] = {}  # no health endpoint: look again then
        self._recheck_at: dict[str, float] = {}  # no load reports: ask again then

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        # A client (connection pool) each: probes that hang must not hold the load's slots.
        async with (
            httpx.AsyncClient(transport=self._transport) as probes,
            httpx.AsyncClient(transport=self._transport) as scrapes,
        ):
            health = _Schedule(lambda: self.check_health(probes), self.health_interval_s, False)
            load = _Schedule(lambda: self.scrape_load(scrapes), self.metrics_interval_s, True)
            schedules = (health, load)
            try:
                while True:
                    now = time.monotonic()
                    for schedule in schedules:
                        schedule.start_if_due(now)
                    rounds = [s.running for s in schedules if s.running is not None]
                    due = min((s.due_at for s in schedules if s.running is None), default=math.inf)
                    timeout = None if due == math.inf else max(due - now, 0.0)
                    if rounds:
                        await asyncio.wait(
                            rounds, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                        )
                    else:
                        await asyncio.sleep(timeout or 0.0)
                    for schedule in schedules:
                        schedule.collect(time.monotonic())
            finally:
                for schedule in schedules:
                    await schedule.cancel()

    # --- health ----------------------------------------------------------------------

    async def check_health(self, client: httpx.AsyncClient) -> None:
        """One round of health probes, to every replica due one."""
        now = time.monotonic()
        targets = [
            (replica, pool.backend.health_path)
            for pool in self.pools
            if pool.backend.health_path is not None
            for replica in pool.replicas
            if self._absent.get(replica, -math.inf) <= now
        ]
        results = await asyncio.gather(*(self._probe(client, r, path) for r, path in targets))
        now = time.monotonic()
        for (replica, path), result in zip(targets, results, strict=True):
            if result == "absent":
                if replica not in self._absent:
                    _logger.info(
                        "replica %s (model %s) has no health endpoint at %s: passive checks "
                        "only, looking again every %.0f s",
                        replica.url,
                        replica._model,
                        path,
                        _HEALTH_RECHECK_S,
                    )
                self._absent[replica] = now + _HEALTH_RECHECK_S
                replica.health_passed(now)  # it answered: something listens
                continue
            self._absent.pop(replica, None)
            if result == "passed":
                replica.health_passed(now)
            elif result == "refused":
                replica.health_failed(now, reason="connect_refused")
            elif result != "inconclusive":
                replica.health_failed(now, hard=result == "error")

    async def _probe(self, client: httpx.AsyncClient, replica: Replica, path: str) -> _Probe:
        try:
            response = await client.get(replica.root_url + path, timeout=self.health_timeout_s)
        except httpx.ConnectError:
            return "refused"
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError:
            return "timeout"  # reset or garbled: as unsure as a timeout
        status = response.status_code
        if status in _NO_HEALTH_ENDPOINT:
            return "absent"
        if status >= 500:
            return "error"
        return "passed" if status < 300 else "inconclusive"

    # --- load ------------------------------------------------------------------------

    async def scrape_load(self, client: httpx.AsyncClient) -> None:
        """One round of `/metrics` reads, from every replica due one."""
        scrapes = []
        for pool in self.pools:
            path = pool.backend.metrics_path
            for replica in pool.replicas:
                if path is None:
                    replica.load_unreported()  # the server has none: latency alone
                else:
                    scrapes.append(self._scrape(client, replica, path))
        await asyncio.gather(*scrapes)

    async def _scrape(self, client: httpx.AsyncClient, replica: Replica, path: str) -> None:
        unreported = replica.reports_load is False
        if unreported and time.monotonic() < self._recheck_at.get(replica.url, 0.0):
            return
        try:
            response = await client.get(replica.root_url + path, timeout=self.metrics_timeout_s)
        except httpx.HTTPError:
            return  # no news: the last report ages into "saturated"
        # 404: no such endpoint; 501: llama.cpp's server started without --metrics.
        if response.status_code not in (200, 404, 501):
            return
        load = parse_load(response.text) if response.status_code == 200 else None
        if load is None:
            replica.load_unreported()
            self._recheck_at[replica.url] = time.monotonic() + _RECHECK_UNREPORTED_S
        else:
            replica.observe_load(load, time.monotonic())


class _Schedule:
    """One kind of round: when the next is due, and the one running."""

    __slots__ = ("_from_start", "_poll", "_started", "due_at", "interval_s", "running")

    def __init__(
        self, poll: Callable[[], Awaitable[None]], interval_s: float, from_start: bool
    ) -> None:
        self._poll = poll
        self.interval_s = interval_s
        self._from_start = from_start  # the interval counts from a round's start, not its end
        self._started = 0.0
        self.due_at = -math.inf
        self.running: asyncio.Future[None] | None = None

    def start_if_due(self, now: float) -> None:
        if self.running is None and now >= self.due_at:
            self._started = now
            self.running = asyncio.ensure_future(self._poll())

    def collect(self, now: float) -> None:
        """Take a finished round's result: an error in a round ends the poller."""
        done = self.running
        if done is None or not done.done():
            return
        self.running = None
        self.due_at = (self._started if self._from_start else now) + self.interval_s
        done.result()

    async def cancel(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


def parse_load(text: str) -> Load | None:
    """Running and waiting requests, KV-cache use and prefix-cache counters from a
    Prometheus text exposition.

    A server with several engines (data parallel, several models) reports one series per
    engine: queues add up, and the fullest cache counts. None when neither queue is there.
    """
    sums: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(("vllm:", "sglang:", "llamacpp:")):
            continue
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        if name not in _WANTED:
            continue
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        sums[name] = sums.get(name, 0.0) + value
        peaks[name] = max(peaks.get(name, value), value)
    running = next((sums[n] for n in _RUNNING if n in sums), None)
    waiting = next((sums[n] for n in _WAITING if n in sums), None)
    if running is None and waiting is None:
        return None
    cache = next((peaks[n] for n in _CACHE if n in peaks), None)
    return Load(
        running or 0.0, waiting or 0.0, cache, sums.get(_PREFIX_QUERIES), sums.get(_PREFIX_HITS)
    )
