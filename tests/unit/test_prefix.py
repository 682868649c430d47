"""The prefix index (gateway/prefix.py) and the prefix balancer (`Pool.pick`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.api.hints import read_hints
from gateway.api.request import ParsedRequest
from gateway.policy import PolicyError, parse_policy
from gateway.pools import Pool
from gateway.prefix import PrefixIndex, PrefixSettings, chunk_keys, render_chat, replica_id
from gateway.replica import Replica
from gateway.request_view import RequestView, session_key

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "You are a careful assistant. " * 40  # ~1.1k characters, 4 chunks of 256


def chat(*contents: str, system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": content} for content in contents]
    return {"model": "m", "messages": messages, **extra}


def view(body: dict[str, Any], headers: dict[str, str] | None = None) -> RequestView:
    parsed = ParsedRequest("chat", body, "auto", False, False, read_hints(headers or {}))
    return RequestView("t", parsed, session_key(parsed))


def pool(count: int = 4, **settings: Any) -> Pool:
    urls = [f"http://r{i}:8000/v1" for i in range(count)]
    return Pool.from_urls(
        "m", urls, None, None, balancer="prefix", prefix=PrefixSettings(**settings)
    )


# --- keys and rendering ----------------------------------------------------------------------


def test_keys_chain_so_a_shared_prefix_shares_its_keys_and_nothing_after_a_change() -> None:
    a = chunk_keys("x" * 100 + "a" * 100 + "z" * 100, 50)
    b = chunk_keys("x" * 100 + "b" * 100 + "z" * 100, 50)
    assert len(a) == 6
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))  # chained: the tail differs too
    assert chunk_keys("x" * 49, 50) == []  # no partial chunk


def test_render_puts_system_then_tools_then_the_conversation_and_a_turn_only_appends() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    first = chat("hello", tools=tools)
    text = render_chat(first)
    assert text.index(SYSTEM) < text.index('"name":"f"') < text.index("hello")
    following = {**first, "messages": [*first["messages"], {"role": "assistant", "content": "hi"}]}
    assert render_chat(following).startswith(text)
    assert render_chat({"prompt": "abc"}) == "abc"
    assert render_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]})


def test_replica_id_is_opaque_and_stable() -> None:
    assert replica_id("http://10.0.0.1:8000/v1") == replica_id("http://10.0.0.1:8000/v1")
    assert "10.0.0.1" not in replica_id("http://10.0.0.1:8000/v1")


# --- the index -------------------------------------------------------------------------------


def test_match_is_the_longest_run_of_leading_keys_sent_there() -> None:
    index = PrefixIndex(PrefixSettings(chunk_chars=16))
    keys = chunk_keys("abcdefghijklmnop" * 20, 16)
    index.sent("r1", keys[:12], 0)
    assert index.match("r1", keys) == 12
    assert index.match("r2", keys) == 0
    assert index.match("r1", chunk_keys("zzzzzzzzzzzzzzzz" * 4, 16)) == 0


def test_capacity_bounds_each_replica_and_forgets_tails_before_prefixes() -> None:
    settings = PrefixSettings(chunk_chars=16, kv_tokens=40)  # 40 x 4 / 16 = 10 keys
    index = PrefixIndex(settings)
    assert index.capacity == 10
    shared = "s" * 16 * 6
    first = chunk_keys(shared + "a" * 16 * 4, 16)
    index.sent("r", first, 0)
    second = chunk_keys(shared + "b" * 16 * 4, 16)
    index.sent("r", second, 6)
    assert len(index) == 10
    # The first prompt's own tail went; the shared prefix, used since, is still there.
    assert index.match("r", second) == 10
    assert index.match("r", first) == 6


def test_memory_stays_bounded_under_a_long_run_of_distinct_prompts() -> None:
    settings = PrefixSettings(chunk_chars=64, kv_tokens=4_000, max_sessions=50)
    balanced = Pool.from_urls(
        "m", [f"http://r{i}/v1" for i in range(4)], None, None, balancer="prefix", prefix=settings
    )
    index = balanced.prefix
    assert index is not None
    for n in range(3_000):
        body = chat(f"question {n}", system=f"tenant {n} " * 80)
        assert balanced.pick(request=view(body, {"x-session-id": f"s{n}"})) is not None
    assert len(index) <= 4 * index.capacity
    assert index.sessions == 50
    assert index.queried_chars > 0


# --- the balancer ----------------------------------------------------------------------------


def test_a_shared_prefix_goes_back_where_it_went_and_the_match_is_recorded() -> None:
    p = pool()
    first = view(chat("one"))
    replica = p.pick(request=first)
    assert replica is not None
    for n in range(10):  # one at a time: under the bound
        again = view(chat(f"other question {n}"))
        assert p.pick(request=again) is replica
        assert again.matched[replica.url] >= len(SYSTEM) // 256 * 256


def test_a_hot_prefix_spills_over_at_the_load_bound() -> None:
    p = pool(4, min_bound=1, load_factor=1.25)
    chosen: list[Replica] = []
    for n in range(8):
        replica = p.pick(request=view(chat(f"q{n}")))
        assert replica is not None
        replica.begin(time.monotonic())  # still in flight
        chosen.append(replica)
    # No replica ever went above 1.25 x the mean outstanding (+ the new request).
    counts = [r.in_flight for r in p.replicas]
    assert max(counts) <= 2.5
    assert len(set(chosen)) == 4
    # Finished, the prefix goes back to where it is cached (the first replica it went to).
    for replica in chosen:
        replica.end(False)
    assert p.pick(request=view(chat("later"))) in set(chosen)


def test_new_prompts_spread_evenly_across_the_pool() -> None:
    # Tenants arriving one at a time, each finished before the next: the replicas are idle,
    # so of the two drawn (here: both) the one the index holds least on takes the next.
    p = pool(2)
    for tenant in range(6):
        replica = p.pick(request=view(chat("q", system=f"tenant {tenant} " * 100)))
        assert replica is not None
    assert p.prefix is not None
    held = [p.prefix.held(r.url) for r in p.replicas]
    assert held[0] > 0 and held[0] == held[1]  # three tenants' keys each
    # Eight sessions starting at once: two on each replica.
    p = pool()
    for session in range(8):
        replica = p.pick(request=view(chat("hi", system="short"), {"x-session-id": f"{session}"}))
        assert replica is not None
        replica.begin(time.monotonic())
    assert [r.in_flight for r in p.replicas] == [2, 2, 2, 2]


def test_a_models_own_balancer_is_checked_against_the_servers() -> None:
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    model = next(iter(raw["models"]))
    raw["models"][model]["balancer"] = "prefix"
    assert parse_policy(raw, {}).models[model].balancer == "prefix"
    raw["server"] = {**raw.get("server", {}), "balancer": "round_robin"}
    with pytest.raises(PolicyError) as info:
        parse_policy(raw, {})
    assert info.value.errors == [
        f"models.{model}.balancer: needs server.balancer slo or prefix, not 'round_robin'"
    ]
    raw["models"][model]["balancer"] = "least_outstanding"
    with pytest.raises(PolicyError):
        parse_policy(raw, {})


def test_a_session_stays_on_its_replica_while_healthy_then_moves() -> None:
    p = pool()
    headers = {"x-session-id": "conv-1"}
    replica = p.pick(request=view(chat("turn 1", system="short"), headers))
    assert replica is not None
    for turn in range(2, 8):
        assert p.pick(request=view(chat(f"turn {turn}", system="short"), headers)) is replica
    replica.mark_down(time.monotonic())  # ejected
    moved = p.pick(request=view(chat("turn 8", system="short"), headers))
    assert moved is not None and moved is not replica
    assert p.prefix is not None and p.prefix.match(replica.url, [1]) == 0
    assert p.pick(request=view(chat("turn 9", system="short"), headers)) is moved


def test_the_session_source_is_the_policys_choice() -> None:
    p = pool(session="client")
    body = chat("x", system="s", user="alice")
    assert view(body).session_from("client") is None
    assert view(body).session_from("user") == "alice"
    assert view(body, {"x-session-id": "h"}).session_from("any") == "h"
    assert view(body).session_from("none") is None
    # What a client names a session: the header, else `prompt_cache_key`, else the stored
    # Responses conversation the request continues.
    keyed = chat("x", system="s", user="alice", prompt_cache_key="codex-thread-7")
    assert view(keyed).session_from("any") == "codex-thread-7"
    assert view(keyed, {"x-session-id": "h"}).session_from("client") == "h"
    continued = ParsedRequest(
        "chat", body, "auto", False, False, read_hints({}), conversation="resp_first"
    )
    assert RequestView("t", continued, session_key(continued)).session_from("any") == "resp_first"
    assert RequestView("t", continued).session_from("user") == "alice"
    assert p.pick(request=view(body)) is not None
    assert p.prefix is not None and p.prefix.sessions == 0  # `user` is not trusted here


def test_a_hedge_or_retry_goes_to_the_second_best_and_does_not_move_the_session() -> None:
    p = pool()
    headers = {"x-session-id": "c"}
    best = p.pick(request=view(chat("a"), headers))
    assert best is not None
    request = view(chat("b"), headers)
    assert p.pick(request=request) is best
    second = p.pick([best], request=request)
    assert second is not None and second is not best
    assert p.pick(request=view(chat("c"), headers)) is best


def test_the_session_follows_the_replica_that_answered() -> None:
    """The first pick can be a dead replica not yet ejected; the retry answers elsewhere.
    With no prefix to match (a short prompt), only the session says where the next turn
    goes: it must be where the last one was answered, not any of the others."""
    for session in range(10):  # by chance, 1 in 3 each
        p = pool()
        headers = {"x-session-id": f"conversation-{session}"}
        request = view(chat("turn 1", system="short"), headers)
        dead = p.pick(request=request)
        assert dead is not None
        retry = p.pick([dead], request=request)
        assert retry is not None and retry is not dead
        p.answered_by(request, retry)
        dead.mark_down(time.monotonic())
        for turn in range(2, 5):
            turn_request = view(chat(f"turn {turn}", system="short"), headers)
            assert p.pick(request=turn_request) is retry


def test_one_replica_computes_nothing() -> None:
    single = Pool.from_urls("m", ["http://r/v1"], None, None, balancer="prefix")
    assert single.prefix is None
    request = view(chat("a"))
    assert single.pick(request=request) is single.replicas[0]
    assert request.matched == {} and request._keys == {}


def test_other_balancers_have_no_index() -> None:
    assert Pool.from_urls("m", ["http://a/v1", "http://b/v1"], None, None).prefix is None
