"""Parsing and validating the OpenAI request bodies the simulated backend accepts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import orjson

from gateway.sim.agent import AgentAsk, chat_agent_ask
from gateway.sim.quirks import QUIRKS, Quirks
from gateway.sim.tokens import count_tokens

__all__ = [
    "EmbeddingRequest",
    "SimRequest",
    "SimRequestError",
    "chat_prompt",
    "parse_chat_request",
    "parse_completion_request",
    "parse_embedding_request",
    "parse_json_object",
]

# vLLM's chat template adds a few tokens around each message.
_TOKENS_PER_MESSAGE = 4
_VLLM = QUIRKS["vllm"]


class SimRequestError(Exception):
    """A request the sim refuses, with the fields of its OpenAI error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        validation: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = tuple(headers)
        # A malformed body, answered with the server kind's validation status (500 for some).
        self.validation = validation

    def __repr__(self) -> str:
        return f"SimRequestError(status={self.status}, message={self.message!r})"


@dataclass(frozen=True, slots=True)
class SimRequest:
    """The parts of a chat or text completion request that shape the simulated answer."""

    endpoint: Literal["chat", "completion"]
    model: str | None
    prompt: str
    prompt_tokens: int
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    seed: int | None
    stream: bool
    include_usage: bool
    n: int = 1
    # Tools and reasoning asked for (chat only); None for a plain completion.
    agent: AgentAsk | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """An embeddings request: the model asked for and the texts to embed."""

    model: str | None
    inputs: tuple[str, ...]


def parse_json_object(raw: bytes) -> dict[str, object]:
    """Decode a request body that must be a JSON object."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SimRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SimRequestError(f"request body must be a JSON object, got {type(value).__name__}")
    return value


def parse_chat_request(body: dict[str, object], quirks: Quirks = _VLLM) -> SimRequest:
    """Validate a /v1/chat/completions body as the server kind `quirks` describes would."""
    messages = body.get("messages")
    if messages is None and not quirks.messages_required:
        prompt, prompt_tokens = "", 0  # llama-cpp-python: `messages` defaults to []
    else:
        prompt, prompt_tokens = chat_prompt(messages, body.get("tools"))
    request = _sim_request("chat", body, prompt, prompt_tokens, quirks)
    try:
        agent = chat_agent_ask(body, messages)
    except ValueError as exc:
        param = str(exc).split(":", 1)[0]
        raise SimRequestError(str(exc), param=param) from exc
    return dataclasses.replace(request, agent=agent) if agent is not None else request


def parse_completion_request(body: dict[str, object], quirks: Quirks = _VLLM) -> SimRequest:
    """Validate a /v1/completions body as the server kind `quirks` describes would."""
    prompt, prompt_tokens = _completion_prompt(body.get("prompt"))
    return _sim_request("completion", body, prompt, prompt_tokens, quirks)


def parse_embedding_request(body: dict[str, object]) -> EmbeddingRequest:
    """Validate a /v1/embeddings body: `input` is a string or a non-empty list of strings."""
    value = body.get("input")
    if isinstance(value, str):
        inputs: tuple[str, ...] = (value,)
    elif isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        inputs = tuple(value)
    else:
        raise SimRequestError(
            "input must be a string or a non-empty list of strings", param="input"
        )
    return EmbeddingRequest(model=_model(body), inputs=inputs)


def _sim_request(
    endpoint: Literal["chat", "completion"],
    body: dict[str, object],
    prompt: str,
    prompt_tokens: int,
    quirks: Quirks,
) -> SimRequest:
    lenient = quirks.lenient_types
    n = _optional_int(body, "n", minimum=1, lenient=lenient) or 1
    if n != 1 and quirks.n == "refused":
        raise SimRequestError(
            "Only one completion choice is allowed",
            status=quirks.n_status,
            type="server_error",
            validation=False,
        )
    if quirks.n == "ignored":
        n = 1
    # vLLM's rule: max_completion_tokens, the newer name, wins over max_tokens.
    max_tokens = _optional_int(body, "max_completion_tokens", minimum=1, lenient=lenient)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", minimum=1, lenient=lenient)
    stream = _bool(body, "stream", lenient=lenient)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        if not lenient:
            raise SimRequestError("stream_options must be an object", param="stream_options")
        options = None
    if options is not None and not stream and quirks.stream_options_need_stream:
        raise SimRequestError(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    for key in ("frequency_penalty", "presence_penalty", "temperature", "top_p"):
        value = body.get(key)
        wrong = isinstance(value, bool) or not isinstance(value, int | float)
        if value is not None and wrong and not lenient:
            raise SimRequestError(f"{key} must be a number, got {value!r}", param=key)
    include_usage = (
        stream
        and quirks.stream_usage
        and options is not None
        and _bool(options, "include_usage", lenient=lenient)
    )
    return SimRequest(
        endpoint=endpoint,
        model=_model(body),
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        min_tokens=_optional_int(body, "min_tokens", minimum=0, lenient=lenient) or 0,
        ignore_eos=_bool(body, "ignore_eos", lenient=lenient),
        seed=_optional_int(body, "seed", minimum=None, lenient=lenient),
        stream=stream,
        include_usage=include_usage,
        n=n,
    )


def chat_prompt(messages: object, tools: object = None) -> tuple[str, int]:
    """The prompt text of chat `messages` and its tokens, template overhead included.

    Tool definitions (a non-empty list) are rendered as JSON after the leading system messages,
    where chat templates put them: system prompt, tools, then the conversation, so requests
    that share those share a prompt prefix (and its KV-cache blocks).
    """
    if not isinstance(messages, list) or not messages:
        raise SimRequestError("messages must be a non-empty list", param="messages")
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str):
            raise SimRequestError(
                f"messages[{index}] must be an object with a string role",
                param=f"messages[{index}]",
            )
        text = _content_text(message.get("content"), index)
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            # Templates render an assistant's tool calls into the prompt, as JSON here.
            rendered = orjson.dumps(calls).decode()
            text = f"{text}\n{rendered}" if text else rendered
        turns.append((role, text))
    if isinstance(tools, list) and tools:
        system = next((i for i, (role, _) in enumerate(turns) if role != "system"), len(turns))
        turns.insert(system, ("tools", orjson.dumps(tools).decode()))
    text = "\n".join(f"{role}: {content}" for role, content in turns)
    tokens = sum(count_tokens(content) + _TOKENS_PER_MESSAGE for _, content in turns)
    return text, tokens


def _content_text(content: object, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    error = SimRequestError(
        f"messages[{index}].content must be a string or a list of content parts",
        param=f"messages[{index}].content",
    )
    if not isinstance(content, list):
        raise error
    texts: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise error
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise error
            texts.append(text)
        # Image and audio parts cost nothing here: the sim has no vision or audio tower.
    return "\n".join(texts)


def _completion_prompt(prompt: object) -> tuple[str, int]:
    if isinstance(prompt, str):
        return prompt, count_tokens(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
            return " ".join(map(str, prompt)), len(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0], count_tokens(prompt[0])
        if all(isinstance(item, str) for item in prompt):
            raise SimRequestError(
                f"the sim serves one prompt per request, got {len(prompt)}", param="prompt"
            )
    raise SimRequestError(
        "prompt must be a string, a list of one string or a list of token ids", param="prompt"
    )


def _model(body: dict[str, object]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise SimRequestError("model must be a string", param="model")
    return model


def _optional_int(
    body: dict[str, object], key: str, *, minimum: int | None, lenient: bool = False
) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if lenient:
            return None  # llama.cpp's json_value: a wrongly typed field takes its default
    elif minimum is None or value >= minimum:
        return value
    bound = "an integer" if minimum is None else f"an integer >= {minimum}"
    raise SimRequestError(f"{key} must be {bound}, got {value!r}", param=key)


def _bool(body: dict[str, object], key: str, *, lenient: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        if lenient:
            return False
        raise SimRequestError(f"{key} must be a boolean, got {value!r}", param=key)
    return value
