"""The admin endpoints, behind `server.admin_key`: reload the policy, empty the cache, read
a tenant's usage."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth import ANONYMOUS
from gateway.errors import AuthenticationFailed, NotFound, UpstreamUnavailable
from gateway.policy import hash_key
from gateway.server import restart_workers
from gateway.store import StoreUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["Admin"]


class Admin:
    """The admin endpoints of one gateway; each checks the admin key first."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def routes(self) -> list[Route]:
        return [
            Route("/admin/reload", self.reload, methods=["POST"]),
            Route("/admin/cache", self.cache_delete, methods=["DELETE"]),
            Route("/admin/tenants/{tenant}/usage", self.tenant_usage, methods=["GET"]),
        ]

    async def reload(self, request: Request) -> Response:
        """Reload this process's policy. Under `--workers N` the request reaches one worker:
        once the policy has loaded there, the supervisor is asked (SIGHUP) to replace every
        worker, each new one starting on the new policy, so no worker keeps the old one."""
        self._check(request)
        errors = await self._gateway.reload()
        if errors:
            return JSONResponse({"reloaded": False, "errors": errors}, status_code=400)
        return JSONResponse({"reloaded": True, "workers_restarting": restart_workers()})

    async def cache_delete(self, request: Request) -> Response:
        """`DELETE /admin/cache?tenant=T&model=M`: either, both, or neither (everything)."""
        self._check(request)
        runtime = self._gateway.runtime
        tenant = request.query_params.get("tenant")
        scope = None
        if tenant is not None:
            policy = runtime.policy
            settings = policy.auth.anonymous if tenant == ANONYMOUS else policy.tenants.get(tenant)
            scope = (settings.cache_scope if settings else None) or tenant
        try:
            deleted = await runtime.cache.invalidate(scope, request.query_params.get("model"))
        except StoreUnavailable as exc:
            raise UpstreamUnavailable(
                "The cache store is unavailable.", code="store_unavailable"
            ) from exc
        return JSONResponse({"deleted": deleted})

    async def tenant_usage(self, request: Request) -> Response:
        self._check(request)
        ledger = self._gateway.runtime.ledger
        return JSONResponse(await ledger.usage(request.path_params["tenant"]))

    def _check(self, request: Request) -> None:
        expected = self._gateway.runtime.policy.server.admin_key
        if expected is None:
            raise NotFound("Admin endpoints are off: set server.admin_key in the policy.")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(hash_key(given), expected):
            raise AuthenticationFailed("A valid admin key is required.")
