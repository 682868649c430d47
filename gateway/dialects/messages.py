"""Anthropic's Messages API as a dialect: `POST /v1/messages` read as chat completions,
answered in Messages' shapes (`messages_request` one way, `messages_answer` the other)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.api.request import chat_prompt_chars
from gateway.dialects import DialectContext, ErrorAnswer
from gateway.dialects.context_edits import edit_context
from gateway.dialects.messages_answer import MessagesTranslation, error_answer
from gateway.dialects.messages_request import to_chat
from gateway.errors import TriageError

__all__ = ["MessagesDialect", "count_tokens_estimate"]


class MessagesDialect:
    """The `Dialect` for Anthropic Messages clients (the Anthropic SDKs, Claude Code)."""

    name = "messages"

    def parse(self, body: dict[str, Any]) -> dict[str, Any]:
        return to_chat(body)

    def parse_count_tokens(self, body: dict[str, Any]) -> dict[str, Any]:
        """A `count_tokens` request (a Messages request without `max_tokens`), checked,
        as the chat body whose prompt `count_tokens_estimate` counts (after its context
        edits, as the prompt would be sent)."""
        return to_chat(edit_context(body)[0], require_max_tokens=False)

    def translation(self, body: Mapping[str, Any], context: DialectContext) -> MessagesTranslation:
        stops = body.get("stop_sequences")
        stop_sequences = [s for s in stops if isinstance(s, str)] if isinstance(stops, list) else []
        return MessagesTranslation(
            f"msg_{context.request_id}", stop_sequences, context.context_edits
        )

    def error(self, error: TriageError) -> ErrorAnswer:
        return error_answer(error)


def count_tokens_estimate(chat_body: Mapping[str, Any]) -> int:
    """Input tokens of a translated body by the gateway's own estimate: characters / 4 + 1
    over what a template renders (`chat_prompt_chars`), as budgets and routing count."""
    return chat_prompt_chars(chat_body) // 4 + 1
