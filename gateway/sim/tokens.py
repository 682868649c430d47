"""Deterministic token counting and output words for the simulated backend."""

from __future__ import annotations

import functools
import hashlib
import random
import re

__all__ = ["count_tokens", "output_rng", "sample_words", "token_ids"]

# A word or a single punctuation mark counts as one token: close enough to a BPE tokenizer for
# latency and cost figures, and trivially reproducible in tests.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

_WORDS = """
    the a an of to in on for with by from at as is are was were be been being it this that
    these those there here which who what when where why how model answer question result data
    value system request response token prompt server client cache route tier budget latency
    simple clear short long fast slow good better best first next last each every some many
    more most other same new old small large high low early late open close start stop run
    make take give find know think see use work call try ask need feel become leave put mean
    keep let begin seem help show hear play move live believe hold bring happen write provide
    sit stand lose pay meet include continue set learn change lead understand watch follow
    create speak read allow add spend grow offer remember love consider appear buy wait serve
"""
_VOCABULARY: tuple[str, ...] = tuple(_WORDS.split())
# Token ids stay below a Llama 3 sized vocabulary; the template's own tokens share one id.
_VOCAB_SIZE = 128000
_TEMPLATE_TOKEN_ID = 128006


def count_tokens(text: str) -> int:
    """Number of simulated tokens in `text`: words plus punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def token_ids(text: str, count: int | None = None) -> list[int]:
    """Stable ids for the simulated tokens of `text`, as a tokenize endpoint returns them.

    With `count`, exactly that many: padded with a template-token id or cut, for a chat
    prompt whose count includes the chat template's own tokens.
    """
    ids = [_token_id(token) for token in _TOKEN_RE.findall(text)]
    if count is None:
        return ids
    return (ids + [_TEMPLATE_TOKEN_ID] * count)[:count]


# Prompts repeat the same words, and every prompt is turned into ids for the KV cache's block
# hashes: remembering the ids keeps a 100 KB prompt's conversion in milliseconds.
@functools.lru_cache(maxsize=1 << 16)
def _token_id(token: str) -> int:
    digest = hashlib.blake2b(token.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % _VOCAB_SIZE


def output_rng(*, seed: int, model: str, prompt: str, request_seed: int | None) -> random.Random:
    """An RNG that depends only on its arguments, never on the process (unlike `hash()`)."""
    key = f"{seed}\x00{model}\x00{request_seed}\x00{prompt}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def sample_words(rng: random.Random, count: int) -> tuple[str, ...]:
    """`count` output tokens: one word each, every word after the first with a leading space."""
    if count <= 0:
        return ()
    first, *rest = rng.choices(_VOCABULARY, k=count)
    return (first, *(" " + word for word in rest))
