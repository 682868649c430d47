"""Each replica's own load, scraped from its Prometheus `/metrics` in the background."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

import httpx

from gateway.pools import Load, Pool, Replica

__all__ = ["LoadScraper", "parse_load"]

# A replica without `/metrics` is asked again now and then: it may have been upgraded.
_RECHECK_UNREPORTED_S = 60.0

# Names in order of preference: vLLM renamed its KV-cache gauge (gpu_ -> kv_) in v0.10.
# llama.cpp's server (with --metrics) reports slots busy and requests deferred for a slot.
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred")
_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_WANTED = frozenset(_RUNNING + _WAITING + _CACHE)


def parse_load(text: str) -> Load | None:
    """Running and waiting requests and KV-cache use from a Prometheus text exposition.

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
    return Load(running or 0.0, waiting or 0.0, cache)


class LoadScraper:
    """Reads every replica's `/metrics` every `interval_s`, and hands the load to the replica.

    A replica that answers 404, or without any queue gauge, has no load to report and is
    judged by latency alone. One that stops answering keeps its last report, which soon
    goes stale: the balancer then treats it as saturated.
    """

    def __init__(self, pools: Iterable[Pool], interval_s: float = 0.25) -> None:
        self.pools = list(pools)
        self.interval_s = interval_s
        self.timeout_s = max(interval_s * 2, 0.5)
        self._task: asyncio.Task[None] | None = None
        self._recheck_at: dict[str, float] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def scrape_all(self, client: httpx.AsyncClient) -> None:
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
            response = await client.get(replica.root_url + path, timeout=self.timeout_s)
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

    async def _run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                started = time.monotonic()
                await self.scrape_all(client)
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(self.interval_s - elapsed, 0.0))
