"""Memory across a long run: RSS after 100,000 requests within 10 % of RSS after 10,000.

    .venv/bin/python bench/memory.py [--requests 100000] [--concurrency 32]

Same stub backend, policy and request mix as bench/overhead.py (cache off, `model=auto`
routed by the classifier), streams and plain requests alternating in rounds of wrk. The
gateway's RSS (VmRSS) is read after each round, and the request count from its own
`triage_requests_total`. Exit status 1 if RSS grew more than `--max-growth` between the
10,000th request and the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _processes import stop
from overhead import Target, run_wrk, start_stub, triage_target


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def served(gateway: Target) -> int:
    text = httpx.get(gateway.url.removesuffix("/v1") + "/metrics", timeout=10).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "triage_requests"
            for sample in family.samples
            if sample.name == "triage_requests_total"
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--round-s", type=int, default=5)
    parser.add_argument("--max-growth", type=float, default=0.10)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="triage-memory-"))
    stub, stub_url = start_stub()
    gateway: Target | None = None
    baseline: tuple[int, float] | None = None
    try:
        gateway = triage_target(stub_url, workdir, "triage", cache=False)
        assert gateway.process is not None
        pid = gateway.process.pid
        print(f"{'requests':>9} {'RSS MB':>8}")
        print(f"{0:>9} {rss_mb(pid):>8.1f}", flush=True)
        stream = False
        count = 0
        while count < args.requests:
            run_wrk(gateway, stream, args.concurrency, args.round_s, workdir)
            stream = not stream
            count, rss = served(gateway), rss_mb(pid)
            print(f"{count:>9} {rss:>8.1f}", flush=True)
            if baseline is None and count >= args.baseline:
                baseline = (count, rss)
        assert baseline is not None
    finally:
        stop(gateway.process if gateway else None)
        stop(stub)
    growth = rss / baseline[1] - 1
    verdict = "ok" if growth <= args.max_growth else "FAILED"
    print(
        f"RSS {baseline[1]:.1f} MB after {baseline[0]:,} requests, {rss:.1f} MB after "
        f"{count:,}: {growth:+.1%} (limit {args.max_growth:+.0%}) {verdict}"
    )
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
