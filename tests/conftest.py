"""Fixtures shared by unit and integration tests: real Redis servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis import RedisCluster, RedisServer, running_cluster, running_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests flush what they need."""
    yield from running_redis()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill, pause or restart it."""
    yield from running_redis()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    yield from running_cluster()
