"""Stored Responses answers (`store`, `previous_response_id`, GET and DELETE by id), kept
in the gateway's shared store (Redis, or the embedded one) and scoped to a tenant.

The key holds a digest of the tenant's scope, so another tenant's id is simply not found:
there is no record to leak and nothing to check. `StoreUnavailable` propagates; the
caller decides what an unavailable store means for its request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.store import Store

__all__ = ["MAX_ID_LENGTH", "ResponseStore", "public"]

MAX_ID_LENGTH = 256  # longer ids were never issued: not found, without a store call


class ResponseStore:
    """Records `{"id", "response", "input", "conversation"}`: the Response object, the
    conversation's input items up to it (what a continuation puts before its own input),
    and the id of the conversation's first response (its session, for replica choice)."""

    def __init__(self, store: Store, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s

    async def save(self, scope: str, record: Mapping[str, Any]) -> None:
        await self.store.set(_key(scope, record["id"]), orjson.dumps(record), self.ttl_s)

    async def load(self, scope: str, response_id: str) -> dict[str, Any] | None:
        """The tenant's record, or None (unknown, expired, deleted, or another tenant's)."""
        if not 0 < len(response_id) <= MAX_ID_LENGTH:
            return None
        raw = await self.store.get(_key(scope, response_id))
        if raw is None:
            return None
        record = orjson.loads(raw)
        return record if isinstance(record, dict) else None

    async def delete(self, scope: str, response_id: str) -> bool:
        """True if the tenant had that record."""
        if not 0 < len(response_id) <= MAX_ID_LENGTH:
            return False
        return await self.store.delete(_key(scope, response_id)) > 0


def public(record: Mapping[str, Any]) -> dict[str, Any]:
    """What GET /v1/responses/{id} answers: the Response object, without the history."""
    response: dict[str, Any] = record["response"]
    return response


def _key(scope: str, response_id: str) -> str:
    # The scope is hashed: a tenant name may hold any character, a key part must not.
    tenant = hashlib.sha256(scope.encode()).hexdigest()[:32]
    return f"responses:{tenant}:{response_id}"
