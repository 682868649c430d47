"""Malformed HTTP/1.1, sent as raw bytes to a real gateway process: every refusal is an
OpenAI-shaped JSON error (400, 413 or 505) on a closed connection, never the HTTP server's
plain text, and the gateway serves the next client as before."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.integration.conftest import ERROR_FIELDS, Service, policy_for, start_gateway, start_sim

pytestmark = pytest.mark.integration
CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
BODY = b'{"model":"cheap","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'

MALFORMED = {
    "garbage-request-line": (b"HELLO WORLD\r\n\r\n", 400),
    "binary-request-line": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40, 400),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "unknown-version": (b"GET /v1/models HTTP/3.0\r\nhost: x\r\n\r\n", 505),
    "content-length-with-chunked": (
        CHAT + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad-chunk-size": (CHAT + b"transfer-encoding: chunked\r\n\r\nzz\r\n" + BODY + b"\r\n", 400),
    "negative-content-length": (CHAT + b"content-length: -5\r\n\r\nhello", 400),
    "absurd-content-length": (CHAT + b"content-length: 99999999999999999999999\r\n\r\n", 413),
    "two-content-lengths": (CHAT + b"content-length: 5\r\ncontent-length: 6\r\n\r\nhello", 400),
    "header-without-colon": (b"GET /v1/models HTTP/1.1\r\nhost: x\r\nbroken line\r\n\r\n", 400),
    "space-before-colon": (b"GET /v1/models HTTP/1.1\r\nhost : x\r\n\r\n", 400),
    "control-char-in-path": (b"GET /v1/mo\x01dels HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "unknown-transfer-encoding": (CHAT + b"transfer-encoding: gzip\r\n\r\n", 400),
}


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Callable[[Service], Service]) -> Service:
    small = services(start_sim(log_dir, "instant"))
    large = services(start_sim(log_dir, "instant"))
    return services(start_gateway(log_dir, policy_for([small.url], [large.url])))


def exchange(gateway: Service, raw: bytes) -> tuple[bytes, bool]:
    """Send `raw`; return what came back, and whether the server closed the connection."""
    host, port = gateway.url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(raw)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http_gets_an_api_error_and_a_closed_connection(
    gateway: Service, name: str
) -> None:
    raw, status = MALFORMED[name]
    answer, closed = exchange(gateway, raw)
    assert closed, answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in header_lines)
    }
    assert headers[b"content-type"] == b"application/json", headers
    assert headers[b"connection"] == b"close", headers
    assert int(headers[b"content-length"]) == len(body)
    error = orjson.loads(body)["error"]
    assert set(error) == ERROR_FIELDS
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["code"], str) and error["message"], error
    # The next client, on a fresh connection, is served as before.
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=BODY,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 200, response.text[:300]


def test_a_well_formed_request_on_a_raw_socket_is_served(gateway: Service) -> None:
    # The same helper on a good request: the checks above are not passing by accident.
    answer, _ = exchange(gateway, CHAT + b"content-length: %d\r\n\r\n" % len(BODY) + BODY)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
