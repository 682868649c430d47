"""What the prefix balancer costs a request: rendering a chat body and keying its chunks.

    .venv/bin/python bench/prefix_hash.py [--kb 100] [--chunk-chars 256] [--runs 200]

A chat body of `--kb` KB (a system prompt, tools and a conversation) is rendered and cut into
chained chunk keys (gateway/prefix.py) `--runs` times; p50 and p99 are printed, and the
index's match and insert against a replica holding the whole prompt.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.prefix import PrefixIndex, PrefixSettings, chunk_keys, render_chat


def body(kb: int, seed: int = 1) -> dict[str, object]:
    rng = random.Random(seed)
    words = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "on", "by")

    def text(chars: int) -> str:
        out: list[str] = []
        size = 0
        while size < chars:
            word = rng.choice(words)
            out.append(word)
            size += len(word) + 1
        return " ".join(out)

    total = kb * 1000
    messages: list[dict[str, str]] = [{"role": "system", "content": text(total // 4)}]
    for turn in range(10):
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": text(total * 3 // 40)})
    tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    return {"model": "m", "messages": messages, "tools": [tool]}


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kb", type=int, default=100)
    parser.add_argument("--chunk-chars", type=int, default=256)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    chat = body(args.kb)
    size = len(render_chat(chat))
    keying, matching = [], []
    index = PrefixIndex(PrefixSettings(chunk_chars=args.chunk_chars))
    for _ in range(args.runs):
        began = time.perf_counter()
        keys = chunk_keys(render_chat(chat), args.chunk_chars)
        keyed = time.perf_counter()
        index.sent("r", keys, index.match("r", keys))
        keying.append(keyed - began)
        matching.append(time.perf_counter() - keyed)
    print(f"prompt {size} chars, {len(keys)} keys of {args.chunk_chars} chars")
    print(f"render + key: {percentiles(keying)}")
    print(f"match + insert (one replica): {percentiles(matching)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
