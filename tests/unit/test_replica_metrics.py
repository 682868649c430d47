"""Reading replicas' load from their Prometheus metrics: vLLM (old and new names), SGLang."""

from __future__ import annotations

import time

import httpx

from gateway.pools import Load, Pool
from gateway.replica_metrics import LoadScraper, parse_load

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


async def test_scrape_all() -> None:
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

    scraper = LoadScraper([p], interval_s=0.25)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        before = time.monotonic()
        await scraper.scrape_all(client)
        assert ok.load == Load(7, 2, 0.875) and ok.load_at >= before
        assert ok.capacity == 7
        assert none.reports_load is False
        assert down.reports_load is None and down.load is None
        await scraper.scrape_all(client)
    # A replica without /metrics is not asked again every cycle.
    assert seen.count("none") == 1 and seen.count("ok") == 2


async def test_scraper_starts_and_stops() -> None:
    scraper = LoadScraper([], interval_s=0.01)
    scraper.start()
    await scraper.stop()


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

    scraper = LoadScraper([llama, hosted], interval_s=0.25)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await scraper.scrape_all(client)
    assert llama.replicas[0].reports_load is False
    assert hosted.replicas[0].reports_load is False
    assert seen == ["llama"]
