"""The sim's embeddings endpoint: unit vectors derived from a hash of each input."""

from __future__ import annotations

import hashlib
import math
import struct

from starlette.types import Receive, Scope, Send

from gateway.sim.asgi import send_json
from gateway.sim.protocol import parse_embedding_request
from gateway.sim.service import SimService
from gateway.sim.shapes import embeddings_body
from gateway.sim.tokens import count_tokens

__all__ = ["EMBEDDING_DIMS", "EmbeddingsEndpoint", "embed"]

EMBEDDING_DIMS = 16


def embed(text: str, *, model: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    """A deterministic unit vector for `text`: equal texts get equal vectors, others differ."""
    if not 1 <= dims <= 32:
        raise ValueError(f"dims must be in 1..32, got {dims}")
    digest = hashlib.blake2b(f"{model}\x00{text}".encode(), digest_size=2 * dims).digest()
    # Centre the 16-bit values on zero; none is exactly zero, so the norm never is.
    raw = [value - 32767.5 for value in struct.unpack(f">{dims}H", digest)]
    norm = math.sqrt(sum(value * value for value in raw))
    return [value / norm for value in raw]


class EmbeddingsEndpoint:
    """ASGI app for POST /v1/embeddings."""

    def __init__(self, service: SimService) -> None:
        self._service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self._service
        service.note_trace(scope)
        request = await service.accept(receive, send, parse_embedding_request)
        if request is None:
            return
        fault = service.draw_fault()
        if fault is not None and await service.inject_fault(
            fault, scope, receive, send, can_stall=False
        ):
            return
        model = service.profile.model
        body = embeddings_body(
            model=model,
            vectors=[embed(text, model=model) for text in request.inputs],
            prompt_tokens=sum(count_tokens(text) for text in request.inputs),
        )
        await send_json(send, 200, body)
        service.stats.requests_completed += 1
