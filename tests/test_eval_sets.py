"""The real benchmark files in ../shared/real/eval_sets/ ingest unedited, with at most field names
set, both as the `prompts` stage's input and as evaluate's `eval_path`; evaluate breaks pass@1
down by the files' `level` and `subject`. docs/evaluate.md lists the same settings per benchmark.
"""
from __future__ import annotations

import json
import os

import pytest

from pipeline.config import load_recipe
from pipeline.runner import run_stage
from stages import STAGES
from stages.evaluate import EvaluateConfig, format_groups, load_eval_problems, summarize_groups
from stages.lib.ingest import problem_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_SETS = os.path.join(REPO, "..", "shared", "real", "eval_sets")
TRACES = os.path.join(REPO, "..", "shared", "real", "traces")

# file -> (field settings, rows, {row index: reference answer as ingested}). The settings are
# what docs/evaluate.md tells a user to pass (as prompts.* or evaluate.*).
BENCHMARKS = {
    "math500_simplerl/test.jsonl": ({}, 500, {
        0: "\\left( 3, \\frac{\\pi}{2} \\right)", 1: "p - q"}),
    "qwen25math/aime24.test.jsonl": ({}, 30, {0: "204"}),
    "qwen25math/amc23.test.jsonl": ({}, 40, {0: "27", 1: "36", 15: "-1"}),   # floats 27.0, -1.0
    "qwen25math/gsm8k.test.jsonl": ({"problem_field": "question"}, 1319, {0: "18", 1: "3"}),
    "gsm8k_openai/test.jsonl": ({"problem_field": "question"}, 1319, {0: "18", 1: "3"}),
    "qwen25math/minerva_math.test.jsonl": ({"answer_field": "solution"}, 272, {0: "1.6"}),
    "limo/minerva.test.jsonl": ({"problem_field": "question"}, 272, {
        0: "1.6", 1: "4.5e33", 5: "np.arcsin(10/13)"}),
}


def _records(name: str) -> list[dict]:
    with open(os.path.join(EVAL_SETS, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_ingests_as_prompts(name, tmp_path):
    fields, rows, known = BENCHMARKS[name]
    recipe = load_recipe(os.path.join(REPO, "configs/tiny.yaml"), [
        f"data_root={tmp_path / 'data'}", f"prompts.path={os.path.join(EVAL_SETS, name)}",
        *[f"prompts.{k}={v}" for k, v in fields.items()]], STAGES)
    v = run_stage("prompts", recipe, log=lambda *_: None)
    got = v.read_table().to_pylist()
    assert len(got) == rows and v.manifest["drops"] == {}
    assert v.manifest["stats"]["with_answer"] == rows
    assert v.manifest["stats"]["answer_not_found"] == 0
    for i, answer in known.items():
        assert got[i]["answer"] == answer, (name, i)
    records = _records(name)
    problem = fields.get("problem_field", "problem")
    assert [r["problem"] for r in got] == [" ".join(r[problem].split()) for r in records]
    if "gsm8k" in name:
        # "#### 2,125": the 14 answers with thousands separators are read as plain integers.
        raw = [r["answer"].rsplit("####", 1)[1].strip() for r in records]
        separated = [i for i, a in enumerate(raw) if "," in a]
        assert len(separated) == 14
        assert all(got[i]["answer"] == raw[i].replace(",", "") for i in separated)
        assert all(a["answer"].lstrip("-").isdigit() for a in got)
    if "amc23" in name:  # every answer is an int-valued float: its integer, never "27.0"
        assert [a["answer"] for a in got] == [str(int(r["answer"])) for r in records]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_loads_as_evaluate_eval_path(name):
    """evaluate reads the same answers as prompts from the same settings, and keeps the
    `level` / `subject` columns the file has for the breakdown."""
    fields, rows, known = BENCHMARKS[name]
    problems = load_eval_problems(EvaluateConfig(eval_path=os.path.join(EVAL_SETS, name), **fields))
    assert len(problems) == rows
    assert all(p["answer"] is not None for p in problems)
    for i, answer in known.items():
        assert problems[i]["answer"] == answer
    groups = {f for p in problems for f in p["groups"]}
    assert groups == ({"level", "subject"} if name.startswith("math500") else set())


def test_answer_from_last_boxed_and_field(tmp_path):
    """MATH's convention: the reference is the solution's last \\boxed{}; `field` keeps the
    value as it is; a solution without a box has no answer and is counted."""
    src = tmp_path / "math.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "P1", "solution": "First \\boxed{1}, finally $\\boxed{\\frac{1}{2}}$."},
        {"problem": "P2", "solution": "no box at all"}]))

    def ingest(*overrides):
        recipe = load_recipe(os.path.join(REPO, "configs/tiny.yaml"), [
            f"data_root={tmp_path / 'data'}", f"prompts.path={src}",
            "prompts.answer_field=solution", *overrides], STAGES)
        return run_stage("prompts", recipe, log=lambda *_: None)

    v = ingest("prompts.answer_from=last_boxed")
    assert [r["answer"] for r in v.read_table().to_pylist()] == ["\\frac{1}{2}", None]
    assert v.manifest["stats"]["answer_not_found"] == 1
    v = ingest("prompts.answer_from=field")
    assert v.read_table().to_pylist()[1]["answer"] == "no box at all"
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="answer_from: 'boxed'"):
        ingest("prompts.answer_from=boxed")


def test_gsm8k_separated_references_grade_every_form():
    """A reference read from "#### 2,125" is 2125, and every way a model writes it is correct."""
    from stages.lib.answers import Checker, VerifyConfig, verify_rows

    problems = load_eval_problems(EvaluateConfig(
        eval_path=os.path.join(EVAL_SETS, "gsm8k_openai/test.jsonl"), problem_field="question"))
    records = _records("gsm8k_openai/test.jsonl")
    raw = [r["answer"].rsplit("####", 1)[1].strip() for r in records]
    refs = [p["answer"] for p, a in zip(problems, raw) if "," in a]
    written = [a for a in raw if "," in a]
    texts, want = [], []
    for ref, w in zip(refs, written):
        texts += [f"\\boxed{{{w}}}", f"So she earns {w} dollars.", f"\\boxed{{{ref}}}",
                  f"\\boxed{{{int(ref) + 1}}}"]
        want += [True, True, True, False]
    checker = Checker(timeout_s=5.0, memory_mib=2048)
    try:
        got = verify_rows(texts, [r for r in refs for _ in range(4)], VerifyConfig(), checker)
    finally:
        checker.close()
    assert got["correct"] == want


def test_breakdown_by_level_on_real_labels():
    """math_cot_100 as an eval file (question / gt, `level` as "Level 3"): its real per-sample
    labels as the verdicts, the breakdown equals the labels' per-level mean."""
    path = os.path.join(TRACES, "qwen25math_cot", "math_cot_100.jsonl")
    problems = load_eval_problems(EvaluateConfig(eval_path=path, problem_field="question",
                                                 answer_field="gt"))
    with open(path) as f:
        records = [json.loads(line) for line in f]
    assert len(problems) == len(records) == 100
    rows = []
    for p, r in zip(problems, records):
        for score in r["score"]:
            rows.append({"model": "qwen", "problem_id": problem_id(p["problem"]),
                         "difficulty": None, "correct": bool(score), "completion_tokens": 1,
                         "finish_reason": "stop"})
    by_group = summarize_groups(rows, {problem_id(p["problem"]): p["groups"] for p in problems}, 4)
    assert set(by_group) == {"level"}
    levels = sorted({r["level"].split()[-1] for r in records}, key=int)
    assert [g["value"] for g in by_group["level"]] == levels       # "Level 3" -> "3", in order
    for g in by_group["level"]:
        mine = [r for r in records if r["level"] == f"Level {g['value']}"]
        assert g["problems"] == len(mine)
        assert g["pass_at_1"] == pytest.approx(
            sum(sum(r["score"]) / len(r["score"]) for r in mine) / len(mine), abs=1e-4)
    table = format_groups(by_group)
    assert table.splitlines()[0].startswith("pass@1 by level:")


def test_evaluate_reports_level_and_subject_on_math500(ray_cluster, tiny_model, data_root,
                                                        tmp_path, capsys):
    """The real stage on MATH-500's first problems (tiny random model on vLLM): pass@1 by level
    and by subject in the manifest and in the printed table."""
    from test_evaluate import evaluate_inputs

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"problem": "Compute 1 + 1.", "answer": "2"}) + "\n")
    recipe, _ = evaluate_inputs(tmp_path, data_root, tiny_model, tiny_model, f"{{path: {train}}}", [
        f"evaluate.eval_path={os.path.join(EVAL_SETS, 'math500_simplerl/test.jsonl')}",
        "evaluate.limit=6", "evaluate.samples=2", "evaluate.pass_k=2", "evaluate.max_tokens=8",
        "evaluate.problem_template='{problem}'"])
    v = run_stage("evaluate", recipe)
    printed = capsys.readouterr().out
    first = _records("math500_simplerl/test.jsonl")[:6]
    by_group = v.manifest["stats"]["by_group"]
    assert set(by_group) == {"level", "subject"}
    for name in ("level", "subject"):
        for model in ("teacher", "sft"):
            mine = {g["value"]: g for g in by_group[name] if g["model"] == model}
            want = {}
            for r in first:
                want[str(r[name])] = want.get(str(r[name]), 0) + 1
            assert {k: g["problems"] for k, g in mine.items()} == want
            assert all(g["samples"] == 2 * g["problems"] for g in mine.values())
        assert f"pass@1 by {name}:" in printed
    level_of = {problem_id(r["problem"]): str(r["level"]) for r in first}
    samples = v.read_table("samples").to_pylist()
    for g in by_group["level"]:
        mine = [s for s in samples
                if s["model"] == g["model"] and level_of[s["problem_id"]] == g["value"]]
        assert g["pass_at_1"] == pytest.approx(sum(bool(s["correct"]) for s in mine) / len(mine),
                                               abs=1e-4)


def _doc_commands() -> list[tuple[int, list[str]]]:
    """(problems, argv) of every row of docs/evaluate.md's tested table."""
    import re
    import shlex

    with open(os.path.join(REPO, "docs", "evaluate.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("<!-- tested: tests/test_eval_sets.py"):].split("\n\n", 1)[0]
    rows = re.findall(r"^\| [^|]+ \| (\d+) \| `([^`]+)` \|$", table, re.M)
    return [(int(n), shlex.split(cmd)) for n, cmd in rows]


def test_docs_evaluate_commands_load_every_benchmark(monkeypatch):
    """Every command of docs/evaluate.md's table, through the real recipe loader: evaluate's
    settings load the file's problems, and the same settings as prompts.* ingest them."""
    from stages.prompts import load_problems

    commands = _doc_commands()
    assert len(commands) == len(BENCHMARKS)
    monkeypatch.chdir(REPO)  # the table's paths are relative to the repository root
    for problems, argv in commands:
        assert argv[:4] == ["distillery", "run", "evaluate", "--recipe"]
        overrides = argv[5:]
        recipe = load_recipe(argv[4], overrides, STAGES)
        cfg = recipe.configs["evaluate"]
        assert os.path.relpath(cfg.eval_path, EVAL_SETS) in BENCHMARKS
        assert len(load_eval_problems(cfg)) == problems, argv
        as_prompts = [o.replace("evaluate.eval_path=", "prompts.path=")
                      .replace("evaluate.", "prompts.") for o in overrides]
        rows, drops, _ = load_problems(load_recipe(argv[4], as_prompts, STAGES).configs["prompts"])
        assert len(rows) == problems and drops == {}, argv
