"""Same code on a laptop and on a Ray cluster: join via RAY_ADDRESS, submit as a Ray job.

Starts a real Ray head (`ray start --head`) on 127.0.0.1 in its own temp dir and stops it by
killing that head's processes only — `ray stop` would kill every Ray on the machine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from pipeline.store import Store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="rayhead-")
    gcs, dash = _free_port(), _free_port()
    # Every port of its own: another Ray on the machine (the test session's, or a user's) holds
    # the defaults, and a job agent that cannot bind never comes up ("No available agent").
    own_ports = []
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port"):
        own_ports += [flag, str(_free_port())]
    # The cluster's Python environment is this venv (on a real cluster: the nodes' image).
    # Token auth on, as `ray start` sets it up by default in Ray 2.60: clients (drivers joining
    # from outside, `ray job submit`) must say RAY_AUTH_MODE=token and find ~/.ray/auth_token.
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([os.path.join(VENV_BIN, "ray"), "start", "--head", "--num-cpus", "1",
                    "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--temp-dir", temp, "--disable-usage-stats", *own_ports],
                   env=env, check=True, capture_output=True)
    # The job agent comes up a little after `ray start` returns (longer on a busy machine):
    # wait until a trivial job is accepted, at most 120 s.
    jobs = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        probe = subprocess.run([os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", jobs,
                                "--", "true"], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        if time.time() > deadline:
            _kill_head(temp)
            pytest.fail(f"the Ray job agent never came up: {probe.stderr[-2000:]}")
        time.sleep(3)
    yield {"gcs": f"127.0.0.1:{gcs}", "jobs": jobs, "env": env}
    _kill_head(temp)


def _kill_head(temp: str) -> None:
    out = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)


def test_stage_joins_the_cluster_named_by_ray_address(ray_head, tmp_path):
    """A stage that uses Ray runs on the cluster in RAY_ADDRESS, not on a new local one."""
    script = tmp_path / "join.py"
    script.write_text(textwrap.dedent(f"""
        from dataclasses import dataclass
        import ray, ray.data
        from pipeline.config import load_recipe
        from pipeline.runner import run_stage
        from pipeline.stage import Stage

        @dataclass
        class C:
            n: int = 10

        def run(cfg, inputs, ctx):
            ctx.ensure_ray()
            ctx.stats["gcs_address"] = ray.get_runtime_context().gcs_address
            return ray.data.range(cfg.n).map(lambda r: {{"id": r["id"], "sq": r["id"] ** 2}})

        stages = {{"squares": Stage("squares", C, (), (), ("sq",), run)}}
        open("{tmp_path}/r.yaml", "w").write("data_root: {tmp_path}/data\\n")
        run_stage("squares", load_recipe("{tmp_path}/r.yaml", [], stages=stages), stages=stages)
    """))
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["gcs"], PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    v = Store(str(tmp_path / "data")).latest("squares")
    # Same GCS port as the head we started (a new local Ray would have its own).
    assert v.manifest["stats"]["gcs_address"].rsplit(":", 1)[1] == ray_head["gcs"].rsplit(":", 1)[1]
    assert sorted(v.read_table().column("sq").to_pylist()) == [i * i for i in range(10)]


def test_submit_a_stage_as_a_ray_job(ray_head, tmp_path):
    root = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "cluster.submit", "--address", ray_head["jobs"],
                           "--", "run", "prompts", f"data_root={root}", "prompts.synthetic_n=9"],
                          cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    assert Store(str(root)).latest("prompts").rows == 9


def test_submit_without_address_is_a_user_error():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "cluster.submit", "--", "run", "prompts"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "RAY_ADDRESS" in proc.stderr
