"""Hostile input against the agent dialects' endpoints (`/v1/messages`, its `count_tokens`,
`/v1/responses` and a stored response by id) on a real gateway and real sims: schemathesis
over the served `/openapi.json`, and hypothesis over valid requests broken one field, one
byte or one header at a time.

The gateway's own fault is any 5xx: the sims are healthy and answer at once, so no case
has a legitimate 502/503/504 to give (test_fuzz.py holds chat to the same). Every 4xx is in
the dialect's own error shape: Anthropic's `{"type": "error", "error": {...}}` on the
Messages endpoints, OpenAI's on the Responses ones. A refused `POST /v1/responses` stores
nothing (its would-be id, `resp_<request id>`, is not found), and no hostile read or
delete touches another tenant's stored responses.
"""

from __future__ import annotations

import collections
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from gateway.policy import hash_key
from tests.integration.conftest import (
    ERROR_FIELDS,
    LARGE,
    SMALL,
    Service,
    Services,
    eventually,
    policy_for,
    sim_stats,
    start_gateway,
    start_sim,
)
from tests.integration.test_fuzz import (
    CORRUPTIONS,
    JSON_VALUES,
    MAX_MODEL_LEN,
    SCALARS,
    assert_still_serving,
    baseline,
    httpx_arguments,
    report,
)

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "sk-fuzz-dialect-a-0123", "sk-fuzz-dialect-b-0123"
ALIASES = {"claude-*": "auto", "gpt-5*": "auto"}
MODELS = ["auto", "cheap", "large", SMALL, LARGE, "claude-sonnet-4-5", "gpt-5-mini"]
DIALECT_PATHS = (
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/responses/{response_id}",
)
# Anthropic's error type for each status the gateway answers a Messages client with.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
MESSAGES_STOPS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"}
RESPONSES_ENDS = {"response.completed", "response.incomplete", "response.failed"}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAIAAAUAAeIhvDMAAAAASUVORK5CYII="
)


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> tuple[Service, Service]:
    """Two instant sims that refuse more than 512 tokens: an absurd `max_tokens` is a
    quick 400 from the backend, not minutes of generation."""
    return (
        services(start_sim(log_dir, "instant", "--max-model-len", MAX_MODEL_LEN)),
        services(start_sim(log_dir, "instant", "--model", LARGE, "--max-model-len", MAX_MODEL_LEN)),
    )


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: tuple[Service, Service]) -> Service:
    """Agent model names aliased to `auto`, which the classifier routes; two tenants with
    keys, and callers without one on a budget too (every case crosses the ledger); the
    embedded store keeps Responses answers."""
    routing = {
        "default_tier": "cheap",
        "fallback": {"cheap": ["large"]},
        "classifier": "classifiers/models/default",
        "strong_fraction": 0.3,
        "rules": [{"when": {"prompt_tokens_over": 2000}, "tier": "large"}],
    }
    tenants = {"a": {"keys": [hash_key(KEY_A)]}, "b": {"keys": [hash_key(KEY_B)]}}
    policy = policy_for(
        [sims[0].url],
        [sims[1].url],
        routing=routing,
        aliases=ALIASES,
        tenants=tenants,
        server={"max_body_bytes": 1024 * 1024},
        auth={"anonymous": {"budget": {"usd_per_day": 1_000_000.0}}},
        budgets={"default_max_tokens": 256},
    )
    return services(start_gateway(log_dir, policy))


# What fuzzing found, kept as explicit cases: turns of no content (a 500 once), and an
# input that leaves no message (sent on to the backend once, which refused it in its words).
_EMPTY_TURNS = b'{"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": []}]}'
_JSON = {"content-type": "application/json"}
FOUND = [
    ("POST", "/v1/messages", _EMPTY_TURNS, _JSON),
    ("POST", "/v1/messages/count_tokens", _EMPTY_TURNS, _JSON),
    ("POST", "/v1/responses", b'{"model": "auto", "input": []}', _JSON),
]


def test_what_fuzzing_found_is_refused_before_the_backend(
    gateway: Service, sims: tuple[Service, Service]
) -> None:
    before = [sim_stats(sim)["requests_total"] for sim in sims]
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for method, path, raw, headers in FOUND:
            response = client.request(method, path, content=raw, headers=headers)
            assert response.status_code == 400, response.text
            assert_dialect_answer(path, response, path, client)
    assert [sim_stats(sim)["requests_total"] for sim in sims] == before


# --- what every answer must look like --------------------------------------------------------


def assert_dialect_answer(
    path: str, response: httpx.Response, case: str, client: httpx.Client
) -> None:
    """Not a 5xx; a 4xx in the dialect's error shape (and, for a refused Responses request,
    nothing stored); a 200 a whole answer or a complete stream in the dialect's shape."""
    status, body = response.status_code, response.content
    assert status < 500, f"{status} for {case}: {body[:400]!r}"
    if status >= 400:
        if path.startswith("/v1/messages"):
            assert_anthropic_error(status, body, case)
        else:
            error = orjson.loads(body)["error"]
            assert set(error) == ERROR_FIELDS, (case, body[:400])
            assert isinstance(error["message"], str) and error["message"], (case, body[:400])
            if path == "/v1/responses" and response.request.method == "POST":
                assert_nothing_stored(response, client, case)
        return
    assert status == 200, (case, status, body[:400])
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = sse_events(body, case)
        if path == "/v1/messages":
            assert_messages_stream(events, case)
        else:
            assert_responses_stream(events, case)
        return
    answer = orjson.loads(body)
    if path == "/v1/messages":
        assert answer["type"] == "message" and answer["role"] == "assistant", (case, answer)
        assert answer["stop_reason"] in MESSAGES_STOPS, (case, answer)
        assert all(b["type"] in {"text", "thinking", "tool_use"} for b in answer["content"])
    elif path == "/v1/messages/count_tokens":
        assert set(answer) == {"input_tokens"} and answer["input_tokens"] >= 0, (case, answer)
    elif response.request.method == "DELETE":
        assert answer["deleted"] is True, (case, answer)
    else:
        assert answer["object"] == "response" and answer["output"], (case, answer)
        assert answer["status"] in {"completed", "incomplete"}, (case, answer)


def assert_anthropic_error(status: int, body: bytes, case: str) -> None:
    answer = orjson.loads(body)
    assert set(answer) == {"type", "error"} and answer["type"] == "error", (case, body[:400])
    error = answer["error"]
    assert set(error) == {"type", "message"}, (case, body[:400])
    assert isinstance(error["message"], str) and error["message"], (case, body[:400])
    assert error["type"] == ANTHROPIC_TYPES.get(status, "invalid_request_error"), (case, status)


def assert_nothing_stored(response: httpx.Response, client: httpx.Client, case: str) -> None:
    """The refused request's would-be response is not found by the caller who sent it."""
    request_id = response.headers["x-triage-request-id"]
    auth = {
        name: value
        for name, value in response.request.headers.items()
        if name.lower() in ("authorization", "x-api-key")
    }
    read = client.get(f"/v1/responses/resp_{request_id}", headers=auth)
    assert read.status_code in (401, 404), (case, read.status_code, read.text[:300])


def sse_events(body: bytes, case: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event; every event names itself in its data's `type`."""
    events = []
    for block in body.split(b"\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        name, data = lines[b"event"].decode(), orjson.loads(lines[b"data"])
        assert data["type"] == name, (case, block[:300])
        events.append((name, data))
    assert body.endswith(b"\n\n") and events, (case, body[-300:])
    return events


def assert_messages_stream(events: list[tuple[str, dict[str, Any]]], case: str) -> None:
    """message_start, blocks opened and closed in order, message_delta, message_stop; or
    an `error` event last, wherever the stream broke."""
    names = [name for name, _ in events]
    assert names[0] == "message_start", (case, names)
    assert names[-1] in ("message_stop", "error"), (case, names)
    open_block: int | None = None
    next_index = 0
    for name, data in events[1:-1]:
        if name == "content_block_start":
            assert open_block is None and data["index"] == next_index, (case, names)
            open_block, next_index = next_index, next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_block, (case, names)
        elif name == "content_block_stop":
            assert data["index"] == open_block, (case, names)
            open_block = None
        elif name == "message_delta":
            assert open_block is None, (case, names)
            assert data["delta"]["stop_reason"] in MESSAGES_STOPS, (case, data)
        else:
            assert name == "ping", (case, names)
    if names[-1] == "message_stop":
        assert "message_delta" in names, (case, names)
    else:
        assert_anthropic_error(500, orjson.dumps(events[-1][1]), case)  # any type will do


def assert_responses_stream(events: list[tuple[str, dict[str, Any]]], case: str) -> None:
    names = [name for name, _ in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events))), case
    assert names[:2] == ["response.created", "response.in_progress"], (case, names)
    assert names[-1] in RESPONSES_ENDS, (case, names)
    assert sum(name in RESPONSES_ENDS for name in names) == 1, (case, names)
    if "error" in names:
        assert names[-2:] == ["error", "response.failed"], (case, names)


# --- schemathesis over the served OpenAPI document -------------------------------------------


def dialect_document(document: dict[str, Any], routed: bool) -> dict[str, Any]:
    """The served document's dialect operations; `routed`: with `model` narrowed to names
    the policy serves, so that generated requests get past the router to the backends."""
    narrowed = json.loads(json.dumps(document))
    narrowed["paths"] = {p: v for p, v in narrowed["paths"].items() if p in DIALECT_PATHS}
    if routed:
        for name in ("MessagesRequest", "MessagesCountTokensRequest", "ResponsesRequest"):
            narrowed["components"]["schemas"][name]["properties"]["model"] = {"enum": MODELS}
    return narrowed


def test_schemathesis_over_the_dialect_operations(
    gateway: Service, record_property: Callable[[str, object], None]
) -> None:
    before = baseline(gateway)
    document = httpx.get(gateway.url + "/openapi.json", timeout=5).json()
    assert set(document["paths"]) >= set(DIALECT_PATHS)
    counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
    checks = [
        st_checks.not_a_server_error,
        st_checks.status_code_conformance,
        st_checks.content_type_conformance,
        st_checks.response_schema_conformance,
    ]
    passes = (
        (False, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE), 25),
        (True, (GenerationMode.POSITIVE,), 40),
    )
    with httpx.Client(
        base_url=gateway.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
    ) as client:
        for routed, modes, examples in passes:
            schema = schemathesis.openapi.from_dict(dialect_document(document, routed))
            for result in schema.get_all_operations():
                operation = result.ok()
                post = operation.method.lower() == "post"
                if routed and not post:
                    continue  # a stored response's id has no model to narrow
                # A string in the path has no negative cases to generate.
                for mode in modes if post else modes[:1]:
                    label = f"{'routed' if routed else 'served'} {mode.value} {operation.label}"
                    run_operation(operation, mode, examples, label, gateway, client, checks, counts)
    by_status = collections.Counter(f"{m}:{s}" for (_, m, s), n in counts.items() for _ in range(n))
    total = report("schemathesis", by_status, record_property)
    assert total >= 3 * 2 * 25 + 2 * 25 + 3 * 40
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses"):
        assert counts[(f"routed positive POST {path}", "positive", 200)] > 0, counts
    assert_still_serving(gateway, before)


def run_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    examples: int,
    label: str,
    gateway: Service,
    client: httpx.Client,
    checks: list[Any],
    counts: collections.Counter[tuple[str, str, int]],
) -> None:
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        # Sent here, not with `case.call`: schemathesis stops reading a stream after 20
        # events, and a stream's end is what must be checked.
        response = client.request(**httpx_arguments(case, gateway.url))
        counts[(label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=checks)
        what = f"{label} {response.request.content!r:.600}"
        assert_dialect_answer(operation.path, response, what, client)

    run()


# --- hypothesis: valid requests, broken one piece at a time ----------------------------------


def text() -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=40) | st.sampled_from(["Hello.", "x" * 3000])


@st.composite
def messages_body(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Messages request: a plain turn, images, a tool round trip or a prefill."""
    question: dict[str, Any] = {"role": "user", "content": draw(text())}
    shape = draw(st.sampled_from(["plain", "images", "tools", "prefill", "thinking"]))
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(MODELS)),
        "max_tokens": draw(st.integers(1, 8)),
        "messages": [question],
    }
    if shape == "images":
        image = {"type": "base64", "media_type": "image/png", "data": PIXEL}
        question["content"] = [
            {"type": "image", "source": image},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
            {"type": "text", "text": draw(text()), "cache_control": {"type": "ephemeral"}},
        ]
    elif shape == "tools":
        body["tools"] = [WEATHER]
        call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "x"}}
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": draw(text())}
        body["messages"] += [
            {"role": "assistant", "content": [{"type": "text", "text": "Let me see."}, call]},
            {"role": "user", "content": [result]},
        ]
        choices = [{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "get_weather"}]
        body["tool_choice"] = draw(st.sampled_from([*choices, {"type": "none"}]))
    elif shape == "prefill":
        body["messages"].append({"role": "assistant", "content": "The answer is"})
    elif shape == "thinking":
        body["max_tokens"] = 2048
        body["thinking"] = draw(
            st.sampled_from(
                [
                    {"type": "enabled", "budget_tokens": 1024},
                    {"type": "adaptive"},
                    {"type": "disabled"},
                ]
            )
        )
        thought = {"type": "thinking", "thinking": "Hm.", "signature": ""}
        body["messages"] += [
            {"role": "assistant", "content": [thought, {"type": "text", "text": "Yes."}]},
            {"role": "user", "content": "And?"},
        ]
    optional = {
        "system": st.sampled_from(["Be terse.", [{"type": "text", "text": "Be terse."}]]),
        "stop_sequences": st.lists(st.text(min_size=1, max_size=5), max_size=3),
        "temperature": st.sampled_from([0, 0.5, 1]),
        "top_p": st.sampled_from([0.5, 1]),
        "top_k": st.integers(0, 50),
        "metadata": st.fixed_dictionaries({"user_id": st.text(max_size=10)}),
        "stream": st.booleans(),
        "output_config": st.sampled_from(
            [{"effort": "low"}, {"format": {"type": "json_schema", "schema": {"type": "object"}}}]
        ),
    }
    for name in sorted(draw(st.sets(st.sampled_from(sorted(optional)), max_size=4))):
        body[name] = draw(optional[name])
    return body


@st.composite
def responses_body(draw: st.DrawFn, previous: list[str]) -> dict[str, Any]:
    """A valid Responses request: a string, message items with images, a function call
    round trip, an echoed reasoning item; maybe continuing a stored response."""
    shape = draw(st.sampled_from(["string", "items", "tools", "reasoning"]))
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS))}
    if shape == "string":
        body["input"] = draw(text())
    elif shape == "items":
        parts = [
            {"type": "input_text", "text": draw(text())},
            {"type": "input_image", "image_url": f"data:image/png;base64,{PIXEL}"},
        ]
        body["input"] = [
            {"role": "developer", "content": "Be terse."},
            {"type": "message", "role": "user", "content": parts},
        ]
    elif shape == "tools":
        body["tools"] = [
            {
                "type": "function",
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "strict": True,
            }
        ]
        body["tool_choice"] = draw(
            st.sampled_from(["auto", "required", {"type": "function", "name": "get_weather"}])
        )
        body["input"] = [
            {"role": "user", "content": draw(text())},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Lyon"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": draw(text())},
        ]
    else:
        body["input"] = [
            {"role": "user", "content": "Think."},
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "Hm"}],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
            {"role": "user", "content": draw(text())},
        ]
    optional = {
        "instructions": st.text(max_size=20),
        "max_output_tokens": st.integers(1, 8),
        "temperature": st.sampled_from([0, 0.7, 2]),
        "top_p": st.sampled_from([0.5, 1]),
        "text": st.sampled_from(
            [
                {"format": {"type": "text"}},
                {"format": {"type": "json_object"}},
                {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}}},
            ]
        ),
        "reasoning": st.sampled_from([{"effort": "low"}, {"effort": "high", "summary": "auto"}]),
        "stream": st.booleans(),
        "store": st.booleans(),
        "previous_response_id": st.sampled_from(previous) | st.text(max_size=12),
        "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        "user": st.text(max_size=10),
    }
    for name in sorted(draw(st.sets(st.sampled_from(sorted(optional)), max_size=4))):
        body[name] = draw(optional[name])
    body.setdefault("max_output_tokens", draw(st.integers(1, 8)))
    return body


def locations(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value a mutation can hit (the root excluded)."""
    found = [at] if at else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += locations(inner, (*at, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += locations(inner, (*at, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with up to three places broken: a value replaced or emptied, a key removed,
    a key added, a block's `type` swapped for another dialect's (or nonsense)."""
    body = json.loads(json.dumps(body))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        places = locations(body)
        at = draw(st.sampled_from(places)) if places else ()
        parent: Any = body
        for step in at[:-1]:
            parent = parent[step]
        key = at[-1] if at else None
        action = draw(st.sampled_from(["replace", "remove", "add", "type", "empty"]))
        if key is None or action == "add":
            target = parent if isinstance(parent, dict) else body
            target[draw(st.text(max_size=12))] = draw(JSON_VALUES)
        elif action == "remove":
            del parent[key]
        elif action == "type" and isinstance(parent, dict):
            parent["type"] = draw(
                st.sampled_from(
                    ["text", "input_text", "image", "tool_use", "function_call", "web_search"]
                )
                | SCALARS
            )
        elif action == "empty":
            parent[key] = type(parent[key])() if isinstance(parent[key], str | list) else {}
        else:
            parent[key] = draw(JSON_VALUES | SCALARS)
    return body


@st.composite
def auth_headers(draw: st.DrawFn) -> dict[str, str]:
    key = st.sampled_from([KEY_A, KEY_B] * 4 + ["sk-nobody-0123", "", "Bearer", "x" * 300])
    headers: dict[str, str] = {}
    how = draw(st.sampled_from(["none", "x-api-key", "x-api-key", "bearer", "bearer", "both"]))
    if how in ("x-api-key", "both"):
        headers["x-api-key"] = draw(key)
    if how in ("bearer", "both"):
        headers["authorization"] = ("Bearer " + draw(key)).strip()  # no trailing space on the wire
    extras = {
        "anthropic-version": st.sampled_from(["2023-06-01", "", "1999"]),
        "anthropic-beta": st.sampled_from(["prompt-caching-2024-07-31", "x,y", ""]),
        "x-triage-tier": st.sampled_from(["cheap", "large", "nope"]),
        "cache-control": st.sampled_from(["no-store", "no-cache"]),
        "content-type": st.sampled_from(["text/plain", "application/json; charset=latin-1"]),
    }
    for name in sorted(draw(st.sets(st.sampled_from(sorted(extras)), max_size=2))):
        headers[name] = draw(extras[name])
    return headers


@st.composite
def hostile_request(draw: st.DrawFn, previous: list[str]) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, raw body, headers)."""
    headers = draw(auth_headers())
    headers.setdefault("content-type", "application/json")
    endpoint = draw(
        st.sampled_from(["messages"] * 4 + ["count_tokens"] * 2 + ["responses"] * 4 + ["stored"])
    )
    if endpoint == "stored":
        any_id = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=300)
        response_id = draw(st.sampled_from(previous) | any_id | st.sampled_from(["..", "a/b"]))
        method = draw(st.sampled_from(["GET", "DELETE"]))
        if method == "DELETE":
            # Tenant A's own keep their records for the end of the test.
            headers.pop("x-api-key", None)
            headers["authorization"] = "Bearer " + draw(st.sampled_from([KEY_B, "sk-nobody"]))
        return method, "/v1/responses/" + urllib.parse.quote(response_id, safe=""), b"", headers
    if endpoint == "responses":
        path, body = "/v1/responses", draw(responses_body(previous))
    else:
        path, body = "/v1/messages", draw(messages_body())
        if endpoint == "count_tokens":
            path = "/v1/messages/count_tokens"
            if draw(st.booleans()):
                del body["max_tokens"]
    body = draw(mutated(body))
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    raw = draw(st.sampled_from(CORRUPTIONS[:1] * 8 + CORRUPTIONS))(raw, draw(st.integers(0, 10**6)))
    return "POST", path, raw, headers


def stored_responses(client: httpx.Client, count: int) -> list[str]:
    """Tenant A's stored responses, for requests to continue, read and fail to delete."""
    ids = []
    for i in range(count):
        body = {"model": "gpt-5-mini", "input": f"Remember {i}.", "max_output_tokens": 4}
        answer = client.post("/v1/responses", json=body, headers={"x-api-key": KEY_A})
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["id"])
    for response_id in ids:
        assert eventually(lambda rid=response_id: readable(client, rid, KEY_A))
    return ids


def readable(client: httpx.Client, response_id: str, key: str) -> bool:
    read = client.get(f"/v1/responses/{response_id}", headers={"authorization": f"Bearer {key}"})
    return read.status_code == 200 and read.json()["id"] == response_id


def test_hypothesis_broken_requests(
    gateway: Service, record_property: Callable[[str, object], None]
) -> None:
    before = baseline(gateway)
    counts: collections.Counter[str] = collections.Counter()
    with httpx.Client(
        base_url=gateway.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
    ) as client:
        previous = stored_responses(client, 4)

        @settings(
            max_examples=350,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(request=hostile_request(previous))
        @example(request=FOUND[0])
        @example(request=FOUND[1])
        @example(request=FOUND[2])
        def run(request: tuple[str, str, bytes, dict[str, str]]) -> None:
            method, path, raw, headers = request
            response = client.request(method, path, content=raw or None, headers=headers)
            route = path if method == "POST" else "/v1/responses/{id}"
            counts[f"{route}:{response.status_code}"] += 1
            case = f"{method} {path} {raw[:400]!r} {headers}"
            assert_dialect_answer(route, response, case, client)

        run()
        # No hostile read, continuation or delete took tenant A's records from it.
        assert all(readable(client, response_id, KEY_A) for response_id in previous)
        assert not any(readable(client, response_id, KEY_B) for response_id in previous)
    total = report("hypothesis", counts, record_property)
    assert total >= 350
    for route in ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses"):
        assert counts[f"{route}:200"] >= 5, counts  # valid answers and refusals both ran
        assert counts[f"{route}:400"] >= 5, counts
    assert_still_serving(gateway, before)
