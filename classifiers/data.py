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
prompt text are skipped by `train`, which says how many.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["DataError", "Row", "read_rows", "request_of_row"]


class DataError(ValueError):
    """A training or evaluation file that cannot be read; the message names file and line."""


@dataclass(frozen=True, slots=True)
class Row:
    """One labelled (or, for `score`, unlabelled) request."""

    request: Mapping[str, Any] | None
    weak: float | None
    strong: float | None
    source: str
    subject: str
    text: str


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
        rows.append(
            Row(
                request=request,
                weak=_number(raw, "weak", where, labelled and request is not None),
                strong=_number(raw, "strong", where, labelled and request is not None),
                source=str(raw.get("source") or "unknown"),
                subject=str(raw.get("subject") or raw.get("source") or "unknown"),
                text=_text(request),
            )
        )
    return rows
