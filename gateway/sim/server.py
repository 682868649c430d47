"""The sim's Starlette app and the ways to serve it: blocking, or inside a running event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.sim.asgi import SERVER_SEND_KEY
from gateway.sim.completions import CompletionEndpoint
from gateway.sim.embeddings import EmbeddingsEndpoint
from gateway.sim.faults import FaultConfig
from gateway.sim.messages import MessagesEndpoint, count_tokens_endpoint
from gateway.sim.profile import SimProfile
from gateway.sim.quirks import Quirks
from gateway.sim.responses import ResponsesEndpoint
from gateway.sim.service import SimService

__all__ = ["RunningSim", "build_sim_app", "serve_sim", "start_sim_server"]

# Hung and stalled requests are cancelled on shutdown; this only bounds anything else.
_GRACEFUL_SHUTDOWN_S = 1


class _SimApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Keep the server's own send (Starlette's middleware wraps it) for the `reset` fault.
        scope[SERVER_SEND_KEY] = send
        await super().__call__(scope, receive, send)


def build_sim_app(
    profile: SimProfile, faults: FaultConfig | None = None, quirks: Quirks | None = None
) -> Starlette:
    """An OpenAI server simulating one GPU replica; its state is `app.state.sim`.

    It behaves as vLLM does unless `quirks` names another kind of server: then only that
    server's health, metrics, tokenize and agent (Messages, Responses) endpoints exist, and its
    errors look like its own.
    """
    service = SimService(profile, faults, quirks)
    quirks = service.quirks
    routes = [
        Route("/v1/chat/completions", CompletionEndpoint(service, "chat"), methods=["POST"]),
        Route("/v1/completions", CompletionEndpoint(service, "completion"), methods=["POST"]),
        Route("/v1/embeddings", EmbeddingsEndpoint(service), methods=["POST"]),
        Route("/v1/models", service.models),
        *[Route(path, service.tokenize, methods=["POST"]) for path in quirks.tokenize_paths],
    ]
    if "messages" in quirks.native_apis:
        routes.append(Route("/v1/messages", MessagesEndpoint(service), methods=["POST"]))
        routes.append(Route("/v1/messages/count_tokens", _count_tokens(service), methods=["POST"]))
    if "responses" in quirks.native_apis:
        routes.append(Route("/v1/responses", ResponsesEndpoint(service), methods=["POST"]))
    if quirks.health_path is not None:
        routes.append(Route(quirks.health_path, service.health))
    if quirks.metrics is not None or quirks.metrics_off_status != 404:
        # llama.cpp's /metrics exists without --metrics, and answers 501.
        routes.append(Route("/metrics", service.metrics_endpoint))
    routes += [
        Route("/admin/faults", service.get_faults),
        Route("/admin/faults", service.set_faults, methods=["POST"]),
        Route("/admin/stats", service.stats_endpoint),
        Route("/admin/traces", service.traces_endpoint),
    ]
    app = _SimApp(routes=routes)
    app.state.sim = service
    return app


def _count_tokens(service: SimService) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await count_tokens_endpoint(service, request)

    return endpoint


def _service(app: Starlette) -> SimService:
    service = app.state.sim
    assert isinstance(service, SimService)
    return service


@dataclass
class RunningSim:
    """A sim server running as a task in the current event loop."""

    app: Starlette
    host: str
    port: int
    _server: uvicorn.Server = field(repr=False)
    _task: asyncio.Task[None] = field(repr=False)

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. `http://127.0.0.1:8001/v1`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def service(self) -> SimService:
        return _service(self.app)

    async def stop(self) -> None:
        """Stop serving; quick even with hung or stalled connections open (they are reset)."""
        self._server.should_exit = True
        await self._task


class _SimServer(uvicorn.Server):
    """A uvicorn server that cancels the sim's requests as soon as shutdown starts."""

    def __init__(self, config: uvicorn.Config, service: SimService, *, embedded: bool) -> None:
        super().__init__(config)
        self._sim = service
        self._embedded = embedded

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if self._embedded:
            # Inside someone else's process the signals are theirs: uvicorn would swap the
            # handlers in and out per server, leaving the wrong one behind.
            yield
            return
        with super().capture_signals():
            yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._sim.close()
        await super().shutdown(sockets)


def _quiet_http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's fastest HTTP protocol, with its access log off for this server only.

    uvicorn's own `access_log=False` silences the `uvicorn.access` logger process-wide, which
    would also mute a gateway serving in the same process.
    """
    base: type[asyncio.Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools missing: the pure-Python h11 protocol
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class _QuietProtocol(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False

    return _QuietProtocol


async def start_sim_server(
    profile: SimProfile,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: FaultConfig | None = None,
    quirks: Quirks | None = None,
) -> RunningSim:
    """Serve a sim from the current event loop; port 0 picks a free port. Stop it with `stop()`."""
    app = build_sim_app(profile, faults, quirks)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose
    # proto says TCP, and without it Nagle plus delayed ACKs add ~40 ms to every response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        http=_quiet_http_protocol(),
        lifespan="off",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        # Building a Config must not reconfigure the logging of the process it runs in.
        log_config=None,
    )
    server = _SimServer(config, _service(app), embedded=True)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"sim:{profile.model}")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises the startup error
            raise RuntimeError("sim server exited during startup")
        await asyncio.sleep(0.005)
    return RunningSim(app, host, sock.getsockname()[1], server, task)


def serve_sim(
    profile: SimProfile,
    host: str,
    port: int,
    faults: FaultConfig | None = None,
    quirks: Quirks | None = None,
) -> None:
    """Serve a sim until interrupted (blocking), with uvloop and httptools when installed."""
    app = build_sim_app(profile, faults, quirks)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_quiet_http_protocol(),
        lifespan="off",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    # uvicorn re-raises the Ctrl-C it handled once shutdown is done; it is not an error here.
    with contextlib.suppress(KeyboardInterrupt):
        _SimServer(config, _service(app), embedded=False).run()
