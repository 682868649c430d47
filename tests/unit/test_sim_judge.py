"""The sim's hidden truth: graded answers, and its verdicts on two of them."""

from __future__ import annotations

from gateway.judge import DEFAULT_JUDGE_PROMPT, judge_messages
from gateway.sim.engine import CompletionPlan
from gateway.sim.judge import (
    answer_passes,
    answer_plans,
    difficulty,
    question_of,
    right_word,
    skill,
    verdict,
)
from gateway.sim.protocol import parse_chat_request, parse_completion_request

SMALL, LARGE = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"


def chat(*messages: tuple[str, str]) -> object:
    return parse_chat_request(
        {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}
    )


def test_skill_grows_with_the_size_in_the_name() -> None:
    assert skill(SMALL) < skill(LARGE) < 0.95
    assert skill("tiny") == 0.5 and skill("x-0.5b") < skill(SMALL)


def test_difficulty_is_fixed_per_question_and_spread() -> None:
    values = [difficulty(f"question {n} about topic {n % 7}") for n in range(2000)]
    assert values[3] == difficulty("question 3 about topic 3")
    assert all(0 <= v < 1 for v in values)
    weak_right = sum(v <= skill(SMALL) for v in values) / len(values)
    strong_right = sum(v <= skill(LARGE) for v in values) / len(values)
    assert 0.2 < weak_right < strong_right  # the strong model fixes a share of questions


def test_the_question_is_the_last_user_message() -> None:
    request = chat(("system", "be brief"), ("user", "first"), ("assistant", "ok"),
                   ("user", "second\nline"))  # fmt: skip
    assert question_of(request) == "second\nline"
    assert question_of(parse_completion_request({"model": "m", "prompt": "p q"})) == "p q"


def test_an_answer_ends_with_the_right_word_only_within_skill() -> None:
    text = next(f"q{n}" for n in range(1000) if answer_passes(f"q{n}", LARGE)
                and not answer_passes(f"q{n}", SMALL))  # fmt: skip
    request = chat(("user", text))
    plan = CompletionPlan(("alpha", " beta", " gamma"), 5, "stop")
    [strong] = answer_plans(request, [plan], LARGE)
    [weak] = answer_plans(request, [plan], SMALL)
    assert strong.tokens[-1] == " " + right_word(text) and weak.tokens[-1] != strong.tokens[-1]
    assert strong.completion_tokens == weak.completion_tokens == 3
    cut = CompletionPlan(("alpha",), 5, "length")
    assert answer_plans(request, [cut], LARGE) == [cut]  # cut off: no final answer


def test_the_judge_prefers_the_right_answer_and_leans_to_a_on_a_tie() -> None:
    right, wrong = f"so it is {right_word('q')}", "so it is nothing"
    assert verdict("q", wrong, right) == "[[B]]"
    assert verdict("q", right, wrong) == "[[A]]"
    assert verdict("q", right, right) == verdict("q", wrong, wrong) == "[[A]]"


def test_a_judge_request_is_answered_with_a_verdict() -> None:
    messages = judge_messages(DEFAULT_JUDGE_PROMPT, "q", "nothing", f"is {right_word('q')}")
    request = parse_chat_request({"model": "m", "messages": messages})
    plan = CompletionPlan(("a", " b"), 50, "stop")
    assert answer_plans(request, [plan], SMALL) == [CompletionPlan(("[[B]]",), 50, "stop")]
