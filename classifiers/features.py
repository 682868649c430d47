"""Request → bounded text parts → dense structural features and word n-grams."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DENSE_NAMES",
    "HEAD_CHARS",
    "HISTORY_CHARS",
    "SYSTEM_CHARS",
    "TAIL_CHARS",
    "WORD_HEAD_CHARS",
    "WORD_TAIL_CHARS",
    "Features",
    "RequestText",
    "Token",
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
# Splitting into words and looking them up is the costly part of scoring, so words (word
# weights, lexicons, phrases) come from the first WORD_HEAD_CHARS and last WORD_TAIL_CHARS
# characters of that; the counts (length, lines, numbers, marks) still see all of it. In
# grouped cross-validation this window changed no APGR figure (MMLU 0.608 -> 0.609).
WORD_HEAD_CHARS = 700
WORD_TAIL_CHARS = 500
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


# A token is one word: lower-case ASCII bytes, each digit folded to "#". (Bigrams were tried and
# dropped: in grouped cross-validation they added nothing and cost half the scoring time.)
Token = bytes


@dataclass(frozen=True, slots=True)
class Features:
    """Dense feature vector (aligned with DENSE_NAMES) and the distinct words."""

    dense: tuple[float, ...]
    tokens: Set[Token]


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


def _table(pairs: Mapping[bytes, bytes], default: int | None) -> bytes:
    """A bytes.translate table: listed bytes map as given, the rest to `default` (None: self)."""
    table = bytearray(range(256)) if default is None else bytearray([default] * 256)
    for sources, targets in pairs.items():
        for byte, target in zip(
            sources, targets * len(sources) if len(targets) == 1 else targets, strict=False
        ):
            table[byte] = target
    return bytes(table)


_UPPER = bytes(range(65, 91))
_LOWER = bytes(range(97, 123))
_DIGIT_BYTES = b"0123456789"
# One translate pass makes words out of the UTF-8 bytes: A-Z -> a-z, digits -> "#" (a number's
# value never matters, its size a little), "#'+" stay word characters (c++, c#, don't), and
# everything else, non-ASCII bytes included, becomes a space; bytes.split() then yields the
# words. Several times faster than a regex over str, and the same words for ASCII text.
_FOLD = _table({_UPPER: _LOWER, _LOWER: _LOWER, _DIGIT_BYTES: b"#", b"#'+": b"#'+"}, ord(" "))
# The text's shape, so that one count finds a whole class of marks: upper-case -> "A",
# digits -> "0", sentence ends "?!" -> ".", bullets "*" -> "-", tabs and returns -> " ".
_SHAPE = _table({_UPPER: b"A", _DIGIT_BYTES: b"0", b"?!": b".", b"*": b"-", b"\t\r": b" "}, None)
_MATH_BYTES = b"=^+*/<>\\"
_MATH_WIDE = tuple(mark.encode() for mark in "√π∑∫≤≥÷\u00d7\u2212")  # times and minus signs
_CODE_BYTES = b"{};"
_CODE_WORDS = frozenset(
    word.encode()
    for word in (
        "def", "return", "import", "#include", "const", "elif", "println", "printf", "void",
        "lambda", "struct", "console", "async", "await", "fn", "impl", "nullptr", "std",
    )
)  # fmt: skip
_NEGATIONS = frozenset((b"not", b"except", b"least"))
_OPTION_MARKS = ((b"\nA.", b"\nB.", b"\nC."), (b"\nA)", b"\nB)", b"\nC)"), (b"(A)", b"(B)", b"(C)"))

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
_LEXICON_SETS = tuple(frozenset(word.encode() for word in words) for words in _LEXICONS.values())

# Two-word phrases; a feature is 1 when any of its phrases occurs.
_PHRASES: dict[str, tuple[str, ...]] = {
    "steps": ("step by",),
    "count_question": ("how many", "how much", "how long"),
    "roleplay_phrase": ("act as", "you are"),
    "bound": ("at least", "at most", "no more"),
    "statements": ("statement #", "scenario #"),
    "which_of": ("which of",),
}
_PHRASE_KEYS = tuple(
    tuple(
        (*(word.encode() for word in phrase.split()), f" {phrase} ".encode()) for phrase in phrases
    )
    for phrases in _PHRASES.values()
)

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
    "uppercase_per_word",
    "log_quotes",
    "uppercase_not",
    *(f"lex_{name}" for name in _LEXICON_NAMES),
    *(f"phrase_{name}" for name in _PHRASES),
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
    """Lower-cased ASCII words and numbers in order; a number becomes one "#" per digit."""
    return text.encode("utf-8", "surrogatepass").translate(_FOLD).decode("ascii").split()


_log = math.log1p


def _is_mcq(raw: bytes) -> bool:
    """Whether the text ends in lettered answer options (A., B., C. or A), B), ... or (A) ...)."""
    for first, second, third in _OPTION_MARKS:
        start = raw.rfind(first)
        if start >= 0 and second in raw[start:] and third in raw[start:]:
            return True
    return False


def _phrases(tokens: Set[bytes], padded: bytes) -> list[float]:
    found = []
    for keys in _PHRASE_KEYS:
        hit = 0.0
        for first, second, needle in keys:
            # Both words are looked up first, so the text is searched only when it may match.
            if first in tokens and second in tokens and needle in padded:
                hit = 1.0
                break
        found.append(hit)
    return found


def extract_text(parts: RequestText) -> Features:
    """Dense features and the distinct words of already-extracted request parts.

    The counts are done in C over the whole (capped) text: a few bytes.translate passes and
    bytes.count calls, no Python loop over characters; words come from the word window.
    """
    text = parts.last_user
    raw = text.encode("utf-8", "surrogatepass")
    wide = len(raw) - len(text)  # extra bytes of non-ASCII characters
    folded = raw.translate(_FOLD)
    if len(folded) <= WORD_HEAD_CHARS + WORD_TAIL_CHARS:
        words = folded.split()
        n_words = len(words)
    else:
        # Cut at spaces so that no word is halved, and scale the word count to the whole text.
        head = folded[:WORD_HEAD_CHARS]
        tail = folded[-WORD_TAIL_CHARS:]
        cut = tail.find(b" ")
        window = head[: head.rfind(b" ") + 1] + (tail[cut:] if cut >= 0 else b"")
        words = window.split()
        n_words = round(len(words) * len(folded) / max(len(window), 1))
    tokens = frozenset(words)
    shape = raw.translate(_SHAPE)
    count = raw.count
    shape_count = shape.count
    chars = max(len(text), 1)
    sentences = max(shape_count(b". ") + shape_count(b".\n") + (shape[-1:] == b"."), 1)
    # Padded so that " word " finds the first and last word too; " #" starts a number.
    padded = b" " + folded + b" "
    numbers = padded.count(b" #")
    math_marks = len(raw) - len(raw.translate(None, _MATH_BYTES))
    code_marks = len(raw) - len(raw.translate(None, _CODE_BYTES)) + len(tokens & _CODE_WORDS)
    list_items = shape_count(b"\n-") + shape_count(b"\n0")  # lines opening with a bullet or number
    quotes = count(b'"')
    if wide:
        math_marks += sum(map(count, _MATH_WIDE))
        list_items += count("\n•".encode())
        quotes += count("“".encode())
    stripped = text.rstrip()
    dense = (
        _log(parts.last_user_chars or len(text)),
        _log(n_words),
        _log(count(b"\n")),
        _log(sentences),
        min(n_words / sentences, 80.0) / 20.0,
        ((len(folded) - folded.count(b" ")) / n_words if n_words else 0.0) / 5.0,
        shape_count(b"0") / chars * 10.0,
        _log(numbers),
        min(numbers / sentences, 10.0),
        _log(math_marks),
        _log(code_marks),
        float(b"`" in raw and b"```" in raw),
        _log(count(b"?")),
        float(_is_mcq(raw)),
        float(stripped.endswith("Answer:") or stripped.endswith("Answer")),
        _log(list_items),
        shape_count(b"A") / max(n_words, 1),
        _log(quotes),
        float(
            not _NEGATIONS.isdisjoint(tokens)
            and (b" NOT " in raw or b"EXCEPT" in raw or b" LEAST " in raw)
        ),
        *map(_log, map(len, map(tokens.intersection, _LEXICON_SETS))),
        *_phrases(tokens, padded),
        _log(parts.turns - 1),
        float(bool(parts.system)),
        _log(len(parts.system)),
        _log(len(parts.history)),
        _log(parts.max_tokens) if parts.max_tokens else 0.0,
        float(parts.tools > 0),
        float(parts.json_format),
        float(parts.images > 0),
    )
    return Features(dense=dense, tokens=tokens)


def extract(request: Mapping[str, Any]) -> Features:
    """Features of a raw OpenAI chat or completions request body."""
    return extract_text(text_of_request(request))
