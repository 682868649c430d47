"""Everything built from one policy, swapped as a whole on reload.

A request takes the current `Runtime` when it starts and keeps it to the end, so a
reload never changes the rules under a request in flight. Building one (`build_runtime`)
starts nothing and opens no file, so a reload rejected for any reason leaves nothing
behind; `Runtime.start` then opens the feedback log and starts polling the replicas.
(Stores and simulated replicas are shared across reloads, keyed by their settings: a
build may open one, as the first policy that names it.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.auth import Authenticator
from gateway.budgets.ledger import Ledger
from gateway.budgets.plan import tier_price
from gateway.cache.response_cache import ResponseCache
from gateway.dialects.response_store import ResponseStore
from gateway.dispatch import Dispatcher, DispatchSettings, Sender, TierRules
from gateway.feedback import FeedbackLog
from gateway.policy import Policy, PolicyError, Price, StoreSettings, resolve_classifier_path
from gateway.poller import Poller
from gateway.pools import Pool
from gateway.prefix import PrefixSettings
from gateway.replica import ReplicaSettings
from gateway.retrain import Retrainer, retrainer
from gateway.router import DifficultyScorer, Router
from gateway.shadow import Shadow
from gateway.simulated import SimulatedFleet
from gateway.slo import FirstByteTracker, SloTarget
from gateway.store import Store, open_store

__all__ = [
    "Runtime",
    "Stores",
    "build_runtime",
    "dispatch_settings",
    "feedback_log",
    "load_classifier",
    "prefix_settings",
    "replica_settings",
    "shadow_comparisons",
]


class Stores:
    """Open stores by settings: a reload that keeps `store:` keeps its connections."""

    def __init__(self) -> None:
        self._open: dict[StoreSettings, Store] = {}

    def get(self, settings: StoreSettings) -> Store:
        if settings not in self._open:
            self._open[settings] = open_store(settings)
        return self._open[settings]

    async def close(self) -> None:
        for store in self._open.values():
            await store.close()
        self._open.clear()


@dataclass(frozen=True)
class Runtime:
    policy: Policy
    router: Router
    pools: Mapping[str, Pool]
    poller: Poller
    auth: Authenticator
    cache: ResponseCache
    prices: Mapping[str, Price]  # per model
    tier_prices: Mapping[str, Price]  # per tier: what a reservation holds (`tier_price`)
    ledger: Ledger
    dispatcher: Dispatcher
    response_store: ResponseStore
    feedback: FeedbackLog | None = None
    shadow: Shadow | None = None  # also reached through `feedback.shadow`
    retrain: Retrainer | None = None  # `routing.retrain`: one schedule per runtime

    def ready(self) -> dict[str, bool]:
        """Per tier: does at least one of its models have a healthy replica?"""
        return {
            name: any(self.pools[model].healthy() for model in tier.models)
            for name, tier in self.policy.tiers.items()
        }

    def start(self) -> None:
        """Open the feedback log, then poll the replicas. Raises `PolicyError`, with nothing
        started, when the log cannot be opened."""
        feedback = self.feedback
        if feedback is not None:
            try:
                feedback.open()
            except OSError as exc:
                path = feedback.settings.path
                raise PolicyError(
                    [f"routing.feedback.path: cannot open {path}: {exc.strerror}"]
                ) from exc
        if self.shadow is not None:
            try:
                self.shadow.open()
            except OSError as exc:
                path = self.shadow.path
                raise PolicyError(
                    [f"routing.shadow.path: cannot open {path}: {exc.strerror}"]
                ) from exc
        self.poller.start()
        if self.retrain is not None:
            self.retrain.start()

    async def close(self) -> None:
        if self.retrain is not None:
            await self.retrain.close()  # kills a run in progress, releases its lock
        await self.poller.stop()
        if self.shadow is not None:
            await self.shadow.close()  # cancels the comparisons still running
        await self.ledger.close()


async def build_runtime(
    policy: Policy,
    base_dir: Path | None,
    fleet: SimulatedFleet,
    stores: Stores,
    sender: Sender,
    tracker: FirstByteTracker,
    previous: Runtime | None = None,
) -> Runtime:
    # What can fail comes first: a rejected reload then starts no simulated replica.
    scorer, thresholds = load_classifier(policy, base_dir)
    feedback = feedback_log(policy, base_dir)
    simulated = await fleet.urls_for(policy)
    server = policy.server
    replicas = replica_settings(policy)
    pools = {
        name: Pool.from_urls(
            name,
            spec.replicas or simulated[name],
            spec.served_name,
            spec.api_key,
            balancer=spec.balancer or server.balancer,
            settings=replicas,
            capacity=spec.max_num_seqs,
            backend=spec.backend,
            prefix=prefix_settings(policy),
        )
        for name, spec in policy.models.items()
    }
    for name, pool in pools.items():
        pool.api = policy.models[name].api  # the API its chat requests are sent in
    poller = Poller(pools.values(), server.health_check_interval_s, server.metrics_interval_s)
    dispatch = dispatch_settings(policy)
    dispatcher = Dispatcher(pools, sender, dispatch, tracker)
    store = stores.get(policy.store)
    await store.ping()  # connects early; on a cluster, loads the slot map
    router = Router(policy, scorer, thresholds)
    prices = {name: spec.price for name, spec in policy.models.items()}
    tier_prices = {tier: tier_price(policy, tier) for tier in policy.tiers}
    cache = ResponseCache(store, policy.cache)
    # A reload hands over settlements still queued for a store that was down.
    ledger = Ledger(store, policy, carry_over=previous.ledger if previous else None)
    auth = Authenticator(policy)
    responses = ResponseStore(store, policy.responses.store_ttl_s)
    shadow = shadow_comparisons(
        policy, base_dir, dispatcher, store, feedback, previous.shadow if previous else None
    )
    return Runtime(
        policy, router, pools, poller, auth, cache, prices, tier_prices, ledger, dispatcher,
        responses, feedback, shadow, retrainer(policy, base_dir, store),
    )  # fmt: skip


def feedback_log(policy: Policy, base_dir: Path | None) -> FeedbackLog | None:
    """The policy's feedback log (not open yet), a relative path taken from the policy's
    directory."""
    settings = policy.routing.feedback
    if settings is None:
        return None
    path = Path(settings.path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return FeedbackLog(settings.model_copy(update={"path": str(path)}))


def shadow_comparisons(
    policy: Policy,
    base_dir: Path | None,
    dispatcher: Dispatcher,
    store: Store,
    feedback: FeedbackLog | None,
    previous: Shadow | None = None,
) -> Shadow | None:
    """The policy's shadow comparisons (not started), handed to the request path through
    the feedback log; their rows go to `routing.shadow.path`, else the feedback log's file."""
    settings = policy.routing.shadow
    if settings is None or feedback is None:  # the policy check requires both
        return None
    path = Path(settings.path or feedback.settings.path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    shadow = Shadow(settings, str(path), policy, dispatcher, store, previous=previous)
    feedback.shadow = shadow
    return shadow


def replica_settings(policy: Policy) -> ReplicaSettings:
    server = policy.server
    breaker = server.breaker
    return ReplicaSettings(
        failures_to_open=breaker.failures,
        initial_cooldown_s=breaker.cooldown_s,
        max_cooldown_s=breaker.max_cooldown_s,
        slow_start_s=breaker.slow_start_s,
        max_ejected_percent=breaker.max_ejected_percent,
        outlier_min_requests=breaker.min_requests,
        # A few missed scrapes in a row, not one slow one, make a replica "saturated".
        load_stale_s=max(4 * server.metrics_interval_s, 1.0),
    )


def prefix_settings(policy: Policy) -> PrefixSettings:
    """The prefix balancer's settings (gateway/prefix.py) from the policy's `server.prefix`."""
    return PrefixSettings(**policy.server.prefix.model_dump())


def dispatch_settings(policy: Policy) -> DispatchSettings:
    routing = policy.routing
    tiers = {}
    for name, tier in policy.tiers.items():
        slo = tier.slo
        if slo is None:
            tiers[name] = TierRules(idempotent=tier.idempotent)
            continue
        tiers[name] = TierRules(
            target=SloTarget(slo.ttft_ms / 1000, slo.e2e_ms / 1000, slo.percentile),
            max_queue_s=slo.max_queue_ms / 1000,
            shed=slo.shed,
            idempotent=tier.idempotent,
        )
    balancer = policy.server.balancer
    return DispatchSettings(
        # The prefix balancer only chooses replicas differently: admission, hedges and
        # retries are the SLO balancer's.
        balancer="slo" if balancer == "prefix" else balancer,
        tiers=tiers,
        max_attempts=routing.retries.max_attempts,
        retry_ratio=routing.retries.budget,
        hedge=routing.hedging.enabled,
        hedge_ratio=routing.hedging.max_extra,
        min_hedge_delay_s=routing.hedging.min_delay_ms / 1000,
        timeout_factor=routing.timeout_factor,
    )


def load_classifier(
    policy: Policy, base_dir: Path | None
) -> tuple[DifficultyScorer | None, dict[str, float]]:
    """The policy's classifier and its thresholds; a file that cannot be loaded is a
    `PolicyError` naming `routing.classifier` and the reason."""
    path = resolve_classifier_path(policy, base_dir)
    if path is None:
        return None, {}
    from classifiers.model import ModelLoadError, load_model  # scikit-learn loads on demand

    try:
        model = load_model(path)
    except ModelLoadError as exc:
        raise PolicyError([f"routing.classifier: {exc}"]) from exc
    routing = policy.routing
    if routing.thresholds is not None:
        return model, dict(routing.thresholds)
    assert routing.strong_fraction is not None  # the policy check guarantees one of the two
    strongest = policy.strongest_tier
    return model, {strongest: model.threshold_for_strong_fraction(routing.strong_fraction)}
