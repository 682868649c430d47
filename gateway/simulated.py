"""Simulated replicas started on loopback for models the policy marks `simulate:`.

Servers are keyed by their settings, so a policy reload that keeps a model's
`simulate:` block keeps its servers (and their in-flight requests).
"""

from __future__ import annotations

import dataclasses

from gateway.policy import Policy, SimulatedPool
from gateway.sim.profile import profile_from_name
from gateway.sim.server import RunningSim, start_sim_server


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
                    await start_sim_server(_profile(served_name, sim, replica))
                    for replica in range(sim.replicas)
                ]
            urls[name] = tuple(server.url for server in self._running[key])
        return urls

    async def stop(self) -> None:
        for servers in self._running.values():
            for server in servers:
                await server.stop()
        self._running.clear()


def _profile(served_name: str, sim: SimulatedPool, replica: int) -> object:
    overrides: dict[str, object] = {"model": served_name, "seed": sim.seed + replica}
    profile = profile_from_name(sim.profile)
    fields = {f.name for f in dataclasses.fields(profile)}
    for name, value in (("ttft_ms", sim.ttft_ms), ("itl_ms", sim.itl_ms)):
        if value is not None and name in fields:
            overrides[name] = value
    if sim.max_num_seqs is not None:
        overrides["max_num_seqs"] = sim.max_num_seqs
    return dataclasses.replace(profile, **overrides)
