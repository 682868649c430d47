"""Backends that speak Anthropic's Messages API or OpenAI's Responses API (a model's
`api:` in the policy), seen from the gateway's side of the wire.

The request path carries a chat completions body whatever the client spoke
(`gateway.dialects`). For a model whose servers take another API there are two ways out:

- native (`Mode` "native"): the client spoke that very API, so its own body goes to the
  backend and the backend's answer comes back as sent, its model name made the policy's
  (`native`, `passthrough`); nothing is lost in a round trip through chat;
- translate: the chat body becomes the backend's request, and its answer, whole or
  streamed, becomes a chat answer (`messages`, `responses`), so everything after
  dispatch (the cache, usage, the client's own dialect) reads it as any chat answer.

Which applies is decided per send, by the pool that is sent to: a fallback or a hedge to
a model of another API builds its own body, and the answer is read the way of the pool
that answered.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["API_PATHS", "BACKEND_APIS", "BackendApi", "Mode", "mode"]

BackendApi = Literal["chat", "messages", "responses"]
BACKEND_APIS: tuple[BackendApi, ...] = get_args(BackendApi)
Mode = Literal["chat", "native", "translate"]

# Each API's path under a replica's base URL (which ends in /v1), as vLLM serves them.
API_PATHS: dict[BackendApi, str] = {
    "chat": "/chat/completions",
    "messages": "/messages",
    "responses": "/responses",
}


def mode(api: BackendApi, dialect: str) -> Mode:
    """How a request from a `dialect` client goes to a backend of `api`."""
    if api == "chat":
        return "chat"
    return "native" if api == dialect else "translate"
