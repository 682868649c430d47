"""What each send and each answer teach the balancer.

Shared by the race (a send failed), the dispatcher (a request got no answer) and the
dispatched answer (it finished), so that none reaches into another's private state.
"""

from __future__ import annotations

import time

from gateway.dispatch.job import OUTCOME, Attempt, Job, client_fault
from gateway.errors import TriageError, UpstreamStatus
from gateway.slo import WaitingRoom
from gateway.upstream import ConnectFailed, Outcome

__all__ = ["Books"]


class Books:
    """Frees replicas, wakes waiting requests and records outcomes; one per dispatcher."""

    __slots__ = ("room",)

    def __init__(self, room: WaitingRoom) -> None:
        self.room = room

    def attempt_failed(self, job: Job, attempt: Attempt, error: TriageError) -> bool:
        """Account for a failed send; True when another replica may be tried.

        A refused connection ejects the replica, and the request may go anywhere (nothing
        reached the replica); so may one answered 503 (the replica did not start it). Any
        other answered 5xx is the replica's answer to this very request, maybe the one
        every replica gives to a malformed request (llama-cpp-python answers those with
        500): it is tried once more, on another replica of the same pool, and never on
        another tier; a second answered 5xx ends it, and then neither counts against its
        replica (the request is the likelier culprit). No answer (reset, timeout) counts
        towards ejection, and the request may be retried anywhere, as before.
        """
        now = time.monotonic()
        replica = attempt.replica
        replica.end(attempt.probe, attempt.progress)
        self.room.wake(attempt.pool)
        attempt.span.set(OUTCOME, "failed")
        attempt.span.end(error)
        if isinstance(error, ConnectFailed):
            replica.mark_down(now)
            return True  # nothing reached the replica
        if not isinstance(error, UpstreamStatus):
            replica.failed(now)  # no answer: reset, timeout, a stream ended before it began
            return job.rules.idempotent
        if error.status_code < 500:
            if error.status_code != 429:
                return False  # the request's own fault: any replica would say the same
            replica.throttle(now, error.retry_after or 1.0)
            return True
        if error.status_code == 503:
            replica.errored(now)
            return True  # the replica did not start it
        if job.errored_on is not None:
            # Failed the same way on two replicas: the request, most likely. Neither answer
            # counts against its replica, or a tenant's malformed requests, retried onto
            # whichever replica is the other one, would make it an outlier of its pool.
            replica.answered(now)
            job.errored_on.forgive()
            return False
        replica.errored(now)
        job.answered_in = (attempt.tier, attempt.pool)
        job.errored_on = replica
        return job.rules.idempotent

    def answered(self, job: Job, attempt: Attempt, outcome: Outcome) -> None:
        """The winning send's answer is done with: free its replica, learn from it."""
        now = time.monotonic()
        replica = attempt.replica
        replica.end(attempt.probe, attempt.progress)
        self.room.wake(attempt.pool)
        attempt.span.set(OUTCOME, _answer_outcome(outcome))
        attempt.span.end(outcome=outcome)
        if outcome.error is not None:
            if not client_fault(outcome.error):
                # Cut short or garbled after a good start: the replica stopped answering.
                replica.failed(now)
            return
        if not outcome.completed:
            return  # the client went away: says nothing about the replica
        replica.succeeded(now)
        if job.stream:
            attempt.pool.observe_answer(now, attempt.progress.events)

    def refused(self, job: Job, error: TriageError) -> None:
        """Say on `error` where a request that got no answer failed: the send that failed
        it, else the last one sent (a timeout), else, with nothing sent (shed, no healthy
        replica), the routed tier and its first model. (Telemetry judges it against the
        SLO from the request record.)"""
        sent = job.last_sent
        if sent is not None:
            error.failed_at(sent.tier, sent.pool.model, sent.replica.url)
        else:
            error.failed_at(job.tier, job.options[0][1].model if job.options else None)


def _answer_outcome(outcome: Outcome) -> str:
    if outcome.error is not None:
        return "failed"
    return "answered" if outcome.completed else "client_closed"
