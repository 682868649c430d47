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

# How a tokenize endpoint is asked, by the server that offers it:
#   vllm: POST {"model", "prompt"} -> {"count", "tokens"}
#   llama_cpp: POST {"content"} -> {"tokens"}
#   llama_cpp_python: POST {"input", "model"} -> {"count"} (`/extras/tokenize/count`)
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
        "vllm": Backend("vllm", "/health", "/metrics", "/tokenize", "vllm", True),
        "sglang": Backend("sglang", "/health", "/metrics", None, None, True),
        "llama_cpp": Backend("llama_cpp", "/health", "/metrics", "/tokenize", "llama_cpp", True),
        "llama_cpp_python": Backend(
            "llama_cpp_python", None, None, "/extras/tokenize/count", "llama_cpp_python", False
        ),
        "ollama": Backend("ollama", None, None, None, None, True),
        "openai": Backend("openai", None, None, None, None, True),
    }
)
