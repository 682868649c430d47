"""Where ledgers live: Redis (the Lua scripts in `lua`) or this process (the same ledger in Python).

Both implement `Backend` with the same arithmetic, pinned by a differential test. The
embedded one is atomic because no operation awaits in the middle.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.budgets import lua
from gateway.budgets.plan import Kind
from gateway.store import RedisStore

__all__ = [
    "CANCELLED",
    "RECORDED",
    "REFUSED",
    "REPEATED",
    "RESERVED",
    "SETTLED",
    "Backend",
    "Counter",
    "EmbeddedBackend",
    "RedisBackend",
]

# reserve(): status codes
REFUSED, RESERVED, REPEATED = 0, 1, 2
# settle(): 0 settled before, 1 settled a live reservation, 2 recorded without one
RECORDED = 2
SETTLED = 1
# cancel(): 1 undone, 0 nothing live to undo
CANCELLED = 1


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter of a ledger as a call names it: its limit and when its window ends."""

    name: str
    kind: Kind
    limit: int
    ends_ms: int


class Backend(Protocol):
    async def reserve(
        self,
        key: str,
        now_ms: int,
        request_id: str,
        expiry_ms: int,
        usd: int,
        tokens: int,
        counters: Sequence[Counter],
    ) -> tuple[int, list[int]]:
        """Hold `usd`/`tokens` (and count one request) on every counter, if all still fit.

        Returns the status (REFUSED, RESERVED, REPEATED) and each counter's settled + held
        amount after the call.
        """
        ...

    async def settle(
        self,
        key: str,
        now_ms: int,
        request_id: str,
        tombstone_ms: int,
        usd: int,
        tokens: int,
        count_request: bool,
        counters: Sequence[Counter],
    ) -> int:
        """Replace the request's hold with the real amounts, once; see `lua.SETTLE`."""
        ...

    async def cancel(self, key: str, now_ms: int, request_id: str) -> int:
        """Undo a live reservation completely, its request count included."""
        ...

    async def read(self, key: str, now_ms: int, names: Sequence[str]) -> list[tuple[int, int]]:
        """(settled, held) for each named counter."""
        ...


class RedisBackend:
    """Ledgers in Redis; each call is one EVALSHA on one hash tag."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    async def reserve(
        self,
        key: str,
        now_ms: int,
        request_id: str,
        expiry_ms: int,
        usd: int,
        tokens: int,
        counters: Sequence[Counter],
    ) -> tuple[int, list[int]]:
        args: list[str | int | float] = [now_ms, request_id, expiry_ms, usd, tokens]
        for c in counters:
            args += (c.name, c.kind, c.limit, c.ends_ms)
        reply = await self.store.eval(lua.RESERVE, (key, key + ":exp"), args)
        return int(reply[0]), [int(v) for v in reply[1:]]

    async def settle(
        self,
        key: str,
        now_ms: int,
        request_id: str,
        tombstone_ms: int,
        usd: int,
        tokens: int,
        count_request: bool,
        counters: Sequence[Counter],
    ) -> int:
        args: list[str | int | float] = [
            now_ms,
            request_id,
            tombstone_ms,
            usd,
            tokens,
            int(count_request),
        ]
        for c in counters:
            args += (c.name, c.kind, c.ends_ms)
        return int(await self.store.eval(lua.SETTLE, (key, key + ":exp"), args))

    async def cancel(self, key: str, now_ms: int, request_id: str) -> int:
        return int(await self.store.eval(lua.CANCEL, (key, key + ":exp"), (now_ms, request_id)))

    async def read(self, key: str, now_ms: int, names: Sequence[str]) -> list[tuple[int, int]]:
        reply: list[Any] = await self.store.eval(lua.READ, (key, key + ":exp"), (now_ms, *names))
        values = [int(v) if v is not None else 0 for v in reply]
        return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


_Hold = tuple[Kind, int, str]  # kind, amount, counter name: one line of a record
_SETTLED = None  # a record's value once settled: the tombstone


@dataclass(slots=True)
class _Book:
    """One ledger in memory, shaped like its two Redis keys."""

    settled: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    records: dict[str, list[_Hold] | None] = field(default_factory=dict)
    expiry: dict[str, int] = field(default_factory=dict)  # member -> expiry ms, as the ZSET
    heap: list[tuple[int, str]] = field(default_factory=list)  # lazily deleted entries

    def bump(self, member: str, at: int, *, force: bool = False) -> None:
        current = self.expiry.get(member)
        if force or current is None or current < at:
            self.expiry[member] = at
            heapq.heappush(self.heap, (at, member))

    def prune(self, now_ms: int) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now_ms:
            at, member = heapq.heappop(heap)
            if self.expiry.get(member) != at:
                continue
            del self.expiry[member]
            name = member[2:]
            if member[0] == "w":
                self.settled.pop(name, None)
                self.held.pop(name, None)
            else:
                holds = self.records.pop(name, _SETTLED)
                if holds is not _SETTLED:
                    self.give_back(holds, uncount_requests=False)

    def give_back(self, holds: list[_Hold], *, uncount_requests: bool) -> None:
        for kind, amount, name in holds:
            if kind == "r":
                if uncount_requests:
                    self.settled[name] = self.settled.get(name, 0) - 1
            else:
                self.held[name] = self.held.get(name, 0) - amount

    def used(self, name: str) -> int:
        return self.settled.get(name, 0) + self.held.get(name, 0)


class EmbeddedBackend:
    """Ledgers in this process (no Redis): the same semantics for one gateway process."""

    def __init__(self) -> None:
        self._books: dict[str, _Book] = {}

    def _book(self, key: str, now_ms: int) -> _Book:
        book = self._books.get(key)
        if book is None:
            book = self._books[key] = _Book()
        book.prune(now_ms)
        return book

    def _drop_if_empty(self, key: str, book: _Book) -> None:
        if not book.expiry:  # like Redis deleting a key with no members left
            self._books.pop(key, None)

    async def reserve(
        self,
        key: str,
        now_ms: int,
        request_id: str,
        expiry_ms: int,
        usd: int,
        tokens: int,
        counters: Sequence[Counter],
    ) -> tuple[int, list[int]]:
        book = self._book(key, now_ms)
        amounts = {"u": usd, "t": tokens, "r": 1}
        used = [book.used(c.name) for c in counters]
        if request_id in book.records:
            return REPEATED, used
        if any(u + amounts[c.kind] > c.limit for u, c in zip(used, counters, strict=True)):
            self._drop_if_empty(key, book)
            return REFUSED, used
        holds: list[_Hold] = []
        for i, c in enumerate(counters):
            amount = amounts[c.kind]
            if c.kind == "r":
                book.settled[c.name] = book.settled.get(c.name, 0) + 1
            else:
                book.held[c.name] = book.held.get(c.name, 0) + amount
            book.settled.setdefault(c.name, 0)
            book.held.setdefault(c.name, 0)
            used[i] += amount
            holds.append((c.kind, amount, c.name))
            book.bump("w:" + c.name, max(c.ends_ms, expiry_ms))
        book.records[request_id] = holds
        book.bump("r:" + request_id, expiry_ms)
        return RESERVED, used

    async def settle(
        self,
        key: str,
        now_ms: int,
        request_id: str,
        tombstone_ms: int,
        usd: int,
        tokens: int,
        count_request: bool,
        counters: Sequence[Counter],
    ) -> int:
        book = self._book(key, now_ms)
        holds = book.records.get(request_id, [])
        if holds is _SETTLED:
            return 0
        real = {"u": usd, "t": tokens, "r": int(count_request)}
        if request_id in book.records:
            for kind, amount, name in holds:
                if kind != "r":
                    book.held[name] = book.held.get(name, 0) - amount
                    book.settled[name] = book.settled.get(name, 0) + real[kind]
            status = SETTLED
        else:
            for c in counters:
                if real[c.kind]:
                    book.settled[c.name] = book.settled.get(c.name, 0) + real[c.kind]
                    book.bump("w:" + c.name, c.ends_ms)
            status = RECORDED
        book.records[request_id] = _SETTLED
        book.bump("r:" + request_id, tombstone_ms, force=True)
        return status

    async def cancel(self, key: str, now_ms: int, request_id: str) -> int:
        book = self._book(key, now_ms)
        holds = book.records.get(request_id, _SETTLED)
        if holds is _SETTLED:
            self._drop_if_empty(key, book)
            return 0
        del book.records[request_id]
        book.expiry.pop("r:" + request_id, None)  # its heap entry is skipped when it surfaces
        book.give_back(holds, uncount_requests=True)
        self._drop_if_empty(key, book)
        return CANCELLED

    async def read(self, key: str, now_ms: int, names: Sequence[str]) -> list[tuple[int, int]]:
        book = self._book(key, now_ms)
        values = [(book.settled.get(n, 0), book.held.get(n, 0)) for n in names]
        self._drop_if_empty(key, book)
        return values
