"""One request's state as it moves through the stages, and the one place it is finished.

Every way a request can end (a JSON body read, a stream relayed to `[DONE]`, an error,
a client that went away) goes through `Exchange.finish`, once: the replica's in-flight
count drops, the cache entry is committed only for a complete answer, the budget
reservation is settled with what was really generated, and telemetry gets the record.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.api.request import ParsedRequest
from gateway.auth import Caller
from gateway.budgets.ledger import Ledger, Reservation
from gateway.cache.plan import CachePlan
from gateway.cache.response_cache import Recorder
from gateway.dispatch import Dispatched
from gateway.feedback import FeedbackLog
from gateway.policy import Price
from gateway.pools import Pool, Replica
from gateway.router import Decision
from gateway.telemetry import RequestRecord, Telemetry
from gateway.upstream import Outcome

OVERHEAD_HEADER = "x-triage-overhead-ms"


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
    upstream_s: float = 0.0  # spent waiting on the backend before the response starts
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
        self.record.served(tier, pool.model, replica.url)
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

    async def _settle(self) -> None:
        outcome, record = self.outcome, self.record
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
            if outcome.usage is None and outcome.events:
                # Cut off before the usage chunk: bill what was generated (one token per
                # event after the role chunk) against the prompt estimate.
                record.prompt_tokens = self.parsed.estimated_prompt_tokens()
                record.completion_tokens = max(outcome.events - 1, 0)
            price = self.prices[self.pool.model]
            record.cost_usd = price.cost(record.prompt_tokens, record.completion_tokens)
        if self.reservation is not None:
            with record.trace.span("triage.budget.settle"):
                await self._settle_budget(self.reservation)
        self.telemetry.finish(record)
        if self.feedback is not None:
            self.feedback.write(self.parsed, record)

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
