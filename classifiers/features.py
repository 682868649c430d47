"""Request → bounded text parts → dense structural features and word n-grams."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DENSE_NAMES",
    "HEAD_CHARS",
    "HISTORY_CHARS",
    "SYSTEM_CHARS",
    "TAIL_CHARS",
    "Features",
    "RequestText",
    "extract",
    "extract_text",
    "text_of_request",
    "tokens_of",
]

# The features read at most HEAD_CHARS + TAIL_CHARS of the last user message: the head holds
# the task statement and the tail the actual question, so long pasted context in between is
# skipped and a 200k-character prompt costs the same as a 4k one.
HEAD_CHARS = 1500
TAIL_CHARS = 2500
SYSTEM_CHARS = 1000
HISTORY_CHARS = 1000
_MAX_MESSAGES = 64
_MAX_PARTS = 16


@dataclass(frozen=True, slots=True)
class RequestText:
    """The prompt parts the classifier reads, each already capped."""

    last_user: str
    system: str = ""
    history: str = ""
    last_user_chars: int = 0  # length before capping
    turns: int = 1
    max_tokens: int | None = None
    tools: int = 0
    json_format: bool = False
    images: int = 0


@dataclass(frozen=True, slots=True)
class Features:
    """Dense feature vector (aligned with DENSE_NAMES) and the n-gram tokens of one request."""

    dense: tuple[float, ...]
    tokens: tuple[str, ...]


def _cap(text: str) -> str:
    if len(text) <= HEAD_CHARS + TAIL_CHARS:
        return text
    return text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]


def _content_text(content: Any) -> tuple[str, int]:
    """Text and image count of an OpenAI message `content` (a string or a list of parts)."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, Sequence) or isinstance(content, bytes | bytearray):
        return "", 0
    texts: list[str] = []
    images = 0
    for part in content[:_MAX_PARTS]:
        if isinstance(part, Mapping):
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
            elif part.get("type") in ("image_url", "input_image", "image"):
                images += 1
        elif isinstance(part, str):
            texts.append(part)
    return "\n".join(texts), images


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], str):
        # A batch of prompts is routed as one request; its first prompt stands for the batch.
        return prompt[0]
    return ""


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def text_of_request(request: Mapping[str, Any]) -> RequestText:
    """Pull the capped prompt parts out of a raw chat or completions request body."""
    max_tokens = _int_or_none(request.get("max_completion_tokens", request.get("max_tokens")))
    tools = request.get("tools") or request.get("functions") or ()
    n_tools = len(tools) if isinstance(tools, Sequence) and not isinstance(tools, str) else 0
    response_format = request.get("response_format")
    json_format = isinstance(response_format, Mapping) and str(
        response_format.get("type", "")
    ).startswith("json")
    messages = request.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        prompt = _completion_prompt(request.get("prompt"))
        return RequestText(
            last_user=_cap(prompt),
            last_user_chars=len(prompt),
            max_tokens=max_tokens,
            tools=n_tools,
            json_format=json_format,
        )
    # Only the newest messages matter; a huge conversation is cut before it is walked.
    window = messages[-_MAX_MESSAGES:]
    last_user = ""
    last_index = -1
    images = 0
    for index in range(len(window) - 1, -1, -1):
        message = window[index]
        if isinstance(message, Mapping) and message.get("role") == "user":
            last_user, images = _content_text(message.get("content"))
            last_index = index
            break
    system_parts: list[str] = []
    history_parts: list[str] = []
    turns = 0
    for index, message in enumerate(window):
        if not isinstance(message, Mapping) or index == last_index:
            continue
        role = message.get("role")
        text, _ = _content_text(message.get("content"))
        if role in ("system", "developer"):
            system_parts.append(text[:SYSTEM_CHARS])
        else:
            turns += role == "user"
            history_parts.append(text[-HISTORY_CHARS:])
    system = "\n".join(system_parts)[:SYSTEM_CHARS]
    history = "\n".join(history_parts)[-HISTORY_CHARS:]
    return RequestText(
        last_user=_cap(last_user),
        system=system,
        history=history,
        last_user_chars=len(last_user),
        turns=turns + 1,
        max_tokens=max_tokens,
        tools=n_tools,
        json_format=json_format,
        images=images,
    )


# Lower-casing and turning every digit into "#" makes numbers "#"-runs (their value never
# matters, their size a little), so one regex then finds words and numbers alike.
_DIGIT = re.compile(r"\d")
_WORD = re.compile(r"[a-z#][a-z#'+]*")
_NUMBER_RUN = re.compile(r"#+")
_CAPITAL = re.compile(r"[ \n][A-Z]")
_NUMBERED_ITEM = re.compile(r"\n\s*\d{1,2}[.)] ")
_MATH_MARKS = ("=", "^", "+", "*", "/", "<", ">", "√", "π", "∑", "∫", "≤", "≥", "÷", "\\")
_CODE_MARKS = ("{", "}", ";", "==", "()", "=>", "->", "def ", "return", "import ", "#include")
_SENTENCE_ENDS = (". ", "? ", "! ", ".\n", "?\n", "!\n")
_OPTION_MARKS = (("\nA.", "\nB.", "\nC."), ("\nA)", "\nB)", "\nC)"), ("(A)", "(B)", "(C)"))

# Word lists group vocabulary by the kind of task, so a weight learned from a few prompts
# (say Python questions) carries to unseen ones (say Rust); they are cues, not classifiers.
_LEXICONS: dict[str, frozenset[str]] = {
    "math": frozenset(
        [
            "solve",
            "calculate",
            "compute",
            "equation",
            "equations",
            "integer",
            "integers",
            "sum",
            "product",
            "total",
            "percent",
            "percentage",
            "ratio",
            "average",
            "probability",
            "derivative",
            "integral",
            "fraction",
            "fractions",
            "remainder",
            "divisible",
            "prime",
            "primes",
            "polynomial",
            "matrix",
            "vector",
            "function",
            "value",
            "values",
            "minimum",
            "maximum",
            "area",
            "volume",
            "perimeter",
            "radius",
            "angle",
            "triangle",
            "square",
            "root",
            "roots",
            "cost",
            "costs",
            "price",
            "profit",
            "rate",
            "speed",
            "distance",
            "hours",
            "minutes",
            "dollars",
            "cents",
            "twice",
            "half",
            "double",
            "triple",
            "each",
            "per",
            "remaining",
            "left",
            "more",
            "less",
            "than",
            "many",
            "much",
            "times",
            "number",
            "numbers",
            "digit",
            "digits",
            "equal",
            "equals",
            "greater",
            "mod",
            "theorem",
            "prove",
            "proof",
        ]
    ),
    "code": frozenset(
        [
            "code",
            "python",
            "javascript",
            "typescript",
            "java",
            "c++",
            "c#",
            "rust",
            "golang",
            "go",
            "sql",
            "html",
            "css",
            "function",
            "functions",
            "class",
            "method",
            "api",
            "script",
            "program",
            "programming",
            "implement",
            "bug",
            "debug",
            "error",
            "compile",
            "regex",
            "json",
            "yaml",
            "database",
            "query",
            "server",
            "library",
            "framework",
            "algorithm",
            "array",
            "string",
            "list",
            "dict",
            "loop",
            "recursion",
            "react",
            "node",
            "django",
            "flask",
            "pandas",
            "numpy",
            "torch",
            "bash",
            "shell",
            "linux",
            "docker",
            "git",
            "unit",
            "test",
            "tests",
            "async",
            "thread",
        ]
    ),
    "write": frozenset(
        [
            "write",
            "rewrite",
            "story",
            "poem",
            "essay",
            "email",
            "letter",
            "blog",
            "post",
            "tweet",
            "song",
            "lyrics",
            "slogan",
            "article",
            "speech",
            "script",
            "character",
            "characters",
            "narrative",
            "creative",
            "haiku",
            "limerick",
            "paragraph",
            "summary",
            "summarize",
            "summarise",
            "draft",
            "compose",
            "headline",
            "tone",
            "persuasive",
        ]
    ),
    "roleplay": frozenset(
        ["pretend", "act", "roleplay", "role", "imagine", "persona", "play", "character", "embody"]
    ),
    "reason": frozenset(
        [
            "if",
            "then",
            "therefore",
            "suppose",
            "assume",
            "assuming",
            "given",
            "puzzle",
            "riddle",
            "logic",
            "logical",
            "deduce",
            "infer",
            "conclude",
            "true",
            "false",
            "must",
            "cannot",
            "why",
            "because",
            "step",
            "steps",
            "reasoning",
            "reason",
            "explain",
            "justify",
        ]
    ),
    "constraint": frozenset(
        [
            "must",
            "exactly",
            "least",
            "most",
            "only",
            "without",
            "never",
            "always",
            "each",
            "every",
            "ensure",
            "should",
            "required",
            "requirement",
            "requirements",
            "format",
            "words",
            "sentences",
            "limit",
        ]
    ),
    "knowledge": frozenset(
        [
            "what",
            "who",
            "when",
            "where",
            "which",
            "history",
            "historical",
            "describe",
            "definition",
            "define",
            "meaning",
            "difference",
            "compare",
            "discuss",
            "overview",
        ]
    ),
    "negation": frozenset(
        ["not", "except", "least", "false", "incorrect", "untrue", "never", "cannot"]
    ),
}
_LEXICON_NAMES = tuple(_LEXICONS)


def _invert(lexicons: Mapping[str, frozenset[str]]) -> dict[str, tuple[int, ...]]:
    """word -> indices of the lexicons holding it (built once at import, never changed)."""
    inverted: dict[str, tuple[int, ...]] = {}
    for index, name in enumerate(lexicons):
        for word in lexicons[name]:
            inverted[word] = (*inverted.get(word, ()), index)
    return inverted


_LEXICON_OF = _invert(_LEXICONS)

_PHRASES: dict[str, str] = {
    "step by": "steps",
    "how many": "count_question",
    "how much": "count_question",
    "how long": "count_question",
    "act as": "roleplay_phrase",
    "you are": "roleplay_phrase",
    "at least": "bound",
    "at most": "bound",
    "no more": "bound",
    "statement 1": "statements",
    "scenario 1": "statements",
    "which of": "which_of",
}
_PHRASE_NAMES = tuple(dict.fromkeys(_PHRASES.values()))

DENSE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "log_sentences",
    "words_per_sentence",
    "mean_word_length",
    "digit_share",
    "log_numbers",
    "numbers_per_sentence",
    "log_math_symbols",
    "log_code_symbols",
    "code_fence",
    "log_question_marks",
    "mcq_options",
    "ends_with_answer",
    "log_list_items",
    "capitalised_share",
    "log_quotes",
    "uppercase_not",
    *(f"lex_{name}" for name in _LEXICON_NAMES),
    *(f"phrase_{name}" for name in _PHRASE_NAMES),
    "turns",
    "has_system",
    "log_system_chars",
    "log_history_chars",
    "log_max_tokens",
    "has_tools",
    "json_format",
    "images",
)


def tokens_of(text: str) -> list[str]:
    """Lower-cased words and numbers in order; a number becomes one "#" per digit."""
    return _WORD.findall(_DIGIT.sub("#", text.lower()))


def _log(value: float) -> float:
    return math.log1p(value)


def extract_text(parts: RequestText) -> Features:
    """Dense features and unigram+bigram tokens of already-extracted request parts."""
    text = parts.last_user
    folded = _DIGIT.sub("#", text.lower())
    words = _WORD.findall(folded)
    n_words = len(words)
    bigrams = list(map(" ".join, itertools.pairwise(words)))
    lexicon = [0] * len(_LEXICON_NAMES)
    for hit in filter(None, map(_LEXICON_OF.get, words)):
        for index in hit:
            lexicon[index] += 1
    phrases = dict.fromkeys(_PHRASE_NAMES, 0)
    for name in filter(None, map(_PHRASES.get, bigrams)):
        phrases[name] += 1
    chars = max(len(text), 1)
    sentences = max(sum(map(text.count, _SENTENCE_ENDS)) + (text[-1:] in ".?!"), 1)
    numbers = len(_NUMBER_RUN.findall(folded))
    digits = folded.count("#")
    stripped = text.rstrip()
    options = any(all(mark in text for mark in marks) for marks in _OPTION_MARKS)
    list_items = sum(map(text.count, ("\n- ", "\n* ", "\n• "))) + len(_NUMBERED_ITEM.findall(text))
    capitalised = len(_CAPITAL.findall(text))
    dense = (
        _log(parts.last_user_chars or len(text)),
        _log(n_words),
        _log(text.count("\n")),
        _log(sentences),
        min(n_words / sentences, 80.0) / 20.0,
        (sum(map(len, words)) / n_words if n_words else 0.0) / 5.0,
        digits / chars * 10.0,
        _log(numbers),
        min(numbers / sentences, 10.0),
        _log(sum(map(text.count, _MATH_MARKS))),
        _log(sum(map(text.count, _CODE_MARKS))),
        float("```" in text),
        _log(text.count("?")),
        float(options),
        float(stripped.endswith("Answer:") or stripped.endswith("Answer")),
        _log(list_items),
        capitalised / max(n_words, 1),
        _log(text.count('"') + text.count("“")),
        float(" NOT " in text or "EXCEPT" in text or " LEAST " in text),
        *(_log(count) for count in lexicon),
        *(_log(count) for count in phrases.values()),
        _log(parts.turns - 1),
        float(bool(parts.system)),
        _log(len(parts.system)),
        _log(len(parts.history)),
        _log(parts.max_tokens) if parts.max_tokens else 0.0,
        float(parts.tools > 0),
        float(parts.json_format),
        float(parts.images > 0),
    )
    return Features(dense=dense, tokens=(*words, *bigrams))


def extract(request: Mapping[str, Any]) -> Features:
    """Features of a raw OpenAI chat or completions request body."""
    return extract_text(text_of_request(request))
