"""The budget ledger: reserve a request's worst case before the upstream call, settle after.

Exactness across replicas comes from doing every check-and-hold in one atomic step on the
shared store (a Lua script on Redis, see `lua`): a request is admitted only if the settled
spend plus everything held by live reservations plus its own worst case fits every limit.
Settling swaps the hold for the real cost; a hold whose gateway died expires on its own.
(~550 lines: reserve, settle and the replay queue for a store that was down share the
reservation's state and its exactness argument; split apart, each half would need the other's
invariants to be read.)

A request touches at most two ledgers. The tenant's (its USD windows, its per-tier windows,
rpm and tpm) is one script call on the tenant's hash tag. A tier's global budget spans
tenants, so it is a second call on the tier's own hash tag (on a cluster, another slot).
Each call checks and holds atomically on its own ledger, so neither can over-admit; the
request goes ahead only if both granted, and if one refuses, what the other granted is
cancelled before the error is raised. Until then that grant may make another request wait
or downgrade, never pass: a refusal can under-admit for a moment, never over-admit. The
order of the two calls does not matter for that, so they are sent at once (one round trip
of latency, not two); the tenant's request count is undone with the rest of its hold.

Settle is idempotent per request and ledger (a tombstone lives for `reservation_ttl_s`):
settling twice counts once. Settling a reservation that already expired (or was lost with
a restarted Redis) records the real cost in the windows the request was reserved in, so
nothing is lost either. Store failures on settle and cancel are queued and replayed when
the store answers again; under `fail_open` a reserve that cannot reach the store serves
the request unchecked and its settle is replayed the same way (the request is counted
then). Spend can pass a limit only if the real usage exceeds the reserved worst case
(an underestimated prompt, or a model that ignores `max_tokens`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from gateway.auth import ANONYMOUS, Caller
from gateway.budgets.backends import REFUSED, Backend, Counter, EmbeddedBackend, RedisBackend
from gateway.budgets.errors import (
    BudgetExceeded,
    BudgetStoreUnavailable,
    QuotaExceeded,
    RateLimitExceeded,
)
from gateway.budgets.plan import (
    NANO_PER_USD,
    Check,
    LedgerChecks,
    Plan,
    build_plan,
    cost_nano,
    usage_checks,
)
from gateway.budgets.report import duration, iso, usage_row, usd
from gateway.budgets.windows import Window, WindowKind, window_at
from gateway.errors import NotFound
from gateway.policy import Policy, Price, Tenant
from gateway.store import RedisStore, Store, StoreCommandError, StoreUnavailable

__all__ = ["Headroom", "Hold", "Ledger", "Reservation", "logger"]

logger = logging.getLogger("triage.budgets")

_MAX_PENDING = 100_000


@dataclass(frozen=True, slots=True)
class Hold:
    """What one reservation holds on one ledger; `held` is False when fail_open skipped it."""

    key: str
    counters: tuple[Counter, ...]
    held: bool


@dataclass(frozen=True, slots=True)
class Headroom:
    """One limit as the reservation left it: `used` includes every live hold, this one too."""

    check: Check
    used: int
    reset_at: float

    @property
    def remaining(self) -> int:
        return max(0, self.check.limit - self.used)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request's hold on its ledgers; pass it to `Ledger.settle` or `Ledger.release`."""

    request_id: str
    tenant: str
    tier: str
    price: Price
    at: float  # epoch seconds: the windows it was reserved in
    usd_nano: int  # worst-case cost held
    tokens: int  # worst-case tokens held
    holds: tuple[Hold, ...] = ()
    headroom: tuple[Headroom, ...] = ()

    @property
    def record_id(self) -> str:
        # Per tier, so a downgrade retry under the same request id is a new reservation.
        return f"{self.request_id}@{self.tier}"

    @property
    def unchecked(self) -> bool:
        """Served without the store (fail_open): its limits were not checked."""
        return any(not hold.held for hold in self.holds)

    def headers(self) -> dict[str, str]:
        """OpenAI-style `x-ratelimit-*` headers, and the tightest own budget's remaining USD."""
        headers: dict[str, str] = {}
        budget_left: int | None = None
        for room in self.headroom:
            check = room.check
            if check.kind == "u":
                if check.scope != "global_tier":  # other tenants' spend is not theirs to see
                    left = room.remaining
                    budget_left = left if budget_left is None else min(budget_left, left)
                continue
            unit = "requests" if check.kind == "r" else "tokens"
            headers[f"x-ratelimit-limit-{unit}"] = str(check.limit)
            headers[f"x-ratelimit-remaining-{unit}"] = str(room.remaining)
            headers[f"x-ratelimit-reset-{unit}"] = duration(room.reset_at - self.at)
        if budget_left is not None:
            headers["x-triage-budget-remaining-usd"] = f"{budget_left / NANO_PER_USD:.6f}"
        return headers

    def budgets_left(self) -> Iterator[tuple[str | None, str | None, str, float]]:
        """(tenant, tier, window, USD left) of each USD budget it was checked against; the
        tenant is None for a tier budget shared by all tenants, the tier None for the
        tenant's overall one."""
        for room in self.headroom:
            check = room.check
            if check.kind == "u":
                tenant = None if check.scope == "global_tier" else self.tenant
                yield tenant, check.tier, check.window, room.remaining / NANO_PER_USD


@dataclass(frozen=True, slots=True)
class _Op:
    """A settle or cancel to (re)play; safe to apply twice."""

    action: Literal["settle", "cancel"]
    key: str
    record_id: str
    usd: int = 0
    tokens: int = 0
    count_request: bool = False
    counters: tuple[Counter, ...] = ()


class _Attempt:
    """One ledger's part of a reservation: what was asked, and what the store answered."""

    __slots__ = ("checks", "counters", "error", "key", "status", "used", "windows")

    def __init__(self, checks: LedgerChecks, now: float) -> None:
        self.key = checks.key
        self.checks = checks.checks
        self.windows = _windows(checks.checks, now)
        self.counters = tuple(
            Counter(c.counter(w), c.kind, c.limit, w.end * 1000)
            for c, w in zip(checks.checks, self.windows, strict=True)
        )
        self.status = REFUSED
        self.used: list[int] = []
        self.error: StoreUnavailable | None = None


class Ledger:
    """Budgets and rate limits of one policy, on Redis or (embedded store) in this process."""

    def __init__(
        self,
        store: Store,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
        carry_over: Ledger | None = None,
    ) -> None:
        """`carry_over`: the ledger of the policy this one replaces, on reload; its queued
        settlements move here, and an embedded ledger keeps its counts."""
        self.policy = policy
        self._clock = clock
        self._fail_open = policy.budgets.failure_mode == "fail_open"
        self._ttl_ms = round(policy.budgets.reservation_ttl_s * 1000)
        self._backend: Backend
        if isinstance(store, RedisStore):
            self._backend = RedisBackend(store)
        elif carry_over is not None and isinstance(carry_over._backend, EmbeddedBackend):
            self._backend = carry_over._backend
        else:
            self._backend = EmbeddedBackend()
        self._plans: dict[tuple[str, str], Plan] = {}
        self._pending: deque[_Op] = carry_over._pending if carry_over else deque()
        self._flush_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the request path ---------------------------------------------------------------

    async def reserve(
        self,
        *,
        request_id: str,
        caller: Caller,
        tier: str,
        price: Price,
        prompt_tokens: int,
        max_tokens: int | None,
        choices: int = 1,
    ) -> Reservation:
        """Hold the request's worst case on every limit of (tenant, tier), or raise.

        `max_tokens` is per choice; `choices` (`n`, `best_of`) are each generated in full.

        Raises `BudgetExceeded` or `RateLimitExceeded` (both `QuotaExceeded`, with
        `on_exhausted`), or `BudgetStoreUnavailable` when the store fails under fail_closed.
        """
        now = self._clock()
        per_choice = self.policy.budgets.default_max_tokens if max_tokens is None else max_tokens
        completion = per_choice * choices
        reservation = Reservation(
            request_id,
            caller.tenant,
            tier,
            price,
            now,
            cost_nano(price, prompt_tokens, completion),
            prompt_tokens + completion,
        )
        plan = self._plan(caller, tier)
        if not plan.ledgers:
            return reservation  # nothing to check: no store call at all
        attempts = [_Attempt(checks, now) for checks in plan.ledgers]
        try:
            if len(attempts) == 1:
                await self._try(attempts[0], reservation)
            else:  # independent ledgers: ask both at once, undo below if either says no
                await asyncio.gather(*(self._try(a, reservation) for a in attempts))
        except BaseException:
            # Cancelled (or a bug): any of the calls may have gone through; undo them all.
            for attempt in attempts:
                self._enqueue(_Op("cancel", attempt.key, reservation.record_id), kick=False)
            raise
        failed = [a for a in attempts if a.error is not None]
        refused = [a for a in attempts if a.error is None and a.status == REFUSED]
        if refused or (failed and not self._fail_open):
            await self._undo(attempts, reservation)
            if refused:
                raise self._exceeded(refused, reservation)
            error = failed[0].error
            raise BudgetStoreUnavailable(
                "The budget store is unavailable; try again shortly.", retry_after=1.0
            ) from error
        if not failed:
            self._kick()
        return replace(
            reservation,
            holds=tuple(Hold(a.key, a.counters, a.error is None) for a in attempts),
            headroom=tuple(
                Headroom(check, used, window.end)
                for a in attempts
                if a.error is None
                for check, window, used in zip(a.checks, a.windows, a.used, strict=True)
            ),
        )

    async def settle(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        price: Price | None = None,
    ) -> None:
        """Replace the hold with the real cost; idempotent, never raises (failures queue).

        `price`: the price of the model that actually served, if not the reserved one.
        Cancelling the caller does not cancel the store calls (they are shielded).
        """
        if not reservation.holds:
            return
        usd = cost_nano(price or reservation.price, prompt_tokens, completion_tokens)
        tokens = prompt_tokens + completion_tokens
        ops = [
            _Op("settle", h.key, reservation.record_id, usd, tokens, not h.held, h.counters)
            for h in reservation.holds
        ]
        task = asyncio.get_running_loop().create_task(self._submit(ops))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def release(self, reservation: Reservation) -> None:
        """The request failed before any token was generated: it costs 0 (rpm still counts)."""
        await self.settle(reservation, prompt_tokens=0, completion_tokens=0)

    # --- reporting ----------------------------------------------------------------------

    async def usage(self, tenant: str) -> dict[str, Any]:
        """Spend, holds and remaining per window and tier, for `GET /admin/tenants/{id}/usage`.

        Raises `NotFound` for an unknown tenant, `BudgetStoreUnavailable` if the store fails.
        """
        settings = self._tenant(tenant)
        now = self._clock()
        rows: list[dict[str, Any]] = []
        for checks in usage_checks(self.policy, tenant, settings):
            windows = _windows(checks.checks, now)
            names = [c.counter(w) for c, w in zip(checks.checks, windows, strict=True)]
            try:
                values = await self._backend.read(checks.key, _ms(now), names)
            except StoreUnavailable as exc:
                raise BudgetStoreUnavailable("The budget store is unavailable.") from exc
            for check, window, (settled, held) in zip(checks.checks, windows, values, strict=True):
                rows.append(usage_row(check, window, settled, held, now))
        return {
            "tenant": tenant,
            "at": iso(now),
            "failure_mode": self.policy.budgets.failure_mode,
            "budgets": [row for row in rows if row["scope"] not in ("rpm", "tpm")],
            "rate_limits": [row for row in rows if row["scope"] in ("rpm", "tpm")],
            "pending_settlements": len(self._pending),
        }

    # --- reconciliation -----------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Settlements and cancels waiting for the store to answer again."""
        return len(self._pending)

    async def flush(self) -> int:
        """Replay queued settlements and cancels in order; return how many are still queued."""
        async with self._flush_lock:
            while self._pending:
                op = self._pending[0]
                try:
                    await self._apply(op)
                except StoreCommandError:
                    logger.exception("budget ledger: dropping an operation Redis rejected")
                except StoreUnavailable:
                    break
                self._pending.popleft()
            return len(self._pending)

    async def close(self) -> None:
        """Wait for settlements in flight, try the queue once more; say what stays unsent."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        left = await self.flush()
        if left:
            logger.error(
                "budget ledger closing with unsent settlements",
                extra={"fields": {"pending": left}},
            )

    # --- internals ----------------------------------------------------------------------

    def _plan(self, caller: Caller, tier: str) -> Plan:
        plan = self._plans.get((caller.tenant, tier))
        if plan is None:
            plan = build_plan(self.policy, caller.tenant, caller.settings, tier)
            self._plans[(caller.tenant, tier)] = plan
        return plan

    def _tenant(self, tenant: str) -> Tenant:
        settings = self.policy.tenants.get(tenant)
        if settings is None and tenant == ANONYMOUS:
            settings = self.policy.auth.anonymous
        if settings is None:
            names = ", ".join(sorted(self.policy.tenants)) or "none"
            raise NotFound(
                f"Unknown tenant '{tenant}' (tenants: {names}).", code="tenant_not_found"
            )
        return settings

    async def _try(self, attempt: _Attempt, reservation: Reservation) -> None:
        """Reserve on one ledger; the answer (or the store's failure) lands in `attempt`."""
        now_ms = _ms(self._clock())
        try:
            attempt.status, attempt.used = await self._backend.reserve(
                attempt.key,
                now_ms,
                reservation.record_id,
                now_ms + self._ttl_ms,
                reservation.usd_nano,
                reservation.tokens,
                attempt.counters,
            )
        except StoreUnavailable as exc:
            attempt.error = exc
            log = logger.error if isinstance(exc, StoreCommandError) else logger.warning
            action = "serving unchecked" if self._fail_open else "rejecting"
            log(
                "budget store unavailable: %s",
                action,
                extra={"fields": {"tenant": reservation.tenant, "error": str(exc)}},
            )

    def _exceeded(self, refused: Sequence[_Attempt], reservation: Reservation) -> QuotaExceeded:
        amounts = {"u": reservation.usd_nano, "t": reservation.tokens, "r": 1}
        failing = [
            (check, window, amount)
            for attempt in refused
            for check, window, amount in zip(
                attempt.checks, attempt.windows, attempt.used, strict=True
            )
            if amount + amounts[check.kind] > check.limit
        ]
        budgets = [f for f in failing if f[0].kind == "u"]
        check, window, amount = max(budgets or failing, key=lambda f: f[1].end)
        retry_after = max(f[1].end for f in failing) - reservation.at
        on_exhausted = (
            "reject" if any(f[0].on_exhausted == "reject" for f in failing) else "downgrade"
        )
        arguments: dict[str, Any] = {
            "scope": check.scope,
            "tier": reservation.tier,
            "window": window.kind,
            "on_exhausted": on_exhausted,
            "retry_after": max(0.0, retry_after),
        }
        wait = duration(retry_after)
        if check.kind == "u" and check.scope == "global_tier":
            # Shared by every tenant: how much the others spent is not this caller's to know.
            return BudgetExceeded(
                f"Budget exceeded for tier '{check.tier}', shared by all tenants: this request "
                f"may cost up to ${usd(reservation.usd_nano)}, more than is left of its "
                f"{check.label}. The window resets in {wait}.",
                **arguments,
            )
        if check.kind == "u":
            whose = {
                "tenant": f"tenant '{reservation.tenant}'",
                "tenant_tier": f"tenant '{reservation.tenant}' on tier '{check.tier}'",
            }[check.scope]
            return BudgetExceeded(
                f"Budget exceeded for {whose}: {check.label} is ${usd(check.limit)}, "
                f"${usd(amount)} is spent or reserved, and this request may cost up to "
                f"${usd(reservation.usd_nano)}. The window resets in {wait}.",
                **arguments,
            )
        what = "requests per min (RPM)" if check.kind == "r" else "tokens per min (TPM)"
        return RateLimitExceeded(
            f"Rate limit reached for tenant '{reservation.tenant}' on {what}: "
            f"Limit {check.limit}, Used {amount}, Requested {amounts[check.kind]}. "
            f"Please try again in {wait}.",
            **arguments,
        )

    async def _undo(self, attempts: Sequence[_Attempt], reservation: Reservation) -> None:
        """The request is refused: give back what the other ledgers granted, now.

        A call the store failed on may still have gone through (a timeout after Redis ran
        it): its undo waits in the queue, unless the breaker refused it before sending.
        """
        undo = []
        for attempt in attempts:
            op = _Op("cancel", attempt.key, reservation.record_id)
            if attempt.error is None and attempt.status != REFUSED:
                undo.append(op)
            elif attempt.error is not None and _was_sent(attempt.error):
                self._enqueue(op, kick=False)
        await self._submit(undo)

    async def _submit(self, ops: Sequence[_Op]) -> None:
        if len(ops) == 1:
            await self._submit_one(ops[0])
        elif ops:
            await asyncio.gather(*(self._submit_one(op) for op in ops))

    async def _submit_one(self, op: _Op) -> None:
        try:
            await self._apply(op)
        except StoreCommandError:
            logger.exception("budget ledger: Redis rejected a %s", op.action)
        except StoreUnavailable as exc:
            logger.warning(
                "budget store unavailable: %s queued for replay",
                op.action,
                extra={"fields": {"error": str(exc)}},
            )
            self._enqueue(op, kick=False)
        except Exception:
            # Settling runs after the client has its answer: a failure here must never
            # reach the request path. Log it with the traceback instead.
            logger.exception("budget ledger: %s failed", op.action)
        else:
            self._kick()

    async def _apply(self, op: _Op) -> None:
        now_ms = _ms(self._clock())
        if op.action == "cancel":
            await self._backend.cancel(op.key, now_ms, op.record_id)
            return
        await self._backend.settle(
            op.key,
            now_ms,
            op.record_id,
            now_ms + self._ttl_ms,
            op.usd,
            op.tokens,
            op.count_request,
            op.counters,
        )

    def _enqueue(self, op: _Op, *, kick: bool = True) -> None:
        if len(self._pending) >= _MAX_PENDING:
            dropped = self._pending.popleft()
            logger.error(
                "budget ledger: replay queue full, dropping the oldest operation",
                extra={"fields": {"action": dropped.action, "record": dropped.record_id}},
            )
        self._pending.append(op)
        if kick:
            self._kick()

    def _kick(self) -> None:
        """After the store answered: replay the queue in the background, if anything waits."""
        if not self._pending or self._flush_lock.locked():
            return
        task = asyncio.get_running_loop().create_task(self._flush_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception:
            logger.exception("budget ledger: replaying queued settlements failed")


def _was_sent(error: StoreUnavailable) -> bool:
    # The store raises a StoreUnavailable with no cause when its breaker refused the call
    # before sending it; every failure of a sent call is converted `from` the Redis error.
    return error.__cause__ is not None


def _windows(checks: Sequence[Check], now: float) -> list[Window]:
    found: dict[WindowKind, Window] = {}
    for check in checks:
        if check.window not in found:
            found[check.window] = window_at(check.window, now)
    return [found[check.window] for check in checks]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
