"""The in-process store, for a single replica: nothing to run, nothing shared."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.policy import StoreSettings
from gateway.store.keys import check_prefix, escape_glob

__all__ = ["EmbeddedStore"]

# What a key costs in the embedded store besides its bytes (dict slot, tuple, floats).
_ENTRY_OVERHEAD = 96


class EmbeddedStore:
    """In-process store: an LRU bounded by bytes, with per-key expiry. One process only."""

    def __init__(
        self, settings: StoreSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.prefix = check_prefix(settings.key_prefix)
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
        matcher = _glob_regex(escape_glob(self.prefix) + pattern)
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
