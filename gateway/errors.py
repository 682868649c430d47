"""One exception tree for everything a client can be told went wrong.

    TriageError                      500 api_error
    ├── InvalidRequest               400 invalid_request_error
    │   └── BodyTooLarge             413
    ├── AuthenticationFailed         401
    ├── PermissionDenied             403
    ├── NotFound                     404 (unknown model, tier or route)
    ├── RateLimited                  429 (rate limits, budgets) + Retry-After
    ├── ClientClosedRequest          499 (the client left; nobody reads the answer)
    └── UpstreamError                502
        ├── UpstreamUnavailable      503 (no healthy replica, connection refused)
        ├── UpstreamTimeout          504
        └── UpstreamStatus           backend's own 4xx/5xx passed through

Each class carries the HTTP status and OpenAI's `type`/`code`; `api.errors` turns
them into OpenAI bodies in exactly one place. An error raised while dispatching also says
where the request failed (`tier`, `model`, `replica`): for logs, metrics and spans only,
never in the body.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BodyTooLarge",
    "ClientClosedRequest",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "TriageError",
    "UpstreamError",
    "UpstreamStatus",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class TriageError(Exception):
    status_code: int = 500
    error_type: str = "api_error"
    default_code: str | None = None
    # Where it failed, once the request was routed: the tier, and the model and replica
    # of the send that failed it (None when nothing was sent). See `failed_at`.
    tier: str | None = None
    model: str | None = None
    replica: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"

    def failed_at(self, tier: str, model: str | None, replica: str | None = None) -> None:
        """Say where the request failed; the first to say so (the nearest to it) wins."""
        if self.tier is None:
            self.tier, self.model, self.replica = tier, model, replica


class InvalidRequest(TriageError):
    status_code = 400
    error_type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status_code = 413
    default_code = "request_too_large"


class AuthenticationFailed(TriageError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(TriageError):
    status_code = 403
    error_type = "permission_error"


class NotFound(TriageError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class RateLimited(TriageError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ClientClosedRequest(TriageError):
    """The client disconnected before its answer: nginx's 499, for logs and metrics."""

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_closed"


class UpstreamError(TriageError):
    status_code = 502
    error_type = "api_error"
    default_code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status_code = 503
    default_code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    default_code = "upstream_timeout"


class UpstreamStatus(UpstreamError):
    """The backend answered with an error status; relayed with the backend's own status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str = "api_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)
        self.status_code = status_code
        self.error_type = error_type
