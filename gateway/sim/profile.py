"""Latency and capacity profiles for the simulated GPU backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["PROFILES", "SimProfile", "profile_from_name"]


@dataclass(frozen=True, slots=True)
class SimProfile:
    """How one simulated vLLM replica behaves.

    Time to first token is `ttft_ms + uncached_prompt_tokens * prefill_ms_per_token`, where the
    uncached tokens are those after the prompt's longest prefix of `block_size`-token blocks
    still in the KV cache (gateway/sim/kvcache.py); after it, one token every `itl_ms`, slowed
    by up to `batch_slowdown` times as the batch fills to `max_num_seqs`. Every delay is
    multiplied by a factor drawn within `1 ± jitter`.

    `kv_blocks` is the KV cache's size in blocks (vLLM's `num_gpu_blocks`). A request holds
    the blocks of its prompt and output while it runs and waits when they do not fit. vLLM
    refuses to start when the cache cannot hold one `max_model_len` sequence; the sim allows it
    (tests ask for huge windows) and gives a longer sequence the whole cache instead.
    """

    model: str
    ttft_ms: float
    prefill_ms_per_token: float
    itl_ms: float
    max_num_seqs: int
    batch_slowdown: float = 1.0
    jitter: float = 0.0
    seed: int = 0
    max_model_len: int = 131072
    # Length of an answer when the request sets no max_tokens (and the model "stops" by itself).
    output_tokens_min: int = 20
    output_tokens_max: int = 120
    # ~400k tokens: what vLLM finds free on an H100 (0.9 of its memory) for an 8B model at
    # 128 KiB of KV per token (32 layers x 8 KV heads x 128 x K,V x BF16) next to 16 GB of
    # weights, and per GPU for a 70B model over 4 (80 layers: 320 KiB per token, 35 GB each).
    kv_blocks: int = 25_000
    block_size: int = 16  # vLLM's default (CacheConfig.DEFAULT_BLOCK_SIZE)

    def __post_init__(self) -> None:
        problems = [
            *_at_least(self, 0.0, "ttft_ms", "prefill_ms_per_token", "itl_ms"),
            *_at_least(
                self,
                1,
                "max_num_seqs",
                "max_model_len",
                "output_tokens_min",
                "kv_blocks",
                "block_size",
            ),
            *_at_least(self, 1.0, "batch_slowdown"),
        ]
        if not self.model:
            problems.append("model must not be empty")
        if not 0.0 <= self.jitter < 1.0:
            problems.append(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.output_tokens_max < self.output_tokens_min:
            problems.append(
                f"output_tokens_max ({self.output_tokens_max}) must be >= "
                f"output_tokens_min ({self.output_tokens_min})"
            )
        if problems:
            raise ValueError("invalid SimProfile: " + "; ".join(problems))

    @property
    def is_instant(self) -> bool:
        """True when the profile never sleeps, so requests can skip all timing machinery."""
        return self.ttft_ms == 0 and self.prefill_ms_per_token == 0 and self.itl_ms == 0


def _at_least(profile: SimProfile, minimum: float, *names: str) -> list[str]:
    return [
        f"{name} must be >= {minimum}, got {getattr(profile, name)!r}"
        for name in names
        if getattr(profile, name) < minimum
    ]


# Figures are in the range vLLM reaches on one H100 with BF16 weights: an 8B model prefills a
# 256-token prompt in well under 100 ms and decodes at ~80 tokens/s per sequence; a 70B model
# (tensor parallel) is roughly 3-4x slower on both.
PROFILES: Mapping[str, SimProfile] = MappingProxyType(
    {
        "small": SimProfile(
            model="llama-3.1-8b-instruct",
            ttft_ms=45.0,
            prefill_ms_per_token=0.15,
            itl_ms=12.0,
            max_num_seqs=64,
            batch_slowdown=2.0,
            jitter=0.1,
        ),
        "large": SimProfile(
            model="llama-3.1-70b-instruct",
            ttft_ms=180.0,
            prefill_ms_per_token=0.6,
            itl_ms=35.0,
            max_num_seqs=32,
            batch_slowdown=1.8,
            jitter=0.1,
        ),
        "instant": SimProfile(
            model="llama-3.1-8b-instruct",
            ttft_ms=0.0,
            prefill_ms_per_token=0.0,
            itl_ms=0.0,
            max_num_seqs=1024,
        ),
    }
)


def profile_from_name(name: str, **overrides: object) -> SimProfile:
    """Return the named profile with `overrides` applied.

    Overrides whose value is None are ignored, so unset CLI flags keep the profile's value.
    Raises ValueError for an unknown profile or field name, or an invalid value.
    """
    try:
        base = PROFILES[name]
    except KeyError:
        valid = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown sim profile {name!r}; valid profiles: {valid}") from None
    fields = {field.name for field in dataclasses.fields(SimProfile)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown SimProfile field(s) {', '.join(unknown)}; valid fields: "
            + ", ".join(sorted(fields))
        )
    changes: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(base, **changes)
