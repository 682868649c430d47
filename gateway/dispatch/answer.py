"""The dispatched answer: read whole or relayed as a stream, then finished once.

The answer owns the way back: `read()` and `relay()` take the replica's response to the
bytes the client gets (usage and finish reasons noted on the `Outcome`, the backend's
model name made the policy's, the usage chunk the client did not ask for left out), and
`finish()` hands the outcome to the dispatcher's `Books`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import orjson

from gateway.backend_api import Mode, mode
from gateway.backend_api.messages_answer import MessagesStream, chat_from_message
from gateway.backend_api.native import read_native, relay_native
from gateway.backend_api.responses_answer import ResponsesStream, chat_from_response
from gateway.dispatch.books import Books
from gateway.dispatch.job import Attempt, Job, Started, late_answer
from gateway.errors import TriageError, UpstreamError
from gateway.pools import Pool
from gateway.replica import Replica
from gateway.upstream import (
    DONE_EVENT,
    ModelRename,
    Outcome,
    event_data,
    finish_reasons,
    model_rename,
)

__all__ = ["Dispatched", "read_answer", "relay_events"]

_T = TypeVar("_T")
# Stream events per inter-token latency sample.
_ITL_SAMPLE_EVENTS = 8
_COALESCED_S = 0.0005


@dataclass(eq=False, slots=True)
class Dispatched:
    """The replica that answered and its response, headers read (for streams, the first
    event too). Call `finish(outcome)` exactly once when the response is done with, even
    when it failed or the client left: it lets the connection go, frees the replica and
    tells the balancer how the answer went."""

    tier: str  # the tier that serves it: the routed tier or one of its fallbacks
    pool: Pool
    replica: Replica
    hedged: bool
    attempts: int  # sends of this request: the first, retries and hedges
    _books: Books = field(repr=False)
    _job: Job = field(repr=False)
    _attempt: Attempt = field(repr=False)
    _started: Started = field(repr=False)
    _finished: bool = field(default=False, repr=False)

    @property
    def prefix_chars(self) -> int | None:
        """Prompt characters the prefix balancer expected cached on the replica that
        answered; None when no prefix balancer chose it."""
        return self._job.view.matched.get(self.replica.url)

    @property
    def mode(self) -> Mode:
        """How the pool that answered was spoken to: `native` when it speaks the client's
        own API (its answer goes to the client as sent), `translate` when its API is
        neither chat nor the client's (its answer is read as a chat answer), else `chat`."""
        return mode(self.pool.api, self._job.parsed.dialect)

    @property
    def retries(self) -> int:
        """Sends after the first that were not hedges."""
        return self._job.retries

    async def read(self, outcome: Outcome) -> bytes:
        """The whole (non-streamed) body, cut off at the request's e2e timeout, its
        `"model"` the policy's name; what it says, or how it failed, goes on `outcome`."""
        try:
            payload = await self.within_deadline(self._started.response.read())
            how, api = self.mode, self.pool.api
            if how == "native":
                return read_native(api, payload, outcome, self._rename())
            if how == "translate":
                payload = (
                    chat_from_message(payload)
                    if api == "messages"
                    else (chat_from_response(payload))
                )
            return read_answer(payload, outcome, self.pool.model)
        except TriageError as error:
            outcome.error = error  # the replica failed it: the balancer is told at finish
            raise

    def relay(self, outcome: Outcome, strip_usage_chunk: bool) -> AsyncGenerator[bytes, None]:
        """The stream for the client, a batch of events at a time (see `relay_events`).

        A stream that fails raises its `TriageError` (put on `outcome` first): the
        response that carries it to the client ends with an error event. A native stream
        is relayed as the backend sent it; a translated one as the chat stream it becomes.
        """
        how, api = self.mode, self.pool.api
        if how == "native":
            return relay_native(api, self.events(), outcome, self._rename())
        events: AsyncIterator[bytes] = self.events()
        if how == "translate":
            stream = MessagesStream() if api == "messages" else ResponsesStream()
            events = stream.translate(events)
        return relay_events(events, outcome, strip_usage_chunk, self._rename())

    def _rename(self) -> ModelRename | None:
        served, model = self.pool.served_name, self.pool.model
        return model_rename(served, model) if served != model else None

    def events(self) -> AsyncGenerator[bytes, None]:
        """The stream's raw event batches, starting with the one already read, as they
        arrive; each sampled for the replica's inter-token latency.

        A stream that outlives the request's e2e timeout ends with `UpstreamTimeout`.
        """
        started = self._started
        assert started.events is not None and started.first_event is not None, "not a stream"
        return self._paced(started.first_event, started.events)

    async def _paced(
        self, first: bytes, events: AsyncGenerator[bytes, None]
    ) -> AsyncGenerator[bytes, None]:
        timeout_at = self._job.deadline.e2e_timeout_at
        replica = self.replica
        progress = self._attempt.progress
        last = self._started.first_byte_at
        paced, paced_s = 0, 0.0
        try:
            progress.events = 1
            yield first
            while True:
                remaining = timeout_at - time.monotonic()
                try:
                    async with asyncio.timeout(
                        None if remaining == math.inf else max(remaining, 0)
                    ):
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    raise late_answer() from exc
                now = time.monotonic()
                # Events that come together (the role and first token, the finish and the
                # usage) are one decode step: count paced events only, in ITLs and lengths.
                if now - last >= _COALESCED_S:
                    progress.events += 1
                    paced += 1
                    paced_s += now - last
                    last = now
                if paced >= _ITL_SAMPLE_EVENTS:
                    # Learn the decode speed as it streams, not when the answer ends: a
                    # replica that turned slow is avoided a second later, not a minute.
                    replica.observe(now, itl_s=paced_s / paced)
                    paced, paced_s = 0, 0.0
                yield event
        finally:
            await events.aclose()

    async def within_deadline(self, work: Awaitable[_T]) -> _T:
        """`work` (reading a non-streamed body), cut off at the request's e2e timeout."""
        remaining = self._job.deadline.e2e_timeout_at - time.monotonic()
        if remaining == math.inf:
            return await work
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await work
        except TimeoutError as exc:
            raise late_answer() from exc

    def finish(self, outcome: Outcome) -> None:
        """Let the connection go (kept for reuse after a complete answer, dropped after
        one cut short, so the backend stops generating), free the replica, tell the
        balancer."""
        if self._finished:
            return
        self._finished = True
        response = self._started.response
        if outcome.completed and outcome.error is None:
            response.release()
        else:
            response.close()
        self._books.answered(self._job, self._attempt, outcome)


def read_answer(payload: bytes, outcome: Outcome, model: str | None = None) -> bytes:
    """A whole JSON answer, its usage and finish reasons noted on `outcome`, its `"model"`
    made `model` (the policy's name) if given."""
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


async def relay_events(
    batches: AsyncIterator[bytes],
    outcome: Outcome,
    strip_usage_chunk: bool,
    rename: ModelRename | None = None,
) -> AsyncGenerator[bytes, None]:
    """Relay SSE event batches (see `iter_event_batches`) as they arrive, noting usage,
    finish reasons and the end on `outcome`, the backend's model name replaced by `rename`.

    A stream cut short or garbled raises `TriageError`, set on `outcome.error` first.
    """
    try:
        async for batch in batches:
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
        raise
    except orjson.JSONDecodeError as exc:
        outcome.error = UpstreamError("The backend replica sent an event that is not JSON.")
        raise outcome.error from exc


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
