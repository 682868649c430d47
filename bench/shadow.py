"""Shadow comparisons cost clients nothing: the same load with shadow at 10 % and off.

    .venv/bin/python bench/shadow.py [--rounds 6] [--round-s 10] [--concurrency 8]
                                     [--rate 0.1] [--cap 1.0] [--tiny-cap 0.0005] [--seed 1]

Two identical sets of simulated replicas (`triage sim`, each its own process: a small cheap
tier, a large strong tier, a small judge), one gateway on each: `off` has no `routing.shadow`,
`shadow` samples `--rate` of the cheap tier's answers, asks the large tier too, and has the
judge compare both answers twice. Both log routing rows, and share one redis-server (each
its own key prefix), where the shadow's daily cap is held. The load is closed-loop: each of
`--concurrency` clients sends the next request when its answer is whole, pinned to the cheap
tier, 32 tokens at most, never cacheable (temperature 0.7). Rounds of `--round-s` alternate
between the gateways (off, shadow, off, ...) so that machine noise falls on both alike; after
each round the sims are left to go idle (the shadow's background calls included), so no
round inherits the other's work. Client latency is the whole answer as the client saw it.

Then the cap: a third gateway on the shadow's replicas compares every answer (rate 1) under a
`--tiny-cap` USD per day, for 120 requests; spend is read back from the store.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from _processes import stop
from overhead import start_gateway, start_sim

from gateway.policy import StoreSettings, parse_policy
from gateway.shadow import SHADOW_TENANT, cap_ledger
from gateway.store.redis import RedisStore
from tests.support.redis import RedisServer

SMALL, LARGE = "bench-8b", "bench-70b"
WORDS = [
    "prove",
    "integral",
    "function",
    "compute",
    "matrix",
    "derive",
    "python",
    "code",
    "error",
    "explain",
    "why",
    "how",
    "history",
    "chemistry",
    "poem",
    "summary",
    "translate",
    "list",
    "compare",
    "design",
    "test",
    "budget",
    "route",
    "cache",
]


@dataclass
class Arm:
    name: str
    gateway: str
    sims: list[str]
    rows: Path
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def policy(sims: list[str], rows: Path, store: dict[str, Any], shadow: dict[str, Any] | None):
    small, large, judge = sims
    routing: dict[str, Any] = {"default_tier": "cheap", "feedback": {"path": str(rows)}}
    if shadow is not None:
        routing["shadow"] = {
            "weak": "cheap",
            "strong": "large",
            "judge": "judge",
            "prompts": "hash",
            "path": str(rows.with_suffix(".labels.jsonl")),
            **shadow,
        }
    return {
        "version": 1,
        "server": {"upstream_timeout_s": 30},
        "models": {
            SMALL: {"replicas": [small], "price": {"input_per_mtok": 0.05, "output_per_mtok": 0.1}},
            LARGE: {"replicas": [large], "price": {"input_per_mtok": 0.6, "output_per_mtok": 0.8}},
            "judge": {
                "replicas": [judge],
                "served_name": SMALL,
                "price": {"input_per_mtok": 0.05, "output_per_mtok": 0.1},
            },
        },
        "tiers": {
            "cheap": {"models": [SMALL]},
            "large": {"models": [LARGE]},
            "judging": {"models": ["judge"]},
        },
        "routing": routing,
        "store": store,
    }


def serve(spec: dict[str, Any], workdir: Path, name: str) -> tuple[str, Any]:
    """A gateway on the policy `spec`: its root URL and process (logs in `workdir`)."""
    path = workdir / f"policy-{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    process, root = start_gateway(path, log=workdir / f"gateway-{name}.log")
    return root, process


def prompt(rng: random.Random) -> str:
    return f"Question {rng.randrange(10**6)}: " + " ".join(rng.choices(WORDS, k=6))


async def load(url: str, seconds: float, concurrency: int, rng: random.Random, arm: Arm) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                body = {
                    "model": "cheap",
                    "messages": [{"role": "user", "content": prompt(rng)}],
                    "max_tokens": 32,
                    "temperature": 0.7,
                }
                started = time.perf_counter()
                answer = await client.post(url + "/v1/chat/completions", json=body)
                if answer.status_code == 200:
                    arm.latencies.append(time.perf_counter() - started)
                else:
                    arm.errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def idle(sims: list[str], wait_s: float = 120) -> None:
    """Until no sim has a request running or queued, twice in a row."""
    deadline = time.monotonic() + wait_s
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        stats = [httpx.get(s[:-3] + "/admin/stats", timeout=5).json() for s in sims]
        quiet = quiet + 1 if all(s["running"] == 0 and s["waiting"] == 0 for s in stats) else 0
        time.sleep(0.3)


def spend(redis_url: str, prefix: str, spec: dict[str, Any], cap: float) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        store = RedisStore(StoreSettings(redis_url=redis_url, key_prefix=prefix))
        try:
            report = await cap_ledger(store, parse_policy(spec), cap).usage(SHADOW_TENANT)
            day: dict[str, Any] = report["budgets"][0]
            return day
        finally:
            await store.close()

    return asyncio.run(read())


def requests_total(sim: str) -> int:
    return int(httpx.get(sim[:-3] + "/admin/stats", timeout=5).json()["requests_total"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def count_rows(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--cap", type=float, default=1.0)
    parser.add_argument("--tiny-cap", type=float, default=0.0005)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    redis = RedisServer().start()
    processes: list[Any] = []
    try:
        arms: list[Arm] = []
        specs: dict[str, dict[str, Any]] = {}
        for name in ("off", "shadow"):
            sims = []
            for role, profile, model in (
                ("cheap", "small", SMALL),
                ("large", "large", LARGE),
                ("judge", "small", SMALL),
            ):
                log = workdir / f"sim-{name}-{role}.log"
                process, url = start_sim(profile, model, "--seed", "1", log=log)
                sims.append(url)
                processes.append(process)
            store = {"redis_url": redis.url, "key_prefix": f"{name}:", "timeout_ms": 1000}
            rows = workdir / f"{name}.jsonl"
            shadow = None if name == "off" else {"sample_rate": args.rate, "usd_per_day": args.cap}
            specs[name] = policy(sims, rows, store, shadow)
            url, process = serve(specs[name], workdir, name)
            processes.append(process)
            arms.append(Arm(name, url, sims, rows))
        rng = random.Random(args.seed)
        for arm in arms:  # warm up connections and estimates, not measured
            asyncio.run(load(arm.gateway, 2, args.concurrency, rng, Arm("warm", "", [], rows)))
            idle(arm.sims)
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else reversed(arms):
                asyncio.run(load(arm.gateway, args.round_s, args.concurrency, rng, arm))
                idle(arm.sims)
        shadow_arm = arms[1]
        day = spend(redis.url, "shadow:", specs["shadow"], args.cap)
        # The shadow gateway's calls, as its replicas counted them (large: shadow requests).
        calls = [requests_total(sim) for sim in shadow_arm.sims]
        labels = count_rows(shadow_arm.rows.with_suffix(".labels.jsonl"))

        # The cap: every answer compared, under a tiny daily cap.
        tiny = policy(
            shadow_arm.sims,
            workdir / "tiny.jsonl",
            {"redis_url": redis.url, "key_prefix": "tiny:", "timeout_ms": 1000},
            {"sample_rate": 1.0, "usd_per_day": args.tiny_cap},
        )
        url, process = serve(tiny, workdir, "tiny")
        tiny_before = [requests_total(sim) for sim in shadow_arm.sims]
        capped_arm = Arm("tiny", url, shadow_arm.sims, workdir / "tiny.jsonl")
        rng = random.Random(args.seed + 1)

        async def hundred_twenty() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                for _ in range(30):
                    await asyncio.gather(
                        *(
                            client.post(
                                url + "/v1/chat/completions",
                                json={
                                    "model": "cheap",
                                    "max_tokens": 32,
                                    "temperature": 0.7,
                                    "messages": [{"role": "user", "content": prompt(rng)}],
                                },
                            )
                            for _ in range(4)
                        )
                    )

        asyncio.run(hundred_twenty())
        idle(capped_arm.sims)
        tiny_day = spend(redis.url, "tiny:", tiny, args.tiny_cap)
        tiny_labels = count_rows(workdir / "tiny.labels.jsonl")
        tiny_calls = [
            requests_total(sim) - before
            for sim, before in zip(shadow_arm.sims, tiny_before, strict=True)
        ]
        stop(process)
    finally:
        for process in reversed(processes):
            stop(process)
        redis.stop()

    print(
        f"shadow vs off: {args.rounds} rounds x {args.round_s:g} s each, concurrency "
        f"{args.concurrency}, shadow rate {args.rate:g}, seed {args.seed}"
    )
    print("| gateway | requests | errors | p50 ms | p99 ms | mean ms |")
    print("|---|---|---|---|---|---|")
    for arm in arms:
        lat = [x * 1000 for x in arm.latencies]
        print(
            f"| {arm.name} | {len(lat)} | {arm.errors} | {percentile(lat, 50):.1f} | "
            f"{percentile(lat, 99):.1f} | {statistics.fmean(lat):.1f} |"
        )
    print(
        f"\nshadow gateway: {labels} labelled rows; spend ${day['spent_usd']:.6f} of the "
        f"${day['limit_usd']:g} daily cap (held now ${day['reserved_usd']:g})"
    )
    print(f"  requests seen by its cheap / large / judge replicas: {' / '.join(map(str, calls))}")
    print(
        f"\ntiny cap ${args.tiny_cap:g}: 120 requests, every answer sampled: {tiny_labels} "
        f"labelled rows; spend ${tiny_day['spent_usd']:.6f} (held ${tiny_day['reserved_usd']:g})"
        f"; spend <= cap: {tiny_day['spent_usd'] <= args.tiny_cap}"
    )
    print(f"  requests seen by cheap / large / judge: {' / '.join(map(str, tiny_calls))}")
    print(f"\nlogs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
