"""State of one sim app: engine, faults, counters, and the control endpoints that expose them."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.sim.asgi import (
    abort_connection,
    read_body,
    reset_connection,
    send_json,
    wait_for_disconnect,
    wait_forever,
)
from gateway.sim.engine import SimEngine
from gateway.sim.faults import FaultConfig, FaultKind
from gateway.sim.metrics import METRICS_CONTENT_TYPE, SimMetrics
from gateway.sim.profile import SimProfile
from gateway.sim.protocol import SimRequestError, chat_prompt, parse_json_object
from gateway.sim.quirks import QUIRKS, Quirks
from gateway.sim.shapes import error_body, models_body
from gateway.sim.tokens import count_tokens, token_ids

__all__ = ["SimService", "SimStats"]

_JSON = "application/json"
# The W3C trace context headers kept from the last inference requests, for tests that
# check what a gateway forwarded (`GET /admin/traces`).
_TRACE_HEADERS = (b"traceparent", b"tracestate")
_KEPT_TRACES = 100


class _ModelRequest(Protocol):
    @property
    def model(self) -> str | None: ...


_RequestT = TypeVar("_RequestT", bound=_ModelRequest)


@dataclass(slots=True)
class SimStats:
    """Counters of the inference endpoints (completions, chat completions, embeddings)."""

    requests_total: int = 0
    requests_completed: int = 0
    # The client went away before its response was finished.
    requests_cancelled: int = 0
    # Refused (4xx) or failed on purpose by an injected fault.
    requests_failed: int = 0


class SimService:
    """Everything one sim app owns; built by `build_sim_app`, reachable as `app.state.sim`."""

    def __init__(
        self, profile: SimProfile, faults: FaultConfig | None = None, quirks: Quirks | None = None
    ) -> None:
        self.profile = profile
        self.quirks = quirks or QUIRKS["vllm"]
        self.engine = SimEngine(profile)
        self.metrics = SimMetrics(self.engine, self.quirks.metrics or "vllm")
        self.stats = SimStats()
        self.last_request: dict[str, object] | None = None
        self.traces: deque[dict[str, str]] = deque(maxlen=_KEPT_TRACES)
        self.created = int(time.time())
        self._faults = faults or FaultConfig()
        self._fault_rng = _fault_rng(profile.seed)
        self._inflight: set[asyncio.Future[None]] = set()
        self._closing = False

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    @faults.setter
    def faults(self, faults: FaultConfig) -> None:
        self._faults = faults
        self._fault_rng = _fault_rng(self.profile.seed)

    def draw_fault(self) -> FaultKind | None:
        return self._faults.draw(self._fault_rng)

    def check_model(self, model: str | None) -> None:
        """404 for a model this replica does not serve; a missing model means the served one.

        Servers that serve one model whatever the name (llama.cpp, SGLang) accept any.
        """
        if model is not None and model != self.profile.model and self.quirks.check_model:
            raise SimRequestError(
                f"The model `{model}` does not exist. This server serves `{self.profile.model}`.",
                status=404,
                param="model",
                code="model_not_found",
                validation=False,
            )

    def note_trace(self, scope: Scope) -> None:
        """Keep an inference request's trace context headers, if it sent any."""
        headers = {
            name.decode(): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _TRACE_HEADERS
        }
        if headers:
            self.traces.append(headers)

    # -- answering --------------------------------------------------------------------------

    async def accept(
        self,
        receive: Receive,
        send: Send,
        parse: Callable[[dict[str, object]], _RequestT],
        *,
        error_shape: Callable[[int, SimRequestError], bytes] | None = None,
    ) -> _RequestT | None:
        """Read, record and validate one inference request; None once it has been answered.

        `error_shape` shapes the refusal for endpoints of another API (Anthropic's Messages).
        """
        self.stats.requests_total += 1
        raw = await read_body(receive)
        if raw is None:
            self.stats.requests_cancelled += 1
            return None
        try:
            body = parse_json_object(raw)
            self.last_request = body
            request = parse(body)
            self.check_model(request.model)
        except SimRequestError as error:
            await self.send_error(send, error, error_shape=error_shape)
            return None
        return request

    async def send_error(
        self,
        send: Send,
        error: SimRequestError,
        *,
        fault: bool = False,
        error_shape: Callable[[int, SimRequestError], bytes] | None = None,
    ) -> None:
        """Answer `error` with the status and body the server kind would.

        Injected faults keep OpenAI's shape whatever the kind: they stand for whatever sits
        in front of a server (a proxy's 429, a crashed worker), not for the server's own code.
        """
        self.stats.requests_failed += 1
        status = error.status
        if fault:
            body = error_body(error.message, error.type, error.param, error.code)
        else:
            if error.validation and status == 400:
                status = self.quirks.validation_status
            if error_shape is not None:
                body = error_shape(status, error)
            else:
                body = self.quirks.error_body(
                    status, error.message, error.type, error.param, error.code
                )
        await send_json(send, status, body, error.headers)

    async def inject_fault(
        self, kind: FaultKind, scope: Scope, receive: Receive, send: Send, *, can_stall: bool
    ) -> bool:
        """Answer the request with fault `kind`; False only for a stall the caller must stream."""
        if kind == "429":
            await self.send_error(send, _rate_limited(self._faults.retry_after_s), fault=True)
        elif kind in ("500", "503"):
            await self.send_error(send, _server_error(int(kind)), fault=True)
        elif kind == "reset":
            self.stats.requests_failed += 1
            await reset_connection(scope, receive)
        elif kind == "stall" and can_stall:
            return False
        else:  # hang, or a stall with no stream to stall: silence until the client leaves
            await self.run_watched(wait_forever(), scope, receive)
        return True

    async def run_watched(
        self, job: Coroutine[Any, Any, None], scope: Scope, receive: Receive
    ) -> None:
        """Run `job` (which sends the response) until it ends or the client disconnects.

        A disconnect cancels the job and counts the request as cancelled, whether it was queued,
        generating or hung on a fault. `close()` cancels the job too and drops the connection.
        """
        work = asyncio.ensure_future(job)
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        self._inflight.add(work)
        if self._closing:
            work.cancel()
        try:
            await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The server gave up on us (graceful shutdown timed out): take both tasks down too.
            work.cancel()
            watcher.cancel()
            raise
        finally:
            self._inflight.discard(work)
        if work.done() and not work.cancelled():
            watcher.cancel()
            work.result()  # re-raise the job's own error, if any
            return
        # The client went away, or close() cancelled the job.
        self.stats.requests_cancelled += 1
        work.cancel()
        await asyncio.wait((work,))
        if watcher.done():
            return
        if abort_connection(scope):
            await watcher  # the server must see the connection go, or it would answer a 500
        else:
            watcher.cancel()

    def close(self) -> None:
        """Cancel every request in flight, so a server can stop without waiting for hangs."""
        self._closing = True
        for work in self._inflight:
            work.cancel()

    # -- control endpoints ------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.quirks.health_delay_s:
            # SGLang's /health runs a one-token generation and checks for it after a second.
            await asyncio.sleep(self.quirks.health_delay_s)
        media_type = _JSON if self.quirks.health_body.startswith(b"{") else None
        return Response(self.quirks.health_body, status_code=200, media_type=media_type)

    async def tokenize(self, request: Request) -> Response:
        """The server kind's tokenize endpoint; counts agree with the usage the sim reports."""
        try:
            body = parse_json_object(await request.body())
            reply = _tokenize_reply(self.quirks, body, self.profile.max_model_len)
        except SimRequestError as error:
            status = self.quirks.validation_status if error.validation else error.status
            payload = self.quirks.error_body(
                status, error.message, error.type, error.param, error.code
            )
            return Response(payload, status, media_type=_JSON)
        return Response(orjson.dumps(reply), media_type=_JSON)

    async def models(self, request: Request) -> Response:
        body = models_body(
            model=self.profile.model, created=self.created, max_model_len=self.profile.max_model_len
        )
        return Response(body, media_type=_JSON)

    async def metrics_endpoint(self, request: Request) -> Response:
        if self.quirks.metrics is None:
            message = "This server does not support metrics endpoint."
            body = self.quirks.error_body(
                self.quirks.metrics_off_status, message, "not_supported_error", None, None
            )
            return Response(body, self.quirks.metrics_off_status, media_type=_JSON)
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def get_faults(self, request: Request) -> Response:
        return Response(self._faults.model_dump_json(), media_type=_JSON)

    async def set_faults(self, request: Request) -> Response:
        try:
            self.faults = FaultConfig.model_validate_json(await request.body())
        except ValidationError as exc:
            message = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"
                for error in exc.errors()
            )
            return Response(error_body(message, "invalid_request_error"), 400, media_type=_JSON)
        return Response(self._faults.model_dump_json(), media_type=_JSON)

    async def traces_endpoint(self, request: Request) -> Response:
        """The trace headers of the last inference requests that sent any, oldest first."""
        return Response(orjson.dumps(list(self.traces)), media_type=_JSON)

    async def stats_endpoint(self, request: Request) -> Response:
        stats = self.stats
        body = {
            "requests_total": stats.requests_total,
            "requests_completed": stats.requests_completed,
            "requests_cancelled": stats.requests_cancelled,
            "requests_failed": stats.requests_failed,
            "running": self.engine.running,
            "waiting": self.engine.waiting,
            # The prefix cache whatever the server kind, whose metrics may not show it.
            "kv_cache": {
                "blocks": self.engine.kv.capacity,
                "blocks_in_use": self.engine.kv.blocks_in_use,
                "cached_blocks": self.engine.kv.cached_blocks,
                "prefix_cache_queries": self.engine.kv.queries,
                "prefix_cache_hits": self.engine.kv.hits,
            },
            "last_request": self.last_request,
        }
        return Response(orjson.dumps(body), media_type=_JSON)


def _tokenize_reply(quirks: Quirks, body: dict[str, object], max_model_len: int) -> object:
    """Tokenize a request body shaped as the server kind's tokenize endpoint expects."""
    style = quirks.tokenize
    if style == "llama_cpp":
        # llama.cpp: {"content": str} -> {"tokens": [int]} (pieces only when asked).
        content = body.get("content")
        if not isinstance(content, str):
            raise SimRequestError('"content" must be provided', param="content")
        return {"tokens": token_ids(content)}
    if style == "llama_cpp_python":
        # llama-cpp-python /extras/tokenize/count: {"input": str, "model"?} -> {"count": int}.
        text = body.get("input")
        if not isinstance(text, str):
            raise SimRequestError("input: Field required", param="input")
        return {"count": count_tokens(text)}
    # vLLM and SGLang: {"model"?, "prompt": str} -> {"count", "max_model_len", "tokens"};
    # vLLM also takes {"messages"} and counts the chat template as the completion would.
    messages = body.get("messages")
    if messages is not None and style == "vllm":
        text, count = chat_prompt(messages, body.get("tools"))
        tokens = token_ids(text, count)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise SimRequestError("prompt: Field required", param="prompt")
        tokens = token_ids(prompt)
    reply: dict[str, object] = {
        "count": len(tokens),
        "max_model_len": max_model_len,
        "tokens": tokens,
    }
    if style == "vllm":
        reply["token_strs"] = None
    return reply


def _fault_rng(seed: int) -> random.Random:
    # A fresh RNG per fault config, so a given config always fails the same requests.
    return random.Random(f"faults:{seed}")


def _rate_limited(retry_after_s: float) -> SimRequestError:
    return SimRequestError(
        f"Rate limit reached; retry after {retry_after_s:g}s.",
        status=429,
        type="requests",
        code="rate_limit_exceeded",
        # OpenAI sends both: whole seconds for generic clients, milliseconds for its own SDK.
        headers=(
            (b"retry-after", str(math.ceil(retry_after_s)).encode()),
            (b"retry-after-ms", str(round(retry_after_s * 1000)).encode()),
        ),
    )


def _server_error(status: int) -> SimRequestError:
    message = (
        "The server had an error while processing your request."
        if status == 500
        else "The engine is currently overloaded, please try again later."
    )
    return SimRequestError(message, status=status, type="server_error")
