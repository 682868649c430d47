"""Request text extraction: which parts are read, and that reading is bounded."""

from __future__ import annotations

import math
import time

from classifiers.features import (
    DENSE_NAMES,
    HEAD_CHARS,
    TAIL_CHARS,
    extract,
    text_of_request,
    tokens_of,
)


def test_chat_parts() -> None:
    parts = text_of_request(
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "second"}, {"type": "image_url"}],
                },
            ],
            "max_tokens": 512,
            "tools": [{"type": "function"}],
            "response_format": {"type": "json_object"},
        }
    )
    assert parts.last_user == "second"
    assert parts.system == "Be terse."
    assert "first question" in parts.history and "first answer" in parts.history
    assert (parts.turns, parts.max_tokens, parts.tools, parts.json_format, parts.images) == (
        2,
        512,
        1,
        True,
        1,
    )


def test_completions_prompt() -> None:
    assert text_of_request({"prompt": "Once upon"}).last_user == "Once upon"
    assert text_of_request({"prompt": ["a", "b"]}).last_user == "a"
    assert text_of_request({}).last_user == ""


def test_huge_prompt_is_capped() -> None:
    text = "word " * 40_000 + "final question?"
    parts = text_of_request({"prompt": text})
    assert len(parts.last_user) <= HEAD_CHARS + TAIL_CHARS + 1
    assert parts.last_user.endswith("final question?")
    assert parts.last_user_chars == len(text)
    start = time.perf_counter()
    extract({"prompt": text})
    assert time.perf_counter() - start < 0.05


def test_structural_features() -> None:
    mcq = extract({"prompt": "Which is prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:"}).dense
    assert mcq[DENSE_NAMES.index("mcq_options")] == 1.0
    assert mcq[DENSE_NAMES.index("ends_with_answer")] == 1.0
    code = extract({"prompt": "Fix this python:\n```\ndef f(x):\n    return x;\n```"}).dense
    assert code[DENSE_NAMES.index("code_fence")] == 1.0
    assert code[DENSE_NAMES.index("lex_code")] > 0
    assert len(mcq) == len(DENSE_NAMES)


def test_words_are_folded_bytes() -> None:
    assert tokens_of("Hello, World! Use C++ or C# in 2024 -- don't, café") == [
        "hello",
        "world",
        "use",
        "c++",
        "or",
        "c#",
        "in",
        "####",
        "don't",
        "caf",
    ]
    assert extract({"prompt": "Hello hello HELLO"}).tokens == frozenset({b"hello"})


def test_phrases_need_adjacent_words() -> None:
    index = DENSE_NAMES.index("phrase_count_question")
    assert extract({"prompt": "How many apples?"}).dense[index] == 1.0
    assert extract({"prompt": "Many people know how."}).dense[index] == 0.0


def test_extraction_is_deterministic() -> None:
    request = {"prompt": "Solve 3x + 4 = 19.\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"}
    assert extract(request) == extract(dict(request))


def test_odd_text_is_read_without_errors() -> None:
    for text in ("", "\ud800 lone surrogate", "a" * 5000, "é" * 3000 + " ok", "\n" * 100):
        features = extract({"prompt": text})
        assert len(features.dense) == len(DENSE_NAMES)
        assert all(isinstance(token, bytes) for token in features.tokens)


def test_words_come_from_a_window_of_long_prompts() -> None:
    text = "alpha " * 200 + "middle " * 500 + "omega " * 100
    features = extract({"prompt": text})
    assert b"alpha" in features.tokens and b"omega" in features.tokens
    assert b"middle" not in features.tokens
    # The word count is estimated for the whole capped message from the window (here 666 vs 615).
    words = len(text_of_request({"prompt": text}).last_user.split())
    assert abs(features.dense[DENSE_NAMES.index("log_words")] - math.log1p(words)) < 0.1
