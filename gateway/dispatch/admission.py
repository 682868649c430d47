"""SLO admission: which tier takes a request now, or how long it waits, or its refusal."""

from __future__ import annotations

import math
import time

from gateway.dispatch.job import Job
from gateway.dispatch.settings import DispatchSettings
from gateway.errors import RateLimited, TriageError, UpstreamUnavailable
from gateway.pools import Pool
from gateway.replica import Budget
from gateway.slo import WaitingRoom

__all__ = ["Admission", "fastest", "live", "no_healthy_replica"]

# A waiting request re-checks the pools this often even without a wake-up: load reports
# and latency estimates change without any request finishing.
_RECHECK_S = 0.025


class Admission:
    """Decides where a request may start, against the latency each option is predicted
    to give; requests that must wait for capacity wait in `room`."""

    def __init__(self, settings: DispatchSettings, room: WaitingRoom) -> None:
        self.settings = settings
        self.room = room

    async def admit(self, job: Job) -> tuple[str, Pool]:
        waiter = None
        try:
            while True:
                now = time.monotonic()
                options = live(job.options, now)
                if not options:
                    raise no_healthy_replica(job)
                if job.deadline.target is None:
                    return options[0]
                budget = self.budget(job)
                assert budget is not None
                if waiter is None or self.room.may_go(waiter):
                    for tier, pool in options:
                        prediction = pool.predict(now, budget, explore=job.explore)
                        if prediction is not None and prediction.fits(budget):
                            return tier, pool
                    # Nothing is predicted to fit, but a prediction alone never keeps work
                    # from an idle replica it cannot vouch for: the request re-measures it.
                    for tier, pool in options:
                        if pool.probe_target(now) is not None:
                            return tier, pool
                if job.priority == "critical" or not job.rules.shed:
                    # Critical requests are never shed while any tier can serve them.
                    return fastest(options, now, job, budget)
                queue_until = min(
                    job.deadline.started + job.rules.max_queue_s, job.deadline.ttft_at
                )
                full = waiter is None and self.room.full()
                if job.priority == "sheddable" or now >= queue_until or full:
                    raise _refusal(job, now, options)
                if waiter is None:
                    waiter = self.room.enter(job.priority, (pool for _, pool in options))
                await self.room.wait(waiter, min(queue_until - now, _RECHECK_S))
        finally:
            if waiter is not None:
                self.room.leave(waiter)

    def budget(self, job: Job) -> Budget | None:
        """What a replica must be predicted to meet, headroom taken off the time left."""
        if job.deadline.target is None or self.settings.balancer != "slo":
            return None
        sheddable = job.priority == "sheddable"
        headroom = self.settings.sheddable_headroom if sheddable else self.settings.headroom
        ttft, e2e = job.deadline.budget(time.monotonic(), headroom)
        reserve = 0.0 if job.priority == "critical" else self.settings.critical_reserve
        return Budget(ttft, e2e, job.max_tokens, reserve)


def live(options: list[tuple[str, Pool]], now: float) -> list[tuple[str, Pool]]:
    """The options that can take a request, those only panicking (`Pool.panicking`) only
    when there is no other: a tier out on suspicion yields to a fallback tier that is not."""
    live = [(tier, pool) for tier, pool in options if pool.healthy()]
    calm = [(tier, pool) for tier, pool in live if not pool.panicking(now)]
    return calm or live


def fastest(
    options: list[tuple[str, Pool]], now: float, job: Job, budget: Budget
) -> tuple[str, Pool]:
    """The option that would miss the SLO by the least (as a share of what is left)."""

    def overrun(option: tuple[str, Pool]) -> float:
        prediction = option[1].predict(now, budget, explore=job.explore)
        return math.inf if prediction is None else prediction.overrun(budget)

    return min(options, key=overrun)


def no_healthy_replica(job: Job) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        f"No healthy replica for tier '{job.tier}'.", code="no_healthy_replica"
    )


def _refusal(job: Job, now: float, live: list[tuple[str, Pool]]) -> TriageError:
    if now >= job.deadline.ttft_at:
        return UpstreamUnavailable(
            f"Tier '{job.tier}' could not start the request before its deadline.",
            code="deadline_expired",
            retry_after=1.0,
        )
    target = job.deadline.target
    budget = Budget(job.deadline.ttft_at - now, job.deadline.e2e_at - now, job.max_tokens)
    prediction = fastest(live, now, job, budget)[1].predict(now, budget)
    wait = 1.0
    if prediction is not None and target is not None:
        wait = max(prediction.ttft_s - target.ttft_s, 1.0)
    return RateLimited(
        f"Tier '{job.tier}' is over capacity: it cannot meet the request's latency SLO now.",
        code="over_capacity",
        retry_after=wait,
    )
