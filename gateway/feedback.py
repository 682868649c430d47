"""Routing feedback: one JSONL row per routed request, in the row format that
`triage classifier train` reads (classifiers/README.md), so a deployment can improve its
router from its own traffic.

The gateway knows what it routed and how the answer ended; how good the answer was is
known later (a judge, user ratings). Rows carry `prompt_sha256` and `request_id` to join
those outcomes on as `weak` / `strong`; `train` skips rows that have none. Prompt text is
written only when the policy says `prompts: text`.

Outcomes arrive two ways, and both land in this file (classifiers/README.md, "Traffic
labels"): a shadow comparison's labelled row (gateway/shadow.py, which this log hands the
request path to), and an application's score of one answer (`POST /v1/feedback`,
`write_score`), a row joined to the request's own by `request_id`. Each row says its
`tenant`: a score joins only a request of the same tenant.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from gateway.api.request import ParsedRequest
from gateway.policy import FeedbackSettings
from gateway.telemetry import RequestRecord

if TYPE_CHECKING:
    from gateway.shadow import Shadow

__all__ = ["FeedbackLog", "last_user_text", "prompt_sha256"]

# Requests whose tenant this process remembers, for `owner`: about 100 bytes each.
_KNOWN_OWNERS = 100_000


class FeedbackLog:
    def __init__(self, settings: FeedbackSettings, sample: Callable[[], float] = random.random):
        self.settings = settings
        self._sample = sample
        self._file: BinaryIO | None = None
        # Set when the policy has `routing.shadow`: the request path reaches it from here.
        self.shadow: Shadow | None = None
        self._owners: dict[str, str | None] = {}

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
        if file is None or record.tier is None:
            return
        owners = self._owners
        owners[record.request_id] = record.tenant
        if len(owners) > _KNOWN_OWNERS:
            del owners[next(iter(owners))]  # the oldest
        if self._sample() >= self.settings.sample_rate:
            return
        prompt = parsed.body.get("messages", parsed.body.get("prompt"))
        with_text = self.settings.prompts == "text"
        row: dict[str, Any] = {
            "request_id": record.request_id,
            "time": round(time.time(), 3),
            "source": self.settings.source,
            "tenant": record.tenant,
            "prompt": last_user_text(prompt) if with_text else None,
            "prompt_sha256": prompt_sha256(parsed.body),
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

    def owner(self, request_id: str) -> tuple[bool, str | None]:
        """(known, tenant) of a request this process answered recently: another replica's,
        or an old one, is not known here."""
        if request_id not in self._owners:
            return False, None
        return True, self._owners[request_id]

    def write_score(
        self, request_id: str, tenant: str | None, score: bool | float, quality: float
    ) -> None:
        """An application's score of one answer: a row joined to the request's by id."""
        file = self._file
        if file is None:
            return
        row = {
            "request_id": request_id,
            "time": round(time.time(), 3),
            "source": self.settings.source,
            "label": "feedback",
            "tenant": tenant,
            "score": score,
            "quality": quality,
        }
        file.write(orjson.dumps(row) + b"\n")


def prompt_sha256(body: Mapping[str, Any]) -> str:
    """The key every row of one prompt shares: a hash of its messages (or prompt)."""
    prompt = body.get("messages", body.get("prompt"))
    return hashlib.sha256(orjson.dumps(prompt)).hexdigest()


def last_user_text(prompt: object) -> str | None:
    """The text of the last user message of `messages`, or a completions prompt."""
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
