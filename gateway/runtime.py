"""Everything built from one policy, swapped as a whole on reload.

A request takes the current `Runtime` when it starts and keeps it to the end, so a
reload never changes the rules under a request in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.auth import Authenticator
from gateway.budgets.ledger import Ledger
from gateway.cache.response_cache import ResponseCache
from gateway.policy import Policy, Price, StoreSettings, resolve_classifier_path
from gateway.pools import HealthChecker, Pool
from gateway.router import DifficultyScorer, Router
from gateway.simulated import SimulatedFleet
from gateway.store import Store, open_store


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
    health: HealthChecker
    auth: Authenticator
    cache: ResponseCache
    prices: Mapping[str, Price]
    ledger: Ledger

    def ready(self) -> dict[str, bool]:
        """Per tier: does at least one of its models have a healthy replica?"""
        return {
            name: any(self.pools[model].healthy() for model in tier.models)
            for name, tier in self.policy.tiers.items()
        }

    async def close(self) -> None:
        await self.health.stop()
        await self.ledger.close()


async def build_runtime(
    policy: Policy,
    base_dir: Path | None,
    fleet: SimulatedFleet,
    stores: Stores,
    previous: Runtime | None = None,
) -> Runtime:
    simulated = await fleet.urls_for(policy)
    pools = {
        name: Pool.from_urls(name, spec.replicas or simulated[name], spec.served_name, spec.api_key)
        for name, spec in policy.models.items()
    }
    scorer, thresholds = load_classifier(policy, base_dir)
    health = HealthChecker(pools.values(), policy.server.health_check_interval_s)
    health.start()
    store = stores.get(policy.store)
    await store.ping()  # connects early; on a cluster, loads the slot map
    router = Router(policy, scorer, thresholds)
    prices = {name: spec.price for name, spec in policy.models.items()}
    cache = ResponseCache(store, policy.cache)
    # A reload hands over settlements still queued for a store that was down.
    ledger = Ledger(store, policy, carry_over=previous.ledger if previous else None)
    auth = Authenticator(policy)
    return Runtime(policy, router, pools, health, auth, cache, prices, ledger)


def load_classifier(
    policy: Policy, base_dir: Path | None
) -> tuple[DifficultyScorer | None, dict[str, float]]:
    path = resolve_classifier_path(policy, base_dir)
    if path is None:
        return None, {}
    from classifiers.model import load_model  # scikit-learn loads only when a policy asks

    model = load_model(path)
    routing = policy.routing
    if routing.thresholds is not None:
        return model, dict(routing.thresholds)
    assert routing.strong_fraction is not None  # the policy check guarantees one of the two
    strongest = list(policy.tiers)[-1]
    return model, {strongest: model.threshold_for_strong_fraction(routing.strong_fraction)}
