"""How Triage listens: uvicorn (uvloop, httptools) with the limits a gateway needs.

uvicorn's httptools protocol accepts headers of any size and count, and waits as long as
a client likes for the rest of a request: a few hundred slow clients pin as many sockets
and coroutines. Its server also re-raises the SIGTERM it handled once it has drained, so a
clean shutdown exits with -15. This module adds a header limit (431), a deadline to read
each request (408), the shutdown deadline streams watch (in worker processes too), and exit
status 0. It also tells each request when its connection is lost (`ConnectionLost`), which
saves the request a task that would wait on `receive` for it. Requests the HTTP parser
refuses get the API's JSON error (400, 413 or 505), not uvicorn's plain-text 400.

The app's signals live here too: SIGHUP reloads the policy, and a worker that reloaded
asks the supervisor of `--workers N` to replace every worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from gateway.api.disconnect import EXTENSION, ConnectionLost
from gateway.shutdown import SHUTDOWN, stream_deadline

__all__ = [
    "SUPERVISOR_PID",
    "ConnectionLimits",
    "GuardedHttpToolsProtocol",
    "handle_signals",
    "restart_workers",
    "serve",
    "start_deadline_on_exit_signals",
]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int  # request line and headers together
    max_headers: int
    client_timeout_s: float  # to send a whole request, from its first byte (or connecting)


class _HeadTooLarge(Exception):
    pass


# What llhttp's refusals (the messages of httptools' exceptions) are answered with, where
# 400 is not the right status; every other refusal is a 400 that quotes the parser.
_PARSER_REFUSALS = {
    "Invalid HTTP version": (
        505,
        "Only HTTP/1.1 and HTTP/1.0 are served here.",
        "http_version_not_supported",
    ),
    "Pause on PRI/Upgrade": (  # the HTTP/2 connection preface, sent without negotiation
        505,
        "HTTP/2 is not served here (no prior knowledge, no h2c): use HTTP/1.1.",
        "http_version_not_supported",
    ),
    "Content-Length overflow": (
        413,
        "The declared Content-Length is larger than any request this server accepts.",
        "request_too_large",
    ),
}


# How long a connection accepted just before shutdown has to start its first request:
# accept-to-first-byte is microseconds for a client that connected to send one.
_FIRST_REQUEST_GRACE_S = 1.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header limit, a request read deadline and a
    connection-lost signal per request."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_bytes = 0
        self._header_count = 0
        self._head_too_large = False
        self._reading = False  # between a request's first byte and its last
        self._head_read = False
        self._read_deadline: asyncio.TimerHandle | None = None
        self._last_request = False  # the server is shutting down: answer this one, then close
        self._unanswered: collections.deque[ConnectionLost] = collections.deque()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)
        while self._unanswered:
            self._unanswered.popleft().fire()

    # --- header limit: the parser's callbacks count, a refusal stops the parse ----------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._header_count = 0
        self._reading = True
        self._head_read = False
        if self._read_deadline is None or self._last_request:
            self._arm_read_deadline()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        limits = self.limits
        if self._head_bytes > limits.max_header_bytes or self._header_count > limits.max_headers:
            self._head_too_large = True
            raise _HeadTooLarge  # the parser stops; uvicorn answers via send_400_response

    def on_headers_complete(self) -> None:
        self._head_read = True
        super().on_headers_complete()
        cycle = self.cycle
        if self._last_request and cycle is not None:
            cycle.keep_alive = False
        if cycle is not None and cycle.scope is self.scope:  # not an upgrade: a request
            lost = ConnectionLost(on_watch=self.flow.resume_reading)
            self.scope.setdefault("extensions", {})[EXTENSION] = {"signal": lost}
            self._unanswered.append(lost)

    def on_response_complete(self) -> None:
        if self._unanswered:  # responses complete in request order, pipelined or not
            self._unanswered.popleft()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this from its `except httptools.HttpParserError` block: the
        exception being handled says what the parser refused."""
        if self._head_too_large:
            limits = self.limits
            self._refuse(
                431,
                f"Request headers exceed the limit of {limits.max_header_bytes} bytes "
                f"or {limits.max_headers} headers.",
                "request_header_fields_too_large",
            )
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # an answer is under way: another would corrupt it
            return
        reason = str(sys.exc_info()[1] or "").strip() or "unreadable request"
        status, message, code = _PARSER_REFUSALS.get(
            reason,
            (400, f"The request is not valid HTTP/1.1: {reason}.", "invalid_http_request"),
        )
        self._refuse(status, message, code)

    # --- graceful shutdown: a request on its way is answered, not cut off ---------------

    def shutdown(self) -> None:
        """Called by the server when it stops accepting. uvicorn closes every connection
        without a request in progress; that includes one it accepted a moment ago whose
        first request is still on the wire, and one whose next request is half read. Both
        clients see "server disconnected" and a POST is not retried: under `--workers N`
        a policy reload could do this to a request. Such a request is answered (with
        `connection: close`); a new connection that sends nothing soon is closed."""
        cycle = self.cycle
        between_requests = cycle is None or cycle.response_complete
        if between_requests and (self._reading or cycle is None):
            self._last_request = True
            if not self._reading:
                self._disarm_read_deadline()
                self._read_deadline = self.loop.call_later(
                    _FIRST_REQUEST_GRACE_S, self._read_deadline_passed
                )
            return
        super().shutdown()

    # --- read deadline: from a request's first byte to its last -----------------------

    def on_message_complete(self) -> None:
        self._reading = False
        self._disarm_read_deadline()
        super().on_message_complete()

    def _arm_read_deadline(self) -> None:
        self._disarm_read_deadline()
        self._read_deadline = self.loop.call_later(
            self.limits.client_timeout_s, self._read_deadline_passed
        )

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_deadline_passed(self) -> None:
        self._read_deadline = None
        cycle = self.cycle
        if not self._reading:
            self.transport.close()  # connected and sent nothing: nothing to answer
        elif self._head_read and cycle is not None and cycle.response_started:
            self.transport.close()  # answered before reading it all (a 413): just hang up
        else:
            self._refuse(408, "The request was not sent in time.", "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer in OpenAI's error shape and close: the connection is in an unknown state."""
        if self.transport.is_closing():
            return
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        body = orjson.dumps({"error": error})
        reason = HTTPStatus(status).phrase.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()


SUPERVISOR_PID = "TRIAGE_SUPERVISOR_PID"  # set by `triage serve --workers N` for its workers


def handle_signals(reload: Callable[[], Awaitable[object]]) -> None:
    """Wire an app into the signals of the server running it: SIGHUP calls `reload`, and
    SIGTERM / SIGINT start the streams' shutdown deadline (`start_deadline_on_exit_signals`).
    Called from the app's lifespan, on the server's loop; outside a uvicorn server (tests)
    only SIGHUP is wired, where the loop allows it."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    start_deadline_on_exit_signals()


def restart_workers() -> bool:
    """Under `--workers N`, ask the supervisor (SIGHUP) to replace every worker, each new
    one starting on the policy file as it is now; False when there is no supervisor."""
    supervisor = os.environ.get(SUPERVISOR_PID)
    if supervisor is None:
        return False
    os.kill(int(supervisor), signal.SIGHUP)
    return True


def start_deadline_on_exit_signals() -> None:
    """From now on, when the uvicorn server running this app is told to exit (SIGTERM,
    SIGINT), start the streams' shutdown deadline first (`gateway.shutdown`).

    Called from the app's lifespan, inside the server: it wraps the handlers the server
    installed, so it works the same in the worker processes of `--workers N`, where
    uvicorn runs a plain `uvicorn.Server`. Where no uvicorn server handles the signals
    (tests, other servers) it does nothing.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        server = getattr(handler, "__self__", None)
        if not isinstance(server, uvicorn.Server) or not callable(handler):
            continue
        grace = server.config.timeout_graceful_shutdown
        if grace is not None:
            wrapped = functools.partial(_deadline_then, handler, server, loop, grace)
            signal.signal(sig, wrapped)


def _deadline_then(
    handler: Callable[[int, FrameType | None], Any],
    server: uvicorn.Server,
    loop: asyncio.AbstractEventLoop,
    grace_s: float,
    sig: int,
    frame: FrameType | None,
) -> None:
    if not server.should_exit:
        SHUTDOWN.start(loop, stream_deadline(grace_s))
    handler(sig, frame)


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    workers: int,
    limits: ConnectionLimits,
    log_level: str,
    grace_s: int,
) -> None:
    """Run `app` (an ASGI app, or an import string when `workers` > 1) until stopped."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        loop="uvloop",
        http=functools.partial(GuardedHttpToolsProtocol, limits=limits),  # type: ignore[arg-type]
        timeout_graceful_shutdown=grace_s,
        env_file=None,
        # Triage reads no client address; X-Forwarded-* parsing was ~3 % of a request's CPU.
        proxy_headers=False,
    )
    # uvicorn re-raises the signal it handled once it has drained; with this handler in
    # place the re-raised SIGTERM is a no-op and the process exits 0.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    uvicorn.Server(config).run()
