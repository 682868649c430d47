"""Backends that speak Messages or Responses (`api:` per model), through the gateway to real
`vllm`-quirk sims, with the official SDKs unmodified.

A client that speaks the backend's API is passed through natively: the sim's own answer
reaches it (vLLM's Messages ids are `chatcmpl-...`, its thinking blocks signed; a
translated answer has `msg_<request id>` and an empty signature). Any other client is
translated both ways. Usage in the request log is the sim's either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from gateway.policy import hash_key
from tests.integration.conftest import (
    LARGE,
    SMALL,
    Service,
    Services,
    SimPair,
    request_line,
    start_gateway,
    start_sim_pair,
)
from tests.support.agents import (
    FAST,
    chat_tool,
    claude_client,
    message_text,
    messages_tool_round_trip,
    openai_client,
    responses_tool,
    weather_tool,
)
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

KEY = "sk-backend-apis"
WEATHER_TOOL = weather_tool()
CHAT_TOOL = chat_tool(WEATHER_TOOL)
RESPONSES_TOOL = responses_tool(WEATHER_TOOL)
NO_STORE = {"cache-control": "no-store"}


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> SimPair:
    return start_sim_pair(log_dir, services, *FAST)


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: tuple[Service, Service]) -> Service:
    small, large = sims[0].url, sims[1].url
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    price = {"input_per_mtok": 0.1, "output_per_mtok": 0.2}
    models = {
        "m-chat": {"replicas": [small], "served_name": SMALL, "price": price},
        "m-messages": {
            "replicas": [small],
            "served_name": SMALL,
            "api": "messages",
            "price": price,
        },
        "m-responses": {
            "replicas": [large],
            "served_name": LARGE,
            "api": "responses",
            "price": price,
        },
        "m-chat-down": {"replicas": [dead], "served_name": SMALL, "price": price},
        "m-messages-down": {
            "replicas": [dead],
            "served_name": SMALL,
            "api": "messages",
            "price": price,
        },
    }
    policy = {
        "version": 1,
        "server": {"upstream_timeout_s": 5, "health_check_interval_s": 0.5},
        "models": models,
        "tiers": {
            "chat": {"models": ["m-chat"]},
            "messages": {"models": ["m-messages"]},
            "responses": {"models": ["m-responses"]},
            # The first model is down: the second answers, whatever API it speaks.
            "chat-then-messages": {"models": ["m-chat-down", "m-messages"]},
            "messages-then-chat": {"models": ["m-messages-down", "m-chat"]},
        },
        "routing": {"default_tier": "chat"},
        "tenants": {"team": {"keys": [hash_key(KEY)]}},
    }
    return services(start_gateway(log_dir, policy))


def claude(gateway: Service) -> anthropic.Anthropic:
    return claude_client(gateway.url, KEY)


def gpt(gateway: Service) -> openai.OpenAI:
    return openai_client(gateway.url, KEY)


def _logged_usage(gateway: Service, request_id: str) -> tuple[int, int]:
    line = request_line(gateway, request_id)
    return line["prompt_tokens"], line["completion_tokens"]


# --- Messages client, `api: messages` backend: native --------------------------------------


def test_messages_native_plain_is_the_backends_own_answer(gateway: Service) -> None:
    raw = claude(gateway).messages.with_raw_response.create(
        model="m-messages",
        max_tokens=16,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say hello."}],
    )
    message = raw.parse()
    assert message.id.startswith("chatcmpl-")  # vLLM's id: not translated by the gateway
    assert message.model == "m-messages"  # the served name made the policy's
    assert message_text(message)
    assert raw.headers["x-triage-model"] == "m-messages"
    assert raw.headers["x-triage-cache"] == "bypass"
    usage = message.usage
    assert _logged_usage(gateway, raw.headers["x-triage-request-id"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )


def test_messages_native_stream_matches_plain_and_logs_the_sims_usage(gateway: Service) -> None:
    client = claude(gateway)
    ask: dict[str, Any] = {
        "model": "m-messages",
        "max_tokens": 24,
        "thinking": {"type": "adaptive"},
        "messages": [{"role": "user", "content": "Tell me about streams."}],
    }
    plain = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-triage-request-id"]
    assert final.id.startswith("chatcmpl-")
    assert [b.type for b in final.content] == [b.type for b in plain.content]
    thinking = next(b for b in final.content if b.type == "thinking")
    assert thinking.signature  # vLLM signs it; a translation would leave it ""
    assert message_text(final) == message_text(plain)
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert _logged_usage(gateway, request_id)[1] > 0


def test_messages_native_streamed_usage_is_logged(gateway: Service) -> None:
    client = claude(gateway)
    with client.messages.stream(
        model="m-messages",
        max_tokens=20,
        messages=[{"role": "user", "content": "Count the usage of this stream."}],
    ) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-triage-request-id"]
    assert _logged_usage(gateway, request_id) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )


def test_messages_native_tool_round_trip(gateway: Service) -> None:
    _, call, _ = messages_tool_round_trip(claude(gateway), "m-messages", WEATHER_TOOL)
    assert call.name == "get_weather" and "city" in call.input


# --- Responses client, `api: responses` backend: native ------------------------------------


def test_responses_native_plain_stream_and_continuation(gateway: Service) -> None:
    client = gpt(gateway)
    raw = client.responses.with_raw_response.create(model="m-responses", input="Say hello.")
    response = raw.parse()
    request_id = raw.headers["x-triage-request-id"]
    assert response.id == f"resp_{request_id}"  # the gateway's id, the backend's replaced
    assert response.model == "m-responses"
    assert response.output_text
    assert response.usage is not None
    assert _logged_usage(gateway, request_id) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )
    with client.responses.stream(model="m-responses", input="Say hello.") as stream:
        final = stream.get_final_response()
    assert final.output_text == response.output_text
    # The gateway stored the native answer: a continuation reads it from the gateway's store.
    follow = client.responses.create(
        model="m-responses", previous_response_id=response.id, input="And again?"
    )
    assert follow.output_text and follow.previous_response_id == response.id
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_responses_native_tool_round_trip(gateway: Service) -> None:
    client = gpt(gateway)
    first = client.responses.create(
        model="m-responses",
        input="What is the weather in Oslo?",
        tools=[RESPONSES_TOOL],  # type: ignore[list-item]
        tool_choice="required",
    )
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather"
    second = client.responses.create(
        model="m-responses",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "4 C"}],
        tools=[RESPONSES_TOOL],  # type: ignore[list-item]
    )
    assert second.output_text


# --- chat client, `api: messages` backend: translated --------------------------------------


def test_chat_client_to_a_messages_backend(gateway: Service) -> None:
    client = gpt(gateway)
    ask: dict[str, Any] = {
        "model": "m-messages",
        "max_tokens": 24,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about translation."},
        ],
    }
    raw = client.chat.completions.with_raw_response.create(**ask, extra_headers=NO_STORE)
    plain = raw.parse()
    assert raw.headers["x-triage-model"] == "m-messages"
    assert plain.object == "chat.completion" and plain.model == "m-messages"
    assert plain.choices[0].message.content
    assert plain.choices[0].finish_reason in {"stop", "length"}
    assert plain.usage is not None
    assert _logged_usage(gateway, raw.headers["x-triage-request-id"]) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
    )
    stream = client.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}, extra_headers=NO_STORE
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_client_tool_call_through_a_messages_backend(gateway: Service) -> None:
    client = gpt(gateway)
    ask: dict[str, Any] = {
        "model": "m-messages",
        "max_tokens": 64,
        "tools": [CHAT_TOOL],
        "tool_choice": "required",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    plain = client.chat.completions.create(**ask)
    assert plain.choices[0].finish_reason == "tool_calls"
    (call,) = plain.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and "city" in call.function.arguments
    pieces = [
        piece
        for chunk in client.chat.completions.create(**ask, stream=True)
        for choice in chunk.choices
        for piece in choice.delta.tool_calls or ()
    ]
    assert pieces[0].id == call.id and pieces[0].function is not None
    arguments = "".join((p.function.arguments or "") for p in pieces if p.function)
    assert arguments == call.function.arguments
    answer = client.chat.completions.create(
        model="m-messages",
        max_tokens=32,
        tools=[CHAT_TOOL],  # type: ignore[list-item]
        messages=[
            *ask["messages"],
            plain.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "18 C"},
        ],
    )
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert answer.choices[0].message.content


def test_a_chat_field_messages_cannot_carry_is_a_400_naming_it(gateway: Service) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gpt(gateway).chat.completions.create(
            model="m-messages",
            max_tokens=8,
            logprobs=True,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert caught.value.body["param"] == "logprobs"  # type: ignore[index]


# --- Messages client, `api: responses` backend: translated ---------------------------------


def test_messages_client_to_a_responses_backend(gateway: Service) -> None:
    client = claude(gateway)
    ask: dict[str, Any] = {
        "model": "m-responses",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "Explain a hop."}],
        "extra_headers": NO_STORE,
    }
    raw = client.messages.with_raw_response.create(**ask)
    plain = raw.parse()
    assert plain.id == f"msg_{raw.headers['x-triage-request-id']}"  # the gateway's translation
    assert message_text(plain)
    assert _logged_usage(gateway, raw.headers["x-triage-request-id"]) == (
        plain.usage.input_tokens + (plain.usage.cache_read_input_tokens or 0),
        plain.usage.output_tokens,
    )
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert message_text(final) == message_text(plain)
    tool = client.messages.create(
        model="m-responses",
        max_tokens=64,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Rome?"}],
    )
    assert tool.stop_reason == "tool_use"
    assert next(b for b in tool.content if b.type == "tool_use").name == "get_weather"


# --- a tier of two APIs, the first model down ----------------------------------------------


def test_fallback_to_a_messages_model_answers_chat_and_messages_clients(gateway: Service) -> None:
    chat = gpt(gateway).chat.completions.with_raw_response.create(
        model="chat-then-messages",
        max_tokens=16,
        messages=[{"role": "user", "content": "Fall back, chat."}],
    )
    assert chat.headers["x-triage-model"] == "m-messages"
    assert chat.parse().choices[0].message.content
    raw = claude(gateway).messages.with_raw_response.create(
        model="chat-then-messages",
        max_tokens=16,
        messages=[{"role": "user", "content": "Fall back, messages."}],
    )
    assert raw.headers["x-triage-model"] == "m-messages"
    message = raw.parse()
    assert message.id.startswith("chatcmpl-")  # native, from the pool that answered
    assert message_text(message)


def test_fallback_from_a_messages_model_to_a_chat_one(gateway: Service) -> None:
    raw = claude(gateway).messages.with_raw_response.create(
        model="messages-then-chat",
        max_tokens=16,
        messages=[{"role": "user", "content": "Fall back to chat."}],
    )
    assert raw.headers["x-triage-model"] == "m-chat"
    message = raw.parse()
    assert message.id == f"msg_{raw.headers['x-triage-request-id']}"  # translated from chat
    assert message_text(message)
