"""Training rows: the JSONL format `train`, `eval` and `score` read, and the gateway's feedback log.

One JSON object per line. `train` and `eval` need `prompt`, `weak` and `strong`; everything
else is optional and kept for grouping and reports:

    {"prompt": "...", "weak": 0, "strong": 1, "source": "mmlu", "subject": "virology"}

`prompt` is the user text (a completions prompt or the last user message). A row may instead
carry the whole OpenAI request body as `request` ({"messages": [...], "max_tokens": ...}), or
just `messages`; then system prompt, earlier turns, tools and response_format count too.

The gateway's feedback log uses the same row, so a deployment can retrain on its own traffic:
`prompt` is null when the policy does not allow storing prompt text (`prompt_sha256` is always
present), `tier` is the tier that answered, and `weak`/`strong` are the outcomes known for the
cheap and the large tier (for example an offline judge score of both answers). Rows without
prompt text are skipped by `train`, which says how many, unless they carry `features`
(`feature_record`): the numbers retraining needs, without the text (classifiers/README.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from classifiers.features import DENSE_NAMES, Features, Token, extract

__all__ = [
    "FEATURES_FORMAT",
    "DataError",
    "Row",
    "StoredFeatures",
    "feature_record",
    "read_rows",
    "request_of_row",
    "word_hash",
]

# Version of the `features` record; bumped whenever DENSE_NAMES or the word rules change, so
# rows written by another version are refused instead of silently misread.
FEATURES_FORMAT = f"triage-features-2/{len(DENSE_NAMES)}"


class DataError(ValueError):
    """A training or evaluation file that cannot be read; the message names file and line."""


@dataclass(frozen=True, slots=True)
class StoredFeatures:
    """What a row without prompt text keeps for retraining: the dense vector and word hashes."""

    dense: tuple[float, ...]
    word_hashes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Row:
    """One labelled (or, for `score`, unlabelled) request."""

    request: Mapping[str, Any] | None
    weak: float | None
    strong: float | None
    source: str
    subject: str
    text: str
    features: StoredFeatures | None = None
    key: str = ""  # identifies the row across files: request_id, else prompt_sha256, else line


def word_hash(word: Token) -> str:
    """The stored form of one word: 12 hex digits of BLAKE2b, unkeyed.

    Unkeyed on purpose: `train` maps hashes back to the words it knows (its public training
    vocabulary and text-bearing rows), and keeps weights only for those, so a private word
    never reaches a model file. The price: whoever holds a row can test whether a given word
    occurred in the prompt; the text, word order and numbers are not stored.
    """
    return hashlib.blake2b(word, digest_size=6).hexdigest()


def feature_record(request: Mapping[str, Any]) -> dict[str, Any]:
    """The `features` field of a row whose prompt text may not be kept (see `word_hash`)."""
    features: Features = extract(request)
    return {
        "format": FEATURES_FORMAT,
        "dense": [round(value, 6) for value in features.dense],
        "words": sorted(word_hash(word) for word in features.tokens),
    }


def _stored(value: Any, where: str) -> StoredFeatures:
    if not isinstance(value, Mapping) or value.get("format") != FEATURES_FORMAT:
        found = value.get("format") if isinstance(value, Mapping) else value
        raise DataError(
            f"{where}: `features` must be a {FEATURES_FORMAT} record, got {found!r}; rows "
            "written by another version cannot be retrained on"
        )
    dense = value.get("dense")
    words = value.get("words")
    if (
        not isinstance(dense, list)
        or len(dense) != len(DENSE_NAMES)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in dense)
    ):
        raise DataError(f"{where}: `features.dense` must be {len(DENSE_NAMES)} numbers")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise DataError(f"{where}: `features.words` must be a list of strings")
    return StoredFeatures(tuple(float(v) for v in dense), tuple(words))


def _key(raw: Mapping[str, Any], line: str) -> str:
    for name in ("request_id", "prompt_sha256"):
        value = raw.get(name)
        if isinstance(value, str) and value:
            return value
    return hashlib.sha256(line.encode()).hexdigest()[:32]


def request_of_row(row: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The OpenAI-style request a data row stands for, or None when it has no prompt text."""
    request = row.get("request")
    if isinstance(request, Mapping):
        return request
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        return {"messages": messages}
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], Mapping):
        # Some exports store a chat as a list of messages under "prompt".
        return {"messages": prompt}
    return None


def _number(row: Mapping[str, Any], key: str, where: str, required: bool) -> float | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        raise DataError(f"{where}: `{key}` must be a number, got {value!r}")
    return float(value)


def _text(request: Mapping[str, Any] | None) -> str:
    if request is None:
        return ""
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, Mapping) and message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else str(content)
    return ""


def _lines(paths: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    for path in paths:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot open ({exc.strerror})") from exc
        for number, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                yield f"{path}:{number}", line.decode("utf-8", errors="replace")


def read_rows(paths: Iterable[str | Path], labelled: bool = True) -> list[Row]:
    """Every row of the JSONL files, in order; `labelled` requires numeric weak and strong."""
    rows: list[Row] = []
    for where, line in _lines(paths):
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(raw, Mapping):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        request = request_of_row(raw)
        stored = raw.get("features")
        features = _stored(stored, where) if stored is not None else None
        usable = request is not None or features is not None
        rows.append(
            Row(
                request=request,
                weak=_number(raw, "weak", where, labelled and usable),
                strong=_number(raw, "strong", where, labelled and usable),
                source=str(raw.get("source") or "unknown"),
                subject=str(raw.get("subject") or raw.get("source") or "unknown"),
                text=_text(request),
                features=features,
                key=_key(raw, line),
            )
        )
    return rows
