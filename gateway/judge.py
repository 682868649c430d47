"""A pairwise judge: the request that asks which of two answers is better, its verdict, and
the label two verdicts in opposite orders give.

The frame is MT-Bench's pairwise one (`[[A]]`, `[[B]]`, `[[C]]` for a tie). Judges lean to
one position; asking once with the weak tier's answer first and once with it second, and
averaging, cancels that lean, and a judge that only follows position lands on a tie.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "Label",
    "Verdict",
    "judge_messages",
    "label",
    "parse_verdict",
]

Verdict = Literal["A", "B", "tie"]

DEFAULT_JUDGE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user question displayed below. Choose the assistant that follows "
    "the user's instructions and answers the user's question better: consider correctness "
    "first, then helpfulness and relevance. Do not let the order in which the responses were "
    "presented, their length or the assistants' names influence your evaluation. Output your "
    'final verdict by strictly following this format: "[[A]]" if assistant A is better, '
    '"[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_SAID: dict[str, Verdict] = {"A": "A", "B": "B", "C": "tie"}


def judge_messages(prompt: str, question: str, first: str, second: str) -> list[dict[str, Any]]:
    """The chat messages that ask the judge to compare `first` (A) with `second` (B)."""
    user = (
        f"[User Question]\n{question}\n\n"
        f"[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's Answer]\n\n"
        f"[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]"
    )
    return [{"role": "system", "content": prompt}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> Verdict | None:
    """The judge's last `[[A]]`, `[[B]]` or `[[C]]`; None when it gave none."""
    found = _VERDICT.findall(text)
    return _SAID[found[-1]] if found else None


@dataclass(frozen=True, slots=True)
class Label:
    """What two verdicts say: the strong answer's share of the wins (ties count half), and
    the outcome pair a training row carries (0/1: the cheap tier clearly worse, or not)."""

    strong_preference: float
    weak: int
    strong: int


def label(weak_first: Verdict, strong_first: Verdict) -> Label:
    """`weak_first`: the verdict with the weak answer as A; `strong_first`: as B."""
    wins = {"A": 0.0, "tie": 0.5, "B": 1.0}
    preference = (wins[weak_first] + (1.0 - wins[strong_first])) / 2
    if preference > 0.5:
        return Label(preference, 0, 1)
    if preference < 0.5:
        return Label(preference, 1, 0)
    return Label(preference, 1, 1)  # a tie: as good (or as bad) as each other
