"""Throwaway Redis and PostgreSQL servers on free local ports, for fault tests and the chaos run.

They live in a temporary folder and are the only servers these tools ever stop or restart. Redis keeps an
append-only file fsynced on every write, so a restart loses nothing it acknowledged."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import attrs


def make_workdir(prefix: str = "sentiment-") -> Path:
    """A fresh temporary folder that the `postgres` user can traverse (mkdtemp makes it 0700)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too: ephemeral ports (32768 and up) would
    put the bus past 65535, so one is drawn from 20000-29999."""
    import random

    for _ in range(1000):
        port = random.randrange(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:g} s")


def _answers(port: int) -> bool:
    """PONG to a PING: accepting connections is not enough, a restarted server answers LOADING while it
    reads its append-only file back (a test's own client then failed on it, under load)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _node_port(address: str) -> int:
    """The port of a CLUSTER NODES address (`host:port@busport`)."""
    return int(address.split("@")[0].rsplit(":", 1)[1])


@attrs.define
class ThrowawayRedis:
    workdir: Path
    port: int = attrs.Factory(free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()  # e.g. ("--enable-debug-command", "yes")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: _answers(self.port), "redis-server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


def _pg_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not versions:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    return versions[-1]


@attrs.define
class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (initdb); run as the `postgres` user when we are root."""

    workdir: Path
    port: int = attrs.Factory(free_port)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/sentiment"

    def _run(self, *args: str) -> None:
        cmd = [str(_pg_bin() / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        data = self.workdir / "data"
        if not data.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.workdir, "postgres", "postgres")
            self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-w",
            "-l",
            str(self.workdir / "log"),
            "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.workdir / "data"), "-w", "-m", mode, "stop")

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends included)."""
        postmaster = int((self.workdir / "data" / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def pause(self) -> None:
        """SIGSTOP the whole server: it neither answers nor closes a connection (a hung host)."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in self.pids():
            with suppress(ProcessLookupError):  # a backend that just ended
                os.kill(pid, sig)

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@attrs.define
class ThrowawayCluster:
    """A Redis Cluster of `masters` masters with one replica each, on free loopback ports, built with
    `redis-cli --cluster create`. A short node timeout makes a replica take over a killed master in a
    second or two. No persistence: a killed node is not restarted."""

    workdir: Path
    masters: int = 3
    node_timeout_ms: int = 1000
    nodes: list[ThrowawayRedis] = attrs.Factory(list)

    @property
    def url(self) -> str:
        """Any live node: the client finds the others."""
        return next(n.url for n in self.nodes if n.process is not None)

    def start(self) -> None:
        for i in range(self.masters * 2):
            node = ThrowawayRedis(
                self.workdir / f"node{i}",
                port=free_cluster_port(),
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    "--appendonly",
                    "no",
                    "--repl-diskless-sync-delay",  # replicas in sync at once, not after 5 s
                    "0",
                ),
            )
            node.start()
            self.nodes.append(node)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wait(self.healthy, "the cluster (all slots served, every master with a replica)", timeout=60)

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout

    def roles(self) -> dict[int, str]:
        """Each live node's port and role (master or slave), as CLUSTER NODES on a live node says."""
        port = next(n.port for n in self.nodes if n.process is not None)
        out = {}
        for line in self.cli(port, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 3 or "fail" in fields[2] or "noaddr" in fields[2]:
                continue
            out[_node_port(fields[1])] = "master" if "master" in fields[2] else "slave"
        return out

    def healthy(self) -> bool:
        """cluster_state:ok on every live node, `masters` masters among them, and every replica's link to
        its master up (a replica that never synced would not take over)."""
        live = [n for n in self.nodes if n.process is not None]
        if not all("cluster_state:ok" in self.cli(n.port, "cluster", "info") for n in live):
            return False
        roles = self.roles()
        replicas = [port for port, role in roles.items() if role == "slave"]
        if not all("master_link_status:up" in self.cli(p, "info", "replication") for p in replicas):
            return False
        return sum(1 for role in roles.values() if role == "master") == self.masters

    def master_of(self, key: str) -> ThrowawayRedis:
        """The node serving `key`'s slot now."""
        node = self._serving(key)
        if node is None:
            raise RuntimeError(f"no master serves {key!r} now")
        return node

    def _serving(self, key: str) -> ThrowawayRedis | None:
        port = next(n.port for n in self.nodes if n.process is not None)
        slot = self.cli(port, "cluster", "keyslot", key).strip()
        for line in self.cli(port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for run in fields[8:]:
                low, _, high = run.partition("-")
                if low.isdigit() and int(low) <= int(slot) <= int(high or low):
                    node_port = _node_port(fields[1])
                    return next(n for n in self.nodes if n.port == node_port)
        return None

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Until every replica has applied everything its master has written so far."""

        def offsets(port: int) -> dict[str, str]:
            info = self.cli(port, "info", "replication")
            return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)

        def caught_up() -> bool:
            for port, role in self.roles().items():
                if role == "master":
                    info = offsets(port)
                    replicas = [v for k, v in info.items() if k.startswith("slave") and "offset=" in v]
                    target = info["master_repl_offset"].strip()
                    if not all(f"offset={target}," in r for r in replicas):
                        return False
            return True

        _wait(caught_up, "the replicas to catch up", timeout)

    def kill_master_of(self, key: str, timeout: float = 30.0) -> float:
        """SIGKILL the master serving `key` (no goodbye: writes it had not yet replicated are lost), wait
        until its replica serves the slot and the cluster is whole again; returns how long that took."""
        node = self.master_of(key)
        assert node.process is not None
        node.process.kill()
        node.process.wait(timeout=10)
        node.process = None
        return self._taken_over(key, node, time.monotonic(), timeout)

    def fail_over(self, key: str, timeout: float = 30.0) -> float:
        """A graceful failover (CLUSTER FAILOVER on a replica) of the master serving `key`: the two swap
        roles with nothing lost, as an operator's upgrade does; returns how long until the replica served."""
        node = self.master_of(key)
        node_id = self.cli(node.port, "cluster", "myid").strip()
        replica_port = next(
            _node_port(line.split()[1])
            for line in self.cli(node.port, "cluster", "replicas", node_id).splitlines()
            if line.strip()
        )
        started = time.monotonic()
        reply = self.cli(replica_port, "cluster", "failover").strip()
        if reply != "OK":
            raise RuntimeError(f"CLUSTER FAILOVER on {replica_port}: {reply}")
        return self._taken_over(key, node, started, timeout)

    def _taken_over(self, key: str, node: ThrowawayRedis, started: float, timeout: float) -> float:
        """Wait until a node other than `node` serves `key` and the cluster is whole again; the seconds
        since `started`."""
        _wait(lambda: self._serving(key) not in (None, node) and self.healthy(), "the failover", timeout)
        return time.monotonic() - started

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.kill()
                node.process.wait(timeout=10)
                node.process = None
