"""The shared state backend (Redis, Redis Cluster or in-process) that cache and budgets use.

Redis trouble never hangs a request. Every Redis call runs inside a deadline of
`timeout_ms` (redis-py's own retries are off) and behind a `CircuitBreaker`: after
`breaker_failures` consecutive failures calls fail at once without touching the network,
and after `breaker_reset_s` one probe call is let through to find out whether Redis is
back. redis-py's exceptions are converted to `StoreUnavailable` here and nowhere else, so
callers choose fail-open or fail-closed. On a cluster, the slot map is read outside the
per-call deadline (see `_cluster_ready`).

The deadline counts only the time this process's event loop was free to read a reply
(`_LoopLag`, `_Deadline`): a reply that arrived while the loop was busy with the gateway's
own work is not a Redis failure. A call whose reply the loop could not get to within
`_LAG_ALLOWANCE_S` more fails without a verdict on Redis (the breaker does not count it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo

from gateway.policy import StoreSettings

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "EmbeddedStore",
    "RedisStore",
    "Store",
    "StoreCommandError",
    "StoreUnavailable",
    "open_store",
]

_T = TypeVar("_T")
# How many times per timeout the loop-lag monitor checks the loop; a stall shorter than
# one tick can go unseen, so a call gets at least 4/5 of its timeout of free loop time.
_LAG_TICKS_PER_TIMEOUT = 5
# A call whose reply the loop was too busy to read waits at most this long past its
# timeout; redis-py's socket timeouts, a backstop only, are set past it.
_LAG_ALLOWANCE_S = 1.0
_SCAN_COUNT = 500
_CLUSTER_SETUP_TIMEOUT_S = 5.0
_PING_WAIT_S = 1.0
# What a key costs in the embedded store besides its bytes (dict slot, tuple, floats).
_ENTRY_OVERHEAD = 96
# Delete `KEYS[1]` only if it still holds `ARGV[1]`: a lock is released by its owner only.
_DELETE_IF_EQUALS = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# Redis's answers that are the caller's bug, not Redis being unavailable: they do not
# count against the breaker (the server is up and answering).
_COMMAND_ERRORS = (redis_errors.DataError, redis_errors.ClusterCrossSlotError)


class StoreUnavailable(Exception):
    """The store could not serve the call: Redis failed, timed out, or the breaker is open."""


class StoreCommandError(StoreUnavailable):
    """Redis answered, with an error (a Lua error, a wrong type): a bug, not an outage."""


class _LayoutPending(StoreUnavailable):
    """A cluster's slot map is still being read (at start-up, after a topology change)."""


class _LoopBusy(StoreUnavailable):
    """No reply was read in time, but this process's event loop, not Redis, was too busy."""


class Store(Protocol):
    """Key/value state with expiry. Keys are full strings; the store adds its prefix.

    Every call raises `StoreUnavailable` when it cannot be served (except `ping`).
    """

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        """SET NX PX: True if this call stored the value (a lock taken)."""
        ...

    async def delete(self, *keys: str) -> int:
        """How many of the keys existed."""
        ...

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        """Delete the key only if it holds `value` (a lock released by its owner only)."""
        ...

    async def delete_matching(self, pattern: str) -> int:
        """Delete every key matching a Redis glob pattern; return how many were deleted."""
        ...

    async def ping(self) -> bool:
        """True when the store answers; never raises (for readiness checks)."""
        ...

    async def close(self) -> None: ...


def open_store(settings: StoreSettings) -> Store:
    """Redis (or a Redis Cluster) when `redis_url` is set, else the in-process store."""
    if settings.redis_url is None:
        return EmbeddedStore(settings)
    return RedisStore(settings)


BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `reset_s` lets one probe through.

    A call asks `allow()` first and then reports exactly one of `success()`, `failure()`
    or `cancel()` (ended without a verdict, e.g. the caller was cancelled).
    """

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError(f"need failures >= 1 and reset_s > 0, got {failures}, {reset_s}")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        if self._state == "closed":
            return True
        now = self._clock()
        if self._state == "open":
            if now - self._opened_at < self.reset_s:
                return False
            self._state = "half_open"
        # Half-open: one probe at a time. A probe that never reported (a lost task) is
        # given up after `reset_s` so the breaker cannot stay stuck.
        if self._probe_started is not None and now - self._probe_started < self.reset_s:
            return False
        self._probe_started = now
        return True

    def success(self) -> None:
        self._state = "closed"
        self._consecutive = 0
        self._probe_started = None

    def failure(self) -> None:
        self._consecutive += 1
        if self._state == "half_open" or self._consecutive >= self.failures:
            self._state = "open"
            self._opened_at = self._clock()
            self._probe_started = None

    def cancel(self) -> None:
        if self._state == "half_open":
            self._probe_started = None


class _LoopLag:
    """How long this event loop was too busy to run a callback on time, while calls wait.

    A timer that runs late proves the loop spent the delay on other work, and a reply that
    arrived meanwhile sat unread. `stalled_s` only grows: a call keeps its value at the
    start and subtracts. Ticks run only while some call is in flight.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.stalled_s = 0.0
        self._seen = 0.0  # loop time up to which stalls are counted
        self._due = 0.0  # when the next tick should run
        self._users = 0
        self._tick: asyncio.TimerHandle | None = None

    def enter(self, loop: asyncio.AbstractEventLoop) -> float:
        """A call starts: returns the stall so far, counting a tick that is overdue now."""
        self._users += 1
        now = loop.time()
        if self._tick is None:
            self._seen = now
            self._schedule(loop, now)
        else:
            self.late(self._due, now)
        return self.stalled_s

    def leave(self) -> None:
        self._users -= 1
        if self._users == 0 and self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def late(self, due: float, now: float) -> None:
        """A callback due at `due` ran at `now`: the loop was busy in between."""
        if now > due and now > self._seen:
            self.stalled_s += now - max(due, self._seen)
            self._seen = now

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._due = now + self.interval_s
        self._tick = loop.call_at(self._due, self._ticked, loop)

    def _ticked(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self.late(self._due, now)
        self._seen = max(self._seen, now)
        self._schedule(loop, now)


class _Deadline:
    """`timeout_s` of time the loop was free to read a reply, within `timeout_s` plus
    `_LAG_ALLOWANCE_S` in all; raises `TimeoutError`, or `_LoopBusy` past the allowance."""

    def __init__(self, lag: _LoopLag, timeout_s: float, operation: str) -> None:
        self._lag = lag
        self._timeout_s = timeout_s
        self._operation = operation
        self._loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        self._check: asyncio.TimerHandle | None = None
        self._start = self._mark = 0.0
        self._busy = self._last_look = False

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self._start = self._loop.time()
        self._mark = self._lag.enter(self._loop)
        self._arm(self._start + self._timeout_s)

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._check is not None:
            self._check.cancel()
        self._lag.leave()
        try:
            await self._timeout.__aexit__(*exc_info)
        except TimeoutError as exc:
            if self._busy:
                raise _LoopBusy(
                    f"redis {self._operation}: no reply read within "
                    f"{self._timeout_s + _LAG_ALLOWANCE_S:g} s: this process was too busy"
                ) from exc
            raise

    def _arm(self, when: float) -> None:
        self._check = self._loop.call_at(when, self._expired, when)

    def _expired(self, due: float) -> None:
        now = self._loop.time()
        self._lag.late(due, now)
        elapsed = now - self._start
        free = elapsed - (self._lag.stalled_s - self._mark)
        give_up = self._timeout_s + _LAG_ALLOWANCE_S
        # Re-armed only for a real shortfall: a timer's own small lateness counts as a
        # stall too, and chasing it in ever smaller steps would never end.
        short = self._timeout_s - free > self._lag.interval_s / 2
        if short and elapsed < give_up:
            # The loop was busy for part of the time: Redis gets what it missed.
            self._arm(now + min(self._timeout_s - free, give_up - elapsed))
            return
        if short and not self._last_look:
            # Past the allowance, but a reply that came in while the loop was blocked may
            # be read just now: give the loop a moment to get to it before giving up.
            self._last_look = True
            self._arm(now + self._lag.interval_s / 2)
            return
        self._busy = short
        self._check = None
        self._timeout.reschedule(now)


@contextlib.contextmanager
def _converted_errors(operation: str) -> Iterator[None]:
    try:
        yield
    except redis_errors.RedisError as exc:
        if type(exc) is redis_errors.ResponseError or isinstance(exc, _COMMAND_ERRORS):
            raise StoreCommandError(f"redis {operation}: {exc}") from exc
        raise StoreUnavailable(f"redis {operation}: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise StoreUnavailable(f"redis {operation}: timed out") from exc
    except (redis_errors.RedisClusterException, OSError) as exc:
        raise StoreUnavailable(f"redis {operation}: {type(exc).__name__}: {exc}") from exc


def _retrieve_exception(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _ttl_ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


def _check_prefix(prefix: str) -> str:
    # A brace in the prefix would become every key's hash tag (or, as `{}`, disable hash
    # tags): keys meant to share a slot could then land in different ones.
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"store key_prefix must not contain '{{' or '}}', got {prefix!r}")
    return prefix


def _escape_glob(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisStore:
    """Redis or Redis Cluster behind short timeouts and a circuit breaker."""

    def __init__(
        self, settings: StoreSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if settings.redis_url is None:
            raise ValueError("RedisStore needs store.redis_url")
        self.prefix = _check_prefix(settings.key_prefix)
        self.timeout_s = settings.timeout_ms / 1000
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s, clock)
        self._lag = _LoopLag(self.timeout_s / _LAG_TICKS_PER_TIMEOUT)
        # redis-py times its reads by the wall clock, busy loop included: a backstop only,
        # past the longest `_Deadline`, which is what bounds a call.
        backstop_s = self.timeout_s + _LAG_ALLOWANCE_S + 1
        options: dict[str, Any] = {
            "socket_timeout": backstop_s,
            "socket_connect_timeout": backstop_s,
            # redis-py's own retries (10, with backoff, by default) would multiply the time a
            # failing call costs; `_run` retries once, and only where that is cheap and safe.
            "retry": Retry(NoBackoff(), 0),
            "max_connections": 1024,
            # Built once: by default each new connection reads redis-py's version from the
            # package metadata, milliseconds of CPU that a reconnect storm multiplies.
            "driver_info": DriverInfo(),
            # RESP2: nothing here needs RESP3, and redis-py reads RESP2 faster (with hiredis,
            # a cluster's COMMAND table in 3 ms instead of 12).
            "protocol": 2,
        }
        self._client: Redis | RedisCluster
        if settings.cluster:
            self._client = RedisCluster.from_url(settings.redis_url, **options)
        else:
            self._client = Redis.from_url(settings.redis_url, **options)
        self._cluster_setup: asyncio.Task[Any] | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._delete_if_equals = self._script(_DELETE_IF_EQUALS)

    async def _run(
        self, operation: str, call: Callable[[], Awaitable[_T]], *, idempotent: bool = True
    ) -> _T:
        if not self.breaker.allow():
            raise StoreUnavailable(f"redis {operation}: circuit breaker is open")
        try:
            with _converted_errors(operation):
                await self._cluster_ready(self.timeout_s)
                async with _Deadline(self._lag, self.timeout_s, operation):
                    try:
                        result = await call()
                    except redis_errors.ConnectionError:
                        # A pooled connection the server closed (it restarted) fails at once;
                        # the next one taken reconnects. Not on a cluster: a connection error
                        # there makes the next call rebuild the slot map first.
                        if not idempotent or isinstance(self._client, RedisCluster):
                            raise
                        result = await call()
        except StoreCommandError:
            self.breaker.success()  # Redis answered: it is up
            raise
        except _LayoutPending:
            self.breaker.cancel()  # not a failure: the cluster answers, just slowly
            raise
        except _LoopBusy:
            self.breaker.cancel()  # not a failure of Redis: this process was too busy
            raise
        except StoreUnavailable:
            self.breaker.failure()
            raise
        except BaseException:
            self.breaker.cancel()
            raise
        self.breaker.success()
        return result

    async def _cluster_ready(self, wait_s: float) -> None:
        """Build a cluster's slot map outside the per-call deadline, once for all callers.

        redis-py (re)builds it on first use and after any connection error, and that
        includes reading the COMMAND table: with the pure-Python parser that alone takes
        longer than a call's deadline, so inside it the map would never get built.
        """
        client = self._client
        if not isinstance(client, RedisCluster) or not client._initialize:
            return
        if self._cluster_setup is None or self._cluster_setup.done():
            setup = asyncio.wait_for(client.initialize(), _CLUSTER_SETUP_TIMEOUT_S)
            self._cluster_setup = asyncio.ensure_future(setup)
            # Its callers may all have stopped waiting: its error is theirs, not the loop's.
            self._cluster_setup.add_done_callback(_retrieve_exception)
        try:
            await asyncio.wait_for(asyncio.shield(self._cluster_setup), wait_s)
        except TimeoutError:
            raise _LayoutPending("redis cluster: still reading the cluster layout") from None

    def _script(self, script: str) -> AsyncScript:
        registered = self._scripts.get(script)
        if registered is None:
            registered = self._scripts[script] = self._client.register_script(script)
        return registered

    async def get(self, key: str) -> bytes | None:
        value = await self._run("GET", lambda: self._client.get(self.prefix + key))
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl = _ttl_ms(ttl_s)
        await self._run("SET", lambda: self._client.set(self.prefix + key, value, px=ttl))

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        ttl = _ttl_ms(ttl_s)
        done = await self._run(
            "SET NX",
            lambda: self._client.set(self.prefix + key, value, px=ttl, nx=True),
            idempotent=False,  # a retry could find our own first write and report "taken"
        )
        return bool(done)

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        full = [self.prefix + key for key in keys]
        return int(await self._run("DEL", lambda: self._client.delete(*full)))

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        script, full = self._delete_if_equals, [self.prefix + key]
        return bool(await self._run("EVALSHA", lambda: script(keys=full, args=[value])))

    async def eval(
        self, script: str, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> Any:
        """Run a Lua script by SHA (EVAL when Redis does not know it yet).

        On a cluster every key must hash to one slot: give them one `{hash tag}`.
        """
        registered, full = self._script(script), [self.prefix + key for key in keys]
        return await self._run(
            "EVALSHA", lambda: registered(keys=full, args=list(args)), idempotent=False
        )

    async def delete_matching(self, pattern: str) -> int:
        """SCAN + UNLINK, on every master of a cluster; each round trip has its own deadline."""
        full = _escape_glob(self.prefix) + pattern
        if isinstance(self._client, RedisCluster):
            await self._run("PING", self._client.ping)  # makes sure the slot map is built
            primaries = self._client.get_primaries()
            return sum([await self._delete_matching_on(full, node) for node in primaries])
        return await self._delete_matching_on(full, None)

    async def _delete_matching_on(self, pattern: str, node: Any) -> int:
        deleted, cursor = 0, 0
        while True:
            cursor, keys = await self._scan(pattern, cursor, node)
            if keys:
                unlink = functools.partial(self._client.unlink, *keys)
                deleted += int(await self._run("UNLINK", unlink))
            if cursor == 0:
                return deleted

    async def _scan(self, pattern: str, cursor: int, node: Any) -> tuple[int, list[Any]]:
        client: Any = self._client  # redis-py types SCAN's reply as a single node's
        options = {"match": pattern, "count": _SCAN_COUNT}
        if node is None:
            found = await self._run("SCAN", lambda: client.scan(cursor, **options))
            return int(found[0]), list(found[1])
        # A cluster answers {node name: cursor} for the one node asked.
        cursors, keys = await self._run(
            "SCAN", lambda: client.scan(cursor, target_nodes=node, **options)
        )
        return int(next(iter(cursors.values()))), list(keys)

    async def ping(self) -> bool:
        """Also waits (up to 1 s) for a cluster's layout: call it once at start-up too."""
        try:
            with _converted_errors("CLUSTER SLOTS"):
                await self._cluster_ready(max(self.timeout_s, _PING_WAIT_S))
            return bool(await self._run("PING", self._client.ping))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        if self._cluster_setup is not None:
            self._cluster_setup.cancel()
            await asyncio.wait([self._cluster_setup])
        await self._client.aclose()


class EmbeddedStore:
    """In-process store: an LRU bounded by bytes, with per-key expiry. One process only."""

    def __init__(
        self, settings: StoreSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.prefix = _check_prefix(settings.key_prefix)
        self.max_bytes = settings.embedded_max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _live(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            self._remove(key)
            return None
        return item[0]

    def _remove(self, key: str) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self._bytes -= _cost(key, item[0])
        return True

    def _delete_live(self, keys: list[str]) -> int:
        deleted = 0
        for key in keys:
            if self._live(key) is not None:
                deleted += self._remove(key)
        return deleted

    def _put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._remove(key)
        cost = _cost(key, value)
        if cost > self.max_bytes:
            return  # larger than the whole store: keeping it would evict everything
        while self._bytes + cost > self.max_bytes:
            oldest = next(iter(self._items))
            self._remove(oldest)
        self._items[key] = (value, self._clock() + ttl_s)
        self._bytes += cost

    async def get(self, key: str) -> bytes | None:
        full = self.prefix + key
        value = self._live(full)
        if value is not None:
            self._items.move_to_end(full)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._put(self.prefix + key, bytes(value), ttl_s)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        full = self.prefix + key
        if self._live(full) is not None:
            return False
        self._put(full, bytes(value), ttl_s)
        return full in self._items

    async def delete(self, *keys: str) -> int:
        return self._delete_live([self.prefix + key for key in keys])

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        full = self.prefix + key
        return self._live(full) == value and self._remove(full)

    async def delete_matching(self, pattern: str) -> int:
        matcher = _glob_regex(_escape_glob(self.prefix) + pattern)
        return self._delete_live([key for key in self._items if matcher.fullmatch(key)])

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0


def _cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + _ENTRY_OVERHEAD


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Redis's glob (`*`, `?`, `[a-z]`, `[^a]`, `\\x`) as a regex, for the embedded store."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out), re.DOTALL)
