"""Token counts for answers whose backend reported none: its tokenizer, else an estimate.

llama-cpp-python never puts usage in a stream (it has no `stream_options`), and some
servers leave it out of JSON answers as well. The gateway then counts for itself, once
the answer has ended, never before the client has it (a client that asked for a stream's
usage chunk waits only for that chunk): with the backend's tokenize endpoint where it has
one (`Backend.tokenize_api`), else with a local estimate. Either way the count says which
it is (`UsageSource`), for the request log, the token metrics and the trace.

Where each endpoint's shape was read:

- vllm: vllm-project/vllm `vllm/entrypoints/openai/protocol.py`: POST /tokenize takes
  `{"model", "prompt", "add_special_tokens"}` (default true) or `{"model", "messages",
  "add_generation_prompt", "tools"}` (the chat template applied) and answers
  `{"count", "max_model_len", "tokens"}`.
- llama_cpp: ggml-org/llama.cpp `tools/server/server.cpp`: POST /tokenize
  `{"content", "add_special"}` (default false) answers `{"tokens"}`; POST /apply-template
  `{"messages"}` answers `{"prompt"}`, which its chat endpoint tokenizes with special tokens.
- llama_cpp_python: abetlen/llama-cpp-python @3691546 `llama_cpp/server/app.py`: POST
  /extras/tokenize/count `{"input", "model"}` answers `{"count"}`, counted with the BOS
  token added (an empty input counts it alone); there is no template endpoint. Every
  endpoint there takes one lock, and with `interrupt_requests` (on by default) a request
  waiting for it ends the stream that holds it: such a replica is asked only when nothing
  else is in flight on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from gateway.api.request import ParsedRequest
from gateway.api.schemas import RequestKind
from gateway.backends import TokenizeApi
from gateway.cache.entry import assemble_chunks
from gateway.pools import Pool
from gateway.replica import Replica
from gateway.upstream import event_data

__all__ = [
    "TIMEOUT_S",
    "Answer",
    "Tokenizer",
    "Usage",
    "UsageSource",
    "answer_from_body",
    "answer_from_events",
    "estimate",
    "estimate_tokens",
    "render_chat",
    "template_tokens",
]

UsageSource = Literal["backend", "tokenized", "estimated"]

TIMEOUT_S = 0.5  # for all of one answer's calls: past it, the estimate stands
_TOKENS_PER_MESSAGE = 3  # ChatML and Llama 3 wrap each message in ~3 special tokens
_REPLY_TOKENS = 4  # and end the prompt with the assistant's header
_MAX_PROMPT_PARTS = 8  # a list prompt with more parts is estimated, not asked part by part
_SERIALIZED: frozenset[TokenizeApi] = frozenset({"llama_cpp_python"})
_OBJECTS = {"chat": "chat.completion.chunk", "completions": "text_completion"}

_logger = logging.getLogger("triage.tokenize")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the backend generated, as far as the gateway saw it."""

    texts: tuple[str, ...] | None  # each choice's text; None when it was not kept
    pieces: int = 0  # a stream's content deltas: one token each on vLLM and llama.cpp


@dataclass(frozen=True, slots=True)
class Usage:
    """An answer's token counts, and who counted them."""

    prompt_tokens: int
    completion_tokens: int
    source: UsageSource

    def as_dict(self, kind: RequestKind) -> dict[str, int]:
        """OpenAI's `usage` object (embeddings have no completion tokens)."""
        total = self.prompt_tokens + self.completion_tokens
        if kind == "embeddings":
            return {"prompt_tokens": self.prompt_tokens, "total_tokens": total}
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


class _Uncountable(ValueError):
    """The endpoint's answer, or the request, is not something this module can count."""


class Tokenizer:
    """Asks a replica's tokenize endpoint for an answer's counts; estimates when it cannot.

    One per app, sharing one HTTP client (opened on first use) across replicas.
    """

    def __init__(
        self, timeout_s: float = TIMEOUT_S, client: httpx.AsyncClient | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self._client = client
        self._bos: dict[str, int] = {}  # llama-cpp-python: what its count adds to any text

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def usage(
        self,
        parsed: ParsedRequest,
        pool: Pool,
        replica: Replica,
        answer: Answer,
        *,
        others_in_flight: int = 0,
    ) -> Usage:
        """The answer's usage, from `replica`'s tokenizer if it has one and answers in time.

        `others_in_flight`: requests on the replica besides this one's.
        """
        guess = estimate(parsed, answer)
        backend = pool.backend
        api, path = backend.tokenize_api, backend.tokenize_path
        if api is None or path is None or (answer.texts is None and answer.pieces):
            return guess
        if api in _SERIALIZED and others_in_flight > 0:
            return guess
        call = _Call(self, api, replica.root_url, path, pool.served_name, pool.api_key)
        try:
            async with asyncio.timeout(self.timeout_s):
                prompt = await call.prompt(parsed)
                completion = await call.text("\n".join(answer.texts or ()), special=False)
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            _logger.debug("tokenize at %s failed, usage estimated: %r", replica.root_url, exc)
            return guess
        return Usage(prompt, completion, "tokenized")

    async def prompt_tokens(
        self, parsed: ParsedRequest, pool: Pool, replica: Replica
    ) -> int | None:
        """`parsed`'s prompt as `replica`'s own tokenizer counts it; None when its kind of
        server has no tokenize endpoint, or it does not answer in time."""
        backend = pool.backend
        api, path = backend.tokenize_api, backend.tokenize_path
        if api is None or path is None:
            return None
        call = _Call(self, api, replica.root_url, path, pool.served_name, pool.api_key)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call.prompt(parsed)
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            _logger.debug("tokenize at %s failed: %r", replica.root_url, exc)
            return None

    async def _post(self, url: str, body: Mapping[str, Any], key: str | None) -> Any:
        if self._client is None:
            self._client = httpx.AsyncClient()
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        response = await self._client.post(
            url, content=orjson.dumps(body), headers=headers, timeout=self.timeout_s
        )
        response.raise_for_status()
        return orjson.loads(response.content)


@dataclass(frozen=True, slots=True)
class _Call:
    """One answer's counting against one replica."""

    tokenizer: Tokenizer
    api: TokenizeApi
    root: str
    path: str
    model: str
    key: str | None

    async def prompt(self, parsed: ParsedRequest) -> int:
        body = parsed.body
        if parsed.kind == "chat":
            return await self._chat(body)
        prompt = body.get("prompt", body.get("input"))
        if isinstance(prompt, str):
            return await self.text(prompt, special=True)
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, int) for p in prompt):
                return len(prompt)  # token ids: counted already
            if all(isinstance(p, list) for p in prompt):
                return sum(len(p) for p in prompt)
            if all(isinstance(p, str) for p in prompt) and len(prompt) <= _MAX_PROMPT_PARTS:
                return sum([await self.text(p, special=True) for p in prompt])
        raise _Uncountable("a prompt of another shape")

    async def _chat(self, body: Mapping[str, Any]) -> int:
        messages: Sequence[Mapping[str, Any]] = body["messages"]
        # What else the template renders: tool definitions, the template's own arguments.
        extras = {k: body[k] for k in ("tools", "chat_template_kwargs") if body.get(k)}
        if self.api == "vllm":
            ask: dict[str, Any] = {"model": self.model, "messages": messages, **extras}
            try:
                return _count(self.api, await self._post(self.path, ask))
            except httpx.HTTPStatusError:
                pass  # SGLang's /tokenize, in vLLM's shape otherwise, takes no messages
        elif self.api == "llama_cpp":
            templated = await self._post("/apply-template", {"messages": messages, **extras})
            prompt = templated.get("prompt") if isinstance(templated, dict) else None
            if not isinstance(prompt, str):
                raise _Uncountable("no prompt from /apply-template")
            return await self.text(prompt, special=True)
        # No template endpoint: the messages' text, and the template's tokens estimated.
        return await self.text(render_chat(messages), special=True) + template_tokens(messages)

    async def text(self, text: str, *, special: bool) -> int:
        """Tokens in `text`; `special`: with the BOS the server adds to a prompt."""
        if not text and not special:
            return 0
        if self.api == "vllm":
            ask = {"model": self.model, "prompt": text, "add_special_tokens": special}
            return _count(self.api, await self._post(self.path, ask))
        if self.api == "llama_cpp":
            return _count(
                self.api, await self._post(self.path, {"content": text, "add_special": special})
            )
        count = _count(self.api, await self._post(self.path, {"input": text, "model": self.model}))
        return count if special else max(count - await self._bos(), 0)

    async def _bos(self) -> int:
        known = self.tokenizer._bos.get(self.root)
        if known is None:
            empty = await self._post(self.path, {"input": "", "model": self.model})
            known = self.tokenizer._bos[self.root] = _count(self.api, empty)
        return known

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.tokenizer._post(self.root + path, body, self.key)


def _count(api: TokenizeApi, reply: object) -> int:
    if isinstance(reply, dict):
        if api == "llama_cpp":
            tokens = reply.get("tokens")
            if isinstance(tokens, list):
                return len(tokens)
        else:
            count = reply.get("count")
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                return count
    raise _Uncountable(f"not a tokenize answer: {str(reply)[:80]}")


# --- local estimates -----------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """About four characters a token, for English text with a BPE vocabulary."""
    return math.ceil(len(text) / 4)


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """The messages as the text a chat template wraps: each role, then its content."""
    parts: list[str] = []
    for message in messages:
        parts.append(str(message.get("role") or ""))
        parts.extend(_message_texts(message))
    return "\n".join(parts)


def template_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The special tokens a chat template adds around `messages`, estimated."""
    return _TOKENS_PER_MESSAGE * len(messages) + _REPLY_TOKENS


def estimate(parsed: ParsedRequest, answer: Answer) -> Usage:
    """Usage without a tokenizer: the chat template's tokens plus characters / 4 for the
    prompt, and for the completion a stream's content deltas (one token each) or its text."""
    if parsed.kind == "chat":
        messages = parsed.body["messages"]
        prompt = estimate_tokens(render_chat(messages)) + template_tokens(messages)
    else:
        prompt = parsed.estimated_prompt_tokens()
    completion = answer.pieces or sum(estimate_tokens(text) for text in answer.texts or ())
    return Usage(prompt, completion, "estimated")


# --- what was generated --------------------------------------------------------------------


def answer_from_events(kind: RequestKind, batches: Iterable[bytes]) -> Answer:
    """The text and content deltas of the SSE events relayed (batches as `Dispatched.relay`
    yields them); None for the texts if an event is not a JSON chunk."""
    chunks: list[dict[str, Any]] = []
    pieces = 0
    for event in b"".join(batches).split(b"\n\n"):
        data = event_data(event)
        if data is None or data == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return Answer(None, pieces)
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            continue  # an error event, a usage chunk
        chunks.append(chunk)
        pieces += sum(_has_content(kind, choice) for choice in chunk["choices"])
    if kind not in _OBJECTS:
        return Answer(None, pieces)
    try:
        return Answer(_response_texts(kind, assemble_chunks(kind, chunks, None)), pieces)
    except (AttributeError, TypeError, ValueError):  # choices of another shape
        return Answer(None, pieces)


def answer_from_body(kind: RequestKind, body: bytes) -> Answer:
    """The text of each choice of a JSON answer."""
    if kind == "embeddings":
        return Answer(())
    try:
        return Answer(_response_texts(kind, orjson.loads(body)))
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return Answer(None)


def _has_content(kind: RequestKind, choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    if kind != "chat":
        return bool(choice.get("text"))
    delta = choice.get("delta")
    return isinstance(delta, dict) and (
        any(isinstance(v, str) and v for k, v in delta.items() if k != "role")
        or bool(delta.get("tool_calls"))
    )


def _response_texts(kind: RequestKind, response: Mapping[str, Any]) -> tuple[str, ...]:
    texts = []
    for choice in response.get("choices") or ():
        if kind == "chat":
            texts.append("\n".join(_message_texts(choice.get("message") or {})))
        else:
            texts.append(str(choice.get("text") or ""))
    return tuple(texts)


def _message_texts(message: Mapping[str, Any]) -> list[str]:
    """A message's generated or given text: content (or its text parts), reasoning, refusal,
    and each tool call's name and arguments."""
    texts = []
    for name, value in message.items():
        if name == "role":
            continue
        if isinstance(value, str):
            texts.append(value)
        elif name == "content" and isinstance(value, list):
            texts.extend(
                p["text"] for p in value if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts.extend(str(function.get(k) or "") for k in ("name", "arguments"))
    return texts
