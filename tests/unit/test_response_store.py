"""Stored Responses answers, on the embedded store and on a real redis-server."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.dialects.response_store import ResponseStore, public
from gateway.policy import StoreSettings
from gateway.store import EmbeddedStore, RedisStore, Store
from tests.support.redis import RedisServer

DAY = 86_400.0


def record(response_id: str = "resp_1") -> dict[str, Any]:
    return {
        "id": response_id,
        "response": {"id": response_id, "object": "response", "output": [], "status": "completed"},
        "input": [{"type": "message", "role": "user", "content": "hi"}],
    }


def redis_settings(server: RedisServer, prefix: str) -> StoreSettings:
    return StoreSettings(redis_url=server.url, key_prefix=prefix, timeout_ms=2000)


@pytest.fixture(params=["embedded", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "embedded":
        yield EmbeddedStore(StoreSettings())
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisStore(redis_settings(server, f"t{uuid.uuid4().hex[:8]}:"))
    try:
        yield store
    finally:
        await store.close()


async def test_save_load_delete(backend: Store) -> None:
    responses = ResponseStore(backend, ttl_s=30 * DAY)
    assert await responses.load("tenant-a", "resp_1") is None
    await responses.save("tenant-a", record())
    loaded = await responses.load("tenant-a", "resp_1")
    assert loaded == record()
    assert public(loaded) == record()["response"]
    assert await responses.delete("tenant-a", "resp_1") is True
    assert await responses.load("tenant-a", "resp_1") is None
    assert await responses.delete("tenant-a", "resp_1") is False


async def test_another_tenant_finds_nothing_and_deletes_nothing(backend: Store) -> None:
    responses = ResponseStore(backend, ttl_s=DAY)
    await responses.save("tenant-a", record())
    assert await responses.load("tenant-b", "resp_1") is None
    assert await responses.delete("tenant-b", "resp_1") is False
    assert await responses.load("tenant-a", "resp_1") == record()


async def test_ids_never_issued_are_not_found(backend: Store) -> None:
    responses = ResponseStore(backend, ttl_s=DAY)
    assert await responses.load("tenant-a", "") is None
    assert await responses.load("tenant-a", "r" * 10_000) is None
    assert await responses.delete("tenant-a", "r" * 10_000) is False


async def test_redis_key_has_the_policy_ttl_and_no_tenant_name(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_settings(redis_server, prefix))
    try:
        await ResponseStore(store, ttl_s=30 * DAY).save("acme corp", record())
    finally:
        await store.close()
    keys = redis_server.client().keys(f"{prefix}*")
    assert len(keys) == 1
    assert b"acme" not in keys[0]
    assert hashlib.sha256(b"acme corp").hexdigest()[:32].encode() in keys[0]
    ttl_ms = redis_server.client().pttl(keys[0])
    assert 30 * DAY * 1000 - 60_000 < ttl_ms <= 30 * DAY * 1000


async def test_a_stored_response_survives_a_new_store_on_the_same_redis(
    redis_server: RedisServer,
) -> None:
    """The gateway's restart: a new process opens a new connection and finds it."""
    settings = redis_settings(redis_server, f"t{uuid.uuid4().hex[:8]}:")
    first = RedisStore(settings)
    try:
        await ResponseStore(first, ttl_s=DAY).save("tenant-a", record("resp_keep"))
    finally:
        await first.close()
    second = RedisStore(settings)
    try:
        assert await ResponseStore(second, ttl_s=DAY).load("tenant-a", "resp_keep") == record(
            "resp_keep"
        )
    finally:
        await second.close()


async def test_embedded_records_expire_after_the_ttl() -> None:
    now = [1000.0]
    store = EmbeddedStore(StoreSettings(), clock=lambda: now[0])
    responses = ResponseStore(store, ttl_s=60)
    await responses.save("tenant-a", record())
    now[0] += 59.9
    assert await responses.load("tenant-a", "resp_1") is not None
    now[0] += 0.1
    assert await responses.load("tenant-a", "resp_1") is None
