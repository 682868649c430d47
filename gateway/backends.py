"""What kind of server a model's replicas are, and what each kind offers besides inference.

vLLM, SGLang, llama.cpp's servers, Ollama and hosted OpenAI-compatible APIs agree on
`/v1/chat/completions` and little else: health endpoints, load metrics, tokenizers and
usage in streams differ. A model's `server:` in the policy picks one row of `DEFAULTS`;
`health_path`, `metrics_path` and `tokenize_path` override single entries of it (null: the
server has none). Where each fact was read is cited in `gateway/sim/quirks.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

__all__ = ["DEFAULTS", "SERVER_KINDS", "Backend", "ServerKind", "TokenizeApi"]

ServerKind = Literal["vllm", "sglang", "llama_cpp", "llama_cpp_python", "ollama", "openai"]
SERVER_KINDS: tuple[ServerKind, ...] = get_args(ServerKind)

# How a tokenize endpoint is asked, by the server that offers it (the sim serves each one
# under `triage sim --quirks KIND`; sources in gateway/sim/quirks.py):
#   vllm: POST /tokenize {"model", "prompt": str} -> {"count", "max_model_len", "tokens",
#     "token_strs"}; vLLM also takes {"model", "messages": [...]} and then counts the chat
#     template too (what a chat completion's prompt_tokens will be). SGLang's /tokenize takes
#     the same prompt form (no messages) -> {"tokens", "count", "max_model_len"}.
#   llama_cpp: POST /tokenize {"content": str} -> {"tokens": [int]} (llama-server; add
#     "with_pieces": true for the strings). Raw text only: the chat template is applied
#     first by POST /apply-template {"messages"} -> {"prompt"} (gateway/tokenize.py).
#   llama_cpp_python: POST /extras/tokenize/count {"input": str, "model"?} -> {"count": int}.
# Errors come back in the server's own error shape with a 4xx (llama-cpp-python: 500).
TokenizeApi = Literal["vllm", "llama_cpp", "llama_cpp_python"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One model's server kind and the paths (from the server's root, not `/v1`) it offers.

    A path of None means the server has no such endpoint: no active health probe (passive
    checks only), no load scrape (latency alone), no tokenizer (usage estimated).
    `stream_usage`: the server honours `stream_options.include_usage`.
    """

    kind: ServerKind
    health_path: str | None
    metrics_path: str | None
    tokenize_path: str | None
    tokenize_api: TokenizeApi | None
    stream_usage: bool


DEFAULTS: MappingProxyType[ServerKind, Backend] = MappingProxyType(
    {
        # vLLM: /health 200 once serving (503 if the engine died); /metrics always on.
        "vllm": Backend("vllm", "/health", "/metrics", "/tokenize", "vllm", True),
        # SGLang: /health is 503 while starting, then runs a one-token generation and answers
        # after >= 1 s (sglang http_server.py), so a probe needs a timeout above a second.
        # /metrics only with --enable-metrics (404 otherwise); /tokenize since 2025.
        "sglang": Backend("sglang", "/health", "/metrics", "/tokenize", "vllm", True),
        # llama-server: /health 503 "Loading model" then 200; /metrics answers 501
        # not_supported_error unless started with --metrics; include_usage honoured by
        # current builds (server-task.cpp), older ones put usage on the finish chunk.
        "llama_cpp": Backend("llama_cpp", "/health", "/metrics", "/tokenize", "llama_cpp", True),
        # llama-cpp-python: no /health, no /metrics, stream_options dropped (types.py).
        "llama_cpp_python": Backend(
            "llama_cpp_python", None, None, "/extras/tokenize/count", "llama_cpp_python", False
        ),
        # Ollama: no /health or /metrics, but `GET /` answers 200 "Ollama is running"
        # (server/routes.go); no tokenize route; include_usage honoured (middleware/openai.go).
        "ollama": Backend("ollama", "/", None, None, None, True),
        # Hosted OpenAI-compatible APIs: inference only.
        "openai": Backend("openai", None, None, None, None, True),
    }
)
