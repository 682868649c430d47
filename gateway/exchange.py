"""One request's state as it moves through the stages, and the one place it is finished.

Every way a request can end (a JSON body read, a stream relayed to `[DONE]`, an error,
a client that went away) goes through `Exchange.finish`, once: the replica's in-flight
count drops, the cache entry is committed only for a complete answer, the budget
reservation is settled with what was really generated (counted here when the backend
reported no usage: see `gateway/tokenize.py`), and telemetry gets the record.

It is called from one spot per kind of response (gateway/app.py):

- a cached answer: `Gateway.generate`, before the reply is returned;
- a JSON answer: the `Reply`'s `after`, once its last byte is sent (or sending failed);
- a stream: the `EventStreamResponse`'s `on_close`, however the stream ended (`[DONE]`,
  an upstream error, the client gone, the shutdown deadline);
- any error before the response starts (a refusal, a failed send or body read, a client
  gone while waiting): `Gateway.generate`'s `except`, after the failure is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.api.request import ParsedRequest
from gateway.auth import Caller
from gateway.budgets.ledger import Ledger, Reservation
from gateway.cache.plan import CachePlan
from gateway.cache.response_cache import Recorder
from gateway.dialects import Translation
from gateway.dispatch import Dispatched
from gateway.feedback import FeedbackLog
from gateway.policy import Price
from gateway.pools import Pool
from gateway.prefix import replica_id
from gateway.replica import Replica
from gateway.router import Decision
from gateway.telemetry import RequestRecord, Telemetry
from gateway.tokenize import (
    Answer,
    Tokenizer,
    answer_from_body,
    answer_from_events,
    estimate,
)
from gateway.upstream import Outcome, event_data

__all__ = ["OVERHEAD_HEADER", "Exchange", "new_request_id"]

OVERHEAD_HEADER = "x-triage-overhead-ms"
_CHUNK_OBJECTS = {"chat": "chat.completion.chunk", "completions": "text_completion"}


def new_request_id() -> str:
    return os.urandom(12).hex()


@dataclass(eq=False, slots=True)
class Exchange:
    parsed: ParsedRequest
    caller: Caller
    decision: Decision
    record: RequestRecord
    telemetry: Telemetry
    prices: Mapping[str, Price]
    ledger: Ledger
    reservation: Reservation | None = None
    plan: CachePlan | None = None
    recorder: Recorder | None = None
    pool: Pool | None = None
    replica: Replica | None = None
    dispatched: Dispatched | None = None
    outcome: Outcome = field(default_factory=Outcome)
    headers: dict[str, str] = field(default_factory=dict)
    feedback: FeedbackLog | None = None
    translation: Translation | None = None  # the client's dialect, when not chat
    upstream_s: float = 0.0  # spent waiting on the backend before the response starts
    tokenizer: Tokenizer | None = None
    kept: list[bytes] | None = None  # a stream's batches, kept when its backend reports no usage
    shadowed: bool = False  # sampled for a shadow comparison (gateway/shadow.py)
    _finished: bool = False

    def __post_init__(self) -> None:
        self.headers["x-triage-request-id"] = self.record.request_id
        if self.decision.difficulty is not None:
            self.headers["x-triage-difficulty"] = f"{self.decision.difficulty:.4f}"

    def overhead_header(self) -> None:
        """`x-triage-overhead-ms`: the gateway's own time so far, the backend's excluded."""
        spent = time.perf_counter() - self.record.started_at - self.upstream_s
        self.headers[OVERHEAD_HEADER] = f"{spent * 1000:.3f}"

    @property
    def max_tokens_cap(self) -> int | None:
        """The `max_tokens` to send when the client set none but a budget reserved a cap."""
        if self.reservation is None or not self.reservation.holds:
            return None
        return self.ledger.policy.budgets.default_max_tokens

    def served_by(self, dispatched: Dispatched) -> None:
        self.dispatched = dispatched
        tier, pool, replica = dispatched.tier, dispatched.pool, dispatched.replica
        self.pool, self.replica = pool, replica
        self.headers["x-triage-tier"] = tier
        self.headers["x-triage-model"] = pool.model
        if dispatched.hedged:
            self.headers["x-triage-hedged"] = "1"
        if pool.expose_replica:
            self.headers["x-triage-replica"] = replica_id(replica.url)
        self.record.prefix_chars = dispatched.prefix_chars
        self.record.served(tier, pool.model, replica.url)
        shadow = self.feedback.shadow if self.feedback is not None else None
        # A native answer (the backend speaks the client's API) is not chat: not compared.
        if shadow is not None and dispatched.mode != "native" and shadow.samples(tier, self.parsed):
            self.shadowed = True
            if self.parsed.stream and self.kept is None:
                self.kept = []  # the final text, for the judge
        self.record.retries = dispatched.retries
        self.record.hedges = int(dispatched.hedged)

    async def finish(self, *, shielded: bool = True) -> None:
        """Release, commit, settle, record; safe to call from every `finally`, runs once.

        Shielded, a client disconnect cancels the relay but not this bookkeeping. That
        costs a task; `shielded=False` is for where nothing is left to cancel the caller
        (after a plain response is sent)."""
        if self._finished:
            return
        self._finished = True
        if self.dispatched is not None:
            # Frees the replica, and feeds its latency and outcome back to the balancer.
            self.dispatched.finish(self.outcome)
        if shielded:
            await asyncio.shield(self._settle())
        else:
            await self._settle()

    async def count_usage(self) -> None:
        """Give `outcome.usage` a count when the backend reported none (llama-cpp-python's
        streams never do): from the replica's tokenizer, else estimated; marked either way."""
        outcome, pool, replica = self.outcome, self.pool, self.replica
        if outcome.usage is not None or pool is None or replica is None:
            return
        if not (outcome.completed or outcome.events):
            return  # nothing was generated
        kind = self.parsed.kind
        if self.kept is not None:
            answer = answer_from_events(kind, self.kept)
        elif self.record.response_body is not None:
            answer = answer_from_body(kind, self.record.response_body)
        else:  # cut off before its usage chunk: one token per event after the role chunk
            answer = Answer(None, max(outcome.events - 1, 0))
        if self.tokenizer is None:
            usage = estimate(self.parsed, answer)
        else:
            # Until `finish`, this request is one of the replica's own in flight.
            others = replica.in_flight - (0 if self._finished else 1)
            with self.record.trace.span("triage.usage.count"):
                usage = await self.tokenizer.usage(
                    self.parsed, pool, replica, answer, others_in_flight=others
                )
        outcome.usage = usage.as_dict(kind)
        outcome.counted = usage.source

    def usage_event(self) -> bytes:
        """The last chunk of a stream whose client asked for usage, as OpenAI sends it:
        no choices, the usage, and the stream's id and creation time."""
        chunk: dict[str, Any] = {}
        data = event_data(self.kept[0].split(b"\n\n", 1)[0]) if self.kept else None
        with contextlib.suppress(orjson.JSONDecodeError):
            first = orjson.loads(data) if data is not None else None
            if isinstance(first, dict):
                names = ("id", "created", "system_fingerprint")
                chunk = {name: first[name] for name in names if name in first}
        chunk.setdefault("id", f"chatcmpl-{self.record.request_id}")
        chunk["object"] = _CHUNK_OBJECTS.get(self.parsed.kind, "chat.completion.chunk")
        chunk.setdefault("created", int(time.time()))
        chunk["model"] = self.pool.model if self.pool is not None else self.parsed.model
        chunk["choices"] = []
        chunk["usage"] = self.outcome.usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _settle(self) -> None:
        outcome, record = self.outcome, self.record
        await self.count_usage()
        if self.recorder is not None:
            same_model = (
                self.plan is not None
                and self.pool is not None
                and (self.pool.model == self.plan.model)
            )
            if outcome.completed and outcome.error is None and same_model:
                await self.recorder.commit(usage=outcome.usage)
            else:
                await self.recorder.abandon()
        if self.pool is not None:
            record.add_outcome(outcome)
            price = self.prices[self.pool.model]
            record.cost_usd = price.cost(record.prompt_tokens, record.completion_tokens)
        if self.reservation is not None:
            with record.trace.span("triage.budget.settle"):
                await self._settle_budget(self.reservation)
        self.telemetry.finish(record)
        if self.feedback is not None:
            self.feedback.write(self.parsed, record)
            if self.shadowed and self.feedback.shadow is not None:
                self.feedback.shadow.offer(self.parsed, record, outcome, self.kept)

    async def _settle_budget(self, reservation: Reservation) -> None:
        record = self.record
        if self.pool is None or not (record.prompt_tokens or record.completion_tokens):
            await self.ledger.release(reservation)
            return
        await self.ledger.settle(
            reservation,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            price=self.prices[self.pool.model],
        )
