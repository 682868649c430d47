"""API key -> tenant. Keys are stored only as `sha256:` hashes in the policy.

The presented key is hashed, then looked up: a dict probe on a SHA-256 digest reveals
nothing an attacker can steer toward a real key, unlike comparing key text byte by byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.policy import Policy, Tenant, hash_key

__all__ = ["ANONYMOUS", "Authenticator", "Caller", "tier_forbidden"]

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as far as budgets, limits and the cache are concerned."""

    tenant: str
    settings: Tenant

    @property
    def cache_scope(self) -> str:
        return self.settings.cache_scope or self.tenant

    def may_use(self, tier: str) -> bool:
        return self.settings.tiers is None or tier in self.settings.tiers


class Authenticator:
    def __init__(self, policy: Policy) -> None:
        self._by_hash = {
            key: Caller(name, tenant)
            for name, tenant in policy.tenants.items()
            for key in tenant.keys
        }
        anonymous = policy.auth.anonymous
        self._anonymous = Caller(ANONYMOUS, anonymous) if anonymous is not None else None

    def authenticate(self, headers: Mapping[str, str]) -> Caller:
        """The caller of `Authorization: Bearer <key>`, or of `x-api-key: <key>` (how the
        Anthropic SDKs send it); one key, one tenant, whichever header carries it."""
        authorization = headers.get("authorization") or headers.get("x-api-key")
        if authorization and "authorization" not in headers:
            authorization = "Bearer " + authorization
        if not authorization:
            if self._anonymous is None:
                raise AuthenticationFailed(
                    "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                    code="missing_api_key",
                )
            return self._anonymous
        scheme, _, key = authorization.partition(" ")
        caller = self._by_hash.get(hash_key(key.strip())) if scheme.lower() == "bearer" else None
        if caller is None:
            if self._anonymous is not None and not self._by_hash:
                return self._anonymous  # no tenants configured: keys are not checked at all
            raise AuthenticationFailed("Incorrect API key provided.")
        return caller


def tier_forbidden(caller: Caller, tier: str) -> PermissionDenied:
    allowed = ", ".join(caller.settings.tiers or ())
    return PermissionDenied(
        f"Tenant '{caller.tenant}' may not use tier '{tier}' (allowed: {allowed}).",
        code="tier_not_allowed",
    )
