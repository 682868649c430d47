"""The dialects' endpoints besides generation: Messages `count_tokens`, and reading or
deleting a stored Responses answer. Each answers in its dialect's error shape."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.errors import internal_error
from gateway.api.request import checked_request, read_json_object
from gateway.dialects import Dialect
from gateway.dialects.messages import MessagesDialect, count_tokens_estimate
from gateway.dialects.response_store import public
from gateway.dialects.responses import ResponsesDialect
from gateway.errors import NotFound, PermissionDenied, TriageError, UpstreamUnavailable
from gateway.store import StoreUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["DialectRoutes"]

_logger = logging.getLogger("triage")

_MESSAGES = MessagesDialect()
_RESPONSES = ResponsesDialect()
_STORE_DOWN = "The response store is unavailable; retry the request."


class DialectRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def routes(self) -> list[Route]:
        return [
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.get_response, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete_response, methods=["DELETE"]),
        ]

    async def count_tokens(self, request: Request) -> Response:
        """The prompt's tokens as the model it would route to counts them: its replica's
        tokenize endpoint where its kind of server has one, else the gateway's estimate.
        Never a host outside the policy."""
        return await _in_shape(_MESSAGES, self._count_answer(request))

    async def _count_answer(self, request: Request) -> Response:
        return _json({"input_tokens": await self._count(request)})

    async def _count(self, request: Request) -> int:
        gateway = self.gateway
        runtime = gateway.runtime
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await read_json_object(request, runtime.policy.server.max_body_bytes)
        caller = runtime.auth.authenticate(headers)
        chat = _MESSAGES.parse_count_tokens(body)
        parsed = checked_request(chat, "chat", headers, _MESSAGES.name)
        estimate = count_tokens_estimate(chat)
        try:
            decision = gateway.route(runtime, parsed, caller, headers, tokens=estimate)
        except PermissionDenied:
            return estimate  # a tier the caller may not use: its replicas are not asked
        pool = runtime.pools[decision.model]
        replica = pool.pick()
        if replica is None:
            return estimate
        counted = await gateway.tokenizer.prompt_tokens(parsed, pool, replica)
        return estimate if counted is None else counted

    async def get_response(self, request: Request) -> Response:
        return await _in_shape(_RESPONSES, self._read(request))

    async def delete_response(self, request: Request) -> Response:
        return await _in_shape(_RESPONSES, self._delete(request))

    async def _read(self, request: Request) -> Response:
        return _json(public(await self._stored(request)))

    async def _delete(self, request: Request) -> Response:
        await self._stored(request)
        response_id = request.path_params["response_id"]
        caller = self.gateway.runtime.auth.authenticate(_headers(request))
        try:
            await self.gateway.runtime.response_store.delete(caller.tenant, response_id)
        except StoreUnavailable as exc:
            raise UpstreamUnavailable(_STORE_DOWN, code="store_unavailable") from exc
        return _json({"id": response_id, "object": "response", "deleted": True})

    async def _stored(self, request: Request) -> dict[str, Any]:
        """The caller's stored response named in the path; another tenant's is not found."""
        runtime = self.gateway.runtime
        caller = runtime.auth.authenticate(_headers(request))
        response_id = request.path_params["response_id"]
        try:
            record = await runtime.response_store.load(caller.tenant, response_id)
        except StoreUnavailable as exc:
            raise UpstreamUnavailable(_STORE_DOWN, code="store_unavailable") from exc
        if record is None:
            raise NotFound(f"No response with id '{response_id}'.", param="response_id")
        return record


async def _in_shape(dialect: Dialect, answer: Awaitable[Response]) -> Response:
    """`answer`, or its failure in the dialect's error shape (a bug as its 500)."""
    try:
        return await answer
    except TriageError as error:
        return _error(dialect, error)
    except Exception:
        _logger.exception("unexpected error on a %s endpoint", dialect.name)
        return _error(dialect, internal_error())


def _headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


def _error(dialect: Dialect, error: TriageError) -> Response:
    answer = dialect.error(error)
    return Response(
        answer.body, answer.status, headers=dict(answer.headers), media_type="application/json"
    )
