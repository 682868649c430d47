"""Redis or Redis Cluster as the store, behind short deadlines and a circuit breaker.

redis-py's exceptions are converted to `StoreUnavailable` here and nowhere else. On a
cluster, the slot map is read outside the per-call deadline (see `_cluster_ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo

from gateway.policy import StoreSettings
from gateway.store.errors import StoreCommandError, StoreUnavailable
from gateway.store.guard import LAG_ALLOWANCE_S, CircuitBreaker, Deadline, LoopBusy, LoopLag
from gateway.store.keys import check_prefix, escape_glob

__all__ = ["RedisStore"]

_T = TypeVar("_T")
# How many times per timeout the loop-lag monitor checks the loop; a stall shorter than
# one tick can go unseen, so a call gets at least 4/5 of its timeout of free loop time.
_LAG_TICKS_PER_TIMEOUT = 5
_SCAN_COUNT = 500
_CLUSTER_SETUP_TIMEOUT_S = 5.0
_PING_WAIT_S = 1.0
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


class _LayoutPending(StoreUnavailable):
    """A cluster's slot map is still being read (at start-up, after a topology change)."""


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


class RedisStore:
    """Redis or Redis Cluster behind short timeouts and a circuit breaker."""

    def __init__(
        self, settings: StoreSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if settings.redis_url is None:
            raise ValueError("RedisStore needs store.redis_url")
        self.prefix = check_prefix(settings.key_prefix)
        self.timeout_s = settings.timeout_ms / 1000
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s, clock)
        self._lag = LoopLag(self.timeout_s / _LAG_TICKS_PER_TIMEOUT)
        # redis-py times its reads by the wall clock, busy loop included: a backstop only,
        # past the longest `Deadline`, which is what bounds a call.
        backstop_s = self.timeout_s + LAG_ALLOWANCE_S + 1
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
                async with Deadline(self._lag, self.timeout_s, operation):
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
        except LoopBusy:
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
        full = escape_glob(self.prefix) + pattern
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
