"""`POST /v1/feedback`: an application's score of one answer, joined to that request's
routing row by its id (`x-triage-request-id`).

    {"request_id": "...", "score": true | false | -1 | 1 | 0.0 .. 1.0}

`score` is task success (a bool), thumbs (-1 or 1), or a grade from 0 to 1; each is stored
as given and as `quality` in [0, 1] (false and -1 are 0, true is 1). The caller must be
authenticated like any request, and may rate only its own tenant's requests: a request this
process answered for another tenant is refused with 403. Ids are not shared across replicas
(that would cost a store write per request), so an id this process does not know, served by
another replica or long ago, is accepted: the row names the caller's tenant, and training
joins a score only to a routing row of the same tenant and id (classifiers/README.md). For
the same reason there is no 404 for an unknown id: only the shape is checked.
"""

from __future__ import annotations

import math
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.request import read_json_object
from gateway.errors import InvalidRequest, NotFound, PermissionDenied
from gateway.runtime import Runtime

__all__ = ["post_feedback", "read_score"]

_MAX_BODY_BYTES = 16 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FIELDS = ("request_id", "score")


async def post_feedback(request: Request) -> Response:
    runtime: Runtime = request.app.state.gateway.runtime
    caller = runtime.auth.authenticate({k: v for k, v in request.headers.items()})
    body = await read_json_object(request, _MAX_BODY_BYTES)
    request_id, score, quality = read_score(body)
    feedback = runtime.feedback
    if feedback is None:
        raise NotFound(
            "Feedback is not enabled: the gateway's policy has no routing.feedback log.",
            code="feedback_not_enabled",
        )
    known, tenant = feedback.owner(request_id)
    if known and tenant != caller.tenant:
        raise PermissionDenied(
            f"Request '{request_id}' was not made by tenant '{caller.tenant}'.",
            param="request_id",
            code="request_of_another_tenant",
        )
    feedback.write_score(request_id, caller.tenant, score, quality)
    payload = {"object": "feedback", "request_id": request_id, "score": score, "quality": quality}
    return JSONResponse(payload)


def read_score(body: dict[str, Any]) -> tuple[str, bool | float, float]:
    """(request_id, score as given, quality in [0, 1]), or `InvalidRequest` naming the field."""
    for name in body:
        if name not in _FIELDS:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
    for name in _FIELDS:
        if name not in body:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)
    request_id = body["request_id"]
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise InvalidRequest(
            "Invalid value for 'request_id': expected the x-triage-request-id of a response "
            f"(1-128 letters, digits or ._:-), got {request_id!r:.60}.",
            param="request_id",
        )
    score = body["score"]
    if isinstance(score, bool):
        return request_id, score, float(score)
    if isinstance(score, int | float) and math.isfinite(score):
        if score == -1:
            return request_id, score, 0.0
        if 0 <= score <= 1:
            return request_id, score, float(score)
    raise InvalidRequest(
        "Invalid value for 'score': expected true or false (task success), -1 or 1 (thumbs), "
        f"or a grade from 0 to 1; got {score!r:.60}.",
        param="score",
    )
