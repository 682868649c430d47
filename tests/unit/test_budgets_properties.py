"""Property tests of the reserve/settle arithmetic (the embedded ledger; Lua is pinned to it
by the differential test in tests/integration/test_budgets_redis.py)."""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from gateway.budgets.backends import RECORDED, REFUSED, RESERVED, SETTLED, Counter, EmbeddedBackend
from gateway.budgets.plan import cost_nano
from gateway.policy import Price

_T = TypeVar("_T")
KEY = "bud:{t:prop}"
TTL_MS = 1000
USD = Counter("u:day:2026-11-27:*", "u", 10_000, 10**13)
TOKENS = Counter("t:minute:2026-11-27T12:00:*", "t", 600, 10**13)
REQUESTS = Counter("r:minute:2026-11-27T12:00:*", "r", 12, 10**13)
COUNTERS = (USD, TOKENS, REQUESTS)


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Drive an embedded-ledger call to its end; it must never suspend (that is its atomicity)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("the embedded ledger awaited in the middle of an operation")


@dataclass
class Held:
    request_id: str
    usd: int
    tokens: int
    expires_ms: int


class LedgerMachine(RuleBasedStateMachine):
    """Random reserve / settle / cancel / time passing, checked against a plain model."""

    live = Bundle("live")
    finished = Bundle("finished")

    @initialize()
    def start(self) -> None:
        self.backend = EmbeddedBackend()
        self.now = 1_000_000
        self.next_id = 0
        self.holds: dict[str, Held] = {}  # live in the model (not yet expired)
        self.settled_usd = 0
        self.settled_tokens = 0
        self.requests = 0
        # Spend settled after its hold had expired: the only way past a limit (that hold's
        # headroom may have gone to other requests meanwhile).
        self.late_usd = 0
        self.late_tokens = 0

    def _expire(self) -> None:
        for rid in [r for r, h in self.holds.items() if h.expires_ms <= self.now]:
            del self.holds[rid]

    @rule(target=live, usd=st.integers(0, 4000), tokens=st.integers(0, 300))
    def reserve(self, usd: int, tokens: int) -> Any:
        self.next_id += 1
        rid = f"q{self.next_id}"
        self._expire()
        fits = (
            self.settled_usd + sum(h.usd for h in self.holds.values()) + usd <= USD.limit
            and self.settled_tokens + sum(h.tokens for h in self.holds.values()) + tokens
            <= TOKENS.limit
            and self.requests + 1 <= REQUESTS.limit
        )
        status, used = run(
            self.backend.reserve(KEY, self.now, rid, self.now + TTL_MS, usd, tokens, COUNTERS)
        )
        assert status == (RESERVED if fits else REFUSED)
        if not fits:
            return multiple()
        self.holds[rid] = Held(rid, usd, tokens, self.now + TTL_MS)
        self.requests += 1
        assert used[2] == self.requests
        return Held(rid, usd, tokens, self.now + TTL_MS)

    @rule(target=finished, held=consumes(live), data=st.data())
    def settle(self, held: Held, data: st.DataObject) -> Held:
        real_usd = data.draw(st.integers(0, held.usd), label="real_usd")
        real_tokens = data.draw(st.integers(0, held.tokens), label="real_tokens")
        self._expire()
        status = run(
            self.backend.settle(
                KEY,
                self.now,
                held.request_id,
                self.now + TTL_MS,
                real_usd,
                real_tokens,
                False,
                COUNTERS,
            )
        )
        # A live hold is settled; an expired one still gets its real spend recorded once.
        late = held.request_id not in self.holds
        assert status == (RECORDED if late else SETTLED)
        if late:
            self.late_usd += real_usd
            self.late_tokens += real_tokens
        self.holds.pop(held.request_id, None)
        self.settled_usd += real_usd
        self.settled_tokens += real_tokens
        return Held(held.request_id, real_usd, real_tokens, self.now + TTL_MS)  # tombstone life

    @rule(held=finished, usd=st.integers(0, 4000))
    def settle_again(self, held: Held, usd: int) -> None:
        # Within the tombstone's life a repeated settle changes nothing, whatever it says.
        if self.now < held.expires_ms:
            status = run(
                self.backend.settle(
                    KEY, self.now, held.request_id, self.now + TTL_MS, usd, 1, True, COUNTERS
                )
            )
            assert status == 0

    @rule(held=consumes(live))
    def cancel(self, held: Held) -> None:
        self._expire()
        undone = run(self.backend.cancel(KEY, self.now, held.request_id))
        assert undone == (held.request_id in self.holds)
        if undone:
            del self.holds[held.request_id]
            self.requests -= 1

    @rule(ms=st.integers(1, 700))
    def time_passes(self, ms: int) -> None:
        self.now += ms

    @rule()
    def time_reaches_the_next_expiry(self) -> None:
        if self.holds:
            self.now = max(self.now, min(h.expires_ms for h in self.holds.values()))

    @invariant()
    def counters_match_the_model_and_stay_within_limits(self) -> None:
        self._expire()
        values = run(self.backend.read(KEY, self.now, [c.name for c in COUNTERS]))
        (usd_s, usd_h), (tok_s, tok_h), (req_s, req_h) = values
        assert (usd_s, usd_h) == (self.settled_usd, sum(h.usd for h in self.holds.values()))
        assert (tok_s, tok_h) == (
            self.settled_tokens,
            sum(h.tokens for h in self.holds.values()),
        )
        assert (req_s, req_h) == (self.requests, 0)
        assert usd_s + usd_h <= USD.limit + self.late_usd
        assert tok_s + tok_h <= TOKENS.limit + self.late_tokens
        assert req_s <= REQUESTS.limit


LedgerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, database=None, deadline=None
)
test_ledger_state_machine = LedgerMachine.TestCase


@settings(database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    price=st.builds(
        Price,
        input_per_mtok=st.floats(0, 100, allow_nan=False),
        output_per_mtok=st.floats(0, 200, allow_nan=False),
    ),
    prompt=st.integers(0, 2_000_000),
    completion=st.integers(0, 200_000),
    less_prompt=st.integers(0, 2_000_000),
    less_completion=st.integers(0, 200_000),
)
def test_real_cost_never_exceeds_the_reserved_worst_case(
    price: Price, prompt: int, completion: int, less_prompt: int, less_completion: int
) -> None:
    worst = cost_nano(price, prompt, completion)
    real = cost_nano(price, min(prompt, less_prompt), min(completion, less_completion))
    assert 0 <= real <= worst
    exact = (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6
    assert abs(worst / 1e9 - exact) <= 1e-9 + exact * 1e-12
