"""The sim's hidden truth about answer quality, and the sim as a judge of two answers.

Every question has a hidden difficulty in [0, 1) and a hidden right final word; every model
a skill, from the parameter count in its name (`8b` 0.52, `70b` 0.80, none 0.5). A model
whose skill reaches a question's difficulty ends its answer with the right word, else with a
wrong one: only that last token of the simulated answer changes, so lengths and usage do not.

A judge request (gateway/judge.py's pairwise frame, with the question and both answers) is
answered with a verdict derived from that truth: `[[A]]` or `[[B]]` for the one answer that
ends right, and for a tie (both right, or both wrong) `[[A]]`: the first position, as real
judges lean, which asking in both orders cancels.

The difficulty is the mean of a hidden per-word difficulty over the question's distinct words
(plus a little per-question noise): learnable from the words, as a real router would have to.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

from gateway.sim.engine import CompletionPlan
from gateway.sim.protocol import SimRequest

__all__ = [
    "QUESTION_HEADER",
    "answer_passes",
    "answer_plans",
    "difficulty",
    "question_of",
    "right_word",
    "skill",
    "verdict",
]

# The frame of a pairwise judge request (MT-Bench's), shared with gateway/judge.py.
QUESTION_HEADER = "[User Question]"
_A_START, _A_END = "[The Start of Assistant A's Answer]", "[The End of Assistant A's Answer]"
_B_START, _B_END = "[The Start of Assistant B's Answer]", "[The End of Assistant B's Answer]"
_WORD = re.compile(r"\w+")
_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)b(?![a-z])")
_NOISE = 0.1  # share of a question's difficulty that no word explains
# Final answers: one token each in the sim's count (a word).
_FINAL_WORDS = (
    *("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("true", "false", "yes", "no", "north", "south", "east", "west", "red", "green"),
    *("blue", "alpha", "beta", "gamma", "delta"),
)


def _unit(*parts: str) -> float:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def difficulty(question: str) -> float:
    """The question's hidden difficulty in [0, 1)."""
    text = question.strip()
    words = sorted({word.lower() for word in _WORD.findall(text)})
    noise = _unit("noise", text)
    if not words:
        return noise
    mean = sum(_unit("word", word) for word in words) / len(words)
    return (1 - _NOISE) * mean + _NOISE * noise


def skill(model: str) -> float:
    """How hard a question the model answers right: grows with the `NNb` in its name."""
    sizes = [float(size) for size in _SIZE.findall(model.lower())]
    if not sizes or sizes[-1] <= 0:
        return 0.5
    return min(max(0.25 + 0.3 * math.log10(sizes[-1]), 0.05), 0.95)


def right_word(question: str) -> str:
    """The final word of a right answer."""
    return _FINAL_WORDS[int(_unit("truth", question.strip()) * len(_FINAL_WORDS))]


def _wrong_word(question: str) -> str:
    right = _FINAL_WORDS.index(right_word(question))
    step = 1 + int(_unit("wrong", question.strip()) * (len(_FINAL_WORDS) - 1))
    return _FINAL_WORDS[(right + step) % len(_FINAL_WORDS)]


def answer_passes(question: str, model: str) -> bool:
    """Does `model` answer `question` right (the hidden truth tests compare labels to)?"""
    return difficulty(question) <= skill(model)


def question_of(request: SimRequest) -> str:
    """What the answer is to: a completion's prompt, a chat's last user message."""
    prompt = request.prompt
    if request.endpoint != "chat":
        return prompt
    # The sim renders a chat as `role: content` lines (`protocol.chat_prompt`).
    at = prompt.rfind("\nuser: ")
    if at >= 0:
        start = at + len("\nuser: ")
    elif prompt.startswith("user: "):
        start = len("user: ")
    else:
        return ""
    end = prompt.find("\nassistant: ", start)
    return prompt[start:] if end < 0 else prompt[start:end]


def _final_word(text: str) -> str | None:
    words = _WORD.findall(text)
    return words[-1] if words else None


def verdict(question: str, first: str, second: str) -> str:
    """`[[A]]`, `[[B]]`: the answer that ends right when only one does; else `[[A]]`."""
    right = right_word(question)
    if _final_word(second) == right and _final_word(first) != right:
        return "[[B]]"
    return "[[A]]"


def _judge_request(prompt: str) -> tuple[str, str, str] | None:
    """(question, answer A, answer B) of a pairwise judge request, or None."""
    at = prompt.rfind(QUESTION_HEADER)
    if at < 0:
        return None
    frame = prompt[at + len(QUESTION_HEADER) :]
    a_start, a_end = frame.find(_A_START), frame.find(_A_END)
    b_start, b_end = frame.find(_B_START), frame.find(_B_END)
    if not 0 <= a_start < a_end < b_start < b_end:
        return None
    question = frame[:a_start]
    first = frame[a_start + len(_A_START) : a_end]
    second = frame[b_start + len(_B_START) : b_end]
    return question.strip(), first.strip(), second.strip()


def answer_plans(
    request: SimRequest, plans: Sequence[CompletionPlan], model: str
) -> list[CompletionPlan]:
    """The plans as the hidden truth has them: a verdict for a judge request, else each
    answer that ended by itself finishing with the right (or a wrong) word."""
    judged = _judge_request(request.prompt) if request.endpoint == "chat" else None
    if judged is not None:
        said = verdict(*judged)
        return [CompletionPlan((said,), plan.prompt_tokens, "stop") for plan in plans]
    question = question_of(request)
    word = right_word(question) if answer_passes(question, model) else _wrong_word(question)
    graded = []
    for plan in plans:
        if plan.finish_reason != "stop" or not plan.tokens:
            graded.append(plan)  # cut off: no final answer
            continue
        last = word if len(plan.tokens) == 1 else " " + word
        graded.append(CompletionPlan((*plan.tokens[:-1], last), plan.prompt_tokens, "stop"))
    return graded
