"""Gateway overhead, side by side in one run: direct, bare relay, Triage, LiteLLM's proxy.

    .venv/bin/python bench/overhead.py [--duration 5] [--rounds 3] [--concurrency 1 32 128]
                                       [--no-litellm]

A stub backend (`triage sim --profile instant`, its own process) answers a seeded mix
of chat requests; wrk (its own process) drives each target at each concurrency, for
non-streaming and streaming requests. `triage-messages` and `triage-responses` send the
same prompts to the same gateway process as Anthropic Messages and OpenAI Responses
requests, which it translates to chat for the same backend work (and stores each
Responses answer, as a client that leaves `store` unset asks): their CPU per request is
compared with the chat path's, round by round, and so is their p50. Reported per run:
throughput, p50/p95/p99 latency, latency added over the direct run at the same
concurrency, the target's CPU time per request and its peak RSS. LiteLLM's proxy is
installed into bench/.venv-litellm on first use (skipped with a message if that fails).

With `--rounds N` the targets take turns N times at each setting (LiteLLM only in the
first round: it is two orders of magnitude slower). Each target's row is its median
round by throughput, and a ratio is the median of the per-round ratios: on a shared
machine a single run of one target can move 20-30 %, turns taken close together less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from _processes import PYTHON, free_port, start, stop

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MODEL = "bench-model"
LITELLM_VENV = BENCH / ".venv-litellm"
# Rows that drive the `triage` gateway in another client API, by target name.
DIALECT_TARGETS = {"triage-messages": "messages", "triage-responses": "responses"}
TICKS = os.sysconf("SC_CLK_TCK")

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "are",
    "from",
    "or",
    "have",
    "an",
    "not",
    "which",
    "but",
    "can",
    "all",
    "their",
    "will",
    "one",
    "there",
    "been",
    "has",
    "more",
    "if",
    "would",
    "when",
    "so",
    "what",
    "about",
    "some",
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
]


def prompts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 300))) for _ in range(count)]


# Where each client API posts, and its body for one prompt: the same 16 output tokens.
API_PATHS = {
    "chat": "/v1/chat/completions",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
}


def api_body(api: str, model: str, text: str, stream: bool) -> dict[str, object]:
    if api == "responses":
        return {"model": model, "input": text, "max_output_tokens": 16, "stream": stream}
    turn = {"role": "user", "content": text}
    return {"model": model, "messages": [turn], "max_tokens": 16, "stream": stream}


def wrk_script(
    path: Path,
    model: str,
    stream: bool,
    auth: str | None,
    extra: dict[str, object],
    api: str = "chat",
) -> None:
    bodies = [json.dumps({**api_body(api, model, text, stream), **extra}) for text in prompts(64)]
    lua_bodies = ",\n".join("[==[" + body + "]==]" for body in bodies)
    auth_header = f'wrk.headers["Authorization"] = "Bearer {auth}"\n' if auth else ""
    path.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        + auth_header
        + "local bodies = {\n"
        + lua_bodies
        + "\n}\nlocal i = 0\n"
        + "request = function()\n  i = i % #bodies + 1\n"
        + f'  return wrk.format(nil, "{API_PATHS[api]}", nil, bodies[i])\nend\n'
        + "done = function(summary, latency, requests)\n"
        + '  local e = summary.errors\n  io.write(string.format("WRK {\\"requests\\": %d, '
        + '\\"duration_us\\": %d, \\"errors\\": %d, \\"non2xx\\": %d, \\"p50\\": %d, '
        + '\\"p95\\": %d, \\"p99\\": %d}\\n", summary.requests, summary.duration, '
        + "e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), "
        + "latency:percentile(95), latency:percentile(99)))\nend\n"
    )


@dataclass
class Target:
    name: str
    url: str
    process: subprocess.Popen[bytes] | None
    model: str
    auth: str | None = None
    body_extra: dict[str, object] = field(default_factory=dict)
    api: str = "chat"  # the client API wrk speaks (API_PATHS)


@dataclass
class Row:
    target: str
    stream: bool
    concurrency: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: float | None
    peak_rss_mb: float | None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def peak_rss_mb(pid: int) -> float:
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run_wrk(target: Target, stream: bool, concurrency: int, duration: float, workdir: Path) -> Row:
    script = workdir / f"{target.name}-{stream}.lua"
    wrk_script(script, target.model, stream, target.auth, target.body_extra, target.api)
    threads = 1 if concurrency == 1 else 2
    base = ["wrk", f"-t{threads}", f"-c{concurrency}", "-s", str(script), "--timeout", "10s"]
    root = target.url.removesuffix("/v1")
    subprocess.run([*base, "-d", "1s", root], capture_output=True, check=True)  # warm-up
    before = cpu_seconds(target.process.pid) if target.process else None
    out = subprocess.run(
        [*base, "-d", f"{int(duration)}s", root], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("WRK "))[4:])
    requests = max(result["requests"], 1)
    cpu = None
    if target.process is not None and before is not None:
        cpu = (cpu_seconds(target.process.pid) - before) * 1000 / requests
    return Row(
        target=target.name,
        stream=stream,
        concurrency=concurrency,
        rps=result["requests"] / (result["duration_us"] / 1e6),
        p50_ms=result["p50"] / 1000,
        p95_ms=result["p95"] / 1000,
        p99_ms=result["p99"] / 1000,
        errors=result["errors"] + result["non2xx"],
        cpu_ms_per_request=cpu,
        peak_rss_mb=peak_rss_mb(target.process.pid) if target.process else None,
    )


def start_sim(
    profile: str, model: str, *flags: str, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A `triage sim` serving `model`, once healthy, and its /v1 URL."""
    port = free_port()
    args = ["-m", "gateway.cli", "sim", "--profile", profile, "--model", model, *flags]
    sim = start([PYTHON, *args, "--port", str(port)], f"http://127.0.0.1:{port}/health", log=log)
    return sim, f"http://127.0.0.1:{port}/v1"


def start_stub() -> tuple[subprocess.Popen[bytes], str]:
    """The stub backend every overhead bench measures against, and its /v1 URL."""
    return start_sim("instant", MODEL)


def start_gateway(
    policy: Path, *flags: str, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A `triage serve` on the policy file `policy`, once healthy, and its root URL."""
    port = free_port()
    args = ["-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port), *flags]
    gateway = start([PYTHON, *args], f"http://127.0.0.1:{port}/healthz", log=log)
    return gateway, f"http://127.0.0.1:{port}"


def triage_policy(stub_url: str, path: Path, cache: bool = False) -> None:
    classifier = ROOT / "classifiers/models/default"
    routing: dict[str, object] = {"default_tier": "cheap"}
    if classifier.exists():
        routing.update(classifier=str(classifier), strong_fraction=0.3)
    policy = {
        "version": 1,
        "models": {
            "bench-small": {"replicas": [stub_url], "served_name": MODEL},
            "bench-large": {"replicas": [stub_url], "served_name": MODEL},
        },
        "tiers": {"cheap": {"models": ["bench-small"]}, "large": {"models": ["bench-large"]}},
        "routing": routing,
        "cache": {"enabled": cache},
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


def triage_target(stub_url: str, workdir: Path, name: str, cache: bool) -> Target:
    policy = workdir / f"{name}.yaml"
    triage_policy(stub_url, policy, cache)
    gateway, root = start_gateway(policy, "--log-level", "warning")
    return Target(name, root + "/v1", gateway, "auto")


def litellm_target(stub_url: str, workdir: Path) -> Target | None:
    binary = LITELLM_VENV / "bin/litellm"
    if not binary.exists():
        print(
            "installing LiteLLM's proxy into bench/.venv-litellm (a few minutes)...",
            file=sys.stderr,
        )
        created = subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)]).returncode
        installed = (
            created == 0
            and subprocess.run(
                [str(LITELLM_VENV / "bin/pip"), "install", "-q", "litellm[proxy]"]
            ).returncode
            == 0
        )
        if not installed or not binary.exists():
            print("LiteLLM could not be installed: its rows are skipped.", file=sys.stderr)
            return None
    config = workdir / "litellm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": stub_url,
                            "api_key": "sk-stub",
                        },
                    }
                ]
            }
        )
    )
    port = free_port()
    key = "sk-bench-master"
    env = {"LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    try:
        process = start(
            [str(binary), "--config", str(config), "--port", str(port)],
            f"http://127.0.0.1:{port}/health/liveliness",
            env=env,
            timeout=120,
        )
    except RuntimeError as exc:
        print(f"LiteLLM did not start, its rows are skipped: {exc}", file=sys.stderr)
        return None
    return Target("litellm", f"http://127.0.0.1:{port}/v1", process, MODEL, key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--only", nargs="+", help="targets to run (direct always runs)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="triage-bench-"))
    stub, stub_url = start_stub()
    targets = [Target("direct", stub_url, stub, MODEL)]
    try:
        everything = ["relay", "triage", "triage-cached", "litellm", *DIALECT_TARGETS]
        wanted = set(args.only or everything)
        if "relay" in wanted:
            port = free_port()
            relay = start(
                [PYTHON, str(BENCH / "relay.py"), stub_url, str(port)],
                f"http://127.0.0.1:{port}/v1/x",
            )
            targets.append(Target("relay", f"http://127.0.0.1:{port}/v1", relay, MODEL))
        if "triage" in wanted or wanted & set(DIALECT_TARGETS):
            triage = triage_target(stub_url, workdir, "triage", cache=False)
            targets.append(triage)
            for name, api in DIALECT_TARGETS.items():  # the same process, another API
                if name in wanted:
                    targets.append(Target(name, triage.url, triage.process, "auto", api=api))
        if "triage-cached" in wanted:
            # temperature 0 makes every request cacheable: after warm-up, all are hits.
            cached = triage_target(stub_url, workdir, "triage-cached", cache=True)
            cached.body_extra = {"temperature": 0}
            targets.append(cached)
        if "litellm" in wanted and not args.no_litellm:
            litellm = litellm_target(stub_url, workdir)
            if litellm is not None:
                targets.append(litellm)

        rows: list[Row] = []
        ratios: dict[tuple[bool, int], float] = {}
        versus_chat: list[DialectCost] = []
        for stream in (False, True):
            for concurrency in args.concurrency:
                turns: dict[str, list[Row]] = {}
                for turn in range(args.rounds):
                    for target in targets:
                        if target.name == "litellm" and turn > 0:
                            continue
                        row = run_wrk(target, stream, concurrency, args.duration, workdir)
                        turns.setdefault(target.name, []).append(row)
                        print(
                            f"  {row.target:8} stream={stream!s:5} c={concurrency:<4}"
                            f" {row.rps:9.0f} req/s  p50 {row.p50_ms:7.2f} ms  p99 "
                            f"{row.p99_ms:7.2f} ms  errors {row.errors}",
                            file=sys.stderr,
                        )
                if "triage" in turns and "relay" in turns:
                    paired = zip(turns["triage"], turns["relay"], strict=True)
                    per_turn = [ours.rps / floor.rps for ours, floor in paired]
                    ratios[stream, concurrency] = statistics.median(per_turn)
                versus_chat += dialect_costs(turns, stream, concurrency)
                chosen = {name: _median_row(found) for name, found in turns.items()}
                floor = chosen.get("direct")
                for name, row in chosen.items():
                    if floor is not None and name != "direct":
                        row.added_p50_ms = row.p50_ms - floor.p50_ms
                        row.added_p99_ms = row.p99_ms - floor.p99_ms
                    rows.append(row)
        print(report(rows, ratios))
        print(dialect_report(versus_chat))
        out = BENCH / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        found = [asdict(r) for r in rows] + [asdict(c) for c in versus_chat]
        (out / f"overhead-{stamp}.json").write_text(json.dumps(found, indent=1))
    finally:
        for process in {id(t.process): t.process for t in targets}.values():  # shared ones once
            stop(process)
    return 0


@dataclass
class DialectCost:
    """A dialect's cost over the chat path, the same prompts to the same gateway: medians
    of the per-round CPU ratio and p50 difference (rounds taken close together)."""

    target: str
    stream: bool
    concurrency: int
    cpu_ms_per_request: float
    chat_cpu_ms_per_request: float
    cpu_ratio: float
    added_p50_ms: float


def dialect_costs(turns: dict[str, list[Row]], stream: bool, concurrency: int) -> list[DialectCost]:
    chat = turns.get("triage")
    costs = []
    for name in DIALECT_TARGETS:
        rounds = turns.get(name)
        if chat is None or rounds is None:
            continue
        paired = list(zip(rounds, chat, strict=True))
        cpu = [(r.cpu_ms_per_request or 0.0, c.cpu_ms_per_request or 0.0) for r, c in paired]
        costs.append(
            DialectCost(
                target=name,
                stream=stream,
                concurrency=concurrency,
                cpu_ms_per_request=statistics.median(ours for ours, _ in cpu),
                chat_cpu_ms_per_request=statistics.median(theirs for _, theirs in cpu),
                cpu_ratio=statistics.median(ours / theirs for ours, theirs in cpu if theirs),
                added_p50_ms=statistics.median(r.p50_ms - c.p50_ms for r, c in paired),
            )
        )
    return costs


def dialect_report(costs: list[DialectCost]) -> str:
    if not costs:
        return ""
    lines = [
        "",
        "| API (translated) | stream | conc. | CPU ms/req | chat CPU ms/req | CPU / chat "
        "| p50 - chat p50 ms |",
        "|" + "---|" * 7,
    ]
    for c in costs:
        lines.append(
            f"| {c.target.removeprefix('triage-')} | {'yes' if c.stream else 'no'} | "
            f"{c.concurrency} | {c.cpu_ms_per_request:.3f} | {c.chat_cpu_ms_per_request:.3f} | "
            f"{c.cpu_ratio:.2f} | {c.added_p50_ms:+.2f} |"
        )
    return "\n".join(lines)


def _median_row(rows: list[Row]) -> Row:
    """The round whose throughput is the median (the lower middle one of an even count)."""
    return sorted(rows, key=lambda row: row.rps)[(len(rows) - 1) // 2]


def report(rows: list[Row], ratios: dict[tuple[bool, int], float] | None = None) -> str:
    """The table; `ratios`, if given, are Triage / relay per (stream, concurrency)."""

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| target | stream | conc. | req/s | p50 ms | p95 ms | p99 ms | +p50 ms | +p99 ms "
        "| CPU ms/req | peak RSS MB | errors |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r.target} | {'yes' if r.stream else 'no'} | {r.concurrency} | {r.rps:.0f} | "
            f"{fmt(r.p50_ms)} | {fmt(r.p95_ms)} | {fmt(r.p99_ms)} | {fmt(r.added_p50_ms)} | "
            f"{fmt(r.added_p99_ms)} | {fmt(r.cpu_ms_per_request, 3)} | "
            f"{fmt(r.peak_rss_mb, 0)} | {r.errors} |"
        )
    by_key = {(r.target, r.stream, r.concurrency): r for r in rows}
    lines += [
        "",
        "| stream | conc. | triage / relay (req/s) | triage / litellm (req/s) |",
        "|---|---|---|---|",
    ]
    for (target, stream, concurrency), row in by_key.items():
        if target != "triage":
            continue
        relay = by_key.get(("relay", stream, concurrency))
        litellm = by_key.get(("litellm", stream, concurrency))
        to_relay = (ratios or {}).get((stream, concurrency))
        if to_relay is None and relay is not None:
            to_relay = row.rps / relay.rps
        lines.append(
            f"| {'yes' if stream else 'no'} | {concurrency} | {fmt(to_relay)} | "
            f"{fmt(row.rps / litellm.rps if litellm else None, 1)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
