"""Sizing stages to the cluster they run on (pipeline/resources.py).

The arithmetic of `auto` and of "does the cluster hold this request" on hand-made clusters (pure
logic, no Ray); then the real thing on this machine's local Ray, which has no GPU and no
autoscaler: the real recipe's first GPU-asking stage runs on CPU, an explicit request for GPUs
is exit 2 within seconds with nothing left behind, Ray Train asking for GPU workers is refused
the same way, and on a cluster declared autoscaling the wait ends at wait_s.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys
import time

import pytest

from pipeline.resources import (AUTO, Cluster, Node, StageResources, asks_for, claim,
                               fit_to_cluster, has_autoscaler, room, shortfall, size)
from pipeline.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(os.path.dirname(sys.executable), "distillery")
RECIPE = "configs/recipe.yaml"


def node(gpus=0, cpus=8, **labels) -> Node:
    resources = {"CPU": float(cpus)}
    if gpus:
        resources["GPU"] = float(gpus)
    return Node(resources=resources, labels=labels)


def sized(r: StageResources, *nodes, autoscaling=False, stage="generate"):
    logs = []
    out = size(stage, r, Cluster(list(nodes), autoscaling=autoscaling), log=logs.append)
    return out, "\n".join(logs)


# --- the arithmetic ---------------------------------------------------------------------------

def test_auto_engines_are_the_gpus_divided_by_the_gpus_per_engine():
    one_gpu = StageResources(replicas=AUTO, gpus_per_replica=1)
    assert sized(one_gpu, node(gpus=8))[0].replicas == 8
    assert sized(one_gpu, node(gpus=1))[0].replicas == 1            # the common workstation
    assert sized(one_gpu, node(gpus=4), node(gpus=4))[0].replicas == 8
    # tensor parallel 4: 8 GPUs / 4 = 2 engines; fractional 0.5: 2 engines a GPU.
    tp4 = StageResources(replicas=AUTO, gpus_per_replica=4, tensor_parallel_size=4)
    assert sized(tp4, node(gpus=8))[0].replicas == 2
    half = StageResources(replicas=AUTO, gpus_per_replica=0.5)
    assert sized(half, node(gpus=8, cpus=32))[0].replicas == 16
    # 0.1 + 0.2 rounding: 1 GPU / (1/3) is 3 engines, not 2.
    assert sized(StageResources(replicas=AUTO, gpus_per_replica=1 / 3), node(gpus=1))[0].replicas == 3
    # An engine's CPUs count too: 4 GPUs but 2 CPUs hold 2 engines of 1 GPU + 1 CPU.
    assert sized(one_gpu, node(gpus=4, cpus=2))[0].replicas == 2
    out, log = sized(one_gpu, node(gpus=8))
    assert out.gpus_per_replica == 1 and "replicas=auto -> 8" in log


def test_auto_counts_gpus_node_by_node_and_only_matching_nodes():
    tp4 = StageResources(replicas=AUTO, gpus_per_replica=4, tensor_parallel_size=4)
    # Two 2-GPU nodes: 4 GPUs, but no node holds a 4-GPU engine. auto keeps 1, and the check
    # then names the problem.
    out, _ = sized(tp4, node(gpus=2), node(gpus=2))
    assert out.replicas == 1
    problem = shortfall("evaluate", asks_for(out, "engines"),
                        Cluster([node(gpus=2), node(gpus=2)]))
    assert "1 engines x 4 GPU + 1 CPU" in problem and "4 GPU, 16 CPU (2 nodes)" in problem
    assert "room for 0" in problem
    placed = StageResources(replicas=AUTO, gpus_per_replica=1, label_selector={"pool": "spot"})
    assert sized(placed, node(gpus=8, pool="spot"), node(gpus=8, pool="ondemand"))[0].replicas == 8
    both = dataclasses.replace(placed, fallback_label_selectors=[{"pool": "ondemand"}])
    assert sized(both, node(gpus=8, pool="spot"), node(gpus=8, pool="ondemand"))[0].replicas == 16
    # Ray's selector operators: !value, in(...), !in(...).
    for selector, want in (({"pool": "!spot"}, 8), ({"pool": "in(spot,ondemand)"}, 16),
                           ({"pool": "!in(spot)"}, 8), ({"zone": "a"}, 0)):
        r = StageResources(replicas=1, gpus_per_replica=1, label_selector=selector)
        assert room(asks_for(r, "engines"),
                    Cluster([node(gpus=8, pool="spot"), node(gpus=8, pool="ondemand")])) == want


def test_auto_workers_are_one_per_gpu():
    r = StageResources(num_workers=AUTO, use_gpu=True)
    assert sized(r, node(gpus=8), stage="sft")[0].num_workers == 8
    assert sized(r, node(gpus=4), node(gpus=4), stage="sft")[0].num_workers == 8
    assert sized(r, node(gpus=8, cpus=4), stage="sft")[0].num_workers == 4   # 1 CPU each
    assert sized(StageResources(num_workers=AUTO), node(), stage="sft")[0].num_workers == 1


def test_no_gpu_falls_back_to_the_cpu_path_with_a_warning():
    out, log = sized(StageResources(replicas=AUTO, gpus_per_replica=1), node(cpus=2))
    assert (out.replicas, out.gpus_per_replica, out.tensor_parallel_size) == (1, 0.0, 1)
    assert "warning: resources.generate: this Ray cluster has no GPU (0 GPU, 2 CPU (1 node))" in log
    assert "1 CPU engine" in log
    tp = StageResources(replicas=AUTO, gpus_per_replica=4, tensor_parallel_size=4)
    assert sized(tp, node(cpus=2))[0].tensor_parallel_size == 1
    out, log = sized(StageResources(num_workers=AUTO, use_gpu=True), node(cpus=2), stage="sft")
    assert (out.num_workers, out.use_gpu) == (1, False)
    assert "warning: resources.sft" in log and "1 CPU worker" in log
    # Explicit numbers never fall back: they are checked as written.
    explicit = StageResources(replicas=8, gpus_per_replica=1)
    assert sized(explicit, node(cpus=2))[0] == explicit
    # An autoscaling cluster with no GPU yet keeps the GPU request (1 engine), to wait for.
    out, log = sized(StageResources(replicas=AUTO, gpus_per_replica=1), node(cpus=2),
                     autoscaling=True)
    assert (out.replicas, out.gpus_per_replica) == (1, 1) and "warning" not in log


def test_shortfall_names_the_stage_the_request_and_the_cluster():
    laptop = Cluster([node(cpus=2)])
    r = StageResources(replicas=8, gpus_per_replica=1)
    problem = shortfall("generate", asks_for(r, "engines"), laptop)
    assert problem.startswith("resources.generate: 8 engines x 1 GPU + 1 CPU = 8 GPU + 8 CPU, "
                              "but the cluster has 0 GPU, 2 CPU (1 node), room for 0")
    assert "set resources.generate.replicas=auto" in problem
    # CPUs run out too: 3 CPU engines on 2 CPUs.
    problem = shortfall("prune", asks_for(StageResources(replicas=3), "engines"), laptop)
    assert "3 engines x 1 CPU = 3 CPU" in problem
    assert problem.endswith("set resources.prune.replicas to at most 2")
    workers = StageResources(num_workers=2, use_gpu=True)
    problem = shortfall("sft", asks_for(workers, "workers"), laptop)
    assert problem.startswith("resources.sft: 2 workers x 1 GPU + 1 CPU = 2 GPU + 2 CPU")
    assert "resources.sft.num_workers=auto" in problem
    big = StageResources(num_cpus=4)
    assert "each task needs 4 CPU on one node" in shortfall("verify", asks_for(big, "tasks"),
                                                            laptop)
    placed = StageResources(replicas=1, gpus_per_replica=1, label_selector={"pool": "gpu"})
    problem = shortfall("generate", asks_for(placed, "engines"), Cluster([node(gpus=1)]))
    assert '0 of its nodes match label_selector {"pool": "gpu"}' in problem
    assert shortfall("generate", asks_for(r, "engines"), Cluster([node(gpus=8)])) is None


def test_replicas_must_be_a_number_or_auto(tmp_path):
    from pipeline.config import load_recipe
    from stages import STAGES

    r = load_recipe(os.path.join(REPO, RECIPE), [], STAGES)
    assert r.resources["generate"].replicas == AUTO and r.resources["sft"].num_workers == AUTO
    for bad, key in (("resources.generate.replicas=eight", "resources.generate.replicas"),
                     ("resources.sft.num_workers=Auto", "resources.sft.num_workers")):
        with pytest.raises(UserError, match=f"{key}: expected int \\| 'auto', got"):
            load_recipe(os.path.join(REPO, RECIPE), [bad], STAGES)
    with pytest.raises(UserError, match="resources.generate.replicas: 0"):
        sized(StageResources(replicas=0), node())


def test_the_scoring_pool_lays_its_own_settings_over_the_engines():
    from pipeline.config import load_recipe
    from pipeline.resources import scoring_pool
    from stages import STAGES

    recipe = os.path.join(REPO, "configs", "tiny.yaml")
    r = load_recipe(recipe, ["resources.opd.replicas=2", "resources.opd.scorers.replicas=1",
                             "resources.opd.scorers.gpus_per_replica=1"], STAGES)
    engines, pool = r.resources["opd"], scoring_pool(r.resources["opd"])
    assert (engines.replicas, engines.gpus_per_replica) == (2, 0.0)
    assert (pool.replicas, pool.gpus_per_replica, pool.scorers) == (1, 1.0, {})
    assert pool.cpus_per_replica == engines.cpus_per_replica  # not set: the engines' value
    assert scoring_pool(load_recipe(recipe, [], STAGES).resources["opd"]).replicas == 1
    with pytest.raises(UserError, match="resources.opd.scorers: 'num_workers' is not a "
                                        "scoring pool setting"):
        load_recipe(recipe, ["resources.opd.scorers.num_workers=2"], STAGES)
    with pytest.raises(UserError, match="resources.opd.scorers.replicas: expected int"):
        load_recipe(recipe, ["resources.opd.scorers.replicas=two"], STAGES)
    # a scoring pool of GPUs on this machine (no GPU) is refused, naming the pool
    with pytest.raises(UserError, match=r"resources.opd.scorers: 1 engines x 1 GPU"):
        fit_to_cluster("opd", r.resources["opd"], log=lambda line: None)
    # auto sizes it like engines: none on a machine without GPUs falls back to 1 CPU actor
    auto = dataclasses.replace(engines, scorers={"replicas": AUTO, "gpus_per_replica": 1})
    logs = []
    out = fit_to_cluster("opd", auto, log=logs.append)
    assert out.scorers["replicas"] == 1 and out.scorers["gpus_per_replica"] == 0.0
    assert any("resources.opd.scorers" in line for line in logs)


def test_a_section_that_asks_for_nothing_needs_no_cluster():
    r = StageResources(enforce_eager=True, dtype="float32")
    assert fit_to_cluster("prompts", r) is r


def test_autoscaling_flag(monkeypatch):
    monkeypatch.setenv("DISTILLERY_AUTOSCALING", "1")
    assert has_autoscaler()
    monkeypatch.setenv("DISTILLERY_AUTOSCALING", "0")
    assert not has_autoscaler()
    monkeypatch.delenv("DISTILLERY_AUTOSCALING")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not has_autoscaler()  # a local Ray started on demand is what it is


# --- on this machine's Ray (no GPU, no autoscaler) --------------------------------------------

def _cli(*args, timeout=240) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    env.pop("DISTILLERY_AUTOSCALING", None)
    started = time.monotonic()
    done = subprocess.run([CLI, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    return done, time.monotonic() - started


@pytest.fixture(scope="module")
def recipe_prompts(tmp_path_factory):
    """The real recipe's prompts stage, 8 problems instead of 20,000 (the rest as written)."""
    root = str(tmp_path_factory.mktemp("recipe") / "data")
    done, _ = _cli("run", "prompts", "--recipe", RECIPE, f"data_root={root}",
                   "prompts.synthetic_n=8", timeout=120)
    assert done.returncode == 0, done.stderr
    return root


def _versions(root: str, stage: str) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(os.path.join(root, stage, "*"))
            if os.path.exists(os.path.join(p, ".manifest.json"))]


def test_explicit_gpu_request_on_this_machine_is_exit_2_within_seconds(recipe_prompts,
                                                                       tiny_model):
    root = recipe_prompts
    done, elapsed = _cli("run", "generate", "--recipe", RECIPE, f"data_root={root}",
                         f"teacher={tiny_model}", "resources.generate.replicas=8",
                         "resources.generate.gpus_per_replica=1", timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: resources.generate: 8 engines x 1 GPU + 1 CPU = 8 GPU")
    assert "but the cluster has 0 GPU" in line and "resources.generate.replicas=auto" in line
    # Checked against what the local Ray would have, before starting it (_local_before_start).
    assert elapsed < 30, elapsed
    # Refused before the version folder exists: no version, complete or half-built.
    assert _versions(root, "generate") == []
    assert not glob.glob(os.path.join(root, "generate", ".tmp-*"))
    print(f"impossible request: exit 2 after {elapsed:.1f} s")


@pytest.mark.slow
def test_the_real_recipe_runs_its_first_gpu_stage_on_cpu_here(recipe_prompts, tiny_model):
    """`make pipeline TEACHER=… STUDENT=…` on this machine: resources.generate is
    `replicas: auto, gpus_per_replica: 1`; with no GPU that is 1 CPU engine and a warning (the
    sampling budget shrunk so that a random model's samples end soon)."""
    root = recipe_prompts
    done, elapsed = _cli("run", "generate", "--recipe", RECIPE, f"data_root={root}",
                         f"teacher={tiny_model}", f"student={tiny_model}", "generate.n=2",
                         "generate.max_tokens=16",
                         # Not sizing: a tiny engine starts ~20 s sooner without torch.compile.
                         "resources.generate.enforce_eager=true", timeout=480)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "warning: resources.generate: this Ray cluster has no GPU" in out
    assert "1 CPU engine" in out
    [version] = _versions(root, "generate")
    from pipeline.store import Store

    assert Store(root).latest("generate").rows == 8 * 2
    print(f"real recipe, generate on CPU: {elapsed:.1f} s")


def _ctx(stage: str, tmp_path):
    from pipeline.stage import Context

    return Context(stage=stage, version="v", out_dir=str(tmp_path), data_root=str(tmp_path),
                   teacher="", student="", resources=None)


def _never_called(config):
    raise AssertionError("the training loop must not start")


def test_ray_train_asking_for_gpu_workers_is_refused_not_pending(ray_cluster, tmp_path):
    from cluster.train import fit
    from pipeline.cli import run_guarded

    import ray.train.torch  # noqa: F401 — fit's own imports (torch: ~10 s on a busy machine)

    r = StageResources(num_workers=2, use_gpu=True)
    started = time.monotonic()
    with pytest.raises(UserError, match=r"resources.sft: 2 workers x 1 GPU \+ 1 CPU = 2 GPU"):
        fit(_never_called, {}, r, _ctx("sft", tmp_path))
    assert time.monotonic() - started < 20  # the check itself: ~1-2 s (docs/performance.md)
    # As the CLI sees it: exit 2.
    assert run_guarded(lambda a: fit(_never_called, {}, r, _ctx("sft", tmp_path)), None) == 2


def test_autoscaling_cluster_waits_with_progress_then_gives_up(ray_cluster, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setenv("DISTILLERY_AUTOSCALING", "1")  # this Ray cannot grow: the wait ends
    r = StageResources(replicas=2, gpus_per_replica=1, wait_s=3.0)
    started = time.monotonic()
    with pytest.raises(UserError, match=r"resources.generate: waited \d+ s .*wait_s.* for "
                                        r"2 engines x 1 GPU \+ 1 CPU"):
        claim("generate", r, "engines")
    waited = time.monotonic() - started
    assert 3.0 <= waited < 15, waited
    assert "resources.generate: waiting for resources: 2 engines x 1 GPU" in capsys.readouterr().out
    # Auto on a cluster that may grow keeps asking for a GPU engine (claim then waits).
    assert fit_to_cluster("generate", StageResources(replicas=AUTO, gpus_per_replica=1),
                          log=lambda s: None).gpus_per_replica == 1
