"""How each kind of real server differs from the sim's vLLM default, read from the servers' code.

OpenAI-compatible servers agree on `/v1/chat/completions` and little else. A `Quirks` names
what a kind does that a gateway must survive: which health, metrics and tokenize endpoints it
has, whether it honours `stream_options.include_usage`, what it does with `n`, what its error
bodies and statuses look like (500 for a validation error included), and when a stream's
headers go out. `triage sim --quirks NAME` serves one of `QUIRKS`; `vllm` is the default.

Where each fact was read (snapshots of 2025-2026):

- vllm: vllm-project/vllm `vllm/entrypoints/utils.py` (`create_error_response`: body
  `{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`, code the HTTP
  status), `vllm/entrypoints/serve/exception_handler/handler/validation.py` (pydantic errors:
  400, type "Bad Request"), `vllm/entrypoints/openai/engine/protocol.py` (`ErrorResponse`,
  `StreamOptions`, `UsageInfo`), `vllm/entrypoints/serve/tokenize/{api_router,protocol}.py`
  (POST /tokenize `{"model", "prompt"}` or `{"model", "messages"}` ->
  `{"count", "max_model_len", "tokens", "token_strs"}`), `vllm/entrypoints/utils.py`
  `should_include_usage` (usage chunk only when asked). Versions before ~0.9 answered errors
  flat (`{"object": "error", "message", ...}`); the nested shape is today's.
- sglang: sgl-project/sglang `python/sglang/srt/entrypoints/http_server.py`: validation
  errors 400 with the flat legacy body `{"object": "error", "message", "type": "Bad Request",
  "param": null, "code": 400}`; `GET /health` is 503 while starting and otherwise runs a
  one-token generation, answering after at least one second (`await asyncio.sleep(1)` before
  its first check); POST /tokenize and /v1/tokenize `{"model", "prompt"}` ->
  `{"tokens", "count", "max_model_len"}`; `/metrics` only with `--enable-metrics`
  (`sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`).
  `.../openai/serving_base.py`: no model-name check, `n` summed into usage.
- llama_cpp (native `llama-server`): ggml-org/llama.cpp `tools/server/server.cpp`
  (`ex_wrapper`: `std::invalid_argument` -> 400 `invalid_request_error`, any other exception
  -> 500 `server_error`; body `{"error": {"code", "message", "type"}}`; `/metrics` without
  `--metrics` is 501 `not_supported_error`), `tools/server/server-common.cpp`
  (`oaicompat_chat_params_parse`: missing `messages` is `invalid_argument` (400), `n != 1` a
  `runtime_error` "Only one completion choice is allowed" (500); `json_value` falls back to the
  default for a wrongly typed field such as `"max_tokens": "many"`), `tools/server/
  server-task.cpp` (`include_usage` adds a last chunk with `choices: []`; a stream waits for
  its first result before sending headers), `tools/server/README.md` (GET /health: 503
  "Loading model" while loading, then 200 `{"status": "ok"}`; POST /tokenize
  `{"content"}` -> `{"tokens"}`; metrics `llamacpp:requests_processing`,
  `llamacpp:requests_deferred`, `llamacpp:prompt_tokens_total`,
  `llamacpp:tokens_predicted_total`). The model name is not checked.
- llama_cpp_python: abetlen/llama-cpp-python @3691546 `llama_cpp/server/errors.py`
  (`RouteErrorHandler` catches every exception, pydantic's `RequestValidationError`
  included, and answers 500 `{"error": {"message", "type": "internal_server_error",
  "param": null, "code": null}}`, except "exceed context window" -> 400
  `context_length_exceeded`), `llama_cpp/server/app.py` (no /health, no /metrics; `n`
  excluded from the call, so ignored; POST /extras/tokenize/count `{"input", "model"}` ->
  `{"count"}`; SSE via sse-starlette, headers at once), `llama_cpp/server/types.py`
  (`messages` defaults to `[]`; no `stream_options` field, so no usage in streams),
  `llama_cpp/server/model.py` (an unknown model name falls back to the default model).
- ollama: ollama/ollama @fb30760 `server/routes.go` (no /health, no /metrics; `GET /` answers
  200 "Ollama is running"; no tokenize route), `openai/openai.go` (`NewError`: 400
  `invalid_request_error`, 404 `not_found_error`, else `api_error`, with `param` and `code`
  null; no `n` field, so ignored), `middleware/openai.go` (missing `messages`: 400 "[] is too
  short - 'messages'"; a JSON type error is 400; `include_usage` adds a usage chunk with
  `choices: []`, other chunks carry no `usage` key; headers go out with the first chunk).
- openai (hosted): https://platform.openai.com/docs/api-reference/chat/create (`n`,
  `stream_options.include_usage`: every chunk has `"usage": null`, a last chunk has
  `choices: []`) and https://platform.openai.com/docs/guides/error-codes (400
  `invalid_request_error` with `param` and a string `code`; 404 `model_not_found`). No
  health, metrics or tokenize endpoint.

Agent APIs (`native_apis`: the Anthropic Messages and OpenAI Responses endpoints the kind
serves besides chat; `reasoning_field`: the chat message and delta field of reasoning text):

- vllm: both. `vllm/entrypoints/anthropic/api_router.py` (POST /v1/messages and
  /v1/messages/count_tokens), `vllm/entrypoints/openai/responses/` (POST /v1/responses).
  Reasoning is `reasoning`: `ChatMessage` (`vllm/entrypoints/openai/chat_completion/
  protocol.py`) and `DeltaMessage` (`vllm/entrypoints/generate/base/protocol.py`) have no
  other field. vLLM renamed `reasoning_content` to `reasoning` in PR #27752 (RFC #27755,
  2025-10), sending both for a while, then dropped the old name (0.17, PR #36730, as
  run-llama/llama_index PR #21076 reports). The sim sends what current vLLM sends, so a
  gateway reading only the old name fails against it, as it would against vLLM.
- sglang: /v1/responses (`python/sglang/srt/entrypoints/openai/serving_responses.py`), no
  /v1/messages; reasoning in `reasoning_content`.
- llama_cpp: /v1/messages and /v1/messages/count_tokens (ggml-org/llama.cpp PR #17570,
  merged 2025-11-28); no /v1/responses (feature request #19138, open); reasoning in
  `reasoning_content`.
- ollama: both, `server/routes.go` (`/v1/responses` via `ResponsesMiddleware`, `/v1/messages`
  via `AnthropicMessagesMiddleware`, PR #13600, v0.14); reasoning in `reasoning`.
- llama_cpp_python: neither, and no reasoning parser. openai (hosted): /v1/responses only,
  and Chat Completions never returns reasoning text.

Where a kind serves an agent API the sim answers in vLLM's shapes (gateway/sim/messages.py,
gateway/sim/responses.py): the endpoint exists, its details are vLLM's.

Non-streamed answers: every one of these sends headers only with the whole body (a FastAPI
`JSONResponse`, a Go `json.Encoder` write, llama.cpp's non-stream result); the sim does too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType
from typing import Literal

import orjson

__all__ = [
    "QUIRKS",
    "ContextCheck",
    "ErrorStyle",
    "MetricsStyle",
    "NHandling",
    "NativeApi",
    "Quirks",
    "TokenizeStyle",
    "quirks_from_name",
]

ErrorStyle = Literal["openai", "vllm", "sglang", "llama_cpp", "llama_cpp_python", "ollama"]
MetricsStyle = Literal["vllm", "sglang", "llama_cpp"]
TokenizeStyle = Literal["vllm", "sglang", "llama_cpp", "llama_cpp_python"]
NHandling = Literal["supported", "ignored", "refused"]
ContextCheck = Literal["prompt_and_output", "prompt_only", "none"]
NativeApi = Literal["messages", "responses"]


@dataclass(frozen=True, slots=True)
class Quirks:
    """What one kind of server does differently; the module docstring says where each was read.

    `validation_status`: the status of a malformed body (a missing field, a wrong type);
    `lenient_types`: wrongly typed fields fall back to defaults instead (llama.cpp).
    `n`: `supported` answers n choices, `ignored` answers one, `refused` is `n_status`.
    `check_model`: an unknown model name is a 404 (else the served model answers it).
    `context_check`: what must fit the context window (prompt and max_tokens, the prompt only,
    or nothing: the server truncates). `stream_headers_at_first_token`: a stream's headers wait
    for prefill. `null_usage_in_chunks`: with include_usage, chunks carry `"usage": null`.
    `native_apis`: the agent APIs served besides chat; `reasoning_field`: where a chat answer
    carries reasoning text (None: the kind never separates it).
    """

    name: str
    health_path: str | None
    health_body: bytes
    health_delay_s: float
    metrics: MetricsStyle | None
    metrics_off_status: int
    tokenize: TokenizeStyle | None
    tokenize_paths: tuple[str, ...]
    stream_usage: bool
    null_usage_in_chunks: bool
    n: NHandling
    n_status: int
    errors: ErrorStyle
    validation_status: int
    lenient_types: bool
    messages_required: bool
    stream_options_need_stream: bool
    check_model: bool
    echo_model: bool
    context_check: ContextCheck
    stream_headers_at_first_token: bool
    native_apis: frozenset[NativeApi] = frozenset()
    reasoning_field: str | None = "reasoning"

    def error_body(
        self, status: int, message: str, type: str, param: str | None, code: str | None
    ) -> bytes:
        """The body this kind of server answers an error with."""
        style = self.errors
        if style == "vllm":
            return _dumps(
                {
                    "error": {
                        "message": message,
                        "type": _VLLM_TYPES.get(status, _phrase(status)),
                        "param": param,
                        "code": status,
                    }
                }
            )
        if style == "sglang":
            return _dumps(
                {
                    "object": "error",
                    "message": message,
                    "type": _phrase(status),
                    "param": param,
                    "code": status,
                }
            )
        if style == "llama_cpp":
            kind = _LLAMA_CPP_TYPES.get(status, "server_error")
            return _dumps({"error": {"code": status, "message": message, "type": kind}})
        if style == "ollama":
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            return _dumps(
                {"error": {"message": message, "type": kind, "param": None, "code": None}}
            )
        if style == "llama_cpp_python" and status == 500:
            type, param, code = "internal_server_error", None, None
        return _dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


_VLLM_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
_LLAMA_CPP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


def _dumps(value: object) -> bytes:
    return orjson.dumps(value)


_VLLM = Quirks(
    name="vllm",
    health_path="/health",
    health_body=b"",
    health_delay_s=0.0,
    metrics="vllm",
    metrics_off_status=404,
    tokenize="vllm",
    tokenize_paths=("/tokenize",),
    stream_usage=True,
    null_usage_in_chunks=True,
    n="supported",
    n_status=400,
    errors="vllm",
    validation_status=400,
    lenient_types=False,
    messages_required=True,
    stream_options_need_stream=True,
    check_model=True,
    echo_model=False,
    context_check="prompt_and_output",
    stream_headers_at_first_token=False,
    native_apis=frozenset({"messages", "responses"}),
)

QUIRKS: Mapping[str, Quirks] = MappingProxyType(
    {
        "vllm": _VLLM,
        "sglang": Quirks(
            name="sglang",
            health_path="/health",
            health_body=b"",
            health_delay_s=1.0,
            metrics="sglang",
            metrics_off_status=404,
            tokenize="sglang",
            tokenize_paths=("/tokenize", "/v1/tokenize"),
            stream_usage=True,
            null_usage_in_chunks=True,
            n="supported",
            n_status=400,
            errors="sglang",
            validation_status=400,
            lenient_types=False,
            messages_required=True,
            stream_options_need_stream=False,
            check_model=False,
            echo_model=True,
            context_check="prompt_and_output",
            stream_headers_at_first_token=False,
            native_apis=frozenset({"responses"}),
            reasoning_field="reasoning_content",
        ),
        "llama_cpp": Quirks(
            name="llama_cpp",
            health_path="/health",
            health_body=b'{"status":"ok"}',
            health_delay_s=0.0,
            metrics="llama_cpp",
            metrics_off_status=501,
            tokenize="llama_cpp",
            tokenize_paths=("/tokenize",),
            stream_usage=True,
            null_usage_in_chunks=False,
            n="refused",
            n_status=500,
            errors="llama_cpp",
            validation_status=400,
            lenient_types=True,
            messages_required=True,
            stream_options_need_stream=False,
            check_model=False,
            echo_model=True,
            context_check="prompt_only",
            stream_headers_at_first_token=True,
            native_apis=frozenset({"messages"}),
            reasoning_field="reasoning_content",
        ),
        "llama_cpp_python": Quirks(
            name="llama_cpp_python",
            health_path=None,
            health_body=b"",
            health_delay_s=0.0,
            metrics=None,
            metrics_off_status=404,
            tokenize="llama_cpp_python",
            tokenize_paths=("/extras/tokenize/count",),
            stream_usage=False,
            null_usage_in_chunks=False,
            n="ignored",
            n_status=400,
            errors="llama_cpp_python",
            validation_status=500,
            lenient_types=False,
            messages_required=False,
            stream_options_need_stream=False,
            check_model=False,
            echo_model=True,
            context_check="prompt_only",
            stream_headers_at_first_token=False,
            reasoning_field=None,
        ),
        "ollama": Quirks(
            name="ollama",
            health_path="/",
            health_body=b"Ollama is running",
            health_delay_s=0.0,
            metrics=None,
            metrics_off_status=404,
            tokenize=None,
            tokenize_paths=(),
            stream_usage=True,
            null_usage_in_chunks=False,
            n="ignored",
            n_status=400,
            errors="ollama",
            validation_status=400,
            lenient_types=False,
            messages_required=True,
            stream_options_need_stream=False,
            check_model=True,
            echo_model=True,
            context_check="none",
            stream_headers_at_first_token=True,
            native_apis=frozenset({"messages", "responses"}),
        ),
        "openai": Quirks(
            name="openai",
            health_path=None,
            health_body=b"",
            health_delay_s=0.0,
            metrics=None,
            metrics_off_status=404,
            tokenize=None,
            tokenize_paths=(),
            stream_usage=True,
            null_usage_in_chunks=True,
            n="supported",
            n_status=400,
            errors="openai",
            validation_status=400,
            lenient_types=False,
            messages_required=True,
            stream_options_need_stream=True,
            check_model=True,
            echo_model=False,
            context_check="prompt_and_output",
            stream_headers_at_first_token=False,
            native_apis=frozenset({"responses"}),
            reasoning_field=None,
        ),
    }
)


def quirks_from_name(name: str) -> Quirks:
    """The named quirk profile; ValueError listing the valid names if there is none."""
    try:
        return QUIRKS[name]
    except KeyError:
        valid = ", ".join(sorted(QUIRKS))
        raise ValueError(f"unknown quirks {name!r}; valid quirks: {valid}") from None
