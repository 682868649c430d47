"""One request's state as it moves through the stages, and the one place it is finished.

Every way a request can end (a JSON body read, a stream relayed to `[DONE]`, an error,
a client that went away) goes through `Exchange.finish`, once: the replica's in-flight
count drops, the cache entry is committed only for a complete answer, and the budget
reservation is settled with what was really generated.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from gateway.api.request import ParsedRequest
from gateway.auth import Caller
from gateway.cache.plan import CachePlan
from gateway.cache.response_cache import Recorder
from gateway.pools import Pool, Replica
from gateway.router import Decision
from gateway.upstream import Outcome


def new_request_id() -> str:
    return os.urandom(12).hex()


@dataclass(eq=False)
class Exchange:
    request_id: str
    parsed: ParsedRequest
    caller: Caller
    decision: Decision
    plan: CachePlan | None = None
    recorder: Recorder | None = None
    tier: str | None = None
    pool: Pool | None = None
    replica: Replica | None = None
    outcome: Outcome = field(default_factory=Outcome)
    headers: dict[str, str] = field(default_factory=dict)
    _finished: bool = False

    def served_by(self, tier: str, pool: Pool, replica: Replica) -> None:
        self.tier, self.pool, self.replica = tier, pool, replica
        self.headers["x-triage-tier"] = tier
        self.headers["x-triage-model"] = pool.model

    async def finish(self) -> None:
        """Release, commit and settle; safe to call from every `finally`, runs once."""
        if self._finished:
            return
        self._finished = True
        if self.replica is not None:
            self.replica.in_flight -= 1
        # Shielded: a client disconnect cancels the relay, not the bookkeeping.
        await asyncio.shield(self._settle())

    async def _settle(self) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        outcome = self.outcome
        same_model = (
            self.plan is not None and self.pool is not None and (self.pool.model == self.plan.model)
        )
        if outcome.completed and outcome.error is None and same_model:
            await recorder.commit(usage=outcome.usage)
        else:
            await recorder.abandon()
