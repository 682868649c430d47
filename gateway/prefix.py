"""Where each prompt prefix was sent: the gateway's approximate picture of its replicas' KV caches.

A prompt is rendered to text (system prompt, tools, then the conversation, as chat templates
order them) and cut into chunks of `chunk_chars` characters. Each chunk's key is a hash
chained over the chunks before it, so one key names a whole prefix, as vLLM's block hashes
do. Per replica, an LRU set of the keys sent there stands in for its cache, bounded by its
KV capacity; a prompt's matched prefix on a replica is its longest run of leading keys there.

Characters, not tokens: a tokenizer in the request path costs milliseconds per long prompt,
and the index only has to rank replicas, not count tokens. `_CHARS_PER_TOKEN` converts the
policy's KV size (in tokens, the unit servers report) into chunks.

Keys are Python's `hash()` of (parent key, chunk text): the cheapest chained hash at hand
(~0.2 µs a chunk, against ~0.7 µs for blake2b over the same bytes). String hashes are salted
per process, which is fine: the index lives in one worker's memory and is never shared.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

__all__ = [
    "PrefixIndex",
    "PrefixSettings",
    "SessionSource",
    "chunk_keys",
    "render_chat",
    "replica_id",
]

# English text in BPE tokenizers runs ~4 characters a token.
_CHARS_PER_TOKEN = 4
_SEPARATOR = "\x1e"  # between rendered parts: "ab" + "c" must not equal "a" + "bc"

SessionSource = Literal["client", "user", "any", "none"]


@dataclass(frozen=True, slots=True)
class PrefixSettings:
    """How the `prefix` balancer keys and bounds its choice (the policy's `server.prefix`).

    `load_factor` is consistent hashing with bounded loads' 1 + ε: no replica takes a request
    that would put it above `load_factor` x the mean requests outstanding across the pool
    (never below `min_bound`, so a nearly idle pool still keeps a prefix where it is cached).
    `session`: which session key to trust: the one the client names (`client`: `x-session-id`,
    `prompt_cache_key`, a stored Responses conversation), its end user (`user`: the body's
    `user`, which Messages `metadata.user_id` becomes), either (`any`, the client's first),
    or none.
    """

    chunk_chars: int = 256
    kv_tokens: int = 400_000  # each replica's KV cache, in tokens
    load_factor: float = 1.25
    min_bound: int = 4
    session: SessionSource = "any"
    max_sessions: int = 100_000
    replica_header: bool = False  # answer with `x-triage-replica`

    @property
    def capacity_chunks(self) -> int:
        return max(self.kv_tokens * _CHARS_PER_TOKEN // self.chunk_chars, 1)


def render_chat(body: Mapping[str, Any]) -> str:
    """A chat body's prompt as text in template order: system messages, tools, the rest.

    Appending a message appends to the text, so a conversation's next turn shares its
    whole rendering so far. A completions body's `prompt` (a string) is taken as it is.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else ""
    parts: list[str] = []
    start = 0
    while start < len(messages) and _role(messages[start]) in ("system", "developer"):
        parts.append(_message(messages[start]))
        start += 1
    tools = body.get("tools")
    if tools:
        parts.append(orjson.dumps(tools).decode())
    parts.extend(_message(message) for message in messages[start:])
    return _SEPARATOR.join(parts)


def _role(message: object) -> object:
    return message.get("role") if isinstance(message, dict) else None


def _message(message: object) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(
            part.get("text", "")
            if isinstance(part, dict) and part.get("type") == "text"
            # Images, audio, tool results: their JSON is what stays the same on the next turn.
            else orjson.dumps(part).decode()
            for part in content
        )
    else:
        text = ""
    calls = message.get("tool_calls")
    if calls:
        text += orjson.dumps(calls).decode()
    return f"{message.get('role')}:{text}"


def chunk_keys(text: str, chunk_chars: int) -> list[int]:
    """One key per full chunk of `text`, each chained over the chunks before it; a partial
    last chunk gets none (it is the part of the prompt least likely to recur)."""
    keys: list[int] = []
    append = keys.append
    parent = 0
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        parent = hash((parent, text[start : start + chunk_chars]))
        append(parent)
    return keys


def replica_id(url: str) -> str:
    """An opaque, stable name for a replica, for `x-triage-replica`: says which, not where."""
    return hashlib.blake2b(url.encode(), digest_size=6).hexdigest()


class PrefixIndex:
    """Per replica (by URL), the chunk keys recently sent there, least recently used first;
    and per session, the replica that last answered it. Memory is bounded: at most
    `capacity_chunks` keys a replica, `max_sessions` sessions.

    A prompt's keys are stored last chunk first, so its prefix is always more recent than
    its tail, and the LRU forgets tails first (vLLM frees a request's blocks in that order
    for the same reason): what a replica holds of a prompt is then always a prefix, and the
    longest match can be found by bisection.
    """

    def __init__(self, settings: PrefixSettings) -> None:
        self.settings = settings
        self.capacity = settings.capacity_chunks
        self._keys: dict[str, OrderedDict[int, None]] = {}
        self._sessions: OrderedDict[str, str] = OrderedDict()
        # What the index predicted (chunks matched where requests were sent) out of the
        # chunks asked for: compared with what the replicas report (`vllm:prefix_cache_*`).
        self.predicted_chars = 0
        self.queried_chars = 0

    def __len__(self) -> int:
        """Keys held, all replicas together."""
        return sum(len(keys) for keys in self._keys.values())

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def held(self, url: str) -> int:
        """Keys held for the replica at `url`."""
        keys = self._keys.get(url)
        return 0 if keys is None else len(keys)

    def match(self, url: str, keys: Sequence[int]) -> int:
        """How many leading `keys` the replica at `url` was sent (and has not forgotten)."""
        held = self._keys.get(url)
        if not held or not keys or keys[0] not in held:
            return 0
        low, high = 1, len(keys)  # keys[:low] held; find the largest such low
        while low < high:
            middle = (low + high + 1) // 2
            if keys[middle - 1] in held:
                low = middle
            else:
                high = middle - 1
        return low

    def sent(self, url: str, keys: Sequence[int], matched: int) -> None:
        """A prompt with `keys` went to `url`, `matched` of them found there."""
        size = self.settings.chunk_chars
        self.predicted_chars += matched * size
        self.queried_chars += len(keys) * size
        held = self._keys.get(url)
        if held is None:
            held = self._keys[url] = OrderedDict()
        for key in reversed(keys):
            if key in held:
                held.move_to_end(key)
            else:
                held[key] = None
        excess = len(held) - self.capacity
        for _ in range(max(excess, 0)):
            held.popitem(last=False)

    def forget(self, url: str) -> None:
        """The replica is out (ejected, restarted, removed): whatever it cached may be gone."""
        self._keys.pop(url, None)

    def session(self, key: str) -> str | None:
        return self._sessions.get(key)

    def stick(self, key: str, url: str) -> None:
        """Keep session `key` on `url`; the least recently used session is dropped at the bound."""
        sessions = self._sessions
        sessions[key] = url
        sessions.move_to_end(key)
        if len(sessions) > self.settings.max_sessions:
            sessions.popitem(last=False)
