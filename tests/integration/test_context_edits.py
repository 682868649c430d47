"""Anthropic context editing through a real gateway to real sims: Claude Code's own
`context_management` is served, and a tool-result clearing edit reaches the backend as a
shorter prompt, whether the Messages request is translated to chat or passed through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.integration.conftest import SMALL, Service, Services, start_gateway, start_sim

pytestmark = pytest.mark.integration

FAST = ("--ttft-ms", "5", "--itl-ms", "1", "--prefill-ms-per-token", "0", "--jitter", "0")
TOOL = {
    "name": "read_file",
    "description": "Read a file.",
    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
}
NO_STORE = {"cache-control": "no-store"}


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services) -> Service:
    sim = services(start_sim(log_dir, "small", *FAST))
    models = {
        "m-chat": {"replicas": [sim.url], "served_name": SMALL},
        "m-messages": {"replicas": [sim.url], "served_name": SMALL, "api": "messages"},
    }
    policy = {
        "version": 1,
        "server": {"upstream_timeout_s": 5},
        "models": models,
        "tiers": {"chat": {"models": ["m-chat"]}, "messages": {"models": ["m-messages"]}},
        "routing": {"default_tier": "chat"},
    }
    return services(start_gateway(log_dir, policy))


def claude(gateway: Service) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="sk-any", max_retries=0)


def session(rounds: int) -> list[Any]:
    """An agent's session: a question, then `rounds` file reads and their long results."""
    messages: list[Any] = [{"role": "user", "content": "why does the build fail?"}]
    for n in range(rounds):
        use = {
            "type": "tool_use",
            "id": f"toolu_{n}",
            "name": "read_file",
            "input": {"path": f"src/{n}.rs"},
        }
        result = {
            "type": "tool_result",
            "tool_use_id": f"toolu_{n}",
            "content": f"line {n}\n" * 300,
        }
        messages += [
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [result]},
        ]
    return messages


@pytest.mark.parametrize("tier", ["chat", "messages"])
def test_claude_codes_context_management_is_served(gateway: Service, tier: str) -> None:
    """What Claude Code sends with thinking on; gateways that refused it broke Claude Code."""
    with claude(gateway).beta.messages.stream(
        model=tier,
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        betas=["context-management-2025-06-27"],
        messages=[{"role": "user", "content": "hello"}],
        extra_headers=NO_STORE,
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")
    if tier == "chat":  # translated: the gateway reports what it applied (nothing to clear)
        assert final.context_management is not None
        assert final.context_management.applied_edits == []


@pytest.mark.parametrize("tier", ["chat", "messages"])
def test_cleared_tool_results_never_reach_the_backend(gateway: Service, tier: str) -> None:
    client = claude(gateway)
    common: dict[str, Any] = {
        "model": tier,
        "max_tokens": 8,
        "tools": [TOOL],
        "messages": session(6),
        "extra_headers": NO_STORE,
    }
    whole = client.beta.messages.create(**common)
    edit = {
        "type": "clear_tool_uses_20250919",
        "trigger": {"type": "input_tokens", "value": 1000},
        "keep": {"type": "tool_uses", "value": 2},
    }
    edited = client.beta.messages.create(
        **common, context_management={"edits": [edit]}, betas=["context-management-2025-06-27"]
    )
    # The backend's own count of the prompt it was sent: four long results fewer.
    assert edited.usage.input_tokens < whole.usage.input_tokens * 0.6, (
        edited.usage.input_tokens,
        whole.usage.input_tokens,
    )
    if tier == "chat":
        assert edited.context_management is not None
        applied = edited.context_management.applied_edits
        assert [(a.type, a.cleared_tool_uses) for a in applied] == [  # type: ignore[union-attr]
            ("clear_tool_uses_20250919", 4)
        ]
