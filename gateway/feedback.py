"""Routing feedback: one JSONL row per routed request, in the row format that
`triage classifier train` reads (classifiers/README.md), so a deployment can improve its
router from its own traffic.

The gateway knows what it routed and how the answer ended; how good the answer was is
known later (a judge, user ratings). Rows carry `prompt_sha256` and `request_id` to join
those outcomes on as `weak` / `strong`; `train` skips rows that have none. Prompt text is
written only when the policy says `prompts: text`.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson

from gateway.api.request import ParsedRequest
from gateway.policy import FeedbackSettings
from gateway.telemetry import RequestRecord

__all__ = ["FeedbackLog"]


class FeedbackLog:
    def __init__(self, settings: FeedbackSettings, sample: Callable[[], float] = random.random):
        self.settings = settings
        self._sample = sample
        self._file: BinaryIO | None = None

    def open(self) -> None:
        """Open (or create) the file: when its policy starts, not when it is built, so a
        reload rejected after building leaves no file open. Raises `OSError`."""
        # One unbuffered write() per row on an O_APPEND file: rows from several workers
        # never interleave, and a crash loses none. The file closes when the last request
        # of its policy is done with it (a reload does not cut off requests in flight).
        fd = os.open(self.settings.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)

    def write(self, parsed: ParsedRequest, record: RequestRecord) -> None:
        """Log one request that a tier answered (or the cache, for that tier); nothing
        before `open`."""
        file = self._file
        if file is None or record.tier is None or self._sample() >= self.settings.sample_rate:
            return
        prompt = parsed.body.get("messages", parsed.body.get("prompt"))
        with_text = self.settings.prompts == "text"
        row: dict[str, Any] = {
            "request_id": record.request_id,
            "time": round(time.time(), 3),
            "source": self.settings.source,
            "prompt": _last_user_text(prompt) if with_text else None,
            "prompt_sha256": hashlib.sha256(orjson.dumps(prompt)).hexdigest(),
            "request": dict(parsed.body) if with_text else None,
            "tier": record.tier,
            "routed_tier": record.decided_tier,
            "reason": record.decision_reason,
            "difficulty": record.difficulty,
            "model": record.model,
            "cache": record.cache,
            "status": record.status,
            "finish_reasons": list(record.finish_reasons),
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "cost_usd": record.cost_usd,
        }
        file.write(orjson.dumps(row) + b"\n")


def _last_user_text(prompt: object) -> str | None:
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        return None
    for message in reversed(prompt):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = [p.get("text") for p in content if isinstance(p, dict)]
                return "\n".join(p for p in parts if isinstance(p, str))
    return None
