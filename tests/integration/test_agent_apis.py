"""Agent traffic through the gateway: the official `anthropic` SDK on `/v1/messages` and
the `openai` SDK's Responses client on `/v1/responses`, unmodified, against real sims.

The gateway translates both to chat completions for the backend (the default `api:
chat`), so every gateway feature applies: aliases route an agent's model name, the exact
cache replays in the dialect asked for, budgets and the request log see the usage.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway.policy import hash_key
from tests.integration.conftest import (
    Service,
    Services,
    SimPair,
    policy_for,
    request_line,
    start_gateway,
    start_sim,
    start_sim_pair,
)
from tests.support.agents import (
    FAST,
    claude_client,
    message_text,
    messages_tool_round_trip,
    openai_client,
    responses_tool,
    weather_tool,
)

pytestmark = pytest.mark.integration

KEYS = {"team-a": "sk-agent-team-a", "team-b": "sk-agent-team-b", "narrow": "sk-agent-narrow"}
ALIASES = {"claude-*": "auto", "gpt-5*": "auto", "claude-haiku-small": "cheap"}
WEATHER_TOOL = weather_tool(unit={"enum": ["c", "f"]})
# A 1x1 transparent PNG.
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
).decode()


def _policy(sims: tuple[Service, Service], **sections: Any) -> dict[str, Any]:
    tenants = {
        "team-a": {"keys": [hash_key(KEYS["team-a"])]},
        "team-b": {"keys": [hash_key(KEYS["team-b"])]},
        "narrow": {"keys": [hash_key(KEYS["narrow"])], "tiers": ["cheap"]},
    }
    return policy_for(
        [sims[0].url],
        [sims[1].url],
        aliases=ALIASES,
        tenants=tenants,
        auth={"anonymous": None},
        **sections,
    )


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> SimPair:
    return start_sim_pair(log_dir, services, *FAST)


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: tuple[Service, Service]) -> Service:
    return services(start_gateway(log_dir, _policy(sims)))


def claude(gateway: Service, tenant: str = "team-a") -> anthropic.Anthropic:
    return claude_client(gateway.url, KEYS[tenant])


def gpt(gateway: Service, tenant: str = "team-a") -> openai.OpenAI:
    return openai_client(gateway.url, KEYS[tenant])


# --- Messages ----------------------------------------------------------------------------


def test_messages_plain_answer_is_routed_by_alias_and_logged(gateway: Service) -> None:
    raw = claude(gateway).messages.with_raw_response.create(
        model="claude-sonnet-4-5",
        max_tokens=16,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say hello."}],
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message_text(message)
    assert message.stop_reason in {"end_turn", "max_tokens"}
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["x-triage-tier"] == "cheap"  # auto, short prompt: the default tier
    line = request_line(gateway, raw.headers["x-triage-request-id"])
    assert line["api"] == "messages"
    assert line["requested_model"] == "claude-sonnet-4-5"
    assert line["prompt_tokens"] == message.usage.input_tokens


def test_messages_stream_accumulates_the_plain_answer(gateway: Service) -> None:
    client = claude(gateway)
    ask: dict[str, Any] = {
        "model": "claude-haiku-small",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "Tell me about streams."}],
    }
    plain = client.messages.create(**ask, extra_headers={"cache-control": "no-store"})
    with client.messages.stream(**ask, extra_headers={"cache-control": "no-store"}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    assert message_text(final) == message_text(plain)
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_messages_tool_round_trip(gateway: Service) -> None:
    first, call, _ = messages_tool_round_trip(claude(gateway), "claude-sonnet-4-5", WEATHER_TOOL)
    assert [b for b in first.content if b.type == "tool_use"] == [call]
    assert call.name == "get_weather"
    assert isinstance(call.input, dict) and set(call.input) >= {"city", "unit"}


def test_messages_streamed_tool_call_matches_the_plain_one(gateway: Service) -> None:
    client = claude(gateway)
    ask: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [{"role": "user", "content": "Weather in Oslo, streamed."}],
    }
    plain = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    plain_call = next(b for b in plain.content if b.type == "tool_use")
    streamed_call = next(b for b in final.content if b.type == "tool_use")
    assert streamed_call.input == plain_call.input
    assert final.stop_reason == "tool_use"


def test_messages_image_blocks_are_accepted(gateway: Service) -> None:
    message = claude(gateway).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                    {"type": "text", "text": "What is in these images?"},
                ],
            }
        ],
    )
    assert message_text(message)


def test_messages_count_tokens_answers_locally(gateway: Service) -> None:
    short = claude(gateway).messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
    )
    long = claude(gateway).messages.count_tokens(
        model="claude-sonnet-4-5",
        system="A much longer system prompt " * 20,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "hi"}],
    )
    assert 0 < short.input_tokens < long.input_tokens


def test_messages_count_tokens_never_asks_a_tier_the_caller_may_not_use(gateway: Service) -> None:
    """`narrow` may use only `cheap`: its count for `large` is the gateway's own estimate, not
    a 403 and not the large replica's tokenizer, which `team-a` is answered from."""
    ask: dict[str, Any] = {"model": "large", "messages": [{"role": "user", "content": "hi"}]}
    estimated = claude(gateway, "narrow").messages.count_tokens(**ask)
    tokenized = claude(gateway).messages.count_tokens(**ask)
    assert 0 < estimated.input_tokens < tokenized.input_tokens


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("bad_key", anthropic.AuthenticationError),
        ("forbidden_tier", anthropic.PermissionDeniedError),
        ("unknown_model", anthropic.NotFoundError),
        ("bad_role", anthropic.BadRequestError),
        ("too_large", anthropic.APIStatusError),
    ],
)
def test_messages_errors_raise_the_sdks_own_classes(
    gateway: Service, call: str, error: type[anthropic.APIStatusError]
) -> None:
    tenant = {"bad_key": "team-a", "forbidden_tier": "narrow"}.get(call, "team-a")
    client = claude(gateway, tenant)
    if call == "bad_key":
        client = claude_client(gateway.url, "sk-nope")
    model = {"forbidden_tier": "large", "unknown_model": "no-such-model"}.get(call, "claude-x")
    content: Any = "x" * (11 << 20) if call == "too_large" else "hello"
    role = "system" if call == "bad_role" else "user"
    with pytest.raises(error) as info:
        client.messages.create(
            model=model,
            max_tokens=8,
            messages=[{"role": role, "content": content}],  # type: ignore[misc,list-item]
        )
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    expected = {
        "bad_key": (401, "authentication_error"),
        "forbidden_tier": (403, "permission_error"),
        "unknown_model": (404, "not_found_error"),
        "bad_role": (400, "invalid_request_error"),
        "too_large": (413, "request_too_large"),
    }[call]
    assert (info.value.status_code, body["error"]["type"]) == expected


def test_messages_rate_limit_is_a_429_rate_limit_error(
    log_dir: Path, services: Services, sims: tuple[Service, Service]
) -> None:
    policy = _policy(sims)
    policy["tenants"]["team-a"]["limits"] = {"rpm": 1}
    gw = services(start_gateway(log_dir, policy))
    ask: dict[str, Any] = {
        "model": "claude-x",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "one"}],
    }
    claude(gw).messages.create(**ask)
    with pytest.raises(anthropic.RateLimitError) as info:
        claude(gw).messages.create(**ask)
    assert info.value.response.headers.get("retry-after")


def test_messages_stream_cut_by_the_backend_ends_with_an_error_event(
    log_dir: Path, services: Services
) -> None:
    stalls = services(
        start_sim(log_dir, "small", *FAST, "--fault-rate", "1", "--fault-kind", "stall")
    )
    policy = _policy((stalls, stalls), server={"upstream_timeout_s": 0.5})
    gw = services(start_gateway(log_dir, policy))
    headers = {"x-api-key": KEYS["team-a"], "anthropic-version": "2023-06-01"}
    body = {
        "model": "claude-x",
        "max_tokens": 32,
        "stream": True,
        "messages": [{"role": "user", "content": "stall please"}],
    }
    with httpx.stream("POST", gw.url + "/v1/messages", json=body, headers=headers) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert lines[0] == "event: message_start"
    assert lines[-2] == "event: error"
    error = orjson.loads(lines[-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "timeout_error"  # a 504
    ask: dict[str, Any] = {k: v for k, v in body.items() if k != "stream"}
    with pytest.raises(anthropic.APIError), claude(gw).messages.stream(**ask) as events:
        for _ in events:
            pass


def test_messages_cache_hit_replays_in_the_messages_dialect(
    log_dir: Path, services: Services, sims: tuple[Service, Service]
) -> None:
    cache = {"enabled": True, "deterministic_only": False}
    gw = services(start_gateway(log_dir, _policy(sims, cache=cache)))
    ask: dict[str, Any] = {
        "model": "claude-x",
        "max_tokens": 12,
        "messages": [{"role": "user", "content": "cache me in messages"}],
    }
    first = claude(gw).messages.with_raw_response.create(**ask)
    second = claude(gw).messages.with_raw_response.create(**ask)
    assert first.headers["x-triage-cache"] == "miss"
    assert second.headers["x-triage-cache"] == "hit"
    assert message_text(second.parse()) == message_text(first.parse())
    with claude(gw).messages.stream(**ask) as stream:
        replayed = stream.get_final_message()
    assert message_text(replayed) == message_text(first.parse())
    # The same conversation asked over chat completions is another entry: no cross-dialect hit.
    chat = gpt(gw).chat.completions.with_raw_response.create(
        model="claude-x",
        max_tokens=12,
        messages=[{"role": "user", "content": "cache me in messages"}],
    )
    assert chat.headers["x-triage-cache"] == "miss"


def test_x_triage_tier_pins_a_messages_request(gateway: Service) -> None:
    raw = claude(gateway).messages.with_raw_response.create(
        model="claude-x",
        max_tokens=4,
        messages=[{"role": "user", "content": "pin me"}],
        extra_headers={"x-triage-tier": "large"},
    )
    assert raw.headers["x-triage-tier"] == "large"


# --- Responses ---------------------------------------------------------------------------


def test_responses_plain_and_stream_agree(gateway: Service) -> None:
    client = gpt(gateway)
    ask: dict[str, Any] = {
        "model": "gpt-5-mini",
        "instructions": "Be brief.",
        "input": "Describe a river.",
        "max_output_tokens": 400,
    }
    raw = client.responses.with_raw_response.create(**ask)
    plain = raw.parse()
    assert plain.status in {"completed", "incomplete"} and plain.output_text
    assert plain.usage is not None and plain.usage.input_tokens > 0
    assert request_line(gateway, raw.headers["x-triage-request-id"])["api"] == "responses"
    with client.responses.stream(**ask, extra_headers={"cache-control": "no-store"}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in {"response.completed", "response.incomplete"}
    assert final.output_text == plain.output_text


def test_responses_tool_round_trip(gateway: Service) -> None:
    client = gpt(gateway)
    tool = responses_tool(WEATHER_TOOL)
    first = client.responses.create(
        model="gpt-5",
        input="Weather in Porto?",
        tools=[tool],
        max_output_tokens=64,  # type: ignore[list-item]
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert set(orjson.loads(calls[0].arguments)) >= {"city", "unit"}
    second = client.responses.create(
        model="gpt-5",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C"}],
        tools=[tool],  # type: ignore[list-item]
        max_output_tokens=64,
    )
    assert second.output_text
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the history was sent


def test_responses_stored_per_tenant_read_continue_and_delete(gateway: Service) -> None:
    a, b = gpt(gateway, "team-a"), gpt(gateway, "team-b")
    first = a.responses.create(model="gpt-5", input="Remember the number 7.", max_output_tokens=8)
    assert a.responses.retrieve(first.id).id == first.id
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model="gpt-5", input="and?", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(first.id)
    a.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(first.id)
    unstored = a.responses.create(model="gpt-5", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(unstored.id)


def test_responses_stored_in_redis_survive_a_gateway_restart(
    log_dir: Path,
    services: Services,
    sims: tuple[Service, Service],
    store_section: dict[str, Any],
) -> None:
    policy = _policy(sims, store=store_section)
    first_gw = start_gateway(log_dir, policy)
    try:
        first = gpt(first_gw).responses.create(model="gpt-5", input="persist me")
    finally:
        first_gw.stop()
    second_gw = services(start_gateway(log_dir, policy))
    assert gpt(second_gw).responses.retrieve(first.id).output_text == first.output_text
    follow = gpt(second_gw).responses.create(
        model="gpt-5", input="and then?", previous_response_id=first.id
    )
    assert follow.previous_response_id == first.id


def test_responses_stream_cut_by_the_backend_ends_with_response_failed(
    log_dir: Path, services: Services
) -> None:
    stalls = services(
        start_sim(log_dir, "small", *FAST, "--fault-rate", "1", "--fault-kind", "stall")
    )
    policy = _policy((stalls, stalls), server={"upstream_timeout_s": 0.5})
    gw = services(start_gateway(log_dir, policy))
    with gpt(gw).responses.stream(model="gpt-5", input="stall please") as stream:
        kinds = [event.type for event in stream]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.failed"


def test_responses_errors_are_openai_errors(gateway: Service) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gpt(gateway).responses.create(
            model="gpt-5",
            input="x",
            tools=[{"type": "web_search"}],  # type: ignore[list-item]
        )
    assert info.value.param is not None and "tools" in info.value.param
    with pytest.raises(openai.AuthenticationError):
        stranger = openai_client(gateway.url, "sk-no")
        stranger.responses.create(model="gpt-5", input="x")


def test_messages_takes_more_stop_sequences_than_openai_allows(gateway: Service) -> None:
    """Anthropic sets no limit of four stop strings; the translated body is not held to
    OpenAI's, and no error names `stop`, a field the client never sent."""
    message = claude(gateway).messages.create(
        model="claude-x",
        max_tokens=8,
        stop_sequences=["\n\nHuman:", "###", "END", "STOP", "DONE", "<|eot|>"],
        messages=[{"role": "user", "content": "hello"}],
    )
    assert message_text(message)
