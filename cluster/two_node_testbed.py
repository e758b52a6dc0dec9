"""A real 2-node Ray cluster on one machine — for tests/test_cluster.py and bench/cluster_generate.py.

    nodes = TwoNodes(num_cpus=2)     # head (labels pool=head) + a second node (pool=second)
    nodes.jobs                       # http://127.0.0.1:PORT, for `distillery submit --address`
    nodes.kill_second()              # SIGKILL the second node's raylet: a lost node
    nodes.replace_second()           # a new second node, as an autoscaler would bring up
    nodes.teardown()

Each node has its own temp dir and ports: another Ray on the machine holds the defaults, and a
job agent that cannot bind never comes up ("No available agent"). Ray maps --node-ip-address
127.0.0.1 to the machine's own address (ray/_private/services.py, resolve_ip_for_localhost);
the dashboard / job server binds 127.0.0.1. Token auth stays on (Ray 2.60's `ray start`
default): clients need RAY_AUTH_MODE=token (in `env`) and ~/.ray/auth_token. Teardown kills
only this cluster's processes (those whose command line names its temp dirs) — `ray stop`
would kill every Ray on the machine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

VENV_BIN = os.path.dirname(sys.executable)
RAY = os.path.join(VENV_BIN, "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    out = []
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port"):
        out += [flag, str(free_port())]
    return out


def pids_matching(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray workers are children of their node's raylet)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = [int(c) for c in children.split()]
    return found + [d for c in found for d in descendants(c)]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


class TwoNodes:
    """A head and a second node on this machine; the second can be killed and replaced.

    num_cpus: logical CPUs per node (Ray's accounting, not cores: both nodes share the
      machine's cores).
    object_store_mib: each node's object store (kept small on a shared machine).
    """

    def __init__(self, num_cpus: int = 2, object_store_mib: int = 400):
        self.num_cpus, self.object_store_mib = num_cpus, object_store_mib
        self.head_temp = tempfile.mkdtemp(prefix="rayh-")
        self.second_temps: list[str] = []
        self.gcs, self.dash = free_port(), free_port()
        # A lost node is noticed after 3 missed 1 s health checks (default 5 x 3 s).
        self.env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
                        RAY_AUTH_MODE="token", RAY_health_check_period_ms="1000",
                        RAY_health_check_failure_threshold="3")
        self.env.pop("RAY_ADDRESS", None)
        try:
            self._start("--head", "--labels", "pool=head", "--port", str(self.gcs),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash),
                        "--ray-client-server-port", str(free_port()),
                        "--temp-dir", self.head_temp)
            self.jobs = f"http://127.0.0.1:{self.dash}"
            self.start_second()
            self.wait_for_job_agent()
        except BaseException:
            self.teardown()
            raise

    def _start(self, *args: str) -> None:
        proc = subprocess.run([RAY, "start", "--num-cpus", str(self.num_cpus),
                               "--object-store-memory", str(self.object_store_mib << 20),
                               "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                               *_agent_ports(), *args],
                              env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start_second(self) -> None:
        temp = tempfile.mkdtemp(prefix="ray2-")
        self.second_temps.append(temp)
        self._start("--address", f"127.0.0.1:{self.gcs}", "--labels", "pool=second",
                    "--node-manager-port", str(free_port()),
                    "--object-manager-port", str(free_port()), "--temp-dir", temp)
        raylets = [p for p in pids_matching(temp) if "/raylet/raylet " in cmdline(p) + " "]
        if len(raylets) != 1:
            raise RuntimeError(f"the second node's raylet: {raylets}")
        self.second_raylet = raylets[0]

    def kill_second(self) -> None:
        """A lost node: SIGKILL its raylet, by PID (its workers and agents die with it)."""
        os.kill(self.second_raylet, signal.SIGKILL)

    def replace_second(self) -> None:
        """What an autoscaler does after a node is lost: a new node of the same kind."""
        kill(pids_matching(self.second_temps[-1]))  # the lost node's leftovers (log monitor)
        self.start_second()

    def wait_for_job_agent(self, timeout_s: float = 120.0) -> None:
        """The job agent comes up a little after `ray start` returns (longer on a busy machine):
        wait until a trivial job is accepted."""
        deadline = time.time() + timeout_s
        while True:
            probe = subprocess.run([RAY, "job", "submit", "--address", self.jobs, "--", "true"],
                                   env=self.env, capture_output=True, text=True)
            if probe.returncode == 0:
                return
            if time.time() > deadline:
                raise RuntimeError(f"the Ray job agent never came up: {probe.stderr[-2000:]}")
            time.sleep(3)

    def on_second(self, needle: str) -> list[int]:
        """PIDs below the second node's raylet whose command line contains `needle`."""
        return [p for p in descendants(self.second_raylet) if needle in cmdline(p)]

    def teardown(self) -> None:
        for temp in self.second_temps + [self.head_temp]:
            kill(pids_matching(temp))
        time.sleep(1)
