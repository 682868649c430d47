"""Which server set-up serves Triage best: uvicorn with one or two workers, or granian.

    .venv/bin/python bench/servers.py [--duration 5] [--rounds 2]
    (granian is optional: `.venv/bin/pip install granian` to include it)

Same stub backend, policy and request mix as bench/overhead.py, at concurrency 32,
streaming and not; the set-ups take turns within each round, so a noisy neighbour hits them
alike. Reported per set-up: req/s and the gateway's CPU ms per request (all its processes).
`triage serve` runs uvicorn (uvloop, httptools, gateway/server.py's limits) with one
worker by default because that is what measured best here (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from _processes import PYTHON, free_port, start, stop
from overhead import Target, run_wrk, start_stub, triage_policy


def setups(stub_url: str, workdir: Path) -> list[Target]:
    policy = workdir / "policy.yaml"
    triage_policy(stub_url, policy)
    targets = []
    for workers in (1, 2):
        port = free_port()
        args = ["-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port)]
        args += ["--workers", str(workers), "--log-level", "warning"]
        process = start([PYTHON, *args], f"http://127.0.0.1:{port}/healthz")
        targets.append(
            Target(f"uvicorn x{workers}", f"http://127.0.0.1:{port}/v1", process, "auto")
        )
    if importlib.util.find_spec("granian") is None:
        print("granian is not installed: skipped (.venv/bin/pip install granian)", flush=True)
        return targets
    port = free_port()
    granian = [str(Path(PYTHON).with_name("granian")), "--interface", "asgi", "--loop", "uvloop"]
    granian += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = start(
        [*granian, "gateway.asgi:app"],
        f"http://127.0.0.1:{port}/healthz",
        env={"TRIAGE_POLICY": str(policy)},
    )
    targets.append(Target("granian x1", f"http://127.0.0.1:{port}/v1", process, "auto"))
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="triage-servers-"))
    stub, stub_url = start_stub()
    targets: list[Target] = []
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    try:
        targets = setups(stub_url, workdir)
        for _ in range(args.rounds):
            for stream in (False, True):
                for target in targets:
                    row = run_wrk(target, stream, 32, args.duration, workdir)
                    cpu = row.cpu_ms_per_request or 0.0
                    results.setdefault((target.name, stream), []).append((row.rps, cpu))
                    print(
                        f"  {target.name:11} stream={stream!s:5} {row.rps:6.0f} req/s "
                        f"CPU {cpu:.3f} ms/req",
                        flush=True,
                    )
    finally:
        for target in targets:
            stop(target.process)
        stop(stub)
    print("\n| set-up | stream | req/s (each round) | CPU ms/req (each round) |")
    print("|---|---|---|---|")
    for (name, stream), runs in results.items():
        rps = " / ".join(f"{r:.0f}" for r, _ in runs)
        cpu = " / ".join(f"{c:.3f}" for _, c in runs)
        print(f"| {name} | {'yes' if stream else 'no'} | {rps} | {cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
