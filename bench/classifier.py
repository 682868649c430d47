"""Classifier speed: per-request scoring latency by prompt size, huge prompts, load time, memory.

Run: python bench/classifier.py [--model DIR]. Single process, one core, after a warm-up.
Prompts come from the shared routing data when present (cut to each size bucket), else from
synthetic text, so the bench runs anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.model import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "routing"


def _prompts() -> list[str]:
    prompts: list[str] = []
    for name in ("mmlu-train.jsonl", "arena-hard-v1.jsonl"):
        path = DATA / name
        if path.is_file():
            with path.open() as handle:
                prompts.extend(json.loads(line)["prompt"] for line in handle if line.strip())
    if not prompts:
        words = [
            "the",
            "model",
            "must",
            "solve",
            "42",
            "equations",
            "with",
            "x^2",
            "+",
            "3",
            "and",
            "write",
            "python",
            "code",
        ]
        rng = random.Random(0)
        prompts = [" ".join(rng.choices(words, k=rng.randint(5, 400))) for _ in range(2000)]
    return prompts


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return pick(0.5) * 1e6, pick(0.99) * 1e6, max(ordered) * 1e6


def _time(model: object, requests: list[dict[str, object]]) -> list[float]:
    score = model.score  # type: ignore[attr-defined]
    for request in requests[:200]:
        score(request)
    samples = []
    gc.disable()
    for request in requests:
        start = time.perf_counter()
        score(request)
        samples.append(time.perf_counter() - start)
    gc.enable()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "classifiers" / "models" / "default"))
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    rng = random.Random(1)
    prompts = _prompts()
    rows = []
    realistic = [p[:2000] for p in rng.choices(prompts, k=args.n)]
    buckets = {
        "mixed, <=2,000 chars (data as is)": realistic,
        "<=300 chars": [p[:300] for p in rng.choices(prompts, k=args.n)],
        "2,000 chars": [
            (p * (2000 // max(len(p), 1) + 1))[:2000] for p in rng.choices(prompts, k=args.n)
        ],
        # Repeating one short prompt up to 2,000 chars gives few distinct words; text made of
        # different prompts is the harder case (about 350 words, 200 of them distinct).
        "2,000 chars, distinct text": [
            " ".join(rng.choices(prompts, k=40))[:2000] for _ in range(args.n)
        ],
        "chat, 2,000 chars + system + 4 turns": [],
        "20,000 chars": [
            (p * (20000 // max(len(p), 1) + 1))[:20000] for p in rng.choices(prompts, k=200)
        ],
        "200,000 chars": [
            (p * (200000 // max(len(p), 1) + 1))[:200000] for p in rng.choices(prompts, k=50)
        ],
    }
    chat: list[dict[str, object]] = []
    for prompt in rng.choices(prompts, k=args.n):
        chat.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a careful assistant. " * 10},
                    {"role": "user", "content": prompt[:500]},
                    {"role": "assistant", "content": "An earlier answer. " * 20},
                    {"role": "user", "content": (prompt * 5)[:2000]},
                ],
                "max_tokens": 512,
            }
        )
    for name, texts in buckets.items():
        requests: list[dict[str, object]] = chat if not texts else [{"prompt": t} for t in texts]
        p50, p99, worst = _percentiles(_time(model, requests))
        rows.append((name, len(requests), p50, p99, worst))

    print(f"model: {args.model}")
    print(
        f"load: {load_s * 1000:.0f} ms, "
        f"peak RSS growth on load: {(rss_after - rss_before) / 1024:.1f} MB, "
        f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB"
    )
    print(f"{'prompts':<38} {'n':>5} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>8}")
    for name, n, p50, p99, worst in rows:
        print(f"{name:<38} {n:>5} {p50:>8.1f} {p99:>8.1f} {worst:>8.1f}")


if __name__ == "__main__":
    main()
