"""A real multi-node Ray cluster on this machine, for tests: one head and N worker
raylets, each its own `ray start --block` process, with token authentication on.

Shared by the cluster-jobs tests (submit, status, placement) and the reliability tests
(node loss): `LocalRayCluster.remove_worker` kills one worker node the way a preempted
machine disappears.

Nothing here touches Ray processes it did not start: each node runs in its own session
(`setsid`), and teardown signals exactly the processes of those sessions (Ray's workers
call setpgid, so a process group would miss them; they keep the session). Every port is
a free one, the temp dirs and HOME are private, and the token is given explicitly
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH): nothing depends on ~/.ray/auth_token or on
what an earlier test left behind.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent        # the venv's ray, maskface and python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Every live process of one session (a node started with setsid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class RayNode:
    name: str                      # "head", "w0", "w1", ...
    proc: subprocess.Popen         # `ray start --block`: the session leader
    temp_dir: Path
    log: Path
    num_gpus: int
    node_id: str | None = None     # filled once the node registered
    stopped: bool = False

    @property
    def sid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return [] if self.stopped else session_pids(self.sid)

    def kill(self, sig: int = signal.SIGKILL, grace_s: float = 0.0) -> None:
        """Signal every process of this node; with a grace period, SIGKILL what is left."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while grace_s and time.time() < deadline and self.pids():
            time.sleep(0.2)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.stopped = True


@dataclass
class LocalRayCluster:
    """Start with `start()`, stop with `stop()` (or use as a context manager).

    `client_env()` is the environment a client needs (the token file, the dashboard
    address); `address` is the GCS address, `dashboard_url` the job submission address.
    """
    head_cpus: int = 1
    worker_cpus: int = 1
    worker_gpus: int = 1
    workers: int = 2
    env: dict = field(default_factory=dict)          # extra env for every node (e.g. RAY_health_check_*)
    root: Path | None = None
    nodes: list[RayNode] = field(default_factory=list)

    def __post_init__(self):
        # short paths: Ray's Unix sockets live under the temp dir (108-byte limit)
        self.root = Path(self.root or tempfile.mkdtemp(prefix="mfray-", dir="/tmp"))
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    # -- environment ------------------------------------------------------------------------
    def node_env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "AWS_")) or k in self.env}
        env.update(self.env)
        env.update(HOME=str(self.home), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_path),
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                   RAY_USAGE_STATS_ENABLED="0")
        return env

    def client_env(self, **extra) -> dict:
        """What `ray job submit` needs on a client: the token (by file) and the address."""
        env = self.node_env()
        env.update(RAY_ADDRESS=self.dashboard_url, **extra)
        return env

    # -- lifecycle ------------------------------------------------------------------------------
    def _launch(self, name: str, args: list[str], num_gpus: int) -> RayNode:
        temp = self.root / name
        temp.mkdir(exist_ok=True)
        log = self.root / f"{name}.log"
        ports = ["--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port",
                 free_port(), "--runtime-env-agent-port", free_port(), "--metrics-export-port",
                 free_port(), "--node-manager-port", free_port(), "--object-manager-port",
                 free_port(), "--min-worker-port", 0, "--max-worker-port", 0]
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp),
               "--num-gpus", str(num_gpus), *args, *map(str, ports)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.node_env(),
                                    start_new_session=True, cwd=self.root)
        node = RayNode(name, proc, temp, log, num_gpus)
        self.nodes.append(node)
        return node

    @staticmethod
    def _wait_started(node: RayNode, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while b"Ray runtime started" not in node.log.read_bytes():
            if node.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start for {node.name} failed:\n"
                                   f"{node.log.read_text()[-4000:]}")
            time.sleep(0.2)

    def _launch_worker(self, num_gpus: int | None) -> RayNode:
        name = f"w{sum(n.name.startswith('w') for n in self.nodes)}"
        gpus = self.worker_gpus if num_gpus is None else num_gpus
        return self._launch(name, ["--address", self.address, "--num-cpus", str(self.worker_cpus),
                                   # a marker resource, so the node id can be told apart
                                   "--resources", json.dumps({f"mf_{name}": 1})], gpus)

    def start(self) -> "LocalRayCluster":
        try:
            head = self._launch("head", ["--head", "--port", str(self.port), "--num-cpus",
                                         str(self.head_cpus), "--dashboard-host", "127.0.0.1",
                                         "--dashboard-port", str(self.dashboard_port),
                                         "--ray-client-server-port", str(free_port())], 0)
            self._wait_started(head)
            workers = [self._launch_worker(None) for _ in range(self.workers)]
            for node in workers:                 # started together: most of it is waiting
                self._wait_started(node)
            self._wait_for_ids()
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, num_gpus: int | None = None) -> RayNode:
        """Start one more worker raylet; returns it once it is ALIVE with a node id."""
        node = self._launch_worker(num_gpus)
        self._wait_started(node)
        self._wait_for_ids()
        return node

    def remove_worker(self, node: RayNode | str, sig: int = signal.SIGKILL) -> None:
        """Kill one worker node's processes at once: a preempted machine, no goodbye."""
        node = node if isinstance(node, RayNode) else self.node(node)
        assert node.name != "head", "remove_worker removes workers; stop() ends the cluster"
        node.kill(sig)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if not node.stopped:
                node.kill(signal.SIGTERM, grace_s=5.0)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- queries ---------------------------------------------------------------------------------
    def node(self, name: str) -> RayNode:
        return next(n for n in self.nodes if n.name == name)

    @property
    def worker_nodes(self) -> list[RayNode]:
        return [n for n in self.nodes if n.name != "head"]

    def list_nodes(self) -> list[dict]:
        """The cluster's node table, through the state API (authenticated by the token)."""
        out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.dashboard_url,
                              "--format", "json", "--limit", "1000"], env=self.node_env(),
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"ray list nodes failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    def _wait_for_ids(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while True:
            alive = [n for n in self.list_nodes() if n["state"] == "ALIVE"]
            for node in self.nodes:
                marker = "node:__internal_head__" if node.name == "head" else f"mf_{node.name}"
                for entry in alive:
                    if marker in entry["resources_total"]:
                        node.node_id = entry["node_id"]
            if all(n.node_id for n in self.nodes if not n.stopped):
                return
            if time.time() > deadline:
                raise RuntimeError(f"nodes did not register: {[n.name for n in self.nodes]}")
            time.sleep(0.5)

    def wait_for_node_state(self, node: RayNode, state: str, timeout: float = 120) -> None:
        """Wait until the head reports `state` (ALIVE or DEAD) for this node."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = {n["node_id"]: n["state"] for n in self.list_nodes()}
            if states.get(node.node_id) == state:
                return
            time.sleep(1)
        raise TimeoutError(f"node {node.name} ({node.node_id}) never became {state}")
