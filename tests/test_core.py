"""The stage core: recipe config, version hashing, the versioned store, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pyarrow as pa
import pytest

from pipeline.config import absolute_if_local, load_recipe
from pipeline.errors import UserError
from pipeline.runner import run_stage, version_hash
from pipeline.stage import Stage
from pipeline.store import Store
from stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "pipeline.cli"]


@dataclass
class EchoConfig:
    """n: rows to make; label: a string copied into every row."""

    n: int = 3
    label: str = "a"
    scale: float = 1.0


def _echo_run(cfg, inputs, ctx):
    ctx.stats["made"] = cfg.n
    return pa.table({"i": list(range(cfg.n)), "label": [cfg.label] * cfg.n})


def _double_run(cfg, inputs, ctx):
    table = inputs["echo"].read_table()
    return table.append_column("twice", pa.array([2 * i for i in table.column("i").to_pylist()]))


ECHO = Stage("echo", EchoConfig, (), (), ("i", "label"), _echo_run)
DOUBLE = Stage("double", EchoConfig, ("echo",), ("i",), ("twice",), _double_run)
TEST_STAGES = {"echo": ECHO, "double": DOUBLE}


def _recipe(tmp_path, body: str, overrides=()):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(body))
    return load_recipe(str(path), list(overrides), stages=TEST_STAGES)


def test_precedence_defaults_recipe_overrides(tmp_path, monkeypatch):
    r = _recipe(tmp_path, """
        data_root: from-recipe
        echo: {n: 5, label: yaml}
    """, ["echo.label=cli", "double.scale=2"])
    assert r.configs["echo"].n == 5            # recipe beats default
    assert r.configs["echo"].label == "cli"    # override beats recipe
    assert r.configs["double"].scale == 2.0 and r.configs["double"].n == 3  # default kept
    assert r.data_root == os.path.abspath("from-recipe")
    monkeypatch.setenv("DISTILLERY_DATA_ROOT", "from-env")
    assert _recipe(tmp_path, "data_root: from-recipe\n").data_root == os.path.abspath("from-env")
    assert _recipe(tmp_path, "data_root: x\n", ["data_root=from-cli"]).data_root == \
        os.path.abspath("from-cli")


def test_overrides_tune_a_stage_but_never_add_it_to_the_run(tmp_path):
    """`run all` runs the recipe's `stages`, else the sections its file has: an override that
    creates a section (to set one key) must not add that stage."""
    r = _recipe(tmp_path, "data_root: d\necho: {n: 5}\n", ["double.scale=2", "echo.n=6"])
    assert r.stages == ["echo"]
    assert r.configs["double"].scale == 2.0 and r.configs["echo"].n == 6  # still applied
    assert _recipe(tmp_path, "data_root: d\n", ["echo.n=2"]).stages == []
    # `stages=` is the one override that chooses the stages.
    assert _recipe(tmp_path, "data_root: d\necho: {n: 5}\n",
                   ["stages=[double, echo]", "double.n=1"]).stages == ["echo", "double"]
    # The real recipe: configs/tiny.yaml has no attribution section and no `stages` list.
    tiny = os.path.join(REPO, "configs", "tiny.yaml")
    plain = load_recipe(tiny, [], STAGES)
    tuned = load_recipe(tiny, ["attribution.alpha=0.2", "evaluate.samples=2"], STAGES)
    assert "attribution" not in plain.stages and tuned.stages == plain.stages
    assert tuned.configs["attribution"].alpha == 0.2


def test_local_paths_become_absolute_hub_ids_stay(tmp_path, monkeypatch):
    """Ray Train workers run elsewhere than the driver's working directory: the demo's default
    `data_root: data/tiny` once made sft look for `data/tiny/models/student-…` there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "student").mkdir(parents=True)
    r = _recipe(tmp_path, "data_root: data/tiny\nteacher: Qwen/Qwen2.5-7B\n"
                          "student: models/student\n")
    assert r.data_root == str(tmp_path / "data" / "tiny")
    assert r.student == str(tmp_path / "models" / "student")
    assert r.teacher == "Qwen/Qwen2.5-7B"                      # a hub id: left to the hub
    assert absolute_if_local("./not-yet") == str(tmp_path / "not-yet")
    assert absolute_if_local("~/m") == os.path.expanduser("~/m")
    assert absolute_if_local("") == ""
    assert _recipe(tmp_path, "data_root: s3://bucket/runs\n").data_root == "s3://bucket/runs"


def test_unknown_keys_name_the_nearest(tmp_path):
    with pytest.raises(UserError, match="unknown key 'lable'.*did you mean 'label'"):
        _recipe(tmp_path, "data_root: d\necho: {lable: x}\n")
    with pytest.raises(UserError, match="unknown key 'ecoh'.*'echo'"):
        _recipe(tmp_path, "data_root: d\necoh: {n: 1}\n")
    with pytest.raises(UserError, match="unknown key 'nn'.*'n'"):
        _recipe(tmp_path, "data_root: d\n", ["echo.nn=3"])
    with pytest.raises(UserError, match="echo.n: expected int"):
        _recipe(tmp_path, "data_root: d\n", ["echo.n=many"])
    with pytest.raises(UserError, match="unknown key 'replica'.*'replicas'"):
        _recipe(tmp_path, "data_root: d\nresources: {echo: {replica: 2}}\n")


def test_version_hash_tracks_config_and_inputs(tmp_path):
    r = _recipe(tmp_path, "data_root: d\n")
    base = version_hash(ECHO, r.configs["echo"], {})
    assert base == version_hash(ECHO, EchoConfig(), {})
    assert base != version_hash(ECHO, EchoConfig(n=4), {})
    # Resources ("where") never enter the hash: same data whatever runs it.
    r2 = _recipe(tmp_path, "data_root: d\nresources: {echo: {replicas: 8}}\n")
    assert version_hash(ECHO, r2.configs["echo"], {}) == base


# Run in a copy of the project: each step edits one module of the copy (a comment appended)
# and prints the stages' code versions.
_HASH_SCRIPT = """
import json, os, sys
from stages import STAGES
from pipeline.runner import code_sources, code_version

def versions():
    return {name: code_version(stage) for name, stage in STAGES.items()}

# A stages/lib module sft imports and prompts does not (stages/lib/packed.py, …).
lib = sorted(m for m in set(code_sources(STAGES["sft"])) - set(code_sources(STAGES["prompts"]))
             if m.startswith("stages.lib."))
steps = [("start", None), ("textfile", "pipeline/textfile.py"),
         ("lib", lib[0].replace(".", "/") + ".py"), ("evaluate", "stages/evaluate.py")]
out = {}
for name, path in steps:
    if path:
        with open(path, "a") as f:
            f.write("\\n# edited\\n")
    out[name] = versions()
print(json.dumps({"versions": out, "lib": lib,
                  "prompts": sorted(code_sources(STAGES["prompts"]))}))
"""


def test_code_version_covers_every_project_module_a_stage_imports(tmp_path):
    """Editing a module a stage imports, at any depth and wherever it lives, makes new versions
    of that stage, and of no stage that does not import it. pipeline/textfile.py decides what
    ingest reads; stages/lib/ modules are reached only through other modules' imports."""
    import shutil

    for pkg in ("pipeline", "stages", "cluster"):
        shutil.copytree(os.path.join(REPO, pkg), tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    v = result["versions"]
    assert "pipeline.textfile" in result["prompts"] and result["lib"]
    assert v["textfile"]["prompts"] != v["start"]["prompts"]
    assert v["textfile"]["sft"] != v["start"]["sft"]       # through pipeline.config
    # A stages/lib module: sft (through stages/lib/packed.py) changes; prompts does not import it.
    assert v["lib"]["sft"] != v["textfile"]["sft"]
    assert v["lib"]["prompts"] == v["textfile"]["prompts"]
    # A stage's module covers itself; stages/__init__ (which imports every stage) is no
    # stage's dependency, so editing evaluate leaves sft and prompts where they were.
    assert v["evaluate"]["evaluate"] != v["lib"]["evaluate"]
    assert v["evaluate"]["sft"] == v["lib"]["sft"]
    assert v["evaluate"]["prompts"] == v["lib"]["prompts"]


def test_run_skip_new_version_and_lineage(tmp_path):
    root = str(tmp_path / "data")
    r = _recipe(tmp_path, f"data_root: {root}\n")
    logs = []
    v1 = run_stage("echo", r, stages=TEST_STAGES, log=logs.append)
    again = run_stage("echo", r, stages=TEST_STAGES, log=logs.append)
    assert again.version == v1.version and "nothing to do" in logs[-1]
    d1 = run_stage("double", r, stages=TEST_STAGES, log=logs.append)
    assert d1.manifest["inputs"] == {"echo": v1.version}
    assert d1.read_table().column("twice").to_pylist() == [0, 2, 4]

    r3 = _recipe(tmp_path, f"data_root: {root}\n", ["echo.n=4"])
    v2 = run_stage("echo", r3, stages=TEST_STAGES, log=logs.append)
    assert v2.version != v1.version and v2.rows == 4
    store = Store(root)
    assert [v.version for v in store.versions("echo")] == [v1.version, v2.version]
    assert store.latest("echo").version == v2.version
    # double's input changed -> a new double version, pinned inputs still reproduce the old one.
    d2 = run_stage("double", r3, stages=TEST_STAGES, log=logs.append)
    assert d2.version != d1.version
    d1_again = run_stage("double", r3, pins={"echo": v1.version}, stages=TEST_STAGES, log=logs.append)
    assert d1_again.version == d1.version
    m = d1.manifest
    assert m["rows_out"] == 3 and m["rows_in"] == 3 and m["schema"]["twice"] == "int64"


def test_requires_checked_before_run(tmp_path):
    needs = Stage("double", EchoConfig, ("echo",), ("missing_col",), (), _double_run)
    r = _recipe(tmp_path, f"data_root: {tmp_path / 'd'}\n")
    run_stage("echo", r, stages=TEST_STAGES, log=lambda *_: None)
    with pytest.raises(UserError, match="missing_col"):
        run_stage("double", r, stages={"echo": ECHO, "double": needs}, log=lambda *_: None)
    with pytest.raises(UserError, match="run `distillery run echo` first"):
        run_stage("double", _recipe(tmp_path, f"data_root: {tmp_path / 'empty'}\n"),
                  stages=TEST_STAGES, log=lambda *_: None)


def test_killed_write_leaves_nothing_complete(tmp_path):
    """A process killed mid-stage (after writing a part) leaves no version that counts."""
    root = tmp_path / "data"
    script = textwrap.dedent(f"""
        import os, signal, pyarrow as pa, pyarrow.parquet as pq
        from dataclasses import dataclass
        from pipeline.config import load_recipe
        from pipeline.runner import run_stage
        from pipeline.stage import Stage

        @dataclass
        class C:
            n: int = 1

        def run(cfg, inputs, ctx):
            pq.write_table(pa.table({{"x": [1]}}), os.path.join(ctx.out_dir, "part-00000.parquet"))
            os.kill(os.getpid(), signal.SIGKILL)

        stages = {{"crash": Stage("crash", C, (), (), ("x",), run)}}
        open("{tmp_path}/r.yaml", "w").write("data_root: {root}\\n")
        run_stage("crash", load_recipe("{tmp_path}/r.yaml", [], stages=stages), stages=stages)
    """)
    (tmp_path / "crash.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "crash.py")], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == -9
    store = Store(str(root))
    assert os.listdir(root / "crash")  # the temp folder is there ...
    assert store.versions("crash") == [] and store.latest("crash") is None  # ... but not a version
    out = subprocess.run(CLI + ["inspect", "crash", f"data_root={root}"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no complete version" in out.stderr


# ---------------------------------------------------------------- ingest (prompts stage)

def _write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def _run_prompts(tmp_path, *overrides):
    r = load_recipe(os.path.join(REPO, "configs/tiny.yaml"),
                    [f"data_root={tmp_path / 'data'}", *overrides], STAGES)
    return run_stage("prompts", r, log=lambda *_: None)


def test_ingest_each_format(tmp_path):
    rows = [{"question": "What is 1+1?", "sol": "2"}, {"question": "What is  2+2? ", "sol": 4},
            {"question": "What is 1+1?", "sol": "2"}]
    jsonl = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    js = _write(tmp_path / "p.json", json.dumps(rows))
    csvf = _write(tmp_path / "p.csv", "question,sol\nWhat is 1+1?,2\nWhat is  2+2? ,4\nWhat is 1+1?,2\n")
    import datasets
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": r["question"], "sol": str(r["sol"])} for r in rows]),
                   tmp_path / "p.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"question": r["question"], "sol": str(r["sol"])} for r in rows])}).save_to_disk(str(tmp_path / "hf"))
    for path in [jsonl, js, csvf, str(tmp_path / "p.parquet"), str(tmp_path / "hf")]:
        v = _run_prompts(tmp_path, f"prompts.path={path}", "prompts.problem_field=question",
                         "prompts.answer_field=sol")
        t = v.read_table().to_pylist()
        assert [r["problem"] for r in t] == ["What is 1+1?", "What is 2+2?"], path
        assert [r["answer"] for r in t] == ["2", "4"], path
        assert v.manifest["drops"] == {"duplicate": 1}, path
        assert len({r["problem_id"] for r in t}) == 2


def test_ingest_gsm8k_answers_and_decontamination(tmp_path):
    src = _write(tmp_path / "gsm.jsonl", "\n".join(json.dumps(r) for r in [
        {"question": "Tom has three apples and buys two more apples at the shop today", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "Ann has ten pears", "answer": "#### 10"}]) + "\n")
    ev = _write(tmp_path / "eval.jsonl", json.dumps(
        {"question": "Q: Tom has three apples and buys two more apples at the shop today?"}) + "\n")
    v = _run_prompts(tmp_path, f"prompts.path={src}", "prompts.problem_field=question",
                     f"prompts.decontaminate={ev}")
    t = v.read_table().to_pylist()
    assert [(r["problem"], r["answer"]) for r in t] == [("Ann has ten pears", "10")]
    assert v.manifest["drops"] == {"contaminated": 1}


def test_synthetic_ingest_is_deterministic(tmp_path):
    a = _run_prompts(tmp_path, "prompts.synthetic_n=20")
    b = _run_prompts(tmp_path, "prompts.synthetic_n=20")
    assert a.version == b.version and a.rows == 20
    answers = a.read_table().column("answer").to_pylist()
    assert all(x is not None and x.lstrip("-").isdigit() for x in answers)


BAD_INPUTS = [
    ("bad.jsonl", b'{"problem": "ok", "answer": "1"}\n{"problem": "broken\n', "bad.jsonl: line 2: not valid JSON"),
    ("nofield.jsonl", b'{"problem": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n',
     "nofield.jsonl: line 2: no field 'problem'"),
    ("type.jsonl", b'{"problem": ["a"], "answer": "1"}\n', "type.jsonl: line 1: field 'problem': expected text, got list"),
    ("empty.jsonl", b"", "empty.jsonl: no rows"),
    ("latin.jsonl", b'{"problem": "caf\xe9", "answer": "1"}\n', "latin.jsonl: line 1: not UTF-8"),
    ("bad.csv", b"problem\nq1\n", "bad.csv: line 2: no field 'answer'"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_naming_file_line_field(tmp_path, name, content, message):
    path = _write(tmp_path / name, content, "wb")
    root = tmp_path / "data"
    proc = subprocess.run(CLI + ["run", "prompts", f"data_root={root}", f"prompts.path={path}"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert Store(str(root)).versions("prompts") == []
    assert not (root / "prompts").exists() or all(p.startswith(".") for p in os.listdir(root / "prompts"))


def test_cli_user_errors_exit_2(tmp_path):
    root = tmp_path / "data"
    cases = [
        (["run", "prompts", f"data_root={root}", "prompts.pathh=x"], "did you mean 'path'"),
        (["run", "prompts", "--recipe", str(tmp_path / "nope.yaml")], "nope.yaml: file not found"),
        (["inspect", "prompts@deadbeef", f"data_root={root}"], "prompts@deadbeef: no complete version"),
        (["run", "verifyy", f"data_root={root}"], "unknown stage 'verifyy'"),
    ]
    for argv, message in cases:
        proc = subprocess.run(CLI + argv, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, argv


def test_cli_run_twice_inspect_lineage(tmp_path):
    root = tmp_path / "data"
    first = subprocess.run(CLI + ["run", "prompts", f"data_root={root}"], cwd=REPO,
                           capture_output=True, text=True, check=True)
    second = subprocess.run(CLI + ["run", "prompts", f"data_root={root}"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert "running" in first.stdout and "nothing to do" in second.stdout
    subprocess.run(CLI + ["run", "prompts", f"data_root={root}", "prompts.synthetic_n=7"],
                   cwd=REPO, check=True, capture_output=True)
    out = subprocess.run(CLI + ["inspect", "prompts", "--json", "--rows", "2", f"data_root={root}"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert d["rows"] == 7 and d["manifest"]["config"]["synthetic_n"] == 7
    assert len(d["sample"]["data"]) == 2 and d["columns"]["data"]["answer"]["nulls"] == 0
    env = dict(os.environ, DISTILLERY_DATA_ROOT=str(root))
    versions = subprocess.run(CLI + ["versions", "prompts", "--json"], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True)
    listed = json.loads(versions.stdout)
    assert len(listed) == 2 and listed[-1]["latest"] and listed[-1]["version"] == d["version"]
    lin = subprocess.run(CLI + ["lineage", f"prompts@{listed[0]['version']}", f"data_root={root}"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert lin.stdout.startswith(f"prompts@{listed[0]['version']}")


def test_evaluate_of_paths_alone_needs_no_sft_or_redi_version(tmp_path):
    """evaluate reads sft / redi only when it evaluates them by name, and the training prompts
    only to decontaminate: checkpoint paths alone resolve on an empty data root."""
    from pipeline.errors import UserError
    from pipeline.runner import resolve_inputs
    from pipeline.store import Store
    from stages import STAGES
    from stages.evaluate import EvaluateConfig

    store, stage = Store(str(tmp_path)), STAGES["evaluate"]
    paths = EvaluateConfig(models=["/models/a", "/models/b"], decontaminate=False)
    assert resolve_inputs(stage, store, {}, paths) == {}
    with pytest.raises(UserError, match="reads 'sft', which has no complete version"):
        resolve_inputs(stage, store, {}, EvaluateConfig(models=["/models/a", "sft"],
                                                        decontaminate=False))
    with pytest.raises(UserError, match="reads 'prompts'"):
        resolve_inputs(stage, store, {}, EvaluateConfig(models=["/models/a"]))
