"""A/B of gateway builds: Triage at several git revisions, taking turns on one stub.

    .venv/bin/python bench/ab.py BUILD [BUILD ...] [--rounds 10] [--duration 3] [--stream]
        [--concurrency 32]

BUILD is a revision (a commit, a branch, or "." for the working tree), optionally with
settings after a colon: `HEAD:log=info` (the gateway's log level; default warning, as in
bench/overhead.py) or `HEAD:python=/path/to/python` (another interpreter with the
project installed), or both, comma-separated.

Single wrk runs on this shared machine move by 20-30 %; a change worth a few percent only
shows when the builds run turn about, each round against the same neighbours. Each build
is exported with `git archive` and served by `triage serve` from there (same policy as
bench/overhead.py); the bare relay runs in every round as the floor. Reported per build:
median req/s and CPU ms per request, and the median over rounds of its ratio to the first
build in the same round.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from _processes import PYTHON, free_port, start, stop
from overhead import ROOT, Row, Target, run_wrk, start_stub, triage_policy

_SERVE = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'triage'; "
    "runpy.run_module('gateway.cli', run_name='__main__')"
)


def parse_build(build: str) -> tuple[str, dict[str, str]]:
    """`REV[:key=value,...]` as the revision and its settings (`log`, `python`)."""
    revision, _, rest = build.partition(":")
    settings = dict(item.split("=", 1) for item in rest.split(",") if item)
    unknown = set(settings) - {"log", "python"}
    if unknown:
        raise SystemExit(f"{build}: unknown settings {sorted(unknown)} (log, python)")
    return revision, settings


def export(revision: str, workdir: Path) -> Path:
    """The tree of `revision` (or the working tree, for ".") as a directory."""
    if revision == ".":
        return ROOT
    tree = workdir / revision.replace("/", "_")
    if tree.exists():
        return tree
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "gateway", "classifiers"],
        check=True,
        capture_output=True,
    ).stdout
    tree.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="triage-ab-"))
    policy = workdir / "policy.yaml"
    stub, stub_url = start_stub()
    targets: list[Target] = []
    try:
        port = free_port()
        relay = [PYTHON, str(ROOT / "bench/relay.py"), stub_url, str(port)]
        process = start(relay, f"http://127.0.0.1:{port}/v1/x")
        targets.append(Target("relay", f"http://127.0.0.1:{port}/v1", process, "bench-model"))
        triage_policy(stub_url, policy)
        for number, build in enumerate(args.builds):
            revision, settings = parse_build(build)
            tree = export(revision, workdir)
            port = free_port()
            python = settings.get("python", PYTHON)
            serve = [python, "-c", _SERVE, str(tree), "serve", "--policy", str(policy)]
            serve += ["--port", str(port), "--log-level", settings.get("log", "warning")]
            process = start(serve, f"http://127.0.0.1:{port}/healthz")
            # The name is also a file name (wrk's script): the build's number, not its text.
            targets.append(Target(f"build{number}", f"http://127.0.0.1:{port}/v1", process, "auto"))
        for target in targets:  # warm-up: connections, the classifier, the hedge window
            run_wrk(target, args.stream, args.concurrency, 2, workdir)
        rows: dict[str, list[Row]] = {target.name: [] for target in targets}
        for round_number in range(args.rounds):
            for target in targets:
                row = run_wrk(target, args.stream, args.concurrency, args.duration, workdir)
                rows[target.name].append(row)
            print(f"round {round_number + 1}/{args.rounds} done", flush=True)
        print(report(rows, ["relay", *args.builds]))
    finally:
        for target in targets:
            stop(target.process)
        stop(stub)
    return 0


def report(rows: dict[str, list[Row]], labels: list[str]) -> str:
    """One line per target (labels in the order the targets were started); ratios are to
    the first build, round by round."""
    first = list(rows)[1]
    lines = [
        "| build | req/s | CPU ms/req | req/s vs first | CPU vs first |",
        "|---|---|---|---|---|",
    ]
    for label, runs in zip(labels, rows.values(), strict=True):
        rps = statistics.median(r.rps for r in runs)
        cpu = statistics.median(r.cpu_ms_per_request or 0.0 for r in runs)
        pairs = list(zip(runs, rows[first], strict=True))
        rps_ratio = statistics.median(a.rps / b.rps for a, b in pairs)
        cpu_ratio = statistics.median(
            (a.cpu_ms_per_request or 0.0) / (b.cpu_ms_per_request or 1.0) for a, b in pairs
        )
        lines.append(f"| {label} | {rps:.0f} | {cpu:.3f} | {rps_ratio:.3f}x | {cpu_ratio:.3f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
