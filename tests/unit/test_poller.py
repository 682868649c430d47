"""Polling replicas in the background: health probes, and load read from Prometheus metrics
(vLLM, old and new names; SGLang; llama.cpp)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from aiohttp import web

from gateway.backends import DEFAULTS
from gateway.poller import Poller, parse_load
from gateway.pools import Pool
from gateway.replica import Load, ReplicaSettings

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.875
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="llama"} 4.0
"""


def test_vllm() -> None:
    assert parse_load(VLLM) == Load(running=7, waiting=2, cache_usage=0.875)


def test_older_vllm_cache_gauge() -> None:
    text = (
        'vllm:num_requests_running{model_name="m"} 1\n'
        'vllm:num_requests_waiting{model_name="m"} 0\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    )
    assert parse_load(text) == Load(1, 0, 0.5)


def test_new_cache_gauge_wins_when_both_are_there() -> None:
    text = VLLM + 'vllm:gpu_cache_usage_perc{model_name="llama"} 0.1\n'
    load = parse_load(text)
    assert load is not None and load.cache_usage == 0.875


def test_sglang() -> None:
    text = (
        "# TYPE sglang:num_running_reqs gauge\n"
        'sglang:num_running_reqs{model_name="m"} 12.0\n'
        'sglang:num_queue_reqs{model_name="m"} 5.0\n'
        'sglang:token_usage{model_name="m"} 0.97\n'
    )
    assert parse_load(text) == Load(12, 5, 0.97)


def test_engines_add_up_and_the_fullest_cache_counts() -> None:
    text = (
        'vllm:num_requests_running{engine="0"} 3\n'
        'vllm:num_requests_running{engine="1"} 4\n'
        'vllm:num_requests_waiting{engine="0"} 1\n'
        'vllm:num_requests_waiting{engine="1"} 0\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.2\n'
        'vllm:kv_cache_usage_perc{engine="1"} 0.6\n'
    )
    assert parse_load(text) == Load(7, 1, 0.6)


def test_unlabelled_series_and_timestamps() -> None:
    text = "vllm:num_requests_running 2 1700000000000\nvllm:num_requests_waiting 1\n"
    assert parse_load(text) == Load(2, 1, None)


def test_no_queue_gauges_is_no_load() -> None:
    assert parse_load("") is None
    assert parse_load("process_cpu_seconds_total 3\nvllm:kv_cache_usage_perc 0.1\n") is None
    assert parse_load('vllm:num_requests_running{a="b"} not-a-number\n') is None


def one_pool() -> Pool:
    urls = ["http://ok:8000/v1", "http://none:8000/v1", "http://down:8000/v1"]
    return Pool.from_urls("m", urls, None, None)


async def test_scrape_load() -> None:
    p = one_pool()
    ok, none, down = p.replicas
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "down":
            raise httpx.ConnectTimeout("slow")
        if request.url.host == "none":
            return httpx.Response(404)
        return httpx.Response(200, text=VLLM)

    poller = Poller([p], 60, 0.25)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        before = time.monotonic()
        await poller.scrape_load(client)
        assert ok.load == Load(7, 2, 0.875) and ok.load_at >= before
        assert ok.capacity == 7
        assert none.reports_load is False
        assert down.reports_load is None and down.load is None
        await poller.scrape_load(client)
    # A replica without /metrics is not asked again every cycle.
    assert seen.count("none") == 1 and seen.count("ok") == 2


async def test_a_started_poller_keeps_scraping_until_stopped() -> None:
    """A real loopback server: the poller's own client and its schedule, not a mock."""
    scrapes = 0
    second = asyncio.Event()

    async def metrics(request: web.Request) -> web.Response:
        nonlocal scrapes
        scrapes += 1
        if scrapes == 2:  # the first answer was read (and handed on) before this one
            second.set()
        return web.Response(text=VLLM)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    p = Pool.from_urls("m", [f"http://127.0.0.1:{port}/v1"], None, None)
    poller = Poller([p], 60, 0.01)
    try:
        poller.start()
        await asyncio.wait_for(second.wait(), 10.0)
        assert p.replicas[0].load == Load(7, 2, 0.875)
    finally:
        await poller.stop()
        await runner.cleanup()


async def test_metrics_off_and_no_metrics_path() -> None:
    """llama.cpp's server without --metrics answers 501; a server kind without a metrics
    path is never asked at all."""
    from gateway.backends import DEFAULTS

    llama = Pool.from_urls("m", ["http://llama:8080/v1"], None, None, backend=DEFAULTS["llama_cpp"])
    hosted = Pool.from_urls("h", ["http://hosted/v1"], None, None, backend=DEFAULTS["openai"])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(501, text="This server does not support metrics endpoint.")

    poller = Poller([llama, hosted], 60, 0.25)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await poller.scrape_load(client)
    assert llama.replicas[0].reports_load is False
    assert hosted.replicas[0].reports_load is False
    assert seen == ["llama"]


# --- health ----------------------------------------------------------------------------


SETTINGS = ReplicaSettings(
    failures_to_open=3, initial_cooldown_s=1.0, max_cooldown_s=4.0, slow_start_s=10.0
)


def pool(count: int) -> Pool:
    urls = [f"http://r{i}:8000/v1" for i in range(count)]
    return Pool.from_urls("m", urls, None, None, settings=SETTINGS)


async def test_health_probes_eject_and_readmit() -> None:
    p = pool(2)
    down = {"http://r1:8000/health"}

    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url) in down:
            raise httpx.ConnectError("refused")
        return httpx.Response(200)

    poller = Poller([p], health_interval_s=60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await poller.check_health(client)
        assert p.replicas[0].state == "closed"
        assert p.replicas[1].state == "open" and p.replicas[1].hard_down
        assert p.replicas[1].ejections_by_reason == {"connect_refused": 1}
        down.clear()
        await poller.check_health(client)
    assert p.replicas[1].state == "half_open"
    assert p.replicas[1].available(time.monotonic())


@pytest.mark.parametrize("status", [404, 405, 501])
async def test_a_server_without_a_health_endpoint_is_never_ejected_for_it(status: int) -> None:
    """llama-cpp-python, Ollama's /v1 and hosted APIs answer 404 on /health: not "down"."""
    p = pool(2)
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(status)

    poller = Poller([p], health_interval_s=60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        for _ in range(5):
            await poller.check_health(client)
    assert all(r.state == "closed" and r.ejections == 0 for r in p.replicas)
    assert len(asked) == 2  # then not asked again for a minute


async def test_health_probes_go_to_the_backends_path_or_nowhere() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(200)

    ollama, hosted = pool(1), pool(1)
    ollama.backend = DEFAULTS["ollama"]  # GET / answers "Ollama is running"
    hosted.backend = DEFAULTS["openai"]  # no health path: passive checks only
    poller = Poller([ollama, hosted], health_interval_s=60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await poller.check_health(client)
    assert asked == ["http://r0:8000/"]


async def test_health_timeouts_eject_after_two_in_a_row_a_5xx_at_once() -> None:
    p = pool(4)
    answers = {
        "http://r0:8000/health": "timeout",
        "http://r1:8000/health": 503,
        "http://r2:8000/health": 200,
        "http://r3:8000/health": 200,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers[str(request.url)]
        if answer == "timeout":
            raise httpx.ReadTimeout("slow")
        return httpx.Response(int(answer))

    poller = Poller([p], health_interval_s=60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await poller.check_health(client)
        assert [r.state for r in p.replicas] == ["closed", "open", "closed", "closed"]
        assert p.replicas[1].hard_down  # the server said it cannot serve
        await poller.check_health(client)
    slow_one = p.replicas[0]
    assert slow_one.state == "open" and not slow_one.hard_down
    assert slow_one.ejections_by_reason == {"health_probe_failed": 1}


# --- the schedule ----------------------------------------------------------------------


async def test_a_hung_health_probe_does_not_hold_up_the_load_reports() -> None:
    """One task polls both paths, each on its own schedule: load reports go stale within a
    second, so a health probe that hangs (up to its timeout) must not delay them."""
    p = pool(1)
    scrapes = 0
    probes = 0
    third = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal scrapes, probes
        if request.url.path == "/health":
            probes += 1
            await asyncio.sleep(60)
        scrapes += 1
        if scrapes == 3:
            third.set()
        return httpx.Response(200, text=VLLM)

    poller = Poller([p], 0.01, 0.01, transport=httpx.MockTransport(handler))
    poller.start()
    try:
        await asyncio.wait_for(third.wait(), 10.0)
        assert probes == 1  # the next probe waits for this one to end
        assert p.replicas[0].load == Load(7, 2, 0.875)
    finally:
        await poller.stop()
    assert not poller.running
