"""Shadow comparisons: a sample of answered requests is asked of the other tier too, after
the client has its answer, and a judge labels which tier did better.

The client never waits for any of it. A request is sampled when a tier is chosen for it
(`samples`, so that a stream's events are kept for its final text), and offered once its
answer is whole (`offer`, from `Exchange._settle`). The comparison then runs in the
background: the same request to the other tier, then the judge twice, the answers in both
orders (`gateway.judge`), then one labelled row appended to the JSONL file.

Every call goes through the dispatcher as `sheddable`, the priority refused first, and only
to a tier with a free slot now (else it is dropped, counted as `busy`): shadow traffic never
queues ahead of a client's. It is never charged to the tenant: each call holds its worst
case on the shadow's own daily cap first, a budget of the synthetic tenant `triage:shadow`
on the policy's store, reserved and settled by the same `Ledger` as any tenant's, so the cap
holds exactly across replicas that share a Redis. Comparisons at once are bounded
(`max_in_flight`; more are dropped, counted), a failure is logged and counted and never
reaches the client, and `close` cancels what is still running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import orjson

from gateway.api.hints import RequestHints
from gateway.api.request import ParsedRequest
from gateway.api.schemas import RequestKind
from gateway.auth import Caller
from gateway.budgets.errors import BudgetStoreUnavailable, QuotaExceeded
from gateway.budgets.ledger import Ledger, Reservation
from gateway.budgets.plan import tier_price
from gateway.dispatch import SHED_CODES, Dispatcher
from gateway.errors import TriageError
from gateway.feedback import last_user_text, prompt_sha256
from gateway.judge import DEFAULT_JUDGE_PROMPT, Verdict, judge_messages, label, parse_verdict
from gateway.policy import Budgets, Policy, Price, ShadowSettings, Tenant, TenantBudget
from gateway.router import Decision
from gateway.store import Store
from gateway.telemetry import RequestRecord
from gateway.tokenize import answer_from_body, answer_from_events, estimate
from gateway.upstream import Outcome

__all__ = ["SHADOW_TENANT", "Shadow", "ShadowStats", "cap_ledger", "logger"]

logger = logging.getLogger("triage.shadow")

SHADOW_TENANT = "triage:shadow"
# Prompt tokens held per chat message beyond characters / 4: the chat template's own.
_TEMPLATE_ALLOWANCE = 8


@dataclass(slots=True)
class ShadowStats:
    """What became of the sampled requests (this process, this policy)."""

    sampled: int = 0  # chosen when a tier was picked
    offered: int = 0  # answered whole, handed over
    dropped: int = 0  # `max_in_flight` comparisons were running already
    busy: int = 0  # a call found no free slot on its tier
    capped: int = 0  # a call did not fit the daily cap
    shed: int = 0  # the dispatcher refused a call (over capacity)
    failed: int = 0  # a call or the judge failed (backend error, no verdict)
    written: int = 0  # labelled rows
    spent_usd: float = 0.0  # settled on the cap by this process


@dataclass(frozen=True, slots=True)
class _Answered:
    """A sampled request, answered whole: what the comparison needs of it."""

    request_id: str
    tenant: str | None
    parsed: ParsedRequest
    tier: str
    model: str | None
    text: str


@dataclass(frozen=True, slots=True)
class _Reply:
    text: str
    model: str
    cost_usd: float


def cap_ledger(
    store: Store, policy: Policy, usd_per_day: float, carry_over: Ledger | None = None
) -> Ledger:
    """A ledger whose one tenant, `SHADOW_TENANT`, has `usd_per_day`: the shadow's cap, on
    the same store and machinery as every budget (no tier-wide budget applies to it).
    `carry_over`: the cap ledger of the policy this one replaces (an embedded store's day
    so far is kept across a reload, as the budgets' is)."""
    tenant = Tenant(budget=TenantBudget(usd_per_day=usd_per_day, on_exhausted="reject"))
    budgets = Budgets(
        failure_mode="fail_closed",  # a cap that cannot be checked is not spent
        default_max_tokens=policy.budgets.default_max_tokens,
        reservation_ttl_s=policy.budgets.reservation_ttl_s,
    )
    capped = policy.model_copy(update={"tenants": {SHADOW_TENANT: tenant}, "budgets": budgets})
    return Ledger(store, capped, carry_over=carry_over)


class Shadow:
    """The shadow comparisons of one policy (`routing.shadow`)."""

    def __init__(
        self,
        settings: ShadowSettings,
        path: str,
        policy: Policy,
        dispatcher: Dispatcher,
        store: Store,
        sample: Callable[[], float] = random.random,
        previous: Shadow | None = None,
    ) -> None:
        self.settings = settings
        self.path = path
        self.stats = ShadowStats()
        self._policy = policy
        self._dispatcher = dispatcher
        self._sample = sample
        carry_over = previous.ledger if previous is not None else None
        self.ledger: Ledger = cap_ledger(store, policy, settings.usd_per_day, carry_over)
        self._caller = Caller(SHADOW_TENANT, self.ledger.policy.tenants[SHADOW_TENANT])
        self._judge_prompt = settings.judge_prompt or DEFAULT_JUDGE_PROMPT
        self._tasks: set[asyncio.Task[None]] = set()
        self._file: BinaryIO | None = None
        self._closed = False

    def open(self) -> None:
        """Open (or create) the rows file, when the policy starts. Raises `OSError`."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)

    async def close(self) -> None:
        """Cancel the comparisons still running; their holds are released or expire."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ledger.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        logger.info("shadow comparisons closed", extra={"fields": asdict(self.stats)})

    # --- on the request path: two cheap checks ------------------------------------------

    def samples(self, tier: str, parsed: ParsedRequest) -> bool:
        """Is this request, answered by `tier`, one to compare? Decided once per request."""
        settings = self.settings
        if self._closed or parsed.kind not in ("chat", "completions") or parsed.choices != 1:
            return False
        if tier == settings.weak:
            wanted = settings.answered_by != "strong"
        elif tier == settings.strong:
            wanted = settings.answered_by != "weak"
        else:
            return False
        if not wanted or self._sample() >= settings.sample_rate:
            return False
        self.stats.sampled += 1
        return True

    def offer(
        self,
        parsed: ParsedRequest,
        record: RequestRecord,
        outcome: Outcome,
        kept: Sequence[bytes] | None,
    ) -> None:
        """A sampled request's answer is with its client: compare it in the background, if
        it is whole and there is room."""
        if record.tier is None or not outcome.completed or outcome.error is not None:
            return
        if kept is not None:
            texts = answer_from_events(parsed.kind, kept).texts
        elif record.response_body is not None:
            texts = answer_from_body(parsed.kind, record.response_body).texts
        else:
            return
        if not texts or not texts[0]:
            return
        self.stats.offered += 1
        if self._closed or len(self._tasks) >= self.settings.max_in_flight:
            self.stats.dropped += 1
            return
        answered = _Answered(
            record.request_id, record.tenant, parsed, record.tier, record.model, texts[0]
        )
        task = asyncio.get_running_loop().create_task(self._run(answered))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- in the background --------------------------------------------------------------

    async def _run(self, answered: _Answered) -> None:
        try:
            await self._compare(answered)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not end anything else: the client had its answer long ago.
            self.stats.failed += 1
            logger.exception("shadow comparison of request %s failed", answered.request_id)

    async def _compare(self, answered: _Answered) -> None:
        settings, parsed = self.settings, answered.parsed
        other = settings.strong if answered.tier == settings.weak else settings.weak
        body = {k: v for k, v in parsed.body.items() if k not in ("stream", "stream_options")}
        body["model"] = other
        shadow = await self._ask(other, _request(parsed.kind, body), f"{answered.request_id}~s")
        if shadow is None:
            return
        mine = _Reply(answered.text, answered.model or answered.tier, 0.0)
        weak, strong = (mine, shadow) if answered.tier == settings.weak else (shadow, mine)
        question = _question(parsed)
        judged = await asyncio.gather(
            self._judge(question, weak.text, strong.text, f"{answered.request_id}~j1"),
            self._judge(question, strong.text, weak.text, f"{answered.request_id}~j2"),
        )
        first, second = judged
        if first is None or second is None:
            return
        verdicts: tuple[Verdict | None, Verdict | None] = (
            parse_verdict(first.text),
            parse_verdict(second.text),
        )
        if verdicts[0] is None or verdicts[1] is None:
            self.stats.failed += 1
            logger.warning("shadow judge gave no verdict for request %s", answered.request_id)
            return
        outcome = label(verdicts[0], verdicts[1])
        row: dict[str, Any] = {
            "request_id": answered.request_id,
            "time": round(time.time(), 3),
            "source": settings.source,
            "label": "shadow",
            "tenant": answered.tenant,
            **self._prompt_fields(parsed),
            "tier": answered.tier,
            "shadow_tier": other,
            "weak": outcome.weak,
            "strong": outcome.strong,
            "strong_preference": outcome.strong_preference,
            "verdicts": list(verdicts),
            "judge": first.model,
            "models": {"weak": weak.model, "strong": strong.model},
            "cost_usd": shadow.cost_usd + first.cost_usd + second.cost_usd,
        }
        if self._file is not None:
            self._file.write(orjson.dumps(row) + b"\n")
            self.stats.written += 1

    def _prompt_fields(self, parsed: ParsedRequest) -> dict[str, Any]:
        """The prompt as the policy lets rows keep it: the text, or what retraining needs
        without it (classifiers/README.md, "traffic labels")."""
        body = parsed.body
        fields: dict[str, Any] = {"prompt_sha256": prompt_sha256(body)}
        if self.settings.prompts == "text":
            fields["prompt"] = _question(parsed)
            fields["request"] = dict(body)
            return fields
        from classifiers.data import feature_record  # the classifier package, on demand

        fields["prompt"] = None
        fields["request"] = None
        fields["features"] = feature_record(body)
        return fields

    async def _judge(self, question: str, first: str, second: str, call: str) -> _Reply | None:
        settings = self.settings
        body = {
            "model": settings.judge,
            "messages": judge_messages(self._judge_prompt, question, first, second),
            "max_tokens": settings.judge_max_tokens,
            "temperature": 0,
        }
        return await self._ask(settings.judge, _request("chat", body), call)

    async def _ask(self, name: str, parsed: ParsedRequest, call: str) -> _Reply | None:
        """One call to a tier or model at the lowest priority, held on the cap; None when it
        was not made or did not answer (counted)."""
        decision = self._decision(name, parsed)
        if not self._room(decision):
            self.stats.busy += 1
            return None
        try:
            reservation = await self.ledger.reserve(
                request_id=call,
                caller=self._caller,
                tier=decision.tier,
                price=self._price(name),
                prompt_tokens=_prompt_allowance(parsed),
                max_tokens=parsed.max_tokens,
            )
        except QuotaExceeded:
            self.stats.capped += 1
            return None
        except BudgetStoreUnavailable:
            self.stats.failed += 1
            return None
        outcome, payload, model = Outcome(), None, None
        try:
            dispatched = await self._dispatcher.dispatch(
                decision,
                parsed,
                {},
                tenant_priority="sheddable",
                max_tokens_cap=self._policy.budgets.default_max_tokens,
            )
            model = dispatched.pool.model
            try:
                payload = await dispatched.read(outcome)
            finally:
                dispatched.finish(outcome)
        except TriageError as error:
            if error.code in SHED_CODES:
                self.stats.shed += 1
            else:
                self.stats.failed += 1
                logger.warning(
                    "shadow call %s failed: %s", call, error, extra={"fields": {"tier": name}}
                )
        finally:
            cost = await self._settle(reservation, parsed, outcome, payload, model)
        if payload is None or model is None:
            return None
        texts = answer_from_body(parsed.kind, payload).texts
        return _Reply(texts[0] if texts else "", model, cost)

    async def _settle(
        self,
        reservation: Reservation,
        parsed: ParsedRequest,
        outcome: Outcome,
        payload: bytes | None,
        model: str | None,
    ) -> float:
        """Swap the hold for what the call cost; nothing generated costs nothing."""
        if payload is None or model is None:
            await self.ledger.release(reservation)
            return 0.0
        prompt, completion = outcome.prompt_tokens, outcome.completion_tokens
        if outcome.usage is None:
            usage = estimate(parsed, answer_from_body(parsed.kind, payload))
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
        price = self._policy.models[model].price
        await self.ledger.settle(
            reservation, prompt_tokens=prompt, completion_tokens=completion, price=price
        )
        cost = price.cost(prompt, completion)
        self.stats.spent_usd += cost
        return cost

    def _decision(self, name: str, parsed: ParsedRequest) -> Decision:
        """Where a call goes: the tier's models (no fallback: the answer must be that
        tier's), or the one model."""
        policy, kind = self._policy, parsed.kind
        if name in policy.models:
            tier = policy.tier_of_model(name)
            return Decision(tier, ((tier, name),), "shadow", kind=kind)
        models = policy.models
        candidates = tuple(
            (name, m) for m in policy.tiers[name].models if kind in models[m].endpoints
        )
        return Decision(name, candidates, "shadow", kind=kind)

    def _room(self, decision: Decision) -> bool:
        """A replica of the call's pools takes it now without queueing."""
        now = time.monotonic()
        pools = self._dispatcher.pools
        return any(
            replica.available(now) and not replica.queue_full(now)
            for _, model in decision.candidates
            for replica in pools[model].replicas
        )

    def _price(self, name: str) -> Price:
        if name in self._policy.models:
            return self._policy.models[name].price
        return tier_price(self._policy, name)


def _request(kind: RequestKind, body: Mapping[str, Any]) -> ParsedRequest:
    return ParsedRequest(
        kind=kind,
        body=body,
        model=body["model"],
        stream=False,
        client_wants_usage=False,
        hints=RequestHints(priority="sheddable"),
    )


def _question(parsed: ParsedRequest) -> str:
    """What the judge is shown as the question: the last user message, or the prompt."""
    body = parsed.body
    text = last_user_text(body.get("messages", body.get("prompt")))
    return text or ""


def _prompt_allowance(parsed: ParsedRequest) -> int:
    """Prompt tokens to hold: characters / 4, and the chat template's tokens per message."""
    messages = parsed.body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    return parsed.estimated_prompt_tokens() + _TEMPLATE_ALLOWANCE * count
