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
from gateway.sim.protocol import SimRequestError, parse_json_object
from gateway.sim.shapes import error_body, models_body

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

    def __init__(self, profile: SimProfile, faults: FaultConfig | None = None) -> None:
        self.profile = profile
        self.engine = SimEngine(profile)
        self.metrics = SimMetrics(self.engine)
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
        """404 for a model this replica does not serve; a missing model means the served one."""
        if model is not None and model != self.profile.model:
            raise SimRequestError(
                f"The model `{model}` does not exist. This server serves `{self.profile.model}`.",
                status=404,
                param="model",
                code="model_not_found",
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
        self, receive: Receive, send: Send, parse: Callable[[dict[str, object]], _RequestT]
    ) -> _RequestT | None:
        """Read, record and validate one inference request; None once it has been answered."""
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
            await self.send_error(send, error)
            return None
        return request

    async def send_error(self, send: Send, error: SimRequestError) -> None:
        self.stats.requests_failed += 1
        body = error_body(error.message, error.type, error.param, error.code)
        await send_json(send, error.status, body, error.headers)

    async def inject_fault(
        self, kind: FaultKind, scope: Scope, receive: Receive, send: Send, *, can_stall: bool
    ) -> bool:
        """Answer the request with fault `kind`; False only for a stall the caller must stream."""
        if kind == "429":
            await self.send_error(send, _rate_limited(self._faults.retry_after_s))
        elif kind in ("500", "503"):
            await self.send_error(send, _server_error(int(kind)))
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
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        body = models_body(
            model=self.profile.model, created=self.created, max_model_len=self.profile.max_model_len
        )
        return Response(body, media_type=_JSON)

    async def metrics_endpoint(self, request: Request) -> Response:
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
            "last_request": self.last_request,
        }
        return Response(orjson.dumps(body), media_type=_JSON)


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
