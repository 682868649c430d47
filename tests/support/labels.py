"""Tiny routing data for retraining tests: a base set whose outcomes are coin flips, and
traffic labels in which a few planted topics are the ones the strong tier fixes."""

from __future__ import annotations

import random
from pathlib import Path

import orjson

TOPICS = (
    "algebra", "biology", "chemistry", "databases", "economics", "finance", "geometry",
    "history", "linguistics", "music", "networks", "optics", "poetry", "quantum", "robotics",
    "statistics", "topology", "writing",
)  # fmt: skip
HARD = frozenset({"quantum", "topology", "chemistry", "optics", "finance", "robotics"})


def prompt(rng: random.Random) -> str:
    first, second = rng.sample(TOPICS, 2)
    return f"Explain {first} with {second}"


def hard(text: str) -> bool:
    return any(topic in text.split() for topic in HARD)


def write_base(path: Path, rows: int = 150, seed: int = 1) -> Path:
    """Rows of two sources whose outcomes carry no signal: a model that knows nothing."""
    rng = random.Random(seed)
    with path.open("wb") as file:
        for source in ("public-a", "public-b"):
            for _ in range(rows):
                row = {"prompt": prompt(rng), "weak": int(rng.random() < 0.5), "strong": 1}
                file.write(orjson.dumps({**row, "source": source}) + b"\n")
    return path


def append_labels(path: Path, rows: int, seed: int = 2, start: int = 0) -> Path:
    """Shadow-like rows: the strong tier wins exactly on prompts naming a hard topic."""
    rng = random.Random(seed)
    with path.open("ab") as file:
        for i in range(start, start + rows):
            text = prompt(rng)
            row = {"request_id": f"req-{seed}-{i}", "prompt": text, "label": "shadow"}
            row |= {"weak": 0, "strong": 1} if hard(text) else {"weak": 1, "strong": 1}
            file.write(orjson.dumps(row) + b"\n")
    return path
