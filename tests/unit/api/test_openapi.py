"""The served OpenAPI document: every endpoint a client may call, each reference resolved,
each dialect's errors in its own shape (schemathesis reads all of it: test_fuzz*.py)."""

from __future__ import annotations

from typing import Any

from gateway.api.openapi import openapi_document


def refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"]} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(refs(inner) for inner in value.values()))
    if isinstance(value, list):
        return set().union(*(refs(inner) for inner in value))
    return set()


def test_every_endpoint_is_documented_and_every_reference_resolves() -> None:
    document = openapi_document()
    assert set(document["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/{response_id}",
    }
    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_each_dialect_documents_its_own_error_shape() -> None:
    paths = openapi_document()["paths"]

    def error_ref(path: str, method: str, status: str) -> str:
        content = paths[path][method]["responses"][status]["content"]
        ref: str = content["application/json"]["schema"]["$ref"]
        return ref.rsplit("/", 1)[1]

    assert error_ref("/v1/messages", "post", "529") == "MessagesError"
    assert error_ref("/v1/messages/count_tokens", "post", "400") == "MessagesError"
    assert "503" not in paths["/v1/messages"]["post"]["responses"]  # Anthropic says 529
    assert error_ref("/v1/responses", "post", "400") == "Error"
    assert error_ref("/v1/responses/{response_id}", "get", "404") == "Error"
    assert error_ref("/v1/responses/{response_id}", "delete", "404") == "Error"
    assert error_ref("/v1/chat/completions", "post", "400") == "Error"


def test_request_bodies_come_from_the_dialects_models() -> None:
    schemas = openapi_document()["components"]["schemas"]
    messages, counted = schemas["MessagesRequest"], schemas["MessagesCountTokensRequest"]
    assert "max_tokens" in messages["required"] and messages["additionalProperties"] is False
    assert "max_tokens" not in counted["properties"]
    assert set(messages["properties"]) - {"max_tokens"} == set(counted["properties"])
    assert schemas["Messages_ToolUse"]["properties"]["type"]["const"] == "tool_use"
    responses = schemas["ResponsesRequest"]
    assert {"model", "input", "previous_response_id", "store"} <= set(responses["properties"])
    assert schemas["Responses_FunctionCall"]["required"] == ["type", "call_id", "name", "arguments"]
