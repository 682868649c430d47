"""The response cache on the request path: look up with single-flight, record, invalidate.

Single-flight: of concurrent identical misses, the one that takes a short lock in the
store (`SET NX PX`, so it works across gateway processes sharing one Redis) goes
upstream; the others poll for its entry, backing off from 5 ms to 50 ms, for at most
`single_flight_wait_s`. A leader that fails releases the lock (or, if it died, the lock
expires after `single_flight_wait_s`), and the next waiter to take it leads instead.
Store trouble never reaches the caller: a failed store call is a miss, or a skipped write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.api.schemas import RequestKind
from gateway.cache.entry import (
    CachedEntry,
    decode_entry,
    encode_entry,
    entry_from_body,
    entry_from_stream,
)
from gateway.cache.plan import CachePlan, CacheStatus, invalidation_pattern, make_plan
from gateway.policy import CacheSettings
from gateway.store import Store, StoreUnavailable

__all__ = ["Lookup", "Recorder", "ResponseCache"]

_logger = logging.getLogger("triage.cache")

_FIRST_POLL_S = 0.005
_MAX_POLL_S = 0.05
# A stream's raw events repeat the id, model, ... in every chunk; the stored entry keeps
# them once. Buffer up to this multiple of `max_entry_bytes` before giving up on a stream.
_RAW_EVENTS_FACTOR = 4


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache found: an entry (`hit`), or a recorder to fill it from upstream."""

    status: CacheStatus
    entry: CachedEntry | None
    recorder: Recorder


class ResponseCache:
    """The exact response cache of one policy, over a `Store`."""

    def __init__(
        self, store: Store, settings: CacheSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock

    def plan(
        self,
        *,
        scope: str,
        tier: str,
        model: str,
        kind: RequestKind,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        dialect: str = "chat",
    ) -> CachePlan:
        """Key, TTL and whether to look up and write; pure (see `plan.make_plan`)."""
        return make_plan(
            self.settings,
            scope=scope,
            tier=tier,
            model=model,
            kind=kind,
            body=body,
            headers=headers,
            dialect=dialect,
        )

    async def lookup(self, plan: CachePlan) -> Lookup:
        """A hit, or a miss whose recorder the caller must `commit` or `abandon`.

        On a miss the caller may be the single-flight leader; waiting for another
        leader is bounded by `single_flight_wait_s`, then the caller goes upstream too.
        """
        if not plan.lookup:
            return Lookup(plan.status, None, self._recorder(plan, None))
        try:
            entry = await self._get(plan)
            if entry is not None:
                return self._hit(entry)
            if not (plan.store and self.settings.single_flight):
                return self._miss(plan, None)
            return await self._lead_or_wait(plan, os.urandom(16).hex().encode())
        except StoreUnavailable as exc:
            _logger.debug("cache lookup skipped: %s", exc)
            return self._miss(plan, None)

    async def invalidate(self, tenant_scope: str | None = None, model: str | None = None) -> int:
        """Delete the entries of one scope, one model, both, or (both None) all of them.

        Raises `StoreUnavailable`: the admin endpoint should say so (503).
        """
        return await self.store.delete_matching(invalidation_pattern(tenant_scope, model))

    async def _lead_or_wait(self, plan: CachePlan, token: bytes) -> Lookup:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.single_flight_wait_s
        delay, waited = _FIRST_POLL_S, False
        while True:
            if await self.store.set_if_absent(plan.lock_key, token, self._lock_ttl_s):
                recorder = self._recorder(plan, token)
                # Taking over after a wait: the leader may have stored its answer just
                # before it let go of the lock.
                entry = await self._get_or_none(plan) if waited else None
                if entry is None:
                    return Lookup(CacheStatus.MISS, None, recorder)
                await recorder.abandon()
                return self._hit(entry)
            remaining = deadline - loop.time()
            if remaining <= 0:
                _logger.debug("cache: gave up waiting for the single-flight leader")
                return self._miss(plan, None)
            await asyncio.sleep(min(delay * random.uniform(0.8, 1.2), remaining))
            delay, waited = min(delay * 2, _MAX_POLL_S), True
            entry = await self._get(plan)
            if entry is not None:
                return self._hit(entry)

    @property
    def _lock_ttl_s(self) -> float:
        # A leader that died holds the lock this long: no waiter waits longer anyway.
        return self.settings.single_flight_wait_s

    async def _get_or_none(self, plan: CachePlan) -> CachedEntry | None:
        try:
            return await self._get(plan)
        except StoreUnavailable:
            return None

    async def _get(self, plan: CachePlan) -> CachedEntry | None:
        raw = await self.store.get(plan.key)
        if raw is None:
            return None
        entry = decode_entry(raw)
        if entry is None:
            _logger.warning("cache: unreadable entry under %s, treated as a miss", plan.key)
        return entry

    def _hit(self, entry: CachedEntry) -> Lookup:
        return Lookup(CacheStatus.HIT, entry, _nothing_to_record())

    def _miss(self, plan: CachePlan, token: bytes | None) -> Lookup:
        return Lookup(CacheStatus.MISS, None, self._recorder(plan, token))

    def _recorder(self, plan: CachePlan, token: bytes | None) -> Recorder:
        if not plan.store and token is None:
            return _nothing_to_record()
        return Recorder(self.store, plan, self.settings.max_entry_bytes, token, self._clock)


class Recorder:
    """Collects one upstream response; `commit` stores it if complete, then frees the lock.

    Feed it either every SSE event relayed to the client (`feed_event`) or the JSON
    body (`feed_body`). Call `abandon` on every other way out (error, disconnect): it is
    safe after `commit`, twice, and from a `finally`. Neither ever raises a store error.
    """

    def __init__(
        self,
        store: Store | None,
        plan: CachePlan | None,
        max_entry_bytes: int,
        lock_token: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._plan = plan
        self._max_bytes = max_entry_bytes
        self._token = lock_token
        self._clock = clock
        self._recording = store is not None and plan is not None and plan.store
        self._events: list[bytes] = []
        self._event_bytes = 0
        self._done = False
        self._body: bytes | None = None
        self._finished = False

    @property
    def leader(self) -> bool:
        """True while this request holds the single-flight lock."""
        return self._token is not None

    def feed_event(self, event: bytes) -> None:
        """One relayed SSE event (or several), with or without the trailing blank line."""
        if not self._recording:
            return
        for block in event.split(b"\n\n") if b"\n\n" in event.rstrip(b"\n") else (event,):
            data = _event_data(block)
            if data is None:
                continue  # a comment or keep-alive
            if data == b"[DONE]":
                self._done = True
            elif self._done or data.startswith(b'{"error"'):
                self._stop_recording()  # an error event (it comes before a [DONE]), or junk
            else:
                self._event_bytes += len(data)
                if self._event_bytes > _RAW_EVENTS_FACTOR * self._max_bytes:
                    self._stop_recording()
                else:
                    self._events.append(data)

    def feed_body(self, body: bytes) -> None:
        """The JSON body of a successful non-stream response."""
        if self._recording and len(body) <= self._max_bytes:
            self._body = body
        else:
            self._stop_recording()

    async def commit(self, usage: Mapping[str, Any] | None = None) -> bool:
        """Store the response if it is complete and small enough; True if stored.

        `usage` (the upstream `Outcome.usage`) stands in for a stream's usage chunk
        when it was not relayed because the client did not ask for it.
        """
        if self._finished:
            return False
        self._finished = True
        try:
            return await self._store_entry(usage)
        finally:
            self._stop_recording()
            await self._release()

    async def abandon(self) -> None:
        """Store nothing; let the next waiter lead."""
        self._finished = True
        self._stop_recording()
        await self._release()

    async def _store_entry(self, usage: Mapping[str, Any] | None) -> bool:
        if not self._recording or self._store is None or self._plan is None:
            return False
        plan = self._plan
        if self._body is not None:
            entry = entry_from_body(plan.kind, plan.model, self._body, self._clock())
        elif self._done:
            entry = entry_from_stream(plan.kind, plan.model, self._events, usage, self._clock())
        else:
            entry = None  # an interrupted stream
        if entry is None:
            return False
        raw = encode_entry(entry)
        if len(raw) > self._max_bytes:
            return False
        try:
            await self._store.set(plan.key, raw, plan.ttl_s)
        except StoreUnavailable as exc:
            _logger.debug("cache write skipped: %s", exc)
            return False
        return True

    def _stop_recording(self) -> None:
        self._recording = False
        self._events = []
        self._body = None

    async def _release(self) -> None:
        token, self._token = self._token, None
        if token is None or self._store is None or self._plan is None:
            return
        try:
            await self._store.delete_if_equals(self._plan.lock_key, token)
        except StoreUnavailable as exc:
            # The lock expires by itself; waiters take over then.
            _logger.debug("cache lock not released: %s", exc)


def _nothing_to_record() -> Recorder:
    return Recorder(None, None, 0, None)


def _event_data(block: bytes) -> bytes | None:
    block = block.strip(b"\r\n")
    if block.startswith(b"data:") and b"\n" not in block:
        return block[5:].strip()
    lines = [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
