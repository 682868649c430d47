"""The OpenAPI document the gateway serves at `/openapi.json`, built from the request models.

Generated, not hand-written, so the fuzzers that read it (schemathesis) test the shapes
the gateway really checks. The dialects check their bodies in two steps (the top level,
then each block by the model its `type` names), so their documented bodies are the top
level's schema with each free-form field narrowed to the block models that check it:
the dialects' own private models, which this document is the one reader of outside them.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from gateway import __version__
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.dialects import messages_request as messages
from gateway.dialects import responses_request as responses

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
# Anthropic's `ErrorResponse`: what the `anthropic` SDK parses into its exception classes.
_MESSAGES_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
_ERROR_STATUSES = ("400", "401", "403", "404", "413", "429", "502", "503", "504")
# Messages answers 503 and shed requests as 529 `overloaded_error` (messages_answer.py).
_MESSAGES_STATUSES = ("400", "401", "403", "404", "413", "429", "502", "504", "529")
_STORE_STATUSES = ("401", "404", "503")  # a stored response: who, which, the store down

# What a successful answer holds at least; the SDKs' types have the rest.
_MESSAGE = {
    "type": "object",
    "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
    "properties": {"type": {"const": "message"}, "content": {"type": "array"}},
}
_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "status", "output"],
    "properties": {"object": {"const": "response"}, "output": {"type": "array"}},
}
_TOKEN_COUNT = {
    "type": "object",
    "required": ["input_tokens"],
    "properties": {"input_tokens": {"type": "integer", "minimum": 0}},
}
_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
_DELETED = {
    "type": "object",
    "required": ["id", "object", "deleted"],
    "properties": {"object": {"const": "response"}, "deleted": {"const": True}},
}


class _Components:
    """The document's `components.schemas`; each dialect's models under its own prefix
    (both have a `_Text`, and they are not the same)."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def add(self, model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
        """A `$ref` to `model`'s schema, added with its nested models unless it is there
        already (and perhaps narrowed since)."""
        name = prefix + model.__name__
        if name in self.schemas:
            return _ref(name)
        template = "#/components/schemas/" + prefix + "{model}"
        schema = model.model_json_schema(ref_template=template)
        for nested, definition in schema.pop("$defs", {}).items():
            self.schemas.setdefault(prefix + nested, definition)
        self.schemas[name] = schema
        return _ref(name)

    def any_of(self, models: list[type[BaseModel]], prefix: str) -> dict[str, Any]:
        return {"anyOf": [self.add(model, prefix) for model in models]}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _narrow(schema: dict[str, Any], name: str, value: dict[str, Any], nullable: bool) -> None:
    """Property `name` of a component schema is `value` (or null, where it may be)."""
    schema["properties"][name] = {"anyOf": [value, {"type": "null"}]} if nullable else value


def _list_or_string(items: dict[str, Any], nonempty: bool = False) -> dict[str, Any]:
    listed: dict[str, Any] = {"type": "array", "items": items}
    if nonempty:
        listed["minItems"] = 1
    return {
        "anyOf": [{"type": "string", "minLength": 1} if nonempty else {"type": "string"}, listed]
    }


def _role_variants(
    base: dict[str, Any], parts_by_roles: list[tuple[list[str], dict[str, Any]]]
) -> dict[str, Any]:
    """A message schema per set of roles, each with the content parts those roles may
    send (the dialects check the parts by role)."""
    variants = []
    for roles, parts in parts_by_roles:
        variant = copy.deepcopy(base)
        variant["properties"]["role"] = {"enum": roles}
        variant["properties"]["content"] = _list_or_string(parts, nonempty=True)
        variants.append(variant)
    return {"anyOf": variants}


def _messages_bodies(components: _Components) -> tuple[dict[str, Any], dict[str, Any]]:
    """`POST /v1/messages` and `POST /v1/messages/count_tokens` bodies (the second without
    `max_tokens`, which a count does not need)."""
    prefix = "Messages"
    schemas = components.schemas
    add, any_of = components.add, components.any_of
    source = any_of([messages._Base64Source, messages._UrlSource], prefix)
    add(messages._Image, prefix)
    _narrow(schemas[prefix + "_Image"], "source", source, nullable=False)
    result_blocks = any_of([messages._Text, messages._Image], prefix)
    add(messages._ToolResult, prefix)
    _narrow(schemas[prefix + "_ToolResult"], "content", _list_or_string(result_blocks), True)
    user: list[type[BaseModel]] = [messages._Text, messages._Image, messages._ToolResult]
    assistant: list[type[BaseModel]] = [
        messages._Text,
        messages._ToolUse,
        messages._Thinking,
        messages._RedactedThinking,
    ]
    # Only a final assistant turn may be empty (a prefill); documented as never empty.
    message: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["role", "content"],
        "properties": {},
    }
    schemas[prefix + "Message"] = _role_variants(
        message, [(["user"], any_of(user, prefix)), (["assistant"], any_of(assistant, prefix))]
    )
    add(messages._OutputConfig, prefix)
    output_format = add(messages._OutputFormat, prefix)
    _narrow(schemas[prefix + "_OutputConfig"], "format", output_format, nullable=True)
    add(messages._Request, prefix)
    request = schemas.pop(prefix + "_Request")
    properties = request["properties"]
    properties["messages"]["items"] = _ref(prefix + "Message")
    system = _list_or_string(add(messages._Text, prefix))
    for name, value in (
        ("system", system),
        ("tools", {"type": "array", "items": add(messages._Tool, prefix)}),
        ("tool_choice", add(messages._ToolChoice, prefix)),
        ("thinking", add(messages._ThinkingConfig, prefix)),
        ("output_config", _ref(prefix + "_OutputConfig")),
    ):
        _narrow(request, name, value, nullable=True)
    request.pop("description", None)
    counted = copy.deepcopy(request)
    counted["properties"].pop("max_tokens")
    counted["title"] = "MessagesCountTokensRequest"
    # Optional to the model (a count has none), required of a Messages request.
    request["properties"]["max_tokens"] = _not_null(request["properties"]["max_tokens"])
    request["required"] = [*request.get("required", []), "max_tokens"]
    request["title"] = "MessagesRequest"
    schemas["MessagesRequest"], schemas["MessagesCountTokensRequest"] = request, counted
    return _ref("MessagesRequest"), _ref("MessagesCountTokensRequest")


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field's schema (`X | None`) as X's."""
    (value,) = [branch for branch in schema["anyOf"] if branch != {"type": "null"}]
    return dict(value)


def _responses_body(components: _Components) -> dict[str, Any]:
    """`POST /v1/responses`: input items, their content parts, tools, the text format."""
    prefix = "Responses"
    schemas = components.schemas
    add, any_of = components.add, components.any_of
    add(responses._Message, prefix)
    input_text = add(responses._InputText, prefix)
    user = any_of([responses._InputText, responses._InputImage], prefix)
    assistant = any_of([responses._InputText, responses._OutputText, responses._Refusal], prefix)
    schemas[prefix + "_Message"] = _role_variants(
        schemas[prefix + "_Message"],
        [(["user"], user), (["assistant"], assistant), (["system", "developer"], input_text)],
    )
    add(responses._FunctionCallOutput, prefix)
    output = _list_or_string(input_text)
    _narrow(schemas[prefix + "_FunctionCallOutput"], "output", output, nullable=False)
    items: list[type[BaseModel]] = [
        responses._Message,
        responses._FunctionCall,
        responses._FunctionCallOutput,
        responses._ReasoningItem,
    ]
    item = any_of(items, prefix)
    formats = any_of([responses._JsonSchemaFormat, responses._PlainFormat], prefix)
    add(responses.ResponsesRequest, prefix)
    schema = schemas["ResponsesRequest"] = schemas.pop(prefix + "ResponsesRequest")
    _narrow(schemas[prefix + "_Text"], "format", formats, nullable=True)
    _narrow(schema, "input", _list_or_string(item, nonempty=True), nullable=False)
    tools = {"type": "array", "items": add(responses._FunctionTool, prefix)}
    _narrow(schema, "tools", tools, nullable=True)
    choice = {
        "anyOf": [
            {"enum": ["auto", "none", "required"]},
            add(responses._ToolChoiceFunction, prefix),
        ]
    }
    _narrow(schema, "tool_choice", choice, nullable=True)
    return _ref("ResponsesRequest")


def _answers(
    ok: dict[str, Any] | None,
    description: str,
    statuses: tuple[str, ...],
    error: str,
    stream: bool = False,
) -> dict[str, Any]:
    answers: dict[str, Any] = {"200": {"description": description}}
    if ok is not None:
        answers["200"]["content"] = {"application/json": {"schema": ok}}
        if stream:  # each event; its JSON data is the dialect's own (the SDKs' stream types)
            answers["200"]["content"]["text/event-stream"] = {"schema": _EVENT}
    for status in statuses:
        answers[status] = {
            "description": "An error in the API's own shape",
            "content": {"application/json": {"schema": _ref(error)}},
        }
    return answers


def _post(operation_id: str, body: dict[str, Any], answers: dict[str, Any]) -> dict[str, Any]:
    content = {"application/json": {"schema": body}}
    return {
        "post": {
            "operationId": operation_id,
            "requestBody": {"required": True, "content": content},
            "responses": answers,
        }
    }


def _dialect_paths(components: _Components) -> dict[str, Any]:
    components.schemas["MessagesError"] = _MESSAGES_ERROR
    message, count = _messages_bodies(components)
    response = _responses_body(components)
    answer = "The answer: JSON, or its event stream when `stream` is true"
    stored_id = {
        "name": "response_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    return {
        "/v1/messages": _post(
            "createMessage",
            message,
            _answers(_MESSAGE, answer, _MESSAGES_STATUSES, "MessagesError", stream=True),
        ),
        "/v1/messages/count_tokens": _post(
            "countMessageTokens",
            count,
            _answers(_TOKEN_COUNT, "The prompt's tokens", _MESSAGES_STATUSES, "MessagesError"),
        ),
        "/v1/responses": _post(
            "createResponse",
            response,
            _answers(_RESPONSE, answer, _ERROR_STATUSES, "Error", stream=True),
        ),
        "/v1/responses/{response_id}": {
            "parameters": [stored_id],
            "get": {
                "operationId": "getResponse",
                "responses": _answers(_RESPONSE, "The stored response", _STORE_STATUSES, "Error"),
            },
            "delete": {
                "operationId": "deleteResponse",
                "responses": _answers(_DELETED, "Deleted", _STORE_STATUSES, "Error"),
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    components = _Components()
    components.schemas["Error"] = _ERROR
    paths: dict[str, Any] = {}
    for path, model in (
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
        ("/v1/embeddings", EmbeddingRequest),
    ):
        body = components.add(model)
        answers = _answers(None, "The backend's answer (JSON or SSE)", _ERROR_STATUSES, "Error")
        for status in _ERROR_STATUSES:
            answers[status]["description"] = "OpenAI-shaped error"
        paths[path] = _post(model.__name__, body, answers)
    paths["/v1/models"] = {
        "get": {
            "operationId": "listModels",
            "responses": {"200": {"description": "auto, the tiers and the concrete models"}},
        }
    }
    paths.update(_dialect_paths(components))
    return {
        "openapi": "3.1.0",
        "info": {"title": "Triage gateway", "version": __version__},
        "paths": paths,
        "components": {"schemas": components.schemas},
    }
