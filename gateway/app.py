"""The Starlette app: wires the stages together once, and the request path top to bottom.

About 500 lines: `Gateway.generate` and its stages (docs/architecture.md maps them) read
in order here, with the ASGI wiring around them (`GatewayApp`, `build_app`, the error
handlers); admin routes live in `gateway.admin`, the server in `gateway.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.admin import Admin
from gateway.api.dialect_routes import DialectRoutes
from gateway.api.disconnect import unless_client_leaves
from gateway.api.errors import error_response, internal_error
from gateway.api.feedback_route import post_feedback
from gateway.api.openapi import openapi_document
from gateway.api.reply import EVENT_STREAM, JSON, Reply
from gateway.api.request import ParsedRequest, checked_request, read_json_object, read_request
from gateway.api.schemas import RequestKind
from gateway.api.streaming import EventStreamResponse
from gateway.auth import Caller, tier_forbidden
from gateway.backend_api import mode
from gateway.backend_api.passthrough import NativeResponses, passthrough
from gateway.budgets.errors import QuotaExceeded
from gateway.budgets.plan import downgrade_order
from gateway.cache.plan import CACHE_HEADER, NATIVE_BYPASS, bypassed
from gateway.cache.replay import render_events, render_json
from gateway.dialects import Dialect, DialectContext, Translation
from gateway.dialects.context_edits import edit_context
from gateway.dialects.messages import MessagesDialect
from gateway.dialects.responses import ResponsesDialect, ResponseTranslation
from gateway.dispatch import SHED_CODES, Dispatched
from gateway.errors import InvalidRequest, TriageError, UpstreamUnavailable
from gateway.exchange import OVERHEAD_HEADER, Exchange, new_request_id
from gateway.policy import PolicyError, load_policy
from gateway.router import AUTO, Decision, RouteInput
from gateway.runtime import Runtime, Stores, build_runtime
from gateway.server import handle_signals
from gateway.simulated import SimulatedFleet
from gateway.slo import FirstByteTracker
from gateway.store import StoreUnavailable
from gateway.telemetry import RequestRecord, Telemetry
from gateway.tokenize import Tokenizer
from gateway.upstream import DONE_EVENT, Upstream, finish_reasons

__all__ = ["FORWARDED_HEADERS", "Gateway", "GatewayApp", "build_app", "header_map", "logger"]

logger = logging.getLogger("triage")

FORWARDED_HEADERS = ("traceparent", "tracestate")


class Gateway:
    """Holds the live runtime and the shared clients; its methods are the endpoints."""

    def __init__(self, policy_path: Path) -> None:
        self.policy_path = policy_path
        self.fleet = SimulatedFleet()
        self.stores = Stores()
        self.first_bytes = FirstByteTracker()  # hedge delays, kept across reloads
        self._runtime: Runtime | None = None
        self._upstream: Upstream | None = None
        self._reload_lock = asyncio.Lock()
        self._telemetry: Telemetry | None = None
        self._openapi = openapi_document()
        self.tokenizer = Tokenizer()  # counts usage a backend did not report

    @property
    def telemetry(self) -> Telemetry:
        assert self._telemetry is not None, "the lifespan has not started"
        return self._telemetry

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "the lifespan has not started"
        return self._runtime

    @property
    def upstream(self) -> Upstream:
        assert self._upstream is not None, "the lifespan has not started"
        return self._upstream

    # --- lifecycle -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        policy = load_policy(self.policy_path)
        server = policy.server
        self._telemetry = Telemetry(policy.telemetry)
        self._upstream = Upstream.open(
            server.upstream_connections_per_replica,
            server.upstream_timeout_s,
            server.upstream_connect_timeout_s,
        )
        self._runtime = await build_runtime(
            policy,
            self.policy_path.parent,
            self.fleet,
            self.stores,
            self.upstream,
            self.first_bytes,
        )
        self.runtime.start()
        self.telemetry.bind(policy, self.runtime.pools)
        handle_signals(self.reload)
        # What start-up built (policy, classifier vocabulary, metric families) lives as long
        # as the process: out of the collector's sight, a full collection no longer walks
        # ~80k objects mid-request (p99 at concurrency 32: 55-74 ms -> 31-51 ms, A/B run).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await self.telemetry.close()
            await self.runtime.close()
            await self.upstream.close()
            await self.tokenizer.close()
            await self.fleet.stop()
            await self.stores.close()

    async def reload(self) -> list[str]:
        """Load the policy file again and start it; keep the old one, and return why, when
        the policy, its classifier file or its feedback path will not do. A rejected
        reload leaves nothing running: building starts nothing (`gateway.runtime`)."""
        async with self._reload_lock:
            try:
                policy = load_policy(self.policy_path)
                runtime = await build_runtime(
                    policy,
                    self.policy_path.parent,
                    self.fleet,
                    self.stores,
                    self.upstream,
                    self.first_bytes,
                    self._runtime,
                )
                runtime.start()
            except PolicyError as exc:
                logger.error("policy reload rejected, keeping the current policy:\n%s", exc)
                return exc.errors
            old, self._runtime = self._runtime, runtime
            self.telemetry.bind(policy, runtime.pools)
            if old is not None:
                await old.close()
            logger.info("policy reloaded from %s", self.policy_path)
            return []

    # --- the request path ------------------------------------------------------------

    async def generate(
        self, request: Request, kind: RequestKind, dialect: Dialect | None = None
    ) -> ASGIApp:
        """The request path: admit, cache, reserve, forward. Answers every failure itself,
        in the client's API's shape (OpenAI's, or `dialect`'s), with the request recorded
        either way."""
        runtime = self.runtime  # this request keeps this policy to the end
        headers = header_map(request)
        record = self.telemetry.start(kind, headers, new_request_id())
        exchange: Exchange | None = None
        try:
            exchange = await self._admit(runtime, request, headers, kind, record, dialect)
            hit = await self._cache_lookup(runtime, exchange, headers)
            if hit is not None:
                await exchange.finish()
                return hit
            try:
                await self._reserve(runtime, exchange)
                forward = self._forward(runtime, exchange, headers)
                if exchange.parsed.stream:
                    return await forward  # EventStreamResponse watches for a disconnect
                return await unless_client_leaves(request.scope, request.receive, forward)
            except BaseException as error:
                record.fail(error)
                record.shed = isinstance(error, TriageError) and error.code in SHED_CODES
                await exchange.finish()
                raise
        except TriageError as error:
            record.fail(error)
            self.telemetry.finish(record)
            return _error_answer(error, _error_headers(record, exchange), dialect)
        except Exception as error:
            # A bug, not a client error: answer in the client's shape and still account for it.
            logger.exception("unexpected error in request %s", record.request_id)
            record.fail(error)
            self.telemetry.finish(record)
            return _error_answer(internal_error(), _error_headers(record, exchange), dialect)

    async def _admit(
        self,
        runtime: Runtime,
        request: Request,
        headers: Mapping[str, str],
        kind: RequestKind,
        record: RequestRecord,
        dialect: Dialect | None = None,
    ) -> Exchange:
        """Parse, authenticate and route: everything decided before any state is touched.
        A dialect's request is authenticated before it is translated: a stored Responses
        conversation it continues belongs to a tenant."""
        limit = runtime.policy.server.max_body_bytes
        translation = None
        if dialect is None:
            parsed = await read_request(request, kind, limit, headers)
            record.requested(parsed)
            caller = self._authenticate(runtime, headers, record)
        else:
            body = await read_json_object(request, limit)
            caller = self._authenticate(runtime, headers, record)
            context = DialectContext(record.request_id, caller.tenant)
            conversation = None
            if isinstance(dialect, ResponsesDialect):
                body, conversation = await _expanded(dialect, body, context, runtime)
            elif isinstance(dialect, MessagesDialect):
                body, edits = edit_context(body)
                context = dataclasses.replace(context, context_edits=edits)
            chat = dialect.parse(body)
            parsed = checked_request(chat, kind, headers, dialect.name, body, conversation)
            record.requested(parsed)
            translation = dialect.translation(body, context)
        with record.trace.span("triage.route"):
            decision = self.route(runtime, parsed, caller, headers)
        record.routed(decision)
        telemetry, prices, ledger = self.telemetry, runtime.prices, runtime.ledger
        return Exchange(
            parsed, caller, decision, record, telemetry, prices, ledger,
            feedback=runtime.feedback, translation=translation,
        )  # fmt: skip

    def _authenticate(
        self, runtime: Runtime, headers: Mapping[str, str], record: RequestRecord
    ) -> Caller:
        with record.trace.span("triage.auth"):
            caller = runtime.auth.authenticate(headers)
        record.tenant = caller.tenant
        return caller

    def route(
        self,
        runtime: Runtime,
        parsed: ParsedRequest,
        caller: Caller,
        headers: Mapping[str, str],
        tokens: int | None = None,
    ) -> Decision:
        """Where `parsed` goes, among the tiers the caller may use (PermissionDenied if the
        chosen tier is not one); `tokens`, the prompt's size if known better than by
        `estimated_prompt_tokens`. Decides only: nothing is reserved, sent or recorded."""
        if parsed.kind == "embeddings" and parsed.model == AUTO:
            raise InvalidRequest("Embeddings need a model or tier name, not 'auto'.", param="model")
        if tokens is None:
            tokens = parsed.estimated_prompt_tokens()
        tier = parsed.hints.tier
        route = RouteInput(parsed.model, parsed.body, headers, tokens, parsed.kind, tier)
        decision = runtime.router.decide(route)
        allowed = decision.restricted_to(caller.may_use)
        if allowed is None:
            raise tier_forbidden(caller, decision.tier)
        return allowed

    async def _cache_lookup(
        self, runtime: Runtime, exchange: Exchange, client_headers: Mapping[str, str]
    ) -> ASGIApp | None:
        """A cached answer as the client asked for it, or None (with a recorder set up)."""
        tier, model = exchange.decision.candidates[0]
        parsed = exchange.parsed
        plan = runtime.cache.plan(
            scope=exchange.caller.cache_scope,
            tier=tier,
            model=model,
            kind=parsed.kind,
            body=parsed.body,
            headers=client_headers,
            dialect=parsed.dialect,
        )
        native = mode(runtime.pools[model].api, parsed.dialect) == "native"
        if native and (plan.lookup or plan.store):
            plan = bypassed(parsed.kind, model, NATIVE_BYPASS)  # the backend speaks it
        with exchange.record.trace.span("triage.cache.lookup"):
            found = await runtime.cache.lookup(plan)
        exchange.plan, exchange.recorder = plan, found.recorder
        exchange.headers[CACHE_HEADER] = found.status
        exchange.record.cache = found.status.value
        entry = found.entry
        if entry is None:
            return None
        exchange.record.served(tier, entry.model, "")
        exchange.record.finish_reasons = finish_reasons(entry.response)
        if entry.usage is not None and entry.model in runtime.prices:
            saved = runtime.prices[entry.model].cost(
                entry.usage.prompt_tokens, entry.usage.completion_tokens
            )
            exchange.record.saved_usd = saved
        exchange.overhead_header()
        headers = {**exchange.headers, "x-triage-tier": tier, "x-triage-model": entry.model}
        translation = exchange.translation
        if parsed.stream:
            events = b"".join(render_events(entry, parsed.client_wants_usage))
            if translation is not None:
                events = translation.events(events)
            return Reply(events, EVENT_STREAM, headers, after=self._after(exchange, None))
        payload = render_json(entry)
        if translation is not None:
            payload = translation.json(payload)
        return Reply(payload, JSON, headers, after=self._after(exchange, None))

    async def _reserve(self, runtime: Runtime, exchange: Exchange) -> None:
        """Hold the worst-case cost; where the policy says so, move down a tier to fit."""
        if not runtime.policy.has_quotas:
            return  # no budget or limit anywhere: nothing to hold (the router checked access)
        decision, parsed, policy = exchange.decision, exchange.parsed, runtime.policy
        refused: QuotaExceeded | None = None
        with exchange.record.trace.span("triage.budget.reserve"):
            for tier in downgrade_order(policy, decision.tier, parsed.kind):
                if not exchange.caller.may_use(tier):
                    continue
                try:
                    exchange.reservation = await runtime.ledger.reserve(
                        request_id=exchange.record.request_id,
                        caller=exchange.caller,
                        tier=tier,
                        price=runtime.tier_prices[tier],
                        prompt_tokens=parsed.estimated_prompt_tokens(),
                        max_tokens=parsed.max_tokens,
                        choices=parsed.choices,
                    )
                except QuotaExceeded as exc:
                    if exc.on_exhausted == "reject" or decision.reason == "model":
                        raise
                    refused = exc
                    continue
                break
            else:
                raise refused or tier_forbidden(exchange.caller, decision.tier)
        assert exchange.reservation is not None
        exchange.headers.update(exchange.reservation.headers())
        for tenant, tier_name, window, usd in exchange.reservation.budgets_left():
            self.telemetry.budget_remaining(tenant, tier_name, window, usd)
        if tier != decision.tier:
            exchange.decision = runtime.router.downgraded(decision, tier)
            exchange.headers["x-triage-downgraded"] = f"{decision.tier}->{tier}"
            exchange.record.budget_downgraded = True

    async def _forward(
        self, runtime: Runtime, exchange: Exchange, client_headers: Mapping[str, str]
    ) -> ASGIApp:
        """Get an answer from the decision's candidates: SLO admission, retries, hedging."""
        headers = {h: client_headers[h] for h in FORWARDED_HEADERS if h in client_headers}
        record = exchange.record
        # SLO deadlines count from the request's arrival (the record's clock is perf_counter).
        arrived = time.monotonic() - (time.perf_counter() - record.started_at)
        waited = time.perf_counter()
        try:
            with record.trace.span("triage.dispatch"):
                dispatched = await runtime.dispatcher.dispatch(
                    exchange.decision,
                    exchange.parsed,
                    headers,
                    tenant_priority=exchange.caller.settings.priority,
                    started=arrived,
                    max_tokens_cap=exchange.max_tokens_cap,
                    trace=record.trace,
                )
        finally:  # the error answer's overhead leaves out the wait too
            exchange.upstream_s += time.perf_counter() - waited
        exchange.served_by(dispatched)
        return await self._respond(exchange, dispatched)

    async def _respond(self, exchange: Exchange, dispatched: Dispatched) -> ASGIApp:
        """The answer for the client. `exchange.finish` runs once it is sent: a stream's
        when it ends however it ends (`on_close`), a JSON body's after its last byte; a
        body that fails to arrive is finished by `generate`, as every other error is."""
        exchange.tokenizer = self.tokenizer
        native = dispatched.mode == "native"
        if native:  # the backend speaks the client's API: its answer goes as it was sent
            exchange.translation = self._passthrough(exchange)
        if exchange.parsed.stream:
            if not (native or dispatched.pool.backend.stream_usage):
                exchange.kept = []  # to count its usage from when it ends
            exchange.overhead_header()
            events = self._relay(exchange, dispatched)
            translation = exchange.translation
            if translation is None:
                return EventStreamResponse(events, exchange.headers, on_close=exchange.finish)
            return EventStreamResponse(
                _translated(events, translation.events),
                exchange.headers,
                on_close=self._after(exchange, exchange.finish),
                error_event=translation.error_event,
            )
        waited = time.perf_counter()
        payload = await dispatched.read(exchange.outcome)
        exchange.upstream_s += time.perf_counter() - waited
        if exchange.recorder is not None and not native:
            exchange.recorder.feed_body(payload)
        exchange.record.response_body = payload
        exchange.overhead_header()
        # Commit, settle and record after the client has its answer (and its disconnect
        # watch has ended: nothing cancels this task now).
        if exchange.translation is None:
            finish = functools.partial(exchange.finish, shielded=False)
            return Reply(payload, JSON, exchange.headers, after=finish)
        answer = exchange.translation.json(payload)
        finish = functools.partial(exchange.finish, shielded=False)
        return Reply(answer, JSON, exchange.headers, after=self._after(exchange, finish))

    def _passthrough(self, exchange: Exchange) -> Translation:
        """The client's side of a native answer, in place of its dialect's translation."""
        parsed = exchange.parsed
        assert parsed.native_body is not None, "a dialect's request keeps its own body"
        context = DialectContext(exchange.record.request_id, exchange.caller.tenant)
        return passthrough(parsed.dialect, parsed.native_body, context)

    def _after(
        self, exchange: Exchange, finish: Callable[[], Awaitable[None]] | None
    ) -> Callable[[], Awaitable[None]]:
        """What runs once a dialect's answer is sent: `finish` (None for a cache hit,
        finished already), then a Responses answer is stored for its tenant."""

        async def after() -> None:
            if finish is not None:
                await finish()
            if exchange.parsed.dialect == "responses":
                await self._store_response(exchange)

        return after

    async def _store_response(self, exchange: Exchange) -> None:
        translation = exchange.translation
        assert isinstance(translation, ResponseTranslation | NativeResponses)
        stored = translation.stored()
        if stored is None:
            return
        # A continuation joins its conversation; a first response starts one.
        stored["conversation"] = exchange.parsed.conversation or stored["id"]
        try:
            await self.runtime.response_store.save(exchange.caller.tenant, stored)
        except StoreUnavailable:
            logger.warning(
                "response %s not stored: the store is unavailable", exchange.record.request_id
            )

    async def _relay(self, exchange: Exchange, dispatched: Dispatched) -> AsyncIterator[bytes]:
        """The stream for the client, as the cache and the usage count need it: a usage
        chunk the client asked for that the backend did not send is counted and added."""
        native = dispatched.mode == "native"  # not chat events: nothing to add or record
        wants_usage = exchange.parsed.client_wants_usage and not native
        recorder, outcome, kept = exchange.recorder, exchange.outcome, exchange.kept
        if native:
            recorder = None
        relay = dispatched.relay(outcome, strip_usage_chunk=not wants_usage)
        async with contextlib.aclosing(relay) as events:
            async for event in events:
                if kept is not None:
                    kept.append(event)
                if wants_usage and outcome.completed and outcome.usage is None:
                    # The backend ignored `stream_options`: the usage chunk goes before [DONE].
                    head = event.removesuffix(DONE_EVENT)
                    if head:
                        if recorder is not None:
                            recorder.feed_event(head)
                        yield head
                    await exchange.count_usage()
                    event = exchange.usage_event() + DONE_EVENT
                if recorder is not None:
                    recorder.feed_event(event)
                yield event

    # --- everything else ---------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        policy = self.runtime.policy
        aliases = [name for name in policy.aliases if "*" not in name]
        names = [AUTO, *policy.tiers, *policy.models, *aliases]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "triage"} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    async def metrics(self, request: Request) -> Response:
        return await self.telemetry.metrics_endpoint(request)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        tiers = self.runtime.ready()
        ready = all(tiers.values())
        return JSONResponse({"ready": ready, "tiers": tiers}, status_code=200 if ready else 503)


async def _expanded(
    dialect: ResponsesDialect, body: dict[str, Any], context: DialectContext, runtime: Runtime
) -> tuple[dict[str, Any], str | None]:
    """The Responses body with the stored conversation it continues put before it, and
    that conversation's id."""
    try:
        return await dialect.expand(body, context, runtime.response_store)
    except StoreUnavailable as exc:
        raise UpstreamUnavailable(
            "The response store is unavailable; retry the request.", code="store_unavailable"
        ) from exc


async def _translated(
    events: AsyncIterator[bytes], translate: Callable[[bytes], bytes]
) -> AsyncIterator[bytes]:
    """A chat stream as a dialect's: each batch translated, empty results skipped."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for batch in events:
            out = translate(batch)
            if out:
                yield out


def _error_answer(error: TriageError, headers: dict[str, str], dialect: Dialect | None) -> Response:
    """`error` in the client's API's shape: OpenAI's, or its dialect's."""
    if dialect is None:
        return error_response(error, headers)
    answer = dialect.error(error)
    return Response(
        answer.body,
        status_code=answer.status,
        headers={**headers, **answer.headers},
        media_type="application/json",
    )


def _overhead(started: float, upstream_s: float = 0.0) -> str:
    """`x-triage-overhead-ms`: the gateway's own time since `started` (a perf_counter
    reading), `upstream_s` spent waiting on backends left out (as `Exchange` counts it)."""
    return f"{(time.perf_counter() - started - upstream_s) * 1000:.3f}"


def _error_headers(record: RequestRecord, exchange: Exchange | None) -> dict[str, str]:
    upstream_s = 0.0 if exchange is None else exchange.upstream_s
    return {
        "x-triage-request-id": record.request_id,
        OVERHEAD_HEADER: _overhead(record.started_at, upstream_s),
    }


def _with_overhead(send: Send) -> Send:
    """`send`, the answer's headers given `x-triage-overhead-ms`: for the routes other than
    the generation ones, which call no backend, so their time is all the gateway's own."""
    started = time.perf_counter()
    name = OVERHEAD_HEADER.encode()

    async def timed(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (name, _overhead(started).encode())]
            message = {**message, "headers": headers}
        await send(message)

    return timed


def header_map(request: Request) -> dict[str, str]:
    """The request's headers as a dict, built once: Starlette's `Headers` scans its list
    on every lookup, and the request path looks up a dozen. Of a repeated header the first
    wins, as with `Headers.get`."""
    raw = request.scope["headers"]
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(raw)}


class GatewayApp(Starlette):
    """Starlette, with the generation routes served straight from the top.

    Its router and middleware stack cost about 6 % of a request's CPU (py-spy, see
    bench/profile_gateway.py), and `Gateway.generate` already answers every failure in
    OpenAI's shape: for the three hot routes those layers add only cost. Everything else
    (admin, metrics, health, the lifespan) goes through Starlette as usual. `GENERATION`
    is the one table of the hot routes; Starlette knows their paths only to answer any
    other method with 405 (`build_app`).
    """

    GENERATION: dict[str, RequestKind] = {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completions",
        "/v1/embeddings": "embeddings",
    }

    DIALECTS: dict[str, Dialect] = {
        "/v1/messages": MessagesDialect(),
        "/v1/responses": ResponsesDialect(),
    }

    def __init__(self, gateway: Gateway, **settings: Any) -> None:
        super().__init__(**settings)
        self.gateway = gateway
        self.state.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            post = scope["method"] == "POST"
            kind = self.GENERATION.get(scope["path"]) if post else None
            dialect = self.DIALECTS.get(scope["path"]) if post and kind is None else None
            if kind is not None or dialect is not None:
                scope["app"] = self
                request = Request(scope, receive)
                response = await self.gateway.generate(request, kind or "chat", dialect)
                await response(scope, receive, send)
                return
            send = _with_overhead(send)
        await super().__call__(scope, receive, send)


def build_app(policy_path: str | Path) -> Starlette:
    """The ASGI app for one policy file. The policy loads in the lifespan."""
    gateway = Gateway(Path(policy_path))
    routes = [
        # POST never gets here (`GatewayApp.__call__`): these answer other methods 405.
        *(Route(path, _served_above, methods=["POST"]) for path in GatewayApp.GENERATION),
        *(Route(path, _served_above, methods=["POST"]) for path in GatewayApp.DIALECTS),
        *DialectRoutes(gateway).routes(),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/feedback", post_feedback, methods=["POST"]),
        Route("/metrics", gateway.metrics, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/readyz", gateway.readyz, methods=["GET"]),
        *Admin(gateway).routes(),
    ]
    app = GatewayApp(
        gateway,
        routes=routes,
        lifespan=gateway.lifespan,
        exception_handlers={
            TriageError: _triage_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    return app


async def _served_above(request: Request) -> Response:
    raise HTTPException(405)  # pragma: no cover - a POST is served by `GatewayApp.__call__`


async def _triage_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TriageError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = TriageError(exc.detail)
    error.status_code = exc.status_code
    error.error_type = "invalid_request_error"
    return error_response(error)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(internal_error())
