"""Pools of replicas serving one model: which replica gets the next request, and which are down.

Until SLO-aware balancing lands, the choice is the replica with the fewest requests in
flight. A replica that refuses connections or fails its health check sits out a cooldown
that doubles on each failure (capped), then gets traffic again: the next request is its
probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx

INITIAL_COOLDOWN_S = 1.0
MAX_COOLDOWN_S = 30.0


@dataclass(eq=False)
class Replica:
    """One backend server, addressed by its OpenAI base URL (`http://host:port/v1`)."""

    url: str
    in_flight: int = 0
    down_until: float = 0.0
    cooldown_s: float = INITIAL_COOLDOWN_S
    failures: int = 0

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/v1")

    def available(self, now: float) -> bool:
        return now >= self.down_until

    def mark_down(self, now: float) -> None:
        self.failures += 1
        self.down_until = now + self.cooldown_s
        self.cooldown_s = min(self.cooldown_s * 2, MAX_COOLDOWN_S)

    def mark_up(self) -> None:
        self.failures = 0
        self.down_until = 0.0
        self.cooldown_s = INITIAL_COOLDOWN_S

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


@dataclass(eq=False)
class Pool:
    """The replicas of one concrete model, and the name the backend knows that model by."""

    model: str
    served_name: str
    replicas: list[Replica]
    api_key: str | None = field(default=None, repr=False)
    _next: int = 0

    @classmethod
    def from_urls(
        cls, model: str, urls: Iterable[str], served_name: str | None, api_key: str | None
    ) -> Pool:
        return cls(model, served_name or model, [Replica(url) for url in urls], api_key)

    def pick(self, exclude: Iterable[Replica] = ()) -> Replica | None:
        """The available replica with the fewest requests in flight; ties rotate."""
        now = time.monotonic()
        excluded = set(exclude)
        best: Replica | None = None
        count = len(self.replicas)
        self._next = (self._next + 1) % count
        for offset in range(count):
            replica = self.replicas[(self._next + offset) % count]
            if replica in excluded or not replica.available(now):
                continue
            if best is None or replica.in_flight < best.in_flight:
                best = replica
        return best

    def healthy(self) -> bool:
        now = time.monotonic()
        return any(replica.available(now) for replica in self.replicas)


class HealthChecker:
    """Polls each replica's `/health` in the background; marks it down or back up."""

    def __init__(self, pools: Iterable[Pool], interval_s: float, timeout_s: float = 1.0) -> None:
        self.pools = list(pools)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self, client: httpx.AsyncClient) -> None:
        replicas = [replica for pool in self.pools for replica in pool.replicas]
        results = await asyncio.gather(*(self._probe(client, r) for r in replicas))
        now = time.monotonic()
        for replica, ok in zip(replicas, results, strict=True):
            if ok:
                replica.mark_up()
            elif replica.available(now):
                replica.mark_down(now)

    async def _probe(self, client: httpx.AsyncClient, replica: Replica) -> bool:
        try:
            response = await client.get(replica.root_url + "/health", timeout=self.timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                await self.check_all(client)
                await asyncio.sleep(self.interval_s)
