"""Unit tests for gateway.sim.server's app, through httpx's in-process ASGI transport."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from gateway.sim.faults import FaultConfig
from gateway.sim.profile import PROFILES
from gateway.sim.server import build_sim_app
from gateway.sim.service import SimService

PROFILE = dataclasses.replace(PROFILES["instant"], model="unit-model")


@pytest.fixture
def app() -> Starlette:
    return build_sim_app(PROFILE)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as http:
        yield http


def test_each_app_owns_its_state() -> None:
    first, second = build_sim_app(PROFILE), build_sim_app(PROFILE)
    assert isinstance(first.state.sim, SimService)
    assert first.state.sim is not second.state.sim
    assert first.state.sim.metrics.registry is not second.state.sim.metrics.registry


async def test_a_completion_in_process(client: httpx.AsyncClient) -> None:
    payload = {"model": "unit-model", "prompt": "hello", "max_tokens": 2}
    body = (await client.post("/v1/completions", json=payload)).json()
    assert body["usage"]["completion_tokens"] == 2
    stats = (await client.get("/admin/stats")).json()
    assert stats["requests_completed"] == 1
    assert stats["last_request"] == payload


async def test_faults_set_at_run_time_reach_the_service(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    response = await client.post("/admin/faults", json={"rate": 1.0, "kind": "503"})
    assert response.status_code == 200
    assert app.state.sim.faults == FaultConfig(rate=1.0, kind="503")
    assert (await client.post("/v1/completions", json={"prompt": "x"})).status_code == 503


async def test_reset_without_uvicorn_raises_connection_reset() -> None:
    # No transport to abort outside uvicorn: the error is left for the server to handle.
    app = build_sim_app(PROFILE, FaultConfig(rate=1.0, kind="reset"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as http:
        with pytest.raises(ConnectionResetError):
            await http.post("/v1/completions", json={"prompt": "x"})
