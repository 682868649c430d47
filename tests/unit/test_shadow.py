"""The shadow's bounds on the request path: which answers it samples, how many comparisons
run at once, and that closing cancels them. (The comparisons themselves run against real
processes: tests/integration/test_shadow.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from gateway.api.hints import RequestHints
from gateway.api.request import ParsedRequest
from gateway.dispatch import Dispatcher, DispatchSettings
from gateway.policy import Policy, StoreSettings, parse_policy
from gateway.shadow import Shadow
from gateway.store.embedded import EmbeddedStore
from gateway.telemetry import RequestRecord
from gateway.upstream import Outcome

ROOT = Path(__file__).resolve().parents[2]


def policy(**shadow: Any) -> Policy:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["routing"].pop("classifier")
    raw["routing"].pop("strong_fraction")
    raw["routing"]["feedback"] = {"path": "feedback.jsonl"}
    settings = {"weak": "cheap", "strong": "large", "judge": "large", "usd_per_day": 1}
    raw["routing"]["shadow"] = {"sample_rate": 1.0, **settings, **shadow}
    return parse_policy(raw, {})


def shadow(tmp_path: Path, **settings: Any) -> Shadow:
    spec = policy(**settings)
    assert spec.routing.shadow is not None
    dispatcher = Dispatcher({}, sender=None, settings=DispatchSettings())  # type: ignore[arg-type]
    store = EmbeddedStore(StoreSettings())
    return Shadow(spec.routing.shadow, str(tmp_path / "rows.jsonl"), spec, dispatcher, store)


def chat(**body: Any) -> ParsedRequest:
    full = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **body}
    return ParsedRequest("chat", full, "auto", stream=False, client_wants_usage=False,
                         hints=RequestHints())  # fmt: skip


def answered(request_id: str) -> tuple[RequestRecord, Outcome]:
    record = RequestRecord(request_id, "chat")
    record.tier, record.tenant = "cheap", "acme"
    record.response_body = b'{"choices": [{"message": {"role": "assistant", "content": "x"}}]}'
    outcome = Outcome()
    outcome.completed = True
    return record, outcome


def test_only_the_pair_and_single_choice_generations_are_sampled(tmp_path: Path) -> None:
    either = shadow(tmp_path)
    assert either.samples("cheap", chat()) and either.samples("large", chat())
    assert not either.samples("other", chat())
    assert not either.samples("cheap", chat(n=2))
    embeddings = ParsedRequest("embeddings", {"model": "e", "input": "x"}, "e", False, False)
    assert not either.samples("cheap", embeddings)
    weak_only = shadow(tmp_path, answered_by="weak")
    assert weak_only.samples("cheap", chat()) and not weak_only.samples("large", chat())
    assert either.stats.sampled == 2


async def test_comparisons_are_bounded_and_closing_cancels_them(tmp_path: Path) -> None:
    bounded = shadow(tmp_path, max_in_flight=2)
    started: list[str] = []
    cancelled: list[str] = []
    release, two_started = asyncio.Event(), asyncio.Event()

    async def compare(answer: Any) -> None:
        started.append(answer.request_id)
        if len(started) == 2:
            two_started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(answer.request_id)
            raise

    bounded._compare = compare  # type: ignore[method-assign]
    for request_id in ("r1", "r2", "r3"):
        bounded.offer(chat(), *answered(request_id), None)
    await asyncio.wait_for(two_started.wait(), 5)
    assert started == ["r1", "r2"]
    assert (bounded.stats.offered, bounded.stats.dropped) == (3, 1)
    await bounded.close()
    assert sorted(cancelled) == ["r1", "r2"]
    bounded.offer(chat(), *answered("r4"), None)  # after close: dropped, nothing started
    assert bounded.stats.dropped == 2 and started == ["r1", "r2"]


async def test_an_answer_cut_short_is_not_compared(tmp_path: Path) -> None:
    quiet = shadow(tmp_path)
    record, outcome = answered("r1")
    outcome.completed = False
    quiet.offer(chat(), record, outcome, None)
    assert quiet.stats.offered == 0
    await quiet.close()
