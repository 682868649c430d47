"""A stand-in for llama-cpp-python's server where usage is concerned, run as its own process.

    python -m tests.support.fake_llama_cpp_python --port N [--no-json-usage]

What it copies from abetlen/llama-cpp-python @3691546 (`llama_cpp/server/app.py`,
`llama_cpp/llama.py`): streams carry no usage whatever `stream_options` says; chunks are
`json.dumps` output (a space after each colon) sent by sse-starlette with CRLF line ends;
the answer echoes the request's `model`; POST /extras/tokenize/count `{"input", "model"}`
answers `{"count"}`, counting the BOS token it adds. Its "tokenizer" is one token per
whitespace-separated word (plus that BOS), so tests know the exact counts. Answers are
one word per token: `max_tokens` words. `--no-json-usage` leaves `usage` out of
non-streamed answers too (as some OpenAI-compatible servers do). `GET /stats` counts
the requests seen; `GET /health` answers 200 (the real server has none).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


def count_tokens(text: str) -> int:
    """What this server's tokenize endpoint answers: BOS plus one token per word."""
    return len(text.split()) + 1


def build_app(json_usage: bool) -> Starlette:
    stats = {"chat": 0, "tokenize": 0}

    async def chat(request: Request) -> Response:
        stats["chat"] += 1
        body = await request.json()
        words = [WORDS[i % len(WORDS)] for i in range(int(body.get("max_tokens") or 4))]
        pieces = [words[0], *(" " + w for w in words[1:])]
        envelope = {"id": "chatcmpl-fake", "created": 1700000000, "model": body["model"]}
        if body.get("stream"):
            return StreamingResponse(_stream(envelope, pieces), media_type="text/event-stream")
        reply: dict[str, Any] = {
            **envelope,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces)},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
        }
        if json_usage:
            prompt = sum(count_tokens(str(m.get("content"))) for m in body["messages"])
            reply["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": len(pieces),
                "total_tokens": prompt + len(pieces),
            }
        return JSONResponse(reply)

    async def tokenize_count(request: Request) -> Response:
        stats["tokenize"] += 1
        body = await request.json()
        return JSONResponse({"count": count_tokens(body["input"])})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_stats(request: Request) -> Response:
        return JSONResponse(stats)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/extras/tokenize/count", tokenize_count, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/stats", get_stats, methods=["GET"]),
        ]
    )


async def _stream(envelope: dict[str, Any], pieces: list[str]) -> AsyncIterator[bytes]:
    def event(delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk = {**envelope, "object": "chat.completion.chunk", "choices": [choice]}
        return b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"

    yield event({"role": "assistant"}, None)
    for piece in pieces:
        yield event({"content": piece}, None)
    yield event({}, "length")
    yield b"data: [DONE]\r\n\r\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-json-usage", action="store_true")
    args = parser.parse_args()
    app = build_app(json_usage=not args.no_json_usage)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
