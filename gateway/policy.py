"""The routing policy: YAML -> one validated, immutable `Policy`, or every error with its path.

Loading runs in two phases, as TensorZero does with its config: pydantic checks each
section's shape (unknown keys are errors), then `_check_references` checks what spans
sections (tiers -> models, rules and fallbacks -> tiers, classifier settings). Every
problem becomes one line that starts with its dotted YAML path, and all of them are
reported together so an operator fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.api.schemas import RequestKind
from gateway.backend_api import BackendApi
from gateway.backends import DEFAULTS, Backend, ServerKind
from gateway.telemetry.settings import TelemetrySettings

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "ENDPOINTS",
    "GENERATION",
    "RESERVED_MODEL_NAMES",
    "Auth",
    "Breaker",
    "Budgets",
    "CacheSettings",
    "FeedbackSettings",
    "Hedging",
    "Limits",
    "ModelSpec",
    "OnExhausted",
    "Policy",
    "PolicyError",
    "PrefixBalancing",
    "Price",
    "ResponsesSettings",
    "RetrainSettings",
    "Retries",
    "Routing",
    "Rule",
    "RuleCondition",
    "Server",
    "ShadowSettings",
    "SimulatedPool",
    "Slo",
    "StoreSettings",
    "Tenant",
    "TenantBudget",
    "Tier",
    "TierCache",
    "WindowBudget",
    "hash_key",
    "load_policy",
    "parse_policy",
    "resolve_classifier_path",
]

RESERVED_MODEL_NAMES = frozenset({"auto"})
# What `auto` routes by difficulty: the endpoints whose requests carry a prompt to score.
GENERATION: frozenset[RequestKind] = frozenset({"chat", "completions"})
ENDPOINTS: tuple[RequestKind, ...] = get_args(RequestKind)
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class PolicyError(ValueError):
    """A policy failed to load; `errors` holds one `path: message` line per problem."""

    def __init__(self, errors: list[str], source: str = "policy") -> None:
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """USD per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


class SimulatedPool(_Strict):
    """Start this model's replicas as simulated GPU servers on loopback (demo and tests)."""

    profile: Literal["small", "large", "instant"]
    replicas: int = Field(2, ge=1, le=32)
    ttft_ms: float | None = Field(None, ge=0)
    itl_ms: float | None = Field(None, ge=0)
    max_num_seqs: int | None = Field(None, ge=1)
    seed: int = 0


class ModelSpec(_Strict):
    """One concrete model: the pool of replicas that serve it and what its tokens cost."""

    replicas: tuple[str, ...] = ()
    simulate: SimulatedPool | None = None
    served_name: str | None = None
    price: Price = Price()
    api_key: str | None = Field(None, repr=False)
    # Sequences each replica runs at once (vLLM's --max-num-seqs): SLO admission knows the
    # limit from the first request, not only once a load report has shown a queue.
    max_num_seqs: int | None = Field(None, ge=1)
    # What kind of server the replicas are (gateway/backends.py): which health, metrics and
    # tokenize endpoints they have. Each path overrides the kind's default; null: none.
    server: ServerKind = "vllm"
    health_path: str | None = None
    metrics_path: str | None = None
    tokenize_path: str | None = None
    # The API endpoints its servers answer: an embedding model says `endpoints: [embeddings]`,
    # so that no chat request is routed to it (and no embedding request to a chat model).
    endpoints: tuple[RequestKind, ...] = ("chat", "completions")
    # The API its servers are sent chat requests in (gateway/backend_api/): `chat` is
    # /v1/chat/completions; `messages` and `responses` are Anthropic's and OpenAI's agent
    # APIs (vLLM serves both). A client speaking the same one is passed through natively,
    # any other is translated. These carry chat only: such a model serves `endpoints: [chat]`.
    api: BackendApi = "chat"
    # How its pool chooses among its replicas, when not `server.balancer`: `prefix` for a
    # pool whose requests share long prompt prefixes or sessions (gateway/prefix.py).
    balancer: Literal["slo", "prefix"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _agent_api_serves_chat(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("api", "chat") != "chat" and "endpoints" not in data:
            return {**data, "endpoints": ["chat"]}
        return data

    @field_validator("endpoints", mode="before")
    @classmethod
    def _a_list(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list, like [chat, completions] or [embeddings]")
        return value

    @field_validator("endpoints")
    @classmethod
    def _distinct(cls, endpoints: tuple[RequestKind, ...]) -> tuple[RequestKind, ...]:
        if not endpoints:
            raise ValueError("must name at least one of chat, completions, embeddings")
        for endpoint in endpoints:
            if endpoints.count(endpoint) > 1:
                raise ValueError(f"{endpoint!r} is listed twice")
        return endpoints

    @field_validator("health_path", "metrics_path", "tokenize_path")
    @classmethod
    def _root_path(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError(f"must be a path from the server's root like /health, got {path!r}")
        return path

    @property
    def backend(self) -> Backend:
        """The server kind's endpoints with this model's overrides applied."""
        base = DEFAULTS[self.server]
        overrides = {
            name: getattr(self, name)
            for name in ("health_path", "metrics_path", "tokenize_path")
            if name in self.model_fields_set
        }
        return dataclasses.replace(base, **overrides)

    @field_validator("replicas")
    @classmethod
    def _urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"must be http(s) base URLs like http://host:8000/v1, got {url!r}")
        return tuple(url.rstrip("/") for url in urls)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if bool(self.replicas) == (self.simulate is not None):
            raise ValueError("give exactly one of `replicas` (URLs) or `simulate`")
        if self.tokenize_path is not None and DEFAULTS[self.server].tokenize_api is None:
            raise ValueError(
                f"tokenize_path: Triage knows no tokenize API of server {self.server!r}"
            )
        if self.api != "chat" and self.endpoints != ("chat",):
            raise ValueError(
                f"endpoints: a model with `api: {self.api}` serves chat only (endpoints: [chat]);"
                " completions and embeddings have no such API"
            )
        return self


class Slo(_Strict):
    ttft_ms: float = Field(gt=0)
    e2e_ms: float = Field(gt=0)
    percentile: float = Field(95.0, gt=0, le=100)
    # When neither the tier nor its fallbacks is predicted to meet the SLO, a standard
    # request waits this long for capacity (0: not at all), then is shed if `shed` is on.
    max_queue_ms: float = Field(500.0, ge=0)
    shed: bool = True


class Tier(_Strict):
    models: tuple[str, ...] = Field(min_length=1)
    slo: Slo | None = None
    # False when sending a request twice is not harmless: no hedging, no retry after a 5xx.
    idempotent: bool = True


class RuleCondition(_Strict):
    """All given conditions must hold for the rule to match."""

    header: dict[str, str] | None = None
    prompt_tokens_over: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _not_empty(self) -> RuleCondition:
        if self.header is None and self.prompt_tokens_over is None:
            raise ValueError("give at least one of `header`, `prompt_tokens_over`")
        return self


class Rule(_Strict):
    when: RuleCondition
    tier: str


class Hedging(_Strict):
    """A second copy of a request whose first byte is later than the tier's recent p95."""

    enabled: bool = True
    max_extra: float = Field(0.05, ge=0, le=1)  # hedged requests per request, at most
    min_delay_ms: float = Field(20.0, ge=0)


class Retries(_Strict):
    """Retries before the first byte, on another replica: connect errors, 5xx, 429."""

    max_attempts: int = Field(3, ge=1, le=10)  # sends per request, the first included
    budget: float = Field(0.1, ge=0, le=1)  # retries per request, at most


class FeedbackSettings(_Strict):
    """A JSONL log of routed requests, to retrain the classifier on (gateway/feedback.py)."""

    path: str
    sample_rate: float = Field(1.0, gt=0, le=1)
    prompts: Literal["hash", "text"] = "hash"  # text: prompts and request bodies in the log
    source: str = "gateway"  # the rows' `source` (training ranks and weights per source)


class ShadowSettings(_Strict):
    """Shadow comparisons (gateway/shadow.py): a sample of the requests one of two tiers
    answered is asked of the other too, after the client has its answer, and a judge
    compares the two answers in both orders; each comparison is a labelled row."""

    weak: str  # the cheap tier
    strong: str  # the tier it is compared with
    answered_by: Literal["either", "weak", "strong"] = "either"  # which answers are sampled
    sample_rate: float = Field(0.1, gt=0, le=1)
    judge: str  # a model or a tier
    judge_prompt: str | None = None  # None: gateway/judge.py's `DEFAULT_JUDGE_PROMPT`
    judge_max_tokens: int = Field(32, ge=1)
    # What shadow and judge calls may spend per UTC day, held like a tenant's budget.
    usd_per_day: float = Field(ge=0)
    prompts: Literal["hash", "text"] = "hash"  # text: prompt and request body in the rows
    path: str | None = None  # the labelled rows; None: routing.feedback's file
    source: str = "shadow"  # the rows' `source`
    max_in_flight: int = Field(4, ge=1)  # comparisons at once; more are dropped, counted


class RetrainSettings(_Strict):
    """Scheduled retraining (gateway/retrain.py): `triage classifier train --traffic` then
    `promote` into `routing.classifier`, by one replica at a time, and a reload on promotion."""

    data: tuple[str, ...] = Field(min_length=1)  # the base training data, as `train --data`
    labels: tuple[str, ...] = ()  # traffic labels; (): routing.shadow's file, else feedback's
    interval_s: float = Field(3600.0, gt=0)  # at least this long between two runs
    min_new_labels: int = Field(200, ge=1)  # labelled rows added since the last run
    candidates: str = "candidates"  # where each run's candidate model is written
    keep_candidates: int = Field(5, ge=1)  # the newest runs' candidates are kept, no more
    holdout: float = Field(0.2, gt=0, lt=1)  # labels never trained on: what promote compares
    timeout_s: float = Field(1800.0, gt=0)  # a run taking longer is killed
    check_s: float = Field(10.0, gt=0)  # how often new labels and a new model are looked for


class Routing(_Strict):
    default_tier: str | None = None
    classifier: str | None = None
    strong_fraction: float | None = Field(None, ge=0, le=1)
    thresholds: dict[str, float] | None = None
    rules: tuple[Rule, ...] = ()
    fallback: dict[str, tuple[str, ...]] = {}
    hedging: Hedging = Hedging()
    retries: Retries = Retries()
    # Upstream timeouts, as a multiple of the request's TTFT SLO (a stream, before its first
    # token) and of its e2e SLO (after it; a non-streamed answer, whose headers come with
    # its whole body, only this one).
    timeout_factor: float = Field(2.0, ge=1)
    feedback: FeedbackSettings | None = None
    shadow: ShadowSettings | None = None
    retrain: RetrainSettings | None = None


class ResponsesSettings(_Strict):
    """The Responses API's stored responses (`store`, `previous_response_id`)."""

    store_ttl_s: float = Field(30 * 86400, gt=0)  # OpenAI keeps them 30 days


class Breaker(_Strict):
    """Passive outlier ejection: when a replica is taken out, and how it comes back.

    Requests that got no answer (reset, timeout) eject after `failures` in a row; answered
    5xx only make a replica an outlier when its rate over `min_requests` answers or more is
    far above its peers' (one client's bad requests draw errors from every replica alike).
    At most `max_ejected_percent` of a pool is ejected on such suspicion (the first one
    always, as Envoy's `max_ejection_percent`; 0: never); refused connections eject anyway.
    """

    failures: int = Field(5, ge=1)  # consecutive unanswered requests that eject a replica
    cooldown_s: float = Field(1.0, gt=0)  # the first ejection's; doubles on each one
    max_cooldown_s: float = Field(30.0, gt=0)
    slow_start_s: float = Field(10.0, ge=0)  # a recovered replica's traffic ramps up
    max_ejected_percent: float = Field(50.0, ge=0, le=100)
    min_requests: int = Field(20, ge=1)  # answers in a replica's window to judge its 5xx rate

    @model_validator(mode="after")
    def _cooldowns(self) -> Breaker:
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError("max_cooldown_s must be >= cooldown_s")
        return self


class PrefixBalancing(_Strict):
    """The `prefix` balancer (gateway/prefix.py): where a prompt's prefix and session went."""

    chunk_chars: int = Field(256, ge=16)  # prompt characters per key of the index
    kv_tokens: int = Field(400_000, ge=1)  # each replica's KV cache: what the index remembers
    load_factor: float = Field(1.25, ge=1)  # no replica above this x the mean outstanding
    min_bound: int = Field(4, ge=1)  # ... unless it has fewer outstanding than this
    # Which session key keeps a conversation on its replica: the one the client names
    # (x-session-id, prompt_cache_key, a stored Responses conversation), the end user (the
    # body's `user`, Messages metadata.user_id), either (the client's first), or none.
    session: Literal["client", "user", "any", "none"] = "any"
    max_sessions: int = Field(100_000, ge=1)
    replica_header: bool = False  # answer with `x-triage-replica`, an opaque replica id


class Server(_Strict):
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    # Listener limits, read when the server starts (a reload does not change them).
    max_header_bytes: int = Field(32 * 1024, ge=1024)  # request line + headers: else 431
    max_headers: int = Field(100, ge=8)
    client_timeout_s: float = Field(30.0, gt=0)  # to send a whole request: else 408, closed
    admin_key: str | None = Field(None, repr=False)
    upstream_connect_timeout_s: float = Field(2.0, gt=0)
    upstream_timeout_s: float = Field(600.0, gt=0)
    upstream_connections_per_replica: int = Field(256, ge=1)
    health_check_interval_s: float = Field(5.0, gt=0)
    # slo: SLO-aware power of two choices with admission, hedging and retries; prefix: the
    # same, choosing first where the prompt's prefix and session went (`prefix:` below; a
    # pool of one replica computes nothing for it). A model's own `balancer` overrides this.
    # The others are the usual baselines, each request sent once, there to be compared against.
    balancer: Literal["slo", "prefix", "least_outstanding", "round_robin"] = "prefix"
    prefix: PrefixBalancing = PrefixBalancing()
    metrics_interval_s: float = Field(0.25, gt=0)  # how often replicas' /metrics are read
    breaker: Breaker = Breaker()

    @field_validator("admin_key")
    @classmethod
    def _hashed(cls, value: str | None) -> str | None:
        if value is not None and not _KEY_HASH.match(value):
            raise ValueError("must be a key hash `sha256:<64 hex>` (see `triage key new`)")
        return value


class StoreSettings(_Strict):
    """Shared state (cache entries, spend, rate windows, locks): Redis, or in-process."""

    redis_url: str | None = Field(None, repr=False)  # redis:// or rediss://; None: embedded
    cluster: bool = False  # redis_url names a node of a Redis Cluster
    timeout_ms: float = Field(50.0, gt=0)  # socket and connect timeout per Redis call
    breaker_failures: int = Field(3, ge=1)  # consecutive failures that open the breaker
    breaker_reset_s: float = Field(2.0, gt=0)  # how long it stays open before a probe
    embedded_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    key_prefix: str = "triage:"

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, prefix: str) -> str:
        if "{" in prefix or "}" in prefix:
            raise ValueError("must not contain { or }: keys carry their own cluster hash tags")
        return prefix

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^rediss?://", url):
            raise ValueError("must start with redis:// or rediss://")
        return url


class TierCache(_Strict):
    enabled: bool = True
    ttl_s: float | None = Field(None, gt=0)


class CacheSettings(_Strict):
    enabled: bool = True
    ttl_s: float = Field(3600.0, gt=0)
    tiers: dict[str, TierCache] = {}
    deterministic_only: bool = True  # cache only temperature 0 (or seeded, if allowed)
    cache_seeded: bool = False  # treat requests with a `seed` as deterministic
    max_entry_bytes: int = Field(1024 * 1024, gt=0)
    single_flight: bool = True
    single_flight_wait_s: float = Field(10.0, gt=0)


OnExhausted = Literal["downgrade", "reject"]


class WindowBudget(_Strict):
    """USD caps per calendar window (UTC). Unset windows are unlimited."""

    usd_per_minute: float | None = Field(None, ge=0)
    usd_per_hour: float | None = Field(None, ge=0)
    usd_per_day: float | None = Field(None, ge=0)
    usd_per_month: float | None = Field(None, ge=0)
    on_exhausted: OnExhausted = "reject"


class TenantBudget(WindowBudget):
    tiers: dict[str, WindowBudget] = {}


class Limits(_Strict):
    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens per minute (prompt + completion)
    on_exceeded: OnExhausted = "reject"


class Tenant(_Strict):
    keys: tuple[str, ...] = ()  # sha256:<hex> hashes of the tenant's API keys
    tiers: tuple[str, ...] | None = None  # tiers it may use; None: all
    cache_scope: str | None = None  # tenants with one scope share cache entries
    budget: TenantBudget | None = None
    limits: Limits | None = None
    priority: Literal["critical", "standard", "sheddable"] = "standard"

    @field_validator("keys")
    @classmethod
    def _hashed_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            if not _KEY_HASH.match(key):
                raise ValueError("must be key hashes `sha256:<64 hex>` (see `triage key new`)")
        return keys


class Auth(_Strict):
    # Callers without a key act as this tenant; `anonymous: null` requires a key.
    anonymous: Tenant | None = Tenant()


class Budgets(_Strict):
    tiers: dict[str, WindowBudget] = {}  # global caps per tier, across all tenants
    failure_mode: Literal["fail_open", "fail_closed"] = "fail_closed"
    default_max_tokens: int = Field(4096, ge=1)  # reserved when a request sets no max_tokens
    reservation_ttl_s: float = Field(900.0, gt=0)  # a dead gateway's reservations expire


class Policy(_Strict):
    """A validated routing policy. Immutable: a reload builds a new one."""

    version: Literal[1]
    server: Server = Server()
    models: dict[str, ModelSpec] = Field(min_length=1)
    tiers: dict[str, Tier] = Field(min_length=1)
    routing: Routing = Routing()
    store: StoreSettings = StoreSettings()
    cache: CacheSettings = CacheSettings()
    auth: Auth = Auth()
    tenants: dict[str, Tenant] = {}
    budgets: Budgets = Budgets()
    telemetry: TelemetrySettings = TelemetrySettings()
    # Model names clients send (an agent's Claude or GPT name) -> `auto`, a tier or a
    # model. A name with `*` is a pattern (`claude-*`); an exact name wins over patterns,
    # and patterns are tried in the order written.
    aliases: dict[str, str] = {}
    responses: ResponsesSettings = ResponsesSettings()

    def resolve_alias(self, name: str) -> str:
        """What `name` routes as: its alias target, or itself when no alias matches."""
        target = self.aliases.get(name)
        if target is not None:
            return target
        for pattern, target in self._alias_patterns:
            if pattern.fullmatch(name):
                return target
        return name

    @functools.cached_property
    def _alias_patterns(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple(
            (re.compile(".*".join(re.escape(part) for part in name.split("*"))), target)
            for name, target in self.aliases.items()
            if "*" in name
        )

    @property
    def default_tier(self) -> str:
        """Where `auto` goes when nothing else picks a tier: the first that serves chat,
        unless the policy names one."""
        return self.routing.default_tier or (self.tiers_serving("chat") or tuple(self.tiers))[0]

    @property
    def strongest_tier(self) -> str:
        """Where `strong_fraction` sends its share: the last tier (they are listed cheapest
        first) that serves chat. A tier of embedding models listed last is not "strongest"."""
        return (self.tiers_serving("chat") or tuple(self.tiers))[-1]

    @functools.cached_property
    def tier_endpoints(self) -> Mapping[str, frozenset[RequestKind]]:
        """What each tier serves: every endpoint one of its models serves."""
        models = self.models
        return {
            name: frozenset(e for m in tier.models if m in models for e in models[m].endpoints)
            for name, tier in self.tiers.items()
        }

    def tiers_serving(self, kind: RequestKind) -> tuple[str, ...]:
        """The tiers with a model that serves `kind`, in the policy's order."""
        return tuple(name for name, served in self.tier_endpoints.items() if kind in served)

    @functools.cached_property
    def has_quotas(self) -> bool:
        """Budgets or rate limits anywhere: state that is only right if every gateway
        process shares it (a Redis store). Without any, a request reserves nothing."""
        tenants = [*self.tenants.values(), *([self.auth.anonymous] if self.auth.anonymous else [])]
        return bool(self.budgets.tiers) or any(t.budget or t.limits for t in tenants)

    def tier_of_model(self, model: str) -> str:
        """The first tier that lists `model`; every model has one (the load checks it)."""
        return self._home_tiers[model]

    @functools.cached_property
    def _home_tiers(self) -> Mapping[str, str]:
        homes: dict[str, str] = {}
        for name, tier in self.tiers.items():
            for model in tier.models:
                homes.setdefault(model, name)
        return homes


def hash_key(key: str) -> str:
    """The form API and admin keys are stored in: never the key itself."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def load_policy(path: str | Path, environ: Mapping[str, str] | None = None) -> Policy:
    """Read, substitute `${VAR}` references, validate; raise PolicyError listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError([f"<file>: cannot read: {exc.strerror}"], str(path)) from exc
    except yaml.YAMLError as exc:
        raise PolicyError([f"<yaml>: {exc}".replace("\n", " ")], str(path)) from exc
    return parse_policy(raw, environ, source=str(path), base_dir=path.parent)


def parse_policy(
    raw: Any,
    environ: Mapping[str, str] | None = None,
    *,
    source: str = "policy",
    base_dir: Path | None = None,
) -> Policy:
    if not isinstance(raw, dict):
        raise PolicyError(["<root>: must be a mapping"], source)
    errors: list[str] = []
    substituted = _substitute_env(raw, os.environ if environ is None else environ, "", errors)
    if errors:
        raise PolicyError(errors, source)
    try:
        policy = Policy.model_validate(substituted)
    except ValidationError as exc:
        raise PolicyError(_format_validation_errors(exc), source) from exc
    errors = _check_references(policy, base_dir)
    if errors:
        raise PolicyError(errors, source)
    return policy


def resolve_classifier_path(policy: Policy, base_dir: Path | None) -> Path | None:
    """Relative classifier paths are looked up next to the policy, then in the project root."""
    if policy.routing.classifier is None:
        return None
    candidate = Path(policy.routing.classifier)
    if candidate.is_absolute():
        return candidate
    for root in (base_dir, Path.cwd(), Path(__file__).resolve().parent.parent):
        if root is not None and (root / candidate).exists():
            return (root / candidate).resolve()
    return candidate


def _substitute_env(node: Any, environ: Mapping[str, str], path: str, errors: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute_env(v, environ, _join(path, k), errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_env(v, environ, _join(path, i), errors) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        errors.append(f"{path or '<root>'}: environment variable {name} is not set (no default)")
        return ""

    value = _ENV_REFERENCE.sub(replace, node)
    # `key: ${VAR:-}` means "unset": let the field's own default apply.
    return None if value == "" and _ENV_REFERENCE.fullmatch(node) else value


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must not be empty",
    "literal_error": "must be one of {expected}",
}


def _format_validation_errors(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"]) or "<root>"
        template = _MESSAGES.get(error["type"])
        if template is not None:
            context = {k: _plain_number(v) for k, v in error.get("ctx", {}).items()}
            message = template.format(**context)
        else:
            message = error["msg"].removeprefix("Value error, ")
            message = message[0].lower() + message[1:] if message else message
        lines.append(f"{path}: {message}")
    return lines


def _plain_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _check_references(policy: Policy, base_dir: Path | None) -> list[str]:
    errors: list[str] = []
    tiers, models = policy.tiers, policy.models
    tier_names = ", ".join(tiers)

    for name in models:
        if name in RESERVED_MODEL_NAMES or name in tiers:
            errors.append(f"models.{name}: name is reserved or used by a tier")
    for name in tiers:
        if name in RESERVED_MODEL_NAMES:
            errors.append(f"tiers.{name}: name is reserved")
    for tier_name, tier in tiers.items():
        for i, model in enumerate(tier.models):
            if model not in models:
                errors.append(f"tiers.{tier_name}.models.{i}: unknown model {model!r}")
    # A model outside every tier would be listed and asked for, with nowhere to route it.
    for name in models:
        if name not in policy._home_tiers:
            errors.append(f"models.{name}: in no tier; add it to a tier's models or remove it")

    for alias, target in policy.aliases.items():
        if alias in models or alias in tiers or alias in RESERVED_MODEL_NAMES:
            errors.append(f"aliases.{alias}: already names a model, a tier or 'auto'")
        if target not in models and target not in tiers and target not in RESERVED_MODEL_NAMES:
            errors.append(
                f"aliases.{alias}: unknown target {target!r}: 'auto', a tier ({tier_names}) "
                "or a model"
            )

    routing = policy.routing
    if routing.default_tier is not None and routing.default_tier not in tiers:
        errors.append(f"routing.default_tier: unknown tier {routing.default_tier!r} ({tier_names})")
    for i, rule in enumerate(routing.rules):
        if rule.tier not in tiers:
            errors.append(f"routing.rules.{i}.tier: unknown tier {rule.tier!r} ({tier_names})")
    for tier_name, fallbacks in routing.fallback.items():
        if tier_name not in tiers:
            errors.append(f"routing.fallback.{tier_name}: unknown tier ({tier_names})")
        for i, fallback in enumerate(fallbacks):
            if fallback not in tiers:
                errors.append(f"routing.fallback.{tier_name}.{i}: unknown tier {fallback!r}")
            elif fallback == tier_name:
                errors.append(
                    f"routing.fallback.{tier_name}.{i}: a tier cannot fall back to itself"
                )

    if routing.thresholds is not None and routing.strong_fraction is not None:
        errors.append("routing: give `thresholds` or `strong_fraction`, not both")
    for tier_name, threshold in (routing.thresholds or {}).items():
        if tier_name not in tiers:
            errors.append(f"routing.thresholds.{tier_name}: unknown tier ({tier_names})")
        if not 0 <= threshold <= 1:
            errors.append(f"routing.thresholds.{tier_name}: must be between 0 and 1")
    uses_scores = routing.thresholds is not None or routing.strong_fraction is not None
    if uses_scores and routing.classifier is None:
        errors.append("routing.classifier: required when `thresholds` or `strong_fraction` is set")
    if routing.classifier is not None and not uses_scores:
        errors.append("routing: a classifier needs `thresholds` or `strong_fraction`")
    if routing.strong_fraction is not None and len(tiers) < 2:
        errors.append("routing.strong_fraction: needs at least two tiers")
    errors += _check_endpoints(policy)
    errors += _check_tenant_references(policy)
    errors += _check_shadow(policy)
    errors += _check_retrain(policy)
    errors += _check_balancers(policy)
    if policy.budgets.reservation_ttl_s <= policy.server.upstream_timeout_s:
        errors.append(
            "budgets.reservation_ttl_s: must be > server.upstream_timeout_s "
            f"({policy.server.upstream_timeout_s:g}), or live requests lose their hold"
        )
    if routing.classifier is not None:
        path = resolve_classifier_path(policy, base_dir)
        if path is None or not path.exists():
            errors.append(f"routing.classifier: no model directory at {routing.classifier!r}")
    return errors


def _check_endpoints(policy: Policy) -> list[str]:
    """Every tier `auto` may pick serves what it would be sent: chat for the default, chat
    or completions for rules and thresholds, and a fallback something its tier serves."""
    errors: list[str] = []
    routing = policy.routing
    # A tier none of whose models is known has been reported already.
    served = {name: endpoints for name, endpoints in policy.tier_endpoints.items() if endpoints}
    chat = ", ".join(policy.tiers_serving("chat")) or "none"

    default = routing.default_tier
    if default is None and not policy.tiers_serving("chat"):
        errors.append("tiers: no tier serves chat; `auto` needs one to send chat to")
    elif default in served and "chat" not in served[default]:
        errors.append(
            f"routing.default_tier: tier {default!r} does not serve chat (tiers that do: {chat})"
        )
    for i, rule in enumerate(routing.rules):
        if rule.tier in served and not served[rule.tier] & GENERATION:
            errors.append(
                f"routing.rules.{i}.tier: tier {rule.tier!r} serves neither chat nor "
                "completions, the requests rules route"
            )
    for tier_name, fallbacks in routing.fallback.items():
        source = served.get(tier_name, frozenset())
        for i, fallback in enumerate(fallbacks):
            if source and fallback in served and not source & served[fallback]:
                errors.append(
                    f"routing.fallback.{tier_name}.{i}: tier {fallback!r} serves nothing "
                    f"tier {tier_name!r} serves ({fallback}: {_listed(served[fallback])}; "
                    f"{tier_name}: {_listed(source)})"
                )
    for tier_name in routing.thresholds or {}:
        if tier_name in served and not served[tier_name] & GENERATION:
            errors.append(
                f"routing.thresholds.{tier_name}: tier {tier_name!r} serves neither chat nor "
                "completions, the requests the classifier routes"
            )
    chat_tiers = len(policy.tiers_serving("chat"))
    if routing.strong_fraction is not None and len(served) > 1 and chat_tiers == 1:
        errors.append(
            f"routing.strong_fraction: needs a second tier that serves chat (only {chat} does)"
        )
    return errors


def _listed(endpoints: frozenset[RequestKind]) -> str:
    """`chat, completions`: endpoints in the API's order, for messages."""
    return ", ".join(kind for kind in ENDPOINTS if kind in endpoints)


def _check_shadow(policy: Policy) -> list[str]:
    """`routing.shadow`: two distinct chat tiers, a judge that exists, and a routing log for
    its rows and POST /v1/feedback's scores to join (by request_id)."""
    shadow = policy.routing.shadow
    if shadow is None:
        return []
    errors: list[str] = []
    chat = policy.tiers_serving("chat")
    for name in ("weak", "strong"):
        tier = getattr(shadow, name)
        if tier not in policy.tiers:
            errors.append(
                f"routing.shadow.{name}: unknown tier {tier!r} ({', '.join(policy.tiers)})"
            )
        elif tier not in chat:
            errors.append(f"routing.shadow.{name}: tier {tier!r} does not serve chat")
    if shadow.weak == shadow.strong:
        errors.append("routing.shadow.strong: must differ from routing.shadow.weak")
    judge = shadow.judge
    if judge not in policy.models and judge not in policy.tiers:
        errors.append(f"routing.shadow.judge: unknown model or tier {judge!r}")
    elif "chat" not in (
        policy.models[judge].endpoints if judge in policy.models else policy.tier_endpoints[judge]
    ):
        errors.append(f"routing.shadow.judge: {judge!r} does not serve chat")
    if policy.routing.feedback is None:
        errors.append("routing.shadow: needs routing.feedback (the routing rows its labels join)")
    return errors


def _check_balancers(policy: Policy) -> list[str]:
    """A model's own `balancer` refines the SLO balancer's replica choice; round robin and
    least outstanding are whole-gateway baselines, with no admission to share."""
    if policy.server.balancer in ("slo", "prefix"):
        return []
    return [
        f"models.{name}.balancer: needs server.balancer slo or prefix, not "
        f"{policy.server.balancer!r}"
        for name, spec in policy.models.items()
        if spec.balancer is not None
    ]


def _check_retrain(policy: Policy) -> list[str]:
    """`routing.retrain` replaces `routing.classifier`, from labels it can find."""
    routing = policy.routing
    if routing.retrain is None:
        return []
    errors = []
    if routing.classifier is None:
        errors.append("routing.retrain: needs routing.classifier (the model it replaces)")
    if not routing.retrain.labels and routing.feedback is None:
        errors.append("routing.retrain.labels: required without routing.feedback or shadow")
    return errors


def _check_tenant_references(policy: Policy) -> list[str]:
    errors: list[str] = []
    tiers = policy.tiers
    for tier_name in policy.cache.tiers:
        if tier_name not in tiers:
            errors.append(f"cache.tiers.{tier_name}: unknown tier")
    for tier_name in policy.budgets.tiers:
        if tier_name not in tiers:
            errors.append(f"budgets.tiers.{tier_name}: unknown tier")
    owners: dict[str, str] = {}
    everyone = [(f"tenants.{name}", name, t) for name, t in policy.tenants.items()]
    if policy.auth.anonymous is not None:
        everyone.append(("auth.anonymous", "anonymous", policy.auth.anonymous))
    for path, name, tenant in everyone:
        if name == "anonymous" and path.startswith("tenants."):
            errors.append(f"{path}: name is reserved for callers without a key")
        for i, tier_name in enumerate(tenant.tiers or ()):
            if tier_name not in tiers:
                errors.append(f"{path}.tiers.{i}: unknown tier {tier_name!r}")
        for tier_name in tenant.budget.tiers if tenant.budget else {}:
            if tier_name not in tiers:
                errors.append(f"{path}.budget.tiers.{tier_name}: unknown tier")
        for i, key in enumerate(tenant.keys):
            if key in owners:
                errors.append(f"{path}.keys.{i}: key already belongs to tenant {owners[key]!r}")
            owners[key] = name
    return errors
