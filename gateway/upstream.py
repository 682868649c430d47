"""One call to one replica over the shared aiohttp session: send, relay, read usage.

aiohttp's exceptions are converted to `TriageError`s here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp.payload import BytesPayload

from gateway.api.errors import sse_error_event
from gateway.errors import (
    TriageError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pools import Pool, Replica

if TYPE_CHECKING:
    from gateway.tokenize import UsageSource

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

    __slots__ = ("replica",)

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, aiohttp.ClientConnectorError):
            url = self.replica.url
            raise ConnectFailed(f"Could not connect to a backend replica ({url}).") from exc
        if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
            raise UpstreamTimeout("The backend replica did not answer in time.") from exc
        if isinstance(exc, aiohttp.ClientError):
            raise UpstreamError(f"The backend replica failed: {type(exc).__name__}.") from exc


class Upstream:
    """Sends requests to replicas; shares one connection pool across all of them."""

    def __init__(
        self, session: aiohttp.ClientSession, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)

    async def post(
        self, pool: Pool, replica: Replica, path: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send the request; return the response once its headers arrive with a 2xx status."""
        if pool.api_key:
            headers = {**headers, "authorization": f"Bearer {pool.api_key}"}
        # A payload made here, not by aiohttp's registry from the bytes, carries the
        # content type itself: ~2 µs less per send.
        data = BytesPayload(body, content_type="application/json")
        with _ConvertedErrors(replica):
            response = await self.session.post(
                replica.url + path, data=data, headers=headers, timeout=self.timeout
            )
        if response.status >= 400:
            try:
                with _ConvertedErrors(replica):
                    payload = await response.read()
            finally:
                response.close()
            raise status_error(response.status, payload, response.headers.get("retry-after"))
        return response

    async def read(
        self,
        replica: Replica,
        response: aiohttp.ClientResponse,
        outcome: Outcome,
        model: str | None = None,
    ) -> bytes:
        """The whole JSON body, its `"model"` made `model` (the policy's name) if given."""
        try:
            with _ConvertedErrors(replica):
                payload = await response.read()
        finally:
            response.release()
        outcome.first_token_at = time.perf_counter()
        try:
            reply = orjson.loads(payload)
            outcome.usage = reply.get("usage")
        except (orjson.JSONDecodeError, AttributeError) as exc:
            raise UpstreamError("The backend replica sent a response that is not JSON.") from exc
        outcome.finish_reasons = finish_reasons(reply)
        outcome.completed = True
        answered = reply.get("model")
        if model is not None and isinstance(answered, str) and answered != model:
            rename = model_rename(answered, model)
            if rename is not None:
                payload = rename(payload)
        return payload

    async def events(
        self, replica: Replica, response: aiohttp.ClientResponse
    ) -> AsyncGenerator[bytes, None]:
        """The response's SSE events in batches as they arrive, aiohttp's errors converted."""
        with _ConvertedErrors(replica):
            async for batch in iter_event_batches(response.content):
                yield batch

    async def relay(
        self,
        replica: Replica,
        response: aiohttp.ClientResponse,
        outcome: Outcome,
        strip_usage_chunk: bool,
        batches: AsyncIterator[bytes] | None = None,
        rename: ModelRename | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Relay SSE events as they arrive, a batch at a time (see `iter_event_batches`;
        from `batches` when given, which may hold some already read), the backend's model
        name replaced by `rename`; end a failed stream with an error event."""
        source = batches if batches is not None else iter_event_batches(response.content)
        try:
            with _ConvertedErrors(replica):
                async for batch in source:
                    if outcome.first_token_at is None:
                        outcome.first_token_at = time.perf_counter()
                        if rename is not None:
                            rename = rename.narrowed(batch)
                    if _needs_reading(batch):
                        batch = _read_batch(batch, outcome, strip_usage_chunk)
                    else:
                        outcome.events += batch.count(b"\n\n")
                    if strip_usage_chunk:
                        # Usage was our request, not the client's: leave no trace of it.
                        batch = batch.replace(b',"usage":null', b"")
                    if rename is not None:
                        batch = rename(batch)
                    if batch:
                        yield batch
                    if outcome.completed:
                        return
            raise UpstreamError("The backend replica ended the stream before [DONE].")
        except TriageError as error:
            outcome.error = error
            yield sse_error_event(error)
        except orjson.JSONDecodeError:
            outcome.error = UpstreamError("The backend replica sent an event that is not JSON.")
            yield sse_error_event(outcome.error)
        finally:
            # close(), not release(): an unfinished stream must drop the connection so the
            # backend notices and stops generating.
            if outcome.completed:
                response.release()
            else:
                response.close()


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


# What makes an event more than a plain token chunk: the end of the stream, a usage report
# (an object, where other chunks say null), a choice's finish (a string, where others say
# null); compact JSON, or with a space after the colon as Python's json.dumps writes it.
_TO_READ = (
    b"[DONE]",
    b'"usage":{',
    b'"usage": {',
    b'"finish_reason":"',
    b'"finish_reason": "',
)


def _needs_reading(batch: bytes) -> bool:
    """Most batches hold only token chunks: they pass through without being split or parsed."""
    return any(marker in batch for marker in _TO_READ)


def _read_batch(batch: bytes, outcome: Outcome, strip_usage_chunk: bool) -> bytes:
    """Account for each event of a batch that needs it; what is left of it for the client."""
    found = [at for marker in _TO_READ if (at := batch.find(marker)) >= 0]
    cut = batch.rfind(b"\n\n", 0, min(found)) if found else -1
    start = cut + 2 if cut >= 0 else 0  # where the first event that needs reading begins
    plain = batch[:start]
    outcome.events += plain.count(b"\n\n")
    kept = [plain]
    for event in batch[start:].split(b"\n\n")[:-1]:
        data = event_data(event)
        if data == b"[DONE]":
            outcome.completed = True
            kept.append(DONE_EVENT)
            break  # nothing after it is relayed
        outcome.events += 1
        if data is not None and b'"finish_reason"' in data:
            outcome.finish_reasons += finish_reasons(orjson.loads(data))
        if data is not None and b'"usage"' in data:
            chunk = orjson.loads(data)
            if isinstance(chunk, dict) and chunk.get("usage"):
                outcome.usage = chunk["usage"]
                if strip_usage_chunk and not chunk.get("choices"):
                    continue
        kept.append(event + b"\n\n")
    return b"".join(kept)


async def iter_event_batches(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The complete SSE events of a byte stream, as they arrive: each item is all the events
    one read completed, each ending in a blank line (CRLFs made LFs).

    Events that arrive together leave together, in one write to the client instead of one
    each; no event ever waits for another.
    """
    buffer = b""
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
    client_status = status if status < 500 or status == 503 else 502
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
