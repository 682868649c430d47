"""The OpenAPI document the gateway serves at `/openapi.json`, built from the request models.

Generated, not hand-written, so the fuzzers that read it (schemathesis) test the shapes
the gateway really checks.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERROR_STATUSES = ("400", "401", "403", "404", "413", "429", "502", "503", "504")


def openapi_document() -> dict[str, Any]:
    components: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, Any] = {}
    for path, model in (
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
        ("/v1/embeddings", EmbeddingRequest),
    ):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        responses: dict[str, Any] = {"200": {"description": "The backend's answer (JSON or SSE)"}}
        error = {"$ref": "#/components/schemas/Error"}
        for status in _ERROR_STATUSES:
            responses[status] = {
                "description": "OpenAI-shaped error",
                "content": {"application/json": {"schema": error}},
            }
        paths[path] = {
            "post": {
                "operationId": model.__name__,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                        }
                    },
                },
                "responses": responses,
            }
        }
    paths["/v1/models"] = {
        "get": {
            "operationId": "listModels",
            "responses": {"200": {"description": "auto, the tiers and the concrete models"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Triage gateway", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }
