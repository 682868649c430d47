"""One call to one replica over the shared aiohttp session: send, then hand back the
response; and the OpenAI wire-format helpers the way back shares.

aiohttp's exceptions are converted to `TriageError`s here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp.payload import BytesPayload

from gateway.errors import (
    TriageError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pools import Pool
from gateway.replica import Replica

if TYPE_CHECKING:
    from gateway.tokenize import UsageSource

__all__ = [
    "DONE_EVENT",
    "ConnectFailed",
    "ModelRename",
    "Outcome",
    "Upstream",
    "UpstreamResponse",
    "close_session",
    "event_data",
    "finish_reasons",
    "iter_event_batches",
    "model_rename",
    "new_session",
    "status_error",
]

DONE_EVENT = b"data: [DONE]\n\n"


class ConnectFailed(UpstreamUnavailable):
    """No byte reached the replica: safe to retry elsewhere."""


@dataclass(slots=True)
class Outcome:
    """What one upstream exchange produced, for accounting and telemetry."""

    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    usage: Mapping[str, Any] | None = None
    completed: bool = False
    error: TriageError | None = None
    events: int = 0  # data events relayed: ~one token each, for streams cut off before usage
    finish_reasons: tuple[str, ...] = ()  # each choice's, as the backend reported them
    counted: UsageSource | None = None  # set when the gateway counted `usage` itself

    @property
    def usage_source(self) -> UsageSource | None:
        """Who counted `usage`: the backend, its tokenizer asked by the gateway, or an estimate."""
        if self.usage is None:
            return None
        return self.counted or "backend"

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens") or 0)

    @property
    def completion_tokens(self) -> int:
        return int((self.usage or {}).get("completion_tokens") or 0)


class _ConvertedErrors:
    """aiohttp's exceptions within the block, raised as `TriageError`s. A class, not a
    `@contextmanager`: it wraps every send and read, and a generator costs more."""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url  # the replica's, for the message of a refused connection

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise ConnectFailed(f"Could not connect to a backend replica ({self.url}).") from exc
        if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
            raise UpstreamTimeout("The backend replica did not answer in time.") from exc
        if isinstance(exc, aiohttp.ClientError):
            raise UpstreamError(f"The backend replica failed: {type(exc).__name__}.") from exc


class UpstreamResponse:
    """A replica's answer, its headers read with a 2xx status: the body read whole, or its
    events as they arrive. Let go of it once: `release()` after a complete answer (the
    connection is reused), `close()` after one cut short (the connection drops, so the
    backend notices and stops generating). Opaque: nothing above dispatch sees aiohttp."""

    __slots__ = ("_replica", "_response")

    def __init__(self, response: aiohttp.ClientResponse, replica: Replica) -> None:
        self._response = response
        self._replica = replica

    async def read(self) -> bytes:
        """The whole body; the connection is released."""
        try:
            with _ConvertedErrors(self._replica.url):
                return await self._response.read()
        finally:
            self._response.release()

    def events(self) -> AsyncGenerator[bytes, None]:
        """The SSE events in batches as they arrive (see `iter_event_batches`)."""
        return iter_event_batches(self._response.content, self._replica.url)

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class Upstream:
    """Sends requests to replicas; owns the one connection pool shared by all of them."""

    def __init__(
        self, session: aiohttp.ClientSession, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)

    @classmethod
    def open(
        cls, connections_per_replica: int, timeout_s: float, connect_timeout_s: float
    ) -> Upstream:
        """An upstream with its own session (see `new_session`); `close()` it when done."""
        return cls(new_session(connections_per_replica), timeout_s, connect_timeout_s)

    async def close(self) -> None:
        await close_session(self.session)

    async def post(
        self, pool: Pool, replica: Replica, path: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamResponse:
        """Send the request; return the response once its headers arrive with a 2xx status."""
        if pool.api_key:
            headers = {**headers, "authorization": f"Bearer {pool.api_key}"}
        if pool.api == "messages":
            headers = {**headers, **_messages_headers(pool.api_key)}
        # A payload made here, not by aiohttp's registry from the bytes, carries the
        # content type itself: ~2 µs less per send.
        data = BytesPayload(body, content_type="application/json")
        with _ConvertedErrors(replica.url):
            response = await self.session.post(
                replica.url + path, data=data, headers=headers, timeout=self.timeout
            )
        if response.status >= 400:
            try:
                with _ConvertedErrors(replica.url):
                    payload = await response.read()
            finally:
                response.close()
            raise status_error(response.status, payload, response.headers.get("retry-after"))
        return UpstreamResponse(response, replica)


def _messages_headers(api_key: str | None) -> dict[str, str]:
    """What a Messages API server reads besides the body: the API version, and the key as
    `x-api-key` (Anthropic's header; vLLM reads the Bearer one, so both are sent)."""
    headers = {"anthropic-version": "2023-06-01"}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


@dataclass(frozen=True, slots=True)
class ModelRename:
    """The backend's name for a model made the policy's, in the `"model"` fields of JSON.

    Clients see only names they can ask for; a served name is the backend's business. A
    bytes replace of `"model":"<served>"` (compact, or with a space as Python's json.dumps
    writes it): a JSON string inside a value has its quotes escaped, so never matches.
    """

    pairs: tuple[tuple[bytes, bytes], ...]

    def __call__(self, data: bytes) -> bytes:
        for old, new in self.pairs:
            data = data.replace(old, new)
        return data

    def narrowed(self, sample: bytes) -> ModelRename:
        """Only the spellings `sample` uses: a stream keeps to one, one scan per batch."""
        found = tuple(pair for pair in self.pairs if pair[0] in sample)
        return ModelRename(found) if found else self


@functools.lru_cache(maxsize=1024)
def model_rename(served: str, model: str) -> ModelRename | None:
    """The rename from `served` to `model`; None when they are the same (nothing to do)."""
    if served == model:
        return None
    new = orjson.dumps(model)
    pairs: dict[bytes, bytes] = {}
    for old in {orjson.dumps(served), json.dumps(served).encode()}:  # json.dumps: \u escapes
        for colon in (b":", b": "):
            pairs[b'"model"' + colon + old] = b'"model"' + colon + new
    return ModelRename(tuple(pairs.items()))


async def iter_event_batches(
    content: aiohttp.StreamReader, url: str = ""
) -> AsyncGenerator[bytes, None]:
    """The complete SSE events of a byte stream, as they arrive: each item is all the events
    one read completed, each ending in a blank line (CRLFs made LFs); aiohttp's errors
    converted (`url`: the replica's, for their messages).

    Events that arrive together leave together, in one write to the client instead of one
    each; no event ever waits for another.
    """
    buffer = b""
    with _ConvertedErrors(url):
        async for data in content.iter_any():
            buffer += data
            if b"\r" in buffer:
                buffer = buffer.replace(b"\r\n", b"\n")
            end = buffer.rfind(b"\n\n")
            if end >= 0:
                yield buffer[: end + 2]
                buffer = buffer[end + 2 :]
    if buffer.strip():
        yield buffer.strip(b"\n") + b"\n\n"


def finish_reasons(reply: object) -> tuple[str, ...]:
    """The `finish_reason` of each choice of an OpenAI response or stream chunk that has one."""
    choices = reply.get("choices") if isinstance(reply, Mapping) else None
    if not isinstance(choices, list):
        return ()
    return tuple(
        reason
        for choice in choices
        if isinstance(choice, dict) and isinstance(reason := choice.get("finish_reason"), str)
    )


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one event, or None for comments and other fields."""
    if event.startswith(b"data:"):
        return event[5:].strip()
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def status_error(status: int, payload: bytes, retry_after: str | None) -> UpstreamStatus:
    """Map a backend's error status to what the client sees (its 4xx as is, 5xx as 502/503)."""
    message, error_type, code, param = (
        f"The backend replica returned HTTP {status}.",
        None,
        None,
        None,
    )
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        body = orjson.loads(payload)
        error = body.get("error")
        if error is None and body.get("object") == "error":
            error = body  # SGLang's and vLLM's (before ~0.9) flat shape
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            error_type, code, param = error.get("type"), error.get("code"), error.get("param")
        elif isinstance(error, str):
            message = error
    # Anthropic's 529 (overloaded) is a 503: busy, not broken; try another replica.
    client_status = status if status < 500 or status == 503 else 503 if status == 529 else 502
    if status == 429:
        error_type = "rate_limit_error"
    elif status >= 500:
        error_type = "api_error"
    seconds = None
    if retry_after is not None:
        with contextlib.suppress(ValueError):
            seconds = float(retry_after)
    return UpstreamStatus(
        client_status,
        message,
        error_type=error_type or "invalid_request_error",
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
        retry_after=seconds,
    )


def new_session(connections_per_replica: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=connections_per_replica, keepalive_timeout=60, ttl_dns_cache=60
    )
    return aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))


async def close_session(session: aiohttp.ClientSession) -> None:
    await session.close()
    await asyncio.sleep(0)  # let aiohttp's transports finish closing
