"""Prefix-aware replica choice against round robin and P2C, on pools whose prefill dominates.

    .venv/bin/python bench/prefix.py [--duration 20] [--tenants 40] [--sessions 8] [--turns 12]
                                     [--seed 3] [--balancers round_robin slo prefix]
                                     [--workloads ...]

Four simulated vLLM replicas (`triage sim`, fresh processes for every run, so every run
starts with empty KV caches): 2 sequences at once each, 45 ms + 0.15 ms per uncached
prompt token to the first token, 12 ms per output token, and a KV cache of 4,000 blocks
(64k tokens) that cannot hold every prefix of the workload. Workloads:

- shared50 / shared80: `--tenants` tenants, each with a 4-6k-token system prompt, and short
  questions; Poisson arrivals at 50 % and 80 % of the pool's capacity without prefix hits.
  A warm-up comes first, at the same rate: each tenant's system prompt once, in random
  order. It is not measured (nor are the sims' counters over it): steady state is what a
  pool lives in, as in llm-d's benchmark, and a tenant's first request is a miss whatever
  the balancer. Then `--duration` seconds of arrivals are measured.
- agent: `--sessions` concurrent sessions (`x-session-id`), each turn resending the whole
  conversation plus ~2.5k new tokens, from 4.5k to ~32k tokens over `--turns` turns; all
  turns measured, the first (cold) ones included.
- random: prompts of 4-6k tokens with nothing shared, Poisson at 80 % for `--duration`.

Reported over the measured requests: TTFT p50/p90, e2e p90 (ms), output tokens/s, SLO
attainment (TTFT <= 1 s and e2e <= 3 s), the pool's prefix-cache hit rate from the sims'
/metrics (read when the measured phase starts and when it ends), and an offline oracle's:
the same requests, warm-up included, in order, each sent to the replica whose cache (the
sim's own KVCache, same size) holds the most of it, among those within the load bound of
requests placed so far (it knows the caches exactly, and ignores timing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml
from _processes import PYTHON, free_port, start, stop

from gateway.sim.kvcache import KVCache, block_hashes
from gateway.sim.protocol import chat_prompt
from gateway.sim.tokens import token_ids

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-8b"
REPLICAS = 4
SEQS = 2
KV_BLOCKS = 4_000
BLOCK = 16
PREFILL_MS, TTFT_MS, ITL_MS = 0.15, 45.0, 12.0
MAX_TOKENS = 16
SLO_TTFT_S, SLO_E2E_S = 1.0, 3.0
CLIENT_TIMEOUT_S = 60
_TEXT = (
    "the of and to in is that for it as with was on be by at this are from or have an not "
    "which but can all their will one there been has more if would when so what about some "
    "prove integral function compute matrix derive python code error explain why how"
)
WORDS = tuple(_TEXT.split())


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


# --- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    at: float  # seconds from the start; agent turns: -1 (sent when the previous one ends)
    messages: tuple[dict[str, str], ...]
    session: str | None = None
    measured: bool = True  # False: warm-up


def capacity_rps(prompt_tokens: float) -> float:
    """Requests/s the pool serves with no prefix hit: slots / service time."""
    service = (TTFT_MS + prompt_tokens * PREFILL_MS + MAX_TOKENS * ITL_MS * 1.1) / 1000
    return REPLICAS * SEQS / service


def poisson(rng: random.Random, rate: float, duration: float) -> list[float]:
    times, now = [], 0.0
    while (now := now + rng.expovariate(rate)) < duration:
        times.append(now)
    return times


def shared(rng: random.Random, tenants: int, load: float, duration: float) -> list[Request]:
    """A warm-up (each tenant once, shuffled), then `duration` s of measured arrivals."""
    systems = [words(rng, rng.randint(4_000, 6_000)) for _ in range(tenants)]
    rate = load * capacity_rps(5_000)

    def ask(at: float, tenant: int, measured: bool) -> Request:
        question = words(rng, rng.randint(10, 40))
        messages = (
            {"role": "system", "content": systems[tenant]},
            {"role": "user", "content": question},
        )
        return Request(at, messages, measured=measured)

    order = rng.sample(range(tenants), tenants)
    out, at = [], 0.0
    for tenant in order:
        at += rng.expovariate(rate)
        out.append(ask(at, tenant, False))
    warmup = at
    for offset in poisson(rng, rate, duration):
        out.append(ask(warmup + offset, rng.randrange(tenants), True))
    return out


def unshared(rng: random.Random, load: float, duration: float) -> list[Request]:
    rate = load * capacity_rps(5_000)
    return [
        Request(at, ({"role": "user", "content": words(rng, rng.randint(4_000, 6_000))},))
        for at in poisson(rng, rate, duration)
    ]


def agent(rng: random.Random, sessions: int, turns: int) -> list[list[Request]]:
    """Per session, its turns in order: each resends everything so far plus a new message."""
    out = []
    for s in range(sessions):
        messages = [{"role": "system", "content": words(rng, 2_000)}]
        mine = []
        for _ in range(turns):
            messages.append({"role": "user", "content": words(rng, 2_500)})
            mine.append(Request(-1, tuple(messages), f"session-{s}"))
            messages.append({"role": "assistant", "content": words(rng, 30)})
        out.append(mine)
    return out


# --- processes -------------------------------------------------------------------------------


@dataclass
class Sim:
    url: str
    process: subprocess.Popen[bytes]


def start_sims(workdir: Path, run: str) -> list[Sim]:
    def one(i: int) -> Sim:
        port = free_port()
        args = [PYTHON, "-m", "gateway.cli", "sim", "--profile", "small", "--port", str(port)]
        args += ["--model", MODEL, "--max-num-seqs", str(SEQS), "--kv-blocks", str(KV_BLOCKS)]
        args += ["--ttft-ms", str(TTFT_MS), "--prefill-ms-per-token", str(PREFILL_MS)]
        args += ["--itl-ms", str(ITL_MS), "--seed", str(i)]
        root = f"http://127.0.0.1:{port}"
        log = workdir / f"sim-{run}-{i}.log"
        return Sim(root + "/v1", start(args, root + "/health", log=log))

    with ThreadPoolExecutor(REPLICAS) as pool:
        return list(pool.map(one, range(REPLICAS)))


def start_gateway(balancer: str, sims: list[Sim], workdir: Path, run: str) -> tuple[str, Any]:
    policy = {
        "version": 1,
        "server": {
            "balancer": balancer,
            "upstream_timeout_s": CLIENT_TIMEOUT_S,
            "health_check_interval_s": 0.5,
            # The index remembers about what a sim's cache holds: 64k tokens of ~5 characters
            # each here (words of the bench's vocabulary), against the index's 4 a token.
            "prefix": {"kv_tokens": KV_BLOCKS * BLOCK * 5 // 4, "replica_header": True},
        },
        "models": {MODEL: {"replicas": [s.url for s in sims], "max_num_seqs": SEQS}},
        "tiers": {"chat": {"models": [MODEL]}},
        "cache": {"enabled": False},
    }
    path = workdir / f"policy-{run}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "serve", "--policy", str(path), "--port", str(port)]
    process = start(
        [*args, "--log-level", "warning"],
        f"http://127.0.0.1:{port}/healthz",
        log=workdir / f"triage-{run}.log",
    )
    return f"http://127.0.0.1:{port}/v1", process


def prefix_counters(sims: list[Sim]) -> tuple[float, float]:
    hits = queries = 0.0
    for sim in sims:
        for line in httpx.get(sim.url[:-3] + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.split()[-1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.split()[-1])
    return hits, queries


# --- the client ------------------------------------------------------------------------------


@dataclass
class Result:
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    replica: str | None = None

    @property
    def met(self) -> bool:
        return (
            self.status == 200
            and self.ttft_s is not None
            and self.e2e_s is not None
            and self.ttft_s <= SLO_TTFT_S
            and self.e2e_s <= SLO_E2E_S
        )


async def send(session: aiohttp.ClientSession, url: str, request: Request) -> Result:
    result = Result()
    body = {
        "model": "auto",
        "messages": list(request.messages),
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"x-session-id": request.session} if request.session else {}
    sent = time.monotonic()
    try:
        async with session.post(url + "/chat/completions", json=body, headers=headers) as r:
            result.status = r.status
            result.replica = r.headers.get("x-triage-replica")
            if r.status != 200:
                await r.read()
                return result
            async for line in r.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    result.e2e_s = time.monotonic() - sent
                    return result
                chunk = json.loads(payload)
                if result.ttft_s is None and chunk.get("choices"):
                    result.ttft_s = time.monotonic() - sent
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
            result.status = 598
    except (aiohttp.ClientError, TimeoutError):
        result.status = 597
    return result


@dataclass
class Run:
    results: list[Result]  # timed requests first, then each session's turns in order
    counters: tuple[float, float]  # the sims' prefix-cache hits and queries while measured
    measured_s: float  # from the first measured request to the last answer


async def drive(
    url: str, timed: list[Request], sessions: list[list[Request]], sims: list[Sim]
) -> Run:
    """Send every request; the sims' counters are read as the first measured request is
    sent (warm-up requests still in flight then count as measured: a few of ~100+)."""
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    boundary = min((r.at for r in timed if r.measured), default=0.0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.monotonic()

        async def snapshot() -> tuple[tuple[float, float], float]:
            await asyncio.sleep(max(boundary - (time.monotonic() - started), 0.0))
            began = time.monotonic()
            return await asyncio.to_thread(prefix_counters, sims), began

        async def at(request: Request) -> Result:
            await asyncio.sleep(max(request.at - (time.monotonic() - started), 0.0))
            return await send(session, url, request)

        async def conversation(turns: list[Request]) -> list[Result]:
            return [await send(session, url, turn) for turn in turns]

        first = asyncio.create_task(snapshot())
        results = list(await asyncio.gather(*(at(r) for r in timed)))
        for done in await asyncio.gather(*(conversation(s) for s in sessions)):
            results += done
        (hits, queries), began = await first
        wall = time.monotonic() - began
        end_hits, end_queries = await asyncio.to_thread(prefix_counters, sims)
        return Run(results, (end_hits - hits, end_queries - queries), wall)


# --- the oracle ------------------------------------------------------------------------------


def oracle_hit_rate(requests: list[Request], load_factor: float = 1.25) -> float:
    """Each request, in order, to the replica whose cache holds most of its prompt, among
    those within `load_factor` x the mean requests placed so far; caches as the sims'.
    Warm-up requests fill the caches but are not counted."""
    caches = [KVCache(KV_BLOCKS, BLOCK) for _ in range(REPLICAS)]
    placed = [0] * REPLICAS
    hits = queries = 0
    for request in requests:
        prompt, count = chat_prompt(list(request.messages))
        hashes = block_hashes(token_ids(prompt, count), BLOCK)
        bound = load_factor * (sum(placed) + 1) / REPLICAS
        bound = max(bound, min(placed) + 1)
        allowed = [i for i in range(REPLICAS) if placed[i] + 1 <= bound]
        best = max(allowed, key=lambda i: (caches[i].cached_prefix_blocks(hashes), -placed[i]))
        placed[best] += 1
        lease = caches[best].allocate(hashes, count, count + MAX_TOKENS)
        if lease is not None:
            hits += lease.cached_tokens if request.measured else 0
            caches[best].free(lease)
        queries += count if request.measured else 0
    return hits / queries if queries else 0.0


# --- the report ------------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    balancer: str
    requests: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    e2e_p90_ms: float
    output_tps: float
    attainment: float
    hit_rate: float
    oracle: float
    errors: int
    replicas_per_session: float | None = field(default=None)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def summarize(
    workload: str,
    balancer: str,
    run: Run,
    requests: list[Request],
    oracle: float,
    sessions: list[list[Request]],
) -> Row:
    """The measured requests' figures (`requests` in the order of `run.results`)."""
    all_results = run.results
    results = [r for r, q in zip(all_results, requests, strict=True) if q.measured]
    ok = [r for r in results if r.status == 200]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    spread = None
    if sessions:
        # Results of sessions come after the timed ones, in session order.
        tail = all_results[len(all_results) - sum(len(s) for s in sessions) :]
        seen, offset = [], 0
        for turns in sessions:
            seen.append(len({r.replica for r in tail[offset : offset + len(turns)]}))
            offset += len(turns)
        spread = statistics.mean(seen)
    hits, queries = run.counters
    return Row(
        workload=workload,
        balancer=balancer,
        requests=len(results),
        ttft_p50_ms=quantile(ttfts, 0.5),
        ttft_p90_ms=quantile(ttfts, 0.9),
        e2e_p90_ms=quantile([r.e2e_s for r in ok if r.e2e_s is not None], 0.9),
        output_tps=sum(r.output_tokens for r in ok) / run.measured_s,
        attainment=sum(r.met for r in results) / len(results) if results else 0.0,
        hit_rate=hits / queries if queries else 0.0,
        oracle=oracle,
        errors=len(results) - len(ok),
        replicas_per_session=spread,
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | balancer | requests | TTFT p50 ms | TTFT p90 ms | e2e p90 ms | output tok/s "
        "| SLO attainment | prefix hit rate | oracle hit rate | errors | replicas/session |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        spread = "-" if r.replicas_per_session is None else f"{r.replicas_per_session:.1f}"
        lines.append(
            f"| {r.workload} | {r.balancer} | {r.requests} | {r.ttft_p50_ms:.0f} | "
            f"{r.ttft_p90_ms:.0f} | {r.e2e_p90_ms:.0f} | {r.output_tps:.1f} | "
            f"{100 * r.attainment:.1f} % | {100 * r.hit_rate:.1f} % | {100 * r.oracle:.1f} % | "
            f"{r.errors} | {spread} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--tenants", type=int, default=40)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--balancers", nargs="+", default=["round_robin", "slo", "prefix"],
        choices=["round_robin", "least_outstanding", "slo", "prefix"],
    )  # fmt: skip
    parser.add_argument(
        "--workloads", nargs="+", default=["shared50", "shared80", "agent", "random"],
        choices=["shared50", "shared80", "agent", "random"],
    )  # fmt: skip
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="triage-prefix-bench-"))
    print(f"logs in {workdir}", file=sys.stderr)
    rows: list[Row] = []
    for workload in args.workloads:
        rng = random.Random(f"{args.seed}-{workload}")
        timed: list[Request] = []
        sessions: list[list[Request]] = []
        if workload == "shared50":
            timed = shared(rng, args.tenants, 0.5, args.duration)
        elif workload == "shared80":
            timed = shared(rng, args.tenants, 0.8, args.duration)
        elif workload == "random":
            timed = unshared(rng, 0.8, args.duration)
        else:
            sessions = agent(rng, args.sessions, args.turns)
        # Sessions interleave in time; the oracle takes them turn by turn, round the sessions.
        turns = max(map(len, sessions), default=0)
        ordered = timed + [s[t] for t in range(turns) for s in sessions]
        oracle = oracle_hit_rate(ordered)
        for balancer in args.balancers:
            run = f"{workload}-{balancer}"
            sims = start_sims(workdir, run)
            gateway = None
            try:
                url, gateway = start_gateway(balancer, sims, workdir, run)
                outcome = asyncio.run(drive(url, timed, sessions, sims))
            finally:
                stop(gateway)
                for sim in sims:
                    stop(sim.process)
            requests = timed + [turn for turns in sessions for turn in turns]
            row = summarize(workload, balancer, outcome, requests, oracle, sessions)
            print(table([row]).splitlines()[-1], file=sys.stderr)
            rows.append(row)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
