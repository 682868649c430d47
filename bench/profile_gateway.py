"""Where the gateway's CPU goes under load: py-spy samples Triage while wrk drives it.

    .venv/bin/python bench/profile_gateway.py [--stream] [--concurrency 32] [--duration 8]

Same stub backend, policy and request mix as bench/overhead.py. Prints the functions with
the most samples, inclusive (on the stack) and exclusive (running), and keeps the
collapsed stacks (flamegraph input) at the printed path.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _processes import PYTHON, stop
from overhead import Target, run_wrk, start_stub, triage_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    py_spy = Path(PYTHON).with_name("py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="triage-profile-"))
    stacks = workdir / "stacks.txt"
    stub, stub_url = start_stub()
    gateway: Target | None = None
    try:
        gateway = triage_target(stub_url, workdir, "triage", cache=False)
        assert gateway.process is not None
        record = ["record", "--pid", str(gateway.process.pid), "--format", "raw"]
        record += ["--output", str(stacks), "--rate", "250", "--nonblocking"]
        recorder = subprocess.Popen(
            [str(py_spy), *record, "--duration", str(args.duration)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        row = run_wrk(gateway, args.stream, args.concurrency, args.duration, workdir)
        recorder.wait(timeout=60)  # it stops by itself after --duration
    finally:
        stop(gateway.process if gateway else None)
        stop(stub)
    print(f"{row.rps:.0f} req/s, CPU {row.cpu_ms_per_request:.3f} ms/request; stacks: {stacks}")
    report(stacks, args.top)
    return 0


def report(stacks: Path, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    exclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        names = [_short(frame) for frame in frames.split(";")]
        for name in set(names):
            inclusive[name] += samples
        exclusive[names[-1]] += samples
    for title, counter in (("inclusive", inclusive), ("exclusive", exclusive)):
        print(f"\n{title} (% of {total} samples)")
        for name, samples in counter.most_common(top):
            print(f"  {100 * samples / total:5.1f}  {name}")


def _short(frame: str) -> str:
    """`handle (gateway/app.py:150)` -> `handle gateway/app.py`: lines vary, functions don't."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} {path}"


if __name__ == "__main__":
    sys.exit(main())
