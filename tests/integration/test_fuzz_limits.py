"""The limits on what one client may send, each pinned against a real gateway process: body
size (declared and chunked), header size, JSON depth, number of messages, absurd numbers,
invalid UTF-8, odd header values, and idle or slow connections (slowloris). Also the
regression tests of the 5xx bugs the fuzzers in test_fuzz.py found (see KNOWN_500 there).
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.api.schemas import MAX_MESSAGES
from tests.integration.conftest import ERROR_FIELDS, Service, assert_openai_error
from tests.integration.test_fuzz import (
    SLOW_CLIENT_BOUND_S,
    TIGHT_KEY,
    start_fuzz_gateway,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Callable[[Service], Service]) -> Service:
    return start_fuzz_gateway(log_dir, services)


# --- limits, each pinned -------------------------------------------------------------------


def post_raw(gateway: Service, raw: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(gateway.url + path, content=raw, headers=headers, timeout=10)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "cheap",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **extra,
    }


def test_message_count_limit(gateway: Service) -> None:
    at_limit = [{"role": "user", "content": "x"}] * MAX_MESSAGES
    response = post_raw(gateway, orjson.dumps(chat_body(messages=at_limit)))
    # Past the gateway: the backend's own answer (these sims hold 512 tokens of context).
    assert response.status_code == 400 and "context length" in response.text, response.text
    over = orjson.dumps(chat_body(messages=[*at_limit, {"role": "user", "content": "x"}]))
    assert_openai_error(post_raw(gateway, over), 400, "messages")


def test_json_depth_limit_of_the_decoder_is_400(gateway: Service) -> None:
    deep = b'{"model":"cheap","messages":[{"role":"user","content":"x"}],"x":' + b"[" * 5000
    assert_openai_error(post_raw(gateway, deep + b"]" * 5000 + b"}"), 400)


@pytest.mark.parametrize("temperature", [0, 0.7], ids=["cached", "uncached"])
def test_json_nested_past_the_encoder_limit_is_400(gateway: Service, temperature: float) -> None:
    # orjson decodes 1024 levels but encodes only 254: a body between the two is accepted,
    # then fails when the gateway re-encodes it for the backend or the cache key.
    raw = orjson.dumps(chat_body(temperature=temperature, x="DEEP"))
    raw = raw.replace(b'"DEEP"', b"[" * 300 + b"]" * 300)
    assert_openai_error(post_raw(gateway, raw), 400)


@pytest.mark.parametrize("text", [5, 1.5, True], ids=["int", "float", "bool"])
def test_content_part_with_non_string_text_is_400(gateway: Service, text: Any) -> None:
    body = chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
    response = post_raw(gateway, orjson.dumps(body))
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 400:
        assert_openai_error(response, 400)


@pytest.mark.parametrize("value", [1e20, -1e300, 2.0**64], ids=["1e20", "-1e300", "2^64"])
def test_cacheable_request_with_a_huge_whole_number_is_answered(
    gateway: Service, value: float
) -> None:
    # The cache key writes whole floats as integers (`0.0` and `0` ask the same), and
    # orjson cannot write an integer past 64 bits.
    response = post_raw(gateway, orjson.dumps(chat_body(temperature=0, logit_scale=value)))
    assert response.status_code == 200, response.text[:300]


def test_n_counts_in_the_budget_reservation(gateway: Service) -> None:
    """`n` choices cost n times the tokens: the worst case held must count them, or one
    request with a large `n` spends far past the tenant's budget."""
    headers = {"authorization": f"Bearer {TIGHT_KEY}"}
    url = gateway.url + "/v1/chat/completions"
    one = httpx.post(url, json=chat_body(max_tokens=100), headers=headers, timeout=10)
    assert one.status_code == 200, one.text[:300]
    many = httpx.post(url, json=chat_body(max_tokens=100, n=100), headers=headers, timeout=10)
    assert_openai_error(many, 429)
    assert many.json()["error"]["code"] == "insufficient_quota"


def test_absurd_numbers_are_refused_not_generated(gateway: Service) -> None:
    for extra, param in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),  # decoded as a float: not an integer
        ({"n": 129}, "n"),
        ({"n": -1}, "n"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 1e308}, "temperature"),
        ({"stream": "yes"}, "stream"),
    ]:
        raw = json.dumps(chat_body(**extra)).encode()
        assert_openai_error(post_raw(gateway, raw), 400, param)
    # Within the gateway's bounds but over the backend's context: the backend's own 400.
    assert_openai_error(post_raw(gateway, orjson.dumps(chat_body(max_tokens=10_000_000))), 400)


def test_invalid_utf8_and_non_objects_are_400(gateway: Service) -> None:
    for raw in [
        b'{"model":"cheap","messages":[{"role":"user","content":"\xff\xfe"}]}',
        b'{"model":"cheap","messages":[{"role":"user","content":"\\ud800"}]}',
        b'{"model":"cheap","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',
        b"",
        b"[]",
        b"null",
    ]:
        assert_openai_error(post_raw(gateway, raw), 400)


def test_chunked_body_over_the_limit_is_413(gateway: Service) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model":"cheap","messages":[{"role":"user","content":"'
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB against a 1 MiB limit, with no content-length
        yield b'"}]}'

    response = httpx.post(gateway.url + "/v1/chat/completions", content=chunks(), timeout=10)
    assert_openai_error(response, 413)
    assert response.json()["error"]["code"] == "request_too_large"


def test_declared_length_over_the_limit_is_413_before_the_body(gateway: Service) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1073741824\r\n\r\n"
    )
    answer = raw_exchange(gateway, head)  # not one byte of the promised gigabyte is sent
    assert status_of(answer) == 413, answer[:200]
    assert b'"request_too_large"' in answer


# --- headers -----------------------------------------------------------------------------------


def raw_exchange(gateway: Service, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send one request as raw bytes; return what came back before the server closed or 2 s."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may refuse before all of it is sent
            sock.sendall(head + body)
        received = b""
        sock.settimeout(2)
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and b"connection: close" not in received.lower():
                    _, _, rest = received.partition(b"\r\n\r\n")
                    length = _content_length(received)
                    if length is not None and len(rest) >= length:
                        break
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def _content_length(response: bytes) -> int | None:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def request_head(extra: bytes, body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
    )


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def test_odd_header_values_never_500(gateway: Service) -> None:
    body = orjson.dumps(chat_body(model="auto"))
    for header in [
        b"x-triage-tier: \xff\xfe",
        b"x-triage-tier: " + b"large" * 2000,
        b"traceparent: \xff" + b"0" * 60,
        b"tracestate: " + b"k=v," * 5000,
        b"authorization: Bearer " + b"k" * 10000,
        b"authorization: Bearer",
        b"authorization: Negotiate \xc3\xa9",
        b"cache-control: no-cache=\xff, max-age=-1, ,,",
        b"x-triage-cache: \x80",
        b"content-type: application/json; charset=\xff",
    ]:
        answer = raw_exchange(gateway, request_head(header + b"\r\n", body), body)
        status = status_of(answer)
        assert 200 <= status < 500, (header[:60], answer[:300])
        if status >= 400:
            assert_error_bytes(answer)
    # Control characters are refused by the HTTP parser itself, before the app: still a 4xx
    # in the API's error shape (more such cases in test_malformed_http.py).
    answer = raw_exchange(gateway, request_head(b"traceparent: a\x01b\r\n", body), body)
    assert 400 <= status_of(answer) < 500, answer[:300]
    assert_error_bytes(answer)


def assert_error_bytes(answer: bytes) -> None:
    error = orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert set(error) == ERROR_FIELDS


@pytest.mark.parametrize(
    "extra",
    [
        b"x-huge: " + b"a" * (1024 * 1024) + b"\r\n",
        b"".join(b"x-h%d: v\r\n" % i for i in range(20_000)),
    ],
    ids=["one-1MiB-value", "20000-headers"],
)
def test_header_size_is_limited(gateway: Service, extra: bytes) -> None:
    body = orjson.dumps(chat_body())
    answer = raw_exchange(gateway, request_head(extra, body), body)
    assert status_of(answer) == 431, answer[:300]
    assert_error_bytes(answer)
    assert httpx.get(gateway.url + "/healthz", timeout=5).status_code == 200


def test_headers_within_the_limit_are_served(gateway: Service) -> None:
    headers = {f"x-extra-{i}": "v" * 200 for i in range(60)}  # 60 headers, ~13 KiB
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat_body(), headers=headers, timeout=10
    )
    assert response.status_code == 200, response.text[:300]


def test_pipelined_requests_are_answered_in_order(gateway: Service) -> None:
    """Requests sent back to back on one connection (HTTP/1.1 pipelining) each get their own
    answer, in order: the server's per-request connection signals must not cross."""
    first = orjson.dumps(chat_body(messages=[{"role": "user", "content": "first"}]))
    second = orjson.dumps(chat_body(messages=[{"role": "user", "content": "second"}]))
    health = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    pipeline = request_head(b"", first) + first + request_head(b"", second) + second + health
    host, port = gateway.url.removeprefix("http://").split(":")
    answers: list[tuple[int, bytes]] = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(pipeline)
        received = b""
        while len(answers) < 3:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(answers)} answers"
            received += chunk
            while b"\r\n\r\n" in received:
                head, _, rest = received.partition(b"\r\n\r\n")
                length = _content_length(head + b"\r\n\r\n")
                assert length is not None, head
                if len(rest) < length:
                    break
                answers.append((status_of(head), rest[:length]))
                received = rest[length:]
    assert [status for status, _ in answers] == [200, 200, 200]
    objects = [orjson.loads(body).get("object") for _, body in answers]
    assert objects == ["chat.completion", "chat.completion", None]
    assert orjson.loads(answers[2][1]) == {"status": "ok"}


# --- slow and idle clients -----------------------------------------------------------------


def open_connection(gateway: Service, first: bytes) -> socket.socket:
    host, port = gateway.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    if first:
        sock.sendall(first)
    return sock


SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
SLOW_BODY = SLOW_HEAD + b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n{"


def test_slow_clients_do_not_starve_others(gateway: Service) -> None:
    held = [open_connection(gateway, b"") for _ in range(100)]
    held += [open_connection(gateway, SLOW_HEAD) for _ in range(100)]
    held += [open_connection(gateway, SLOW_BODY) for _ in range(100)]
    try:
        start = time.monotonic()
        with httpx.Client(timeout=5) as client:
            for _ in range(20):
                response = client.post(gateway.url + "/v1/chat/completions", json=chat_body())
                assert response.status_code == 200
        assert time.monotonic() - start < 5
    finally:
        for sock in held:
            sock.close()


def test_idle_and_slow_connections_are_closed(gateway: Service) -> None:
    """An idle connection, one that trickles its headers and one that trickles its body are
    each closed (or answered 408) within a bound: otherwise 300 of them pin 300 sockets and
    coroutines per worker for as long as the attacker likes."""
    selector = selectors.DefaultSelector()
    kinds = {"idle": b"", "slow headers": SLOW_HEAD, "slow body": SLOW_BODY}
    drip = {"idle": b"", "slow headers": b"x-drip: 1\r\n", "slow body": b" "}
    open_socks = {}
    for kind, first in kinds.items():
        sock = open_connection(gateway, first)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, kind)
        open_socks[kind] = sock
    closed: dict[str, float] = {}
    start = time.monotonic()
    next_drip = start
    try:
        while len(closed) < len(kinds) and time.monotonic() - start < SLOW_CLIENT_BOUND_S + 1:
            now = time.monotonic()
            if now >= next_drip:
                for kind, sock in open_socks.items():
                    if kind not in closed and drip[kind]:
                        try:
                            sock.send(drip[kind])
                        except OSError:
                            closed[kind] = now - start
                next_drip = now + 0.5
            for key, _ in selector.select(timeout=0.1):
                kind = key.data
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 408"):
                    closed.setdefault(kind, time.monotonic() - start)
                    selector.unregister(key.fileobj)
    finally:
        selector.close()
        for sock in open_socks.values():
            sock.close()
    assert set(closed) == set(kinds), f"still open after {SLOW_CLIENT_BOUND_S + 1}s: {closed}"
    assert max(closed.values()) <= SLOW_CLIENT_BOUND_S + 1
