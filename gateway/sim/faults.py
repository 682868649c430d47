"""Failure injection settings for the simulated backend."""

from __future__ import annotations

import random
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FAULT_KINDS", "FaultConfig", "FaultKind"]

FaultKind = Literal["429", "500", "503", "reset", "hang", "stall"]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)


class FaultConfig(BaseModel):
    """Which fault to inject, and how often.

    Each inference request draws once from the sim's seeded RNG and gets `kind` with
    probability `rate` (1.0 means every request, 0.0, the default, means none):

    - `429`: rate-limit error with a `Retry-After` of `retry_after_s`;
    - `500`, `503`: server error bodies;
    - `reset`: the TCP connection is reset before any response byte;
    - `hang`: no response at all until the client goes away;
    - `stall`: a stream sends `stall_after_tokens` tokens then goes silent without closing
      (a non-streamed request hangs).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float = Field(default=0.0, ge=0.0, le=1.0)
    kind: FaultKind = "500"
    retry_after_s: float = Field(default=1.0, ge=0.0)
    stall_after_tokens: int = Field(default=3, ge=0)

    def draw(self, rng: random.Random) -> FaultKind | None:
        """Return the fault for one request, or None; draws nothing when the rate is 0."""
        if self.rate <= 0.0:
            return None
        return self.kind if rng.random() < self.rate else None
