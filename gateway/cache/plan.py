"""Whether the cache may answer or fill a request, for how long, and under which key.

The key is a sha256 of the tenant's cache scope, the concrete model, the endpoint and
the canonical JSON of every request field that can change the answer. Scope and model
also appear, escaped, in the key's namespace so `invalidation_pattern` can select one
tenant's or one model's entries; the digest is the key's `{hash tag}`, so on a Redis
Cluster an entry and its single-flight lock live in the same slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import orjson

from gateway.api.schemas import RequestKind
from gateway.policy import CacheSettings

__all__ = [
    "CACHE_HEADER",
    "IGNORED_FIELDS",
    "NATIVE_BYPASS",
    "CachePlan",
    "CacheStatus",
    "bypassed",
    "cache_key",
    "invalidation_pattern",
    "make_plan",
]

CACHE_HEADER = "x-triage-cache"

# Request fields that cannot change the answer. Every other field is part of the key:
# a field the gateway does not know might change the answer, so it counts.
IGNORED_FIELDS = frozenset(
    {
        "model",  # replaced by the concrete model the router chose
        "stream",  # replay converts between a stream and a JSON body
        "stream_options",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "metadata",
        "store",
    }
)


class CacheStatus(StrEnum):
    """The `x-triage-cache` response header."""

    HIT = "hit"
    MISS = "miss"
    BYPASS = "bypass"


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache does for one request. `reason` says why it bypasses or does not write."""

    kind: RequestKind
    model: str
    key: str
    lookup: bool
    store: bool
    ttl_s: float
    reason: str | None = None

    @property
    def lock_key(self) -> str:
        return self.key + ":lock"

    @property
    def status(self) -> CacheStatus:
        """The header value when nothing is found: `miss` if the cache was asked."""
        return CacheStatus.MISS if self.lookup else CacheStatus.BYPASS


def make_plan(
    settings: CacheSettings,
    *,
    scope: str,
    tier: str,
    model: str,
    kind: RequestKind,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    dialect: str = "chat",
) -> CachePlan:
    """Apply the policy's and the client's cache rules. Pure: touches no store.

    `headers` must answer lower-case names (Starlette's `Headers` does).
    """

    def bypass(reason: str) -> CachePlan:
        return bypassed(kind, model, reason)

    tier_settings = settings.tiers.get(tier)
    if not settings.enabled:
        return bypass("the cache is off")
    if tier_settings is not None and not tier_settings.enabled:
        return bypass(f"the cache is off for tier {tier!r}")
    not_cacheable = _not_cacheable(settings, kind, body)
    if not_cacheable is not None:
        return bypass(not_cacheable)
    directives = _client_directives(headers)
    lookup, store = "no-cache" not in directives, "no-store" not in directives
    if not (lookup or store):
        return bypass("the client sent no-cache and no-store")
    ttl_s = settings.ttl_s
    if tier_settings is not None and tier_settings.ttl_s is not None:
        ttl_s = tier_settings.ttl_s
    reason = None if lookup and store else f"the client sent {'no-store' if lookup else 'no-cache'}"
    key = cache_key(scope, model, kind, body, dialect)
    return CachePlan(kind, model, key, lookup=lookup, store=store, ttl_s=ttl_s, reason=reason)


def bypassed(kind: RequestKind, model: str, reason: str) -> CachePlan:
    """A plan that neither looks up nor stores, and says why."""
    return CachePlan(kind, model, "", lookup=False, store=False, ttl_s=0.0, reason=reason)


# A native pass-through answer (gateway/backend_api/native.py) is not cached: the cache
# stores chat answers and replays them through the client's translation, and a native one
# is not a chat answer. Recording the backend's bytes as they are would need a replay per
# API (and a Responses id made per request) for the one case where nothing is translated.
NATIVE_BYPASS = "a native pass-through answer is not cached"


def cache_key(
    scope: str, model: str, kind: RequestKind, body: Mapping[str, Any], dialect: str = "chat"
) -> str:
    """`cache:<scope>:<model>:{<sha256>}`; scope and model escaped, the digest the hash tag.
    The client's dialect is in the digest: an entry is replayed only to the API that asked."""
    meaningful = {
        name: _plain_number(value) for name, value in body.items() if name not in IGNORED_FIELDS
    }
    head = [kind, model, scope] if dialect == "chat" else [kind, model, scope, dialect]
    digest = hashlib.sha256(orjson.dumps(head))
    digest.update(orjson.dumps(meaningful, option=orjson.OPT_SORT_KEYS))
    return f"cache:{_segment(scope)}:{_segment(model)}:{{{digest.hexdigest()}}}"


def invalidation_pattern(scope: str | None, model: str | None) -> str:
    """A store glob for the entries (not the locks) of one scope, one model, both, or all."""
    scope_part = "*" if scope is None else _segment(scope)
    model_part = "*" if model is None else _segment(model)
    return f"cache:{scope_part}:{model_part}:{{*}}"


def _segment(text: str) -> str:
    # Percent-escaping leaves no ':' (the separator), no braces (hash tags) and no glob
    # characters, and it is reversible, so two scopes never share a namespace.
    return quote(text, safe="")


def _plain_number(value: Any) -> Any:
    # `"temperature": 0` and `0.0` ask the same thing; bools are not floats, so they stay.
    # Only where the int is exact and fits what orjson writes (64 bits).
    plain = isinstance(value, float) and value.is_integer() and abs(value) < 2**53
    return int(value) if plain else value


def _not_cacheable(
    settings: CacheSettings, kind: RequestKind, body: Mapping[str, Any]
) -> str | None:
    if kind == "embeddings":
        return None  # an embedding does not depend on sampling
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return "n > 1 is not cached"
    if not settings.deterministic_only:
        return None
    temperature = body.get("temperature")
    if _is_number(temperature) and temperature == 0:
        return None
    if settings.cache_seeded and _is_number(body.get("seed")):
        return None
    if settings.cache_seeded:
        return "not deterministic: needs temperature 0 or a seed"
    return "not deterministic: needs temperature 0"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _client_directives(headers: Mapping[str, str]) -> set[str]:
    directives = {
        part.split("=", 1)[0].strip().lower()
        for part in headers.get("cache-control", "").split(",")
    }
    if headers.get(CACHE_HEADER, "").strip().lower() == "bypass":
        directives.add("no-cache")
    return directives
