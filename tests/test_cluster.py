"""Distillery on a real 2-node Ray cluster: jobs through `distillery submit`, a node lost mid-stage.

One module-scoped cluster on this machine: a head (`ray start --head`, labels pool=head) and a
second node (`ray start --address`, its own temp dir and ports, labels pool=second). Stages are
told to prefer the second node (resources.<stage>.label_selector) and, for engines and CPU
tasks, to fall back to the head (fallback_label_selectors); then the test kills the second
node's raylet by its PID mid-stage and checks that the same job finishes with every row exactly
once. Ray Train workers have no fallback (Train takes hard selectors only): as an autoscaler
would, the fixture brings up a replacement second node, and training resumes there from its
newest checkpoint.

Ray maps --node-ip-address 127.0.0.1 to the machine's own address (ray/_private/services.py,
resolve_ip_for_localhost); the dashboard / job server binds 127.0.0.1. Token auth stays on.
Teardown kills only the processes this module started (cluster/two_node_testbed.py: those whose command
line names its temp dirs) — `ray stop` would kill every Ray on the machine.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from cluster.two_node_testbed import TwoNodes
from pipeline.store import Store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    nodes = TwoNodes(num_cpus=2)  # the Ray Train group (2 workers x 1 CPU) fits on either node
    try:
        yield nodes
    finally:
        nodes.teardown()


def submit(cluster, stage: str, recipe: str, *items: str, shared_fs: bool = True,
           background: bool = False):
    """`distillery submit` as a user runs it (a subprocess), against the 2-node cluster."""
    cmd = [sys.executable, "-m", "pipeline.cli", "submit", stage, "--recipe", recipe,
           "--address", cluster.jobs, *(["--shared-fs"] if shared_fs else []), *items]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=400)


def wait_for(predicate, what: str, timeout: float = 240.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def finish(proc, timeout: float = 400.0) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def write_recipe(path, data_root: str, body: dict) -> str:
    path.write_text(yaml.safe_dump({"data_root": data_root, **body}))
    return str(path)


# Prefer the second node, fall back to the head once it is gone (engines and CPU tasks).
PREFER_SECOND = {"label_selector": {"pool": "second"}, "fallback_label_selectors": [{"pool": "head"}]}


# --- 1. generate: the engine's node is lost after the first shard ------------------------------

@pytest.fixture(scope="module")
def generate_recipe(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("gen")
    recipe = write_recipe(tmp / "r.yaml", str(tmp / "data"), {
        "teacher": tiny_model,
        "prompts": {"path": "synthetic", "synthetic_n": 24},
        # 6 shards of 4 problems x n=4; 128 tokens a sample so a shard takes seconds, not ms.
        "generate": {"n": 4, "max_tokens": 128, "temperature": 1.0, "shard_size": 4,
                     "max_model_len": 256},
        "resources": {"generate": {"enforce_eager": True, **PREFER_SECOND}},
    })
    prompts = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "prompts",
                              "--recipe", recipe], cwd=REPO, capture_output=True, text=True)
    assert prompts.returncode == 0, prompts.stderr[-3000:]
    return recipe, str(tmp / "data")


def _check_generate(root: str, version_filter=None):
    v = Store(root).latest("generate")
    t = v.read_table(columns=["problem_id", "trace_id", "sample_idx"])
    assert t.num_rows == 24 * 4
    assert len(set(t.column("trace_id").to_pylist())) == 24 * 4
    assert len(set(zip(t.column("problem_id").to_pylist(),
                       t.column("sample_idx").to_pylist()))) == 24 * 4
    return v


@pytest.mark.slow
def test_generate_survives_losing_the_engine_node(cluster, generate_recipe):
    recipe, root = generate_recipe
    proc = submit(cluster, "generate", recipe, background=True)
    first = wait_for(lambda: glob.glob(f"{root}/generate/.tmp-*/part-*.parquet"),
                     "the first shard", proc=proc)[0]
    engines = cluster.on_second("_VLLMChat")
    assert engines, "the engine actor is not on the second node"
    inode = os.stat(first).st_ino
    cluster.kill_second()
    out = finish(proc)
    v = _check_generate(root)
    # One run did it all: the shard written before the loss was kept (same file, renamed into
    # the version), not generated again.
    assert v.manifest["stats"]["shards_generated_this_run"] == 6
    assert os.stat(os.path.join(v.path, os.path.basename(first))).st_ino == inode
    assert "succeeded" in out
    cluster.replace_second()


# --- 2. verify: CPU tasks on the lost node are retried -------------------------------------------

def write_generate(root: str, rows: list[dict]) -> None:
    """A complete generate version through the real store (verify's input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.runner import _describe

    store = Store(root)
    tmp = store.begin("generate", "test0cluster", clear=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(tmp, "part-00000.parquet"))
    n, schema = _describe(store, tmp)
    store.commit("generate", "test0cluster", {"stage": "generate", "version": "test0cluster",
                                              "splits": [], "rows_out": n, "schema": schema,
                                              "stats": {}})


@pytest.mark.slow
def test_verify_survives_losing_a_node(cluster, tmp_path):
    root = str(tmp_path / "data")
    # 256 traces: 4 blocks of 64. One in four answers is a tower of powers that math-verify
    # cannot finish (its checker child is killed at timeout_s = 0.5 s): 16 x 0.5 s = 8 s a
    # block, so the tasks are still running on the second node when it is lost.
    rows = []
    for i in range(256):
        final = f"\\boxed{{10^{{10^{{10^{{{10 + i}}}}}}}}}" if i % 4 == 0 else f"\\boxed{{{i}}}"
        rows.append({"problem_id": f"p{i // 4}", "trace_id": f"t{i}", "answer": str(i),
                     "source": "test", "completion": final, "final": final})
    write_generate(root, rows)
    recipe = write_recipe(tmp_path / "r.yaml", root, {
        "verify": {"timeout_s": 0.5, "batch_size": 16},
        "resources": {"verify": PREFER_SECOND}})
    proc = submit(cluster, "verify", recipe, background=True)
    # A verify task's math-verify checker runs stages/lib/answers.py as its helper process.
    wait_for(lambda: cluster.on_second("stages/lib/answers.py"), "a verify task on the second node",
             proc=proc)
    time.sleep(2)  # some checks done, most of the block still to go
    cluster.kill_second()
    finish(proc)
    v = Store(root).latest("verify")
    t = v.read_table(columns=["trace_id", "verify_status", "correct"])
    assert sorted(t.column("trace_id").to_pylist()) == sorted(f"t{i}" for i in range(256))
    status = dict(zip(t.column("trace_id").to_pylist(), t.column("verify_status").to_pylist()))
    correct = dict(zip(t.column("trace_id").to_pylist(), t.column("correct").to_pylist()))
    assert all(correct[f"t{i}"] is True for i in range(256) if i % 4)
    assert all(status[f"t{i}"] == "timeout" for i in range(0, 256, 4))
    cluster.replace_second()


# --- 3. sft: Ray Train restarts from the newest checkpoint ------------------------------------

@pytest.mark.slow
def test_sft_resumes_from_a_checkpoint_after_losing_its_node(cluster, tmp_path, tiny_model):
    from test_sft import write_select

    root = str(tmp_path / "data")
    write_select(root, n=96)
    # 256 tokens a step over 2 workers = 128-token rows (~1-2 samples); 60 steps, a checkpoint
    # every 5: the node is lost after the first one, with most steps still to go.
    recipe = write_recipe(tmp_path / "r.yaml", root, {
        "student": tiny_model,
        "sft": {"max_steps": 60, "epochs": 100.0, "max_length": 128, "tokens_per_step": 256,
                "learning_rate": 0.001, "save_steps": 5, "logging_steps": 1,
                "report_to": "none"},
        "resources": {"sft": {"num_workers": 2, "cpus_per_worker": 1, "zero_stage": 2,
                              "max_failures": 3, "label_selector": {"pool": "second"}}}})
    proc = submit(cluster, "sft", recipe, background=True)
    wait_for(lambda: glob.glob(f"{root}/sft/.tmp-*/checkpoints/checkpoint-*/trainer_state.json"),
             "the first checkpoint", proc=proc)
    assert len(cluster.on_second("ray::")) >= 2, "the Train workers are not on the second node"
    cluster.kill_second()
    cluster.replace_second()  # Train workers need pool=second: the replacement node
    finish(proc)
    stats = Store(root).latest("sft").manifest["stats"]
    assert stats["resumed_from_step"] > 0
    assert stats["steps"] == 60
    assert stats["steps_this_run"] == 60 - stats["resumed_from_step"]
    # One history: the checkpoint's steps, then the resumed ones, each step once.
    assert stats["logged_steps"] == list(range(1, 61))


# --- 4. a vLLM engine killed inside its live actor ----------------------------------------------

@pytest.mark.slow
def test_generate_survives_its_engine_process_dying(cluster, generate_recipe):
    recipe, root = generate_recipe
    # vLLM's own engine process (as on GPU), so there is an engine process to kill; a new
    # seed makes a new version.
    proc = submit(cluster, "generate", recipe, "generate.seed=1",
                  "resources.generate.cpu_engine_in_process=false", background=True)
    wait_for(lambda: len(glob.glob(f"{root}/generate/.tmp-*/part-*.parquet")) >= 1,
             "the first shard", proc=proc)
    engine = cluster.on_second("VLLM::EngineCore")
    assert len(engine) == 1, engine
    os.kill(engine[0], signal.SIGKILL)
    out = finish(proc)
    assert "exiting so Ray restarts the actor" in out
    v = _check_generate(root)
    assert v.manifest["config"]["seed"] == 1


# --- 5. storage every node sees -----------------------------------------------------------------

def test_local_data_root_on_a_two_node_cluster_is_refused_before_work(cluster, tmp_path):
    root = tmp_path / "data"
    recipe = write_recipe(tmp_path / "r.yaml", str(root), {"prompts": {"synthetic_n": 8}})
    proc = submit(cluster, "prompts", recipe, shared_fs=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "s3://" in out and "--shared-fs" in out and "2 nodes" in out
    assert not root.exists() or not any(root.iterdir())  # nothing written


# --- jobs: list / status / logs, and a stage joining the cluster directly ------------------------

def test_jobs_list_status_logs(cluster, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "data"),
                          {"prompts": {"synthetic_n": 9}})
    proc = submit(cluster, "prompts", recipe, "--no-wait")
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.split("submitted ", 1)[1].split(":", 1)[0]

    def jobs(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "jobs", *args,
                               "--address", cluster.jobs], cwd=REPO, env=cluster.env,
                              capture_output=True, text=True, timeout=300)

    follow = jobs("logs", job_id, "--follow")  # streams until the job ends: its exit code
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert "prompts@" in follow.stdout
    assert job_id in jobs("list").stdout
    status = jobs("status", job_id).stdout
    assert "SUCCEEDED" in status and "exit_code      0" in status
    assert Store(str(tmp_path / "data")).latest("prompts").rows == 9
    missing = jobs("status", "raysubmit_nosuchjob")
    assert missing.returncode == 2 and "no job" in missing.stderr


def test_stage_joins_the_cluster_named_by_ray_address(cluster, tmp_path):
    """A driver outside the cluster (RAY_ADDRESS) runs its stage there, not on a new local Ray."""
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
    env = dict(cluster.env, RAY_ADDRESS=f"127.0.0.1:{cluster.gcs}", PYTHONPATH=REPO,
               DISTILLERY_SHARED_FS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    v = Store(str(tmp_path / "data")).latest("squares")
    assert v.manifest["stats"]["gcs_address"].rsplit(":", 1)[1] == str(cluster.gcs)
    assert sorted(v.read_table().column("sq").to_pylist()) == [i * i for i in range(10)]


# --- no cluster needed ---------------------------------------------------------------------------

def test_submit_without_address_is_a_user_error():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "prompts"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "RAY_ADDRESS" in proc.stderr


def test_submit_entrypoint_names_the_recipe_inside_the_shipped_repo():
    from cluster.jobs import entrypoint, runtime_env

    cmd = entrypoint("all", os.path.join(REPO, "configs", "tiny.yaml"), ["n=1"], True)
    assert cmd == "python -m pipeline.cli run all --recipe configs/tiny.yaml --shared-fs n=1"
    env = runtime_env()
    assert env["working_dir"] == REPO
    assert ".venv/" in env["excludes"] and "data/" in env["excludes"]


def test_ray_cluster_yaml_passes_rays_own_schema():
    import jsonschema
    import ray

    with open(os.path.join(REPO, "cluster", "deploy", "ray-cluster.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path, encoding="utf-8") as f:
        jsonschema.validate(config, json.load(f))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    setup = " ".join(config["setup_commands"])
    assert "make install" in setup
    # Token auth on, dashboard on localhost; no secret values in the file.
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    with open(os.path.join(REPO, "cluster", "deploy", "ray-cluster.yaml"), encoding="utf-8") as f:
        assert f.readline().startswith("#") and "ray up" in f.read(2000)


def test_kuberay_rayjob_has_the_fields_kuberay_requires():
    path = os.path.join(REPO, "cluster", "deploy", "kuberay", "rayjob.yaml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    job = yaml.safe_load(text)
    assert text.startswith("#") and "kubectl apply" in text.split("apiVersion")[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("distillery run all ")
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["authOptions"]["mode"] == "token"
    head = cluster_spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = cluster_spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] and isinstance(g["rayStartParams"], dict) for g in groups)
    containers = [c for g in [head] + groups for c in g["template"]["spec"]["containers"]]
    assert all(c["name"] and c["image"] for c in containers)
    assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0 for c in containers)
    # API keys and credentials only from a Kubernetes Secret, never inline.
    env = [e for c in containers for e in c.get("env", [])]
    secret_like = [e for e in env if any(w in e["name"] for w in ("KEY", "TOKEN", "SECRET"))]
    assert secret_like and all("value" not in e and "secretKeyRef" in e["valueFrom"]
                               for e in secret_like)


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    from pipeline.progress import Progress

    p = Progress("generate", total=100, unit="samples", done=20, every_s=0)
    p.update(40, tokens=4000, errors=1)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("generate: 60/100 samples (60.0%), ")
    assert "output tok/s, 1 errors, ETA " in lines[0]
    assert len(lines) == 2  # the update and the closing line
