"""Simulated replicas started on loopback for models the policy marks `simulate:`.

Servers are keyed by their settings, so a policy reload that keeps a model's
`simulate:` block keeps its servers (and their in-flight requests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.policy import Policy, SimulatedPool
from gateway.sim.profile import SimProfile, profile_from_name
from gateway.sim.server import RunningSim, start_sim_server

__all__ = ["SimulatedFleet"]


class SimulatedFleet:
    def __init__(self) -> None:
        self._running: dict[tuple[str, SimulatedPool], list[RunningSim]] = {}

    async def urls_for(self, policy: Policy) -> dict[str, tuple[str, ...]]:
        """Replica URLs of every simulated model in `policy`, starting servers as needed."""
        wanted = {
            (name, spec.served_name or name, spec.simulate)
            for name, spec in policy.models.items()
            if spec.simulate is not None
        }
        urls: dict[str, tuple[str, ...]] = {}
        for name, served_name, sim in wanted:
            key = (served_name, sim)
            if key not in self._running:
                self._running[key] = [
                    await start_sim_server(_profile(served_name, sim)) for _ in range(sim.replicas)
                ]
            urls[name] = tuple(server.url for server in self._running[key])
        return urls

    async def stop(self) -> None:
        for servers in self._running.values():
            for server in servers:
                await server.stop()
        self._running.clear()


def _profile(served_name: str, sim: SimulatedPool) -> SimProfile:
    # Replicas of one model share a seed: the same prompt gets the same answer anywhere.
    overrides: dict[str, Any] = {"model": served_name, "seed": sim.seed}
    for name in ("ttft_ms", "itl_ms", "max_num_seqs"):
        if getattr(sim, name) is not None:
            overrides[name] = getattr(sim, name)
    return dataclasses.replace(profile_from_name(sim.profile), **overrides)
