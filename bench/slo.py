"""SLO goodput under bursts and a slow replica: the same seeded workload through each strategy.

    .venv/bin/python bench/slo.py [--rate 6] [--burstiness 3] [--duration 30] [--seed 7]
                                  [--slow-factor 5] [--strategies ...] [--no-litellm]

Simulated vLLM replicas (`triage sim`, each its own process): the cheap tier has two small
replicas, one of them `--slow-factor` times slower (TTFT and inter-token latency); the large
tier has one large replica. Arrivals are Poisson at `--rate` requests/s, `--burstiness`
times that for the first `--burst-s` seconds of every `--period-s`. Each request is a
stream for the cheap (85 %) or the large tier, critical (20 %), standard (50 %) or
sheddable (30 %). The same arrivals go through a fresh gateway per strategy: Triage with
`server.balancer` round_robin, least_outstanding and slo (its full policy), and LiteLLM's
proxy with latency-based routing when bench/.venv-litellm has it.

Goodput is vLLM's `--goodput`: requests per second that met both the TTFT and the e2e SLO
of their tier, as the client measured them. Cost is USD from the answers' usage at the
policy's prices (a hedge's losing copy is counted at its prompt's price).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml
from _processes import PYTHON, free_port, start, stop

ROOT = Path(__file__).resolve().parents[1]
LITELLM = ROOT / "bench/.venv-litellm/bin/litellm"
# Neutral names: LiteLLM looks a tokenizer up on the Hugging Face hub for "llama" models.
SMALL, LARGE = "bench-8b", "bench-70b"
SLO = {"cheap": (0.25, 1.5), "large": (1.0, 4.0)}  # TTFT, e2e seconds
PRICE = {SMALL: (0.05, 0.10), LARGE: (0.60, 0.80)}  # USD per Mtok in, out
CLIENT_TIMEOUT_S = 20  # an answer later than this has missed any SLO here
PRIORITIES = (("critical", 0.2), ("standard", 0.5), ("sheddable", 0.3))
_TEXT = (
    "the of and to in is that for it as with was on be by at this are from or have an not "
    "which but can all their will one there been has more if would when so what about some "
    "prove integral function compute matrix derive python code error explain why how"
)
WORDS = _TEXT.split()


# --- processes -------------------------------------------------------------------------


@dataclass
class Sim:
    name: str
    url: str
    process: subprocess.Popen[bytes]


def start_sim(name: str, profile: str, workdir: Path, flags: list[str]) -> Sim:
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "sim", "--profile", profile, "--port", str(port)]
    args += ["--model", SMALL if profile == "small" else LARGE]
    root = f"http://127.0.0.1:{port}"
    process = start([*args, *flags], root + "/health", log=workdir / f"sim-{name}.log")
    return Sim(name, root + "/v1", process)


def sims_idle(sims: list[Sim], wait_s: float = 60) -> None:
    """Wait until no sim has a request running or queued (leftovers of the last run)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        stats = [httpx.get(s.url[:-3] + "/admin/stats", timeout=5).json() for s in sims]
        if all(s["running"] == 0 and s["waiting"] == 0 for s in stats):
            return
        time.sleep(0.2)


def price(model: str) -> dict[str, float]:
    return dict(zip(("input_per_mtok", "output_per_mtok"), PRICE[model], strict=True))


def triage_policy(strategy: str, sims: dict[str, Sim]) -> dict[str, Any]:
    def slo(tier: str) -> dict[str, float]:
        ttft, e2e = SLO[tier]
        return {"ttft_ms": ttft * 1000, "e2e_ms": e2e * 1000, "percentile": 99}

    return {
        "version": 1,
        "server": {
            "balancer": strategy,
            "upstream_timeout_s": CLIENT_TIMEOUT_S,
            "health_check_interval_s": 0.5,
        },
        "models": {
            SMALL: {
                "replicas": [sims["fast"].url, sims["slow"].url],
                "price": dict(
                    zip(("input_per_mtok", "output_per_mtok"), PRICE[SMALL], strict=True)
                ),
            },
            LARGE: {
                "replicas": [sims["large"].url],
                "price": dict(
                    zip(("input_per_mtok", "output_per_mtok"), PRICE[LARGE], strict=True)
                ),
            },
        },
        "tiers": {
            "cheap": {"models": [SMALL], "slo": slo("cheap")},
            "large": {"models": [LARGE], "slo": slo("large")},
        },
        "routing": {"default_tier": "cheap", "fallback": {"cheap": ["large"]}},
        "cache": {"enabled": False},
        # Everyone may be critical; each request says how important it is (it may only
        # lower its tenant's priority).
        "auth": {"anonymous": {"priority": "critical"}},
    }


@dataclass
class Target:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    key: str | None = None  # LiteLLM wants its master key; Triage takes the tier in a header


def start_triage(strategy: str, sims: dict[str, Sim], workdir: Path) -> Target:
    policy = workdir / f"policy-{strategy}.yaml"
    policy.write_text(yaml.safe_dump(triage_policy(strategy, sims), sort_keys=False))
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port)]
    process = start(
        [*args, "--log-level", "warning"],
        f"http://127.0.0.1:{port}/healthz",
        log=workdir / f"triage-{strategy}.log",
    )
    return Target(strategy, f"http://127.0.0.1:{port}/v1", process)


def start_litellm(sims: dict[str, Sim], workdir: Path) -> Target | None:
    if not LITELLM.exists():
        print("LiteLLM is not installed in bench/.venv-litellm: its rows are skipped.")
        return None

    def deployment(tier: str, sim: Sim, model: str) -> dict[str, Any]:
        params = {"model": f"openai/{model}", "api_base": sim.url, "api_key": "sk-sim"}
        return {"model_name": tier, "litellm_params": params}

    config = {
        "model_list": [
            deployment("cheap", sims["fast"], SMALL),
            deployment("cheap", sims["slow"], SMALL),
            deployment("large", sims["large"], LARGE),
        ],
        "router_settings": {
            "routing_strategy": "latency-based-routing",
            "fallbacks": [{"cheap": ["large"]}],
        },
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    port, key = free_port(), "sk-bench-master"
    env = {
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "HF_HUB_OFFLINE": "1",  # no tokenizer downloads: count tokens with tiktoken
    }
    try:
        process = start(
            [str(LITELLM), "--config", str(path), "--port", str(port)],
            f"http://127.0.0.1:{port}/health/liveliness",
            log=workdir / "litellm.log",
            env=env,
            timeout=180,
        )
    except RuntimeError as exc:
        print(f"LiteLLM did not start, its rows are skipped: {exc}")
        return None
    return Target("litellm", f"http://127.0.0.1:{port}/v1", process, key)


# --- the workload ----------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float
    tier: str
    priority: str
    prompt: str
    max_tokens: int


def workload(
    args: argparse.Namespace, seed: int, duration: float, burstiness: float
) -> list[Arrival]:
    """Poisson arrivals, `burstiness` times faster during each period's burst."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    now = 0.0
    while True:
        bursting = now % args.period_s < args.burst_s
        now += rng.expovariate(args.rate * (burstiness if bursting else 1.0))
        if now >= duration:
            return arrivals
        tier = "cheap" if rng.random() < 0.85 else "large"
        priority = rng.choices([p for p, _ in PRIORITIES], [w for _, w in PRIORITIES])[0]
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160)))
        arrivals.append(Arrival(now, tier, priority, prompt, rng.randint(16, 48)))


@dataclass
class Result:
    tier: str
    priority: str
    at: float = 0.0
    status: int = 0
    code: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    model: str | None = None
    hedged: bool = False
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        ttft, e2e = SLO[self.tier]
        return (
            self.status == 200
            and self.ttft_s is not None
            and self.e2e_s is not None
            and self.ttft_s <= ttft
            and self.e2e_s <= e2e
        )

    @property
    def shed(self) -> bool:
        return self.status in (429, 503) and self.code in ("over_capacity", "deadline_expired")


async def send(
    session: aiohttp.ClientSession, target: Target, arrival: Arrival, started: float
) -> Result:
    await asyncio.sleep(max(arrival.at - (time.monotonic() - started), 0.0))
    result = Result(arrival.tier, arrival.priority, arrival.at)
    body = {
        "model": arrival.tier if target.key else "auto",
        "messages": [{"role": "user", "content": arrival.prompt}],
        "max_tokens": arrival.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"x-triage-tier": arrival.tier, "x-triage-priority": arrival.priority}
    if target.key:
        headers["authorization"] = f"Bearer {target.key}"
    sent = time.monotonic()
    try:
        async with session.post(target.url + "/chat/completions", json=body, headers=headers) as r:
            result.status = r.status
            result.hedged = r.headers.get("x-triage-hedged") == "1"
            result.model = r.headers.get("x-triage-model")
            if r.status != 200:
                error = (await r.json(content_type=None)).get("error") or {}
                result.code = error.get("code") if isinstance(error, dict) else None
                return result
            buffer = b""
            async for data in r.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data:"):
                        continue
                    payload = event[5:].strip()
                    if payload == b"[DONE]":
                        result.e2e_s = time.monotonic() - sent
                        return result
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        result.status = 599
                        return result
                    if result.ttft_s is None and chunk.get("choices"):
                        result.ttft_s = time.monotonic() - sent
                    if chunk.get("usage"):
                        result.usage = chunk["usage"]
                        result.model = result.model or chunk.get("model")
            result.status = 598  # ended without [DONE]
    except (aiohttp.ClientError, TimeoutError):
        result.status = 597
    return result


async def replay(target: Target, warmup: list[Arrival], arrivals: list[Arrival]) -> list[Result]:
    """The warm-up (not counted: every strategy starts with no latency data), then the run."""
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(send(session, target, a, started) for a in warmup))
        started = time.monotonic()
        return await asyncio.gather(*(send(session, target, a, started) for a in arrivals))


# --- the report ------------------------------------------------------------------------


@dataclass
class Row:
    strategy: str
    tier: str
    requests: int
    goodput_rps: float
    attainment: float
    critical_attainment: float | None
    ttft_p99_ms: float | None
    e2e_p99_ms: float | None
    shed: int
    errors: int
    hedged: int
    cost_usd: float


def cost(result: Result) -> float:
    model = result.model if result.model in PRICE else (SMALL if result.tier == "cheap" else LARGE)
    price_in, price_out = PRICE[model]
    prompt = result.usage.get("prompt_tokens", 0)
    total = prompt * price_in + result.usage.get("completion_tokens", 0) * price_out
    if result.hedged:
        total += prompt * price_in
    return total / 1e6


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000


def summarize(strategy: str, results: list[Result], duration: float) -> list[Row]:
    rows = []
    for tier in ("cheap", "large", "all"):
        mine = [r for r in results if tier in (r.tier, "all")]
        if not mine:
            continue
        critical = [r for r in mine if r.priority == "critical"]
        rows.append(
            Row(
                strategy=strategy,
                tier=tier,
                requests=len(mine),
                goodput_rps=sum(r.met for r in mine) / duration,
                attainment=sum(r.met for r in mine) / len(mine),
                critical_attainment=(
                    sum(r.met for r in critical) / len(critical) if critical else None
                ),
                ttft_p99_ms=p99([r.ttft_s for r in mine if r.ttft_s is not None]),
                e2e_p99_ms=p99([r.e2e_s for r in mine if r.e2e_s is not None and r.status == 200]),
                shed=sum(r.shed for r in mine),
                errors=sum(r.status != 200 and not r.shed for r in mine),
                hedged=sum(r.hedged for r in mine),
                cost_usd=sum(cost(r) for r in mine if r.status == 200),
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [
        "| strategy | tier | requests | goodput req/s | SLO attainment | critical attainment "
        "| p99 TTFT ms | p99 e2e ms | shed | errors | hedged | cost USD |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r.strategy} | {r.tier} | {r.requests} | {r.goodput_rps:.2f} | "
            f"{pct(r.attainment)} | {pct(r.critical_attainment)} | {ms(r.ttft_p99_ms)} | "
            f"{ms(r.e2e_p99_ms)} | {r.shed} | {r.errors} | {r.hedged} | {r.cost_usd:.4f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=6.0, help="requests/s between bursts")
    parser.add_argument("--burstiness", type=float, default=3.0, help="rate multiplier in bursts")
    parser.add_argument("--burst-s", type=float, default=3.0)
    parser.add_argument("--period-s", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warmup-s", type=float, default=3.0, help="uncounted, at --rate")
    parser.add_argument("--slow-factor", type=float, default=5.0)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="per small replica")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["round_robin", "least_outstanding", "slo", "litellm"],
        choices=["round_robin", "least_outstanding", "slo", "litellm"],
    )
    parser.add_argument("--no-litellm", action="store_true")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="triage-slo-bench-"))
    arrivals = workload(args, args.seed, args.duration, args.burstiness)
    warmup = workload(args, args.seed + 1, args.warmup_s, 1.0)
    print(f"{len(arrivals)} requests over {args.duration:.0f} s; logs in {workdir}")
    small = ["--ttft-ms", "45", "--itl-ms", "12"]
    slow = ["--ttft-ms", str(45 * args.slow_factor), "--itl-ms", str(12 * args.slow_factor)]
    seqs = ["--max-num-seqs", str(args.max_num_seqs)]
    sims = {
        "fast": start_sim("fast", "small", workdir, [*small, *seqs]),
        "slow": start_sim("slow", "small", workdir, [*slow, *seqs, "--seed", "1"]),
        # A 70B on a node of its own: slower per token, but a fallback that can meet the
        # cheap tier's SLO for short answers.
        "large": start_sim("large", "large", workdir, ["--ttft-ms", "100", "--itl-ms", "25"]),
    }
    rows: list[Row] = []
    try:
        for strategy in args.strategies:
            if strategy == "litellm" and args.no_litellm:
                continue
            sims_idle(list(sims.values()))
            began = time.monotonic()
            if strategy == "litellm":
                target = start_litellm(sims, workdir)
                if target is None:
                    continue
            else:
                target = start_triage(strategy, sims, workdir)
            name = "triage (slo)" if strategy == "slo" else strategy
            print(f"  {name}: started in {time.monotonic() - began:.0f} s", file=sys.stderr)
            try:
                began = time.monotonic()
                results = asyncio.run(replay(target, warmup, arrivals))
                print(f"  {name}: ran in {time.monotonic() - began:.0f} s", file=sys.stderr)
            finally:
                stop(target.process)
            rows += summarize(name, results, args.duration)
            dump = workdir / f"results-{strategy}.json"
            dump.write_text(json.dumps([asdict(r) for r in results]))
    finally:
        for sim in sims.values():
            stop(sim.process)
    print(table(rows))
    goodput = {(r.strategy, r.tier): r for r in rows}
    rr, triage = goodput.get(("round_robin", "all")), goodput.get(("triage (slo)", "all"))
    if rr and triage and rr.goodput_rps:
        print(f"\ntriage / round-robin goodput: {triage.goodput_rps / rr.goodput_rps:.2f}x")
    out = ROOT / "bench/results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"args": vars(args), "rows": [asdict(r) for r in rows]}
    (out / f"slo-{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
