"""The pairwise judge: its frame, its verdicts, and the label two orders give."""

from __future__ import annotations

import pytest

from gateway.judge import DEFAULT_JUDGE_PROMPT, Label, judge_messages, label, parse_verdict


def test_the_frame_carries_the_question_and_both_answers_in_order() -> None:
    system, user = judge_messages(DEFAULT_JUDGE_PROMPT, "2+2?", "four", "five")
    assert system == {"role": "system", "content": DEFAULT_JUDGE_PROMPT}
    text = user["content"]
    assert text.index("2+2?") < text.index("four") < text.index("five")
    assert "[The Start of Assistant A's Answer]\nfour\n" in text


@pytest.mark.parametrize(
    ("said", "verdict"),
    [("[[A]]", "A"), ("I think [[B]]", "B"), ("[[C]]", "tie"), ("[[A]] no, [[B]]", "B"),
     ("A", None), ("", None)],
)  # fmt: skip
def test_the_last_bracketed_verdict_counts(said: str, verdict: str | None) -> None:
    assert parse_verdict(said) == verdict


def test_both_orders_cancel_a_lean_to_one_position() -> None:
    # weak first, then strong first
    assert label("B", "A") == Label(1.0, 0, 1)  # strong better both times
    assert label("A", "B") == Label(0.0, 1, 0)  # weak better both times
    assert label("A", "A") == Label(0.5, 1, 1)  # only ever position A: a tie
    assert label("tie", "tie") == Label(0.5, 1, 1)
    assert label("B", "tie") == Label(0.75, 0, 1)
    assert label("tie", "B") == Label(0.25, 1, 0)
