"""Several teachers (docs/teachers.md): generate.teachers, the teacher column through every stage,
select's teacher options, the report's side-by-side, and `distillery compare-teachers`.

The two teachers of the import tests are two trace styles of stages/lib/synthetic.py written into
a flat trace file with a `teacher` per row: "concise" (one line a step, a slip stays: some answers
wrong) and "checked" (every step re-done, a slip caught: right, about twice as long). A random-init
tiny model writes no correct trace, so imported traces stand in for two trained teachers. Real
components throughout: the import reader, Ray, math-verify, DeepSpeed SFT, vLLM.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from pipeline.apps import compare_teachers
from pipeline.apps.report import teacher_stats, write_report
from pipeline.cli import main
from pipeline.config import load_recipe
from pipeline.errors import UserError
from pipeline.runner import run_stage
from pipeline.store import Store
from stages import STAGES
from stages.generate import GenerateConfig, teacher_list
from stages.lib.synthetic import make_problems, worked_trace
from stages.select import SelectConfig, by_teacher, check_teachers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT = os.path.join(REPO, "configs", "import.yaml")
TINY = os.path.join(REPO, "configs", "tiny.yaml")
STYLES = {"concise": 0.5, "checked": 0.5}  # teacher = style, both slipping at half the minuses


def two_teacher_file(tmp_path, problems: int = 12, samples: int = 2) -> str:
    """A flat trace file: every problem, `samples` traces from each teacher."""
    rng = random.Random(0)
    rows = []
    for p in make_problems(problems, seed=5, min_terms=3, max_terms=3, max_operand=30):
        for style, slip in STYLES.items():
            for _ in range(samples):
                trace = worked_trace(p["problem"], rng, style, slip)
                rows.append({"problem": p["problem"], "answer": p["answer"],
                             "completion": trace["solution"], "teacher": style})
    path = tmp_path / "two_teachers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def import_recipe(tmp_path, student, path, *overrides):
    return load_recipe(IMPORT, [f"data_root={tmp_path / 'data'}", f"student={student}",
                                f"prompts.path={path}", *overrides], STAGES)


# --------------------------------------------------------------------------- config checks

def test_generate_teachers_conflicts_are_user_errors():
    assert teacher_list(GenerateConfig(teacher="a")) == ["a"]
    assert teacher_list(GenerateConfig(teachers=["a", "b"])) == ["a", "b"]
    assert teacher_list(GenerateConfig(teacher="b", teachers=["a", "b"])) == ["a", "b"]
    for cfg in (GenerateConfig(teacher="c", teachers=["a", "b"]),
                GenerateConfig(teachers=["a", "a"]),
                GenerateConfig(teachers=["a", ""]),
                GenerateConfig(backend="import", teachers=["a", "b"])):
        with pytest.raises(UserError, match="generate.teachers"):
            teacher_list(cfg)


def _rows():
    """Two problems; A: one right one wrong on each, B: both right on p1, both wrong on p2."""
    out = []
    for pid in ("p1", "p2"):
        for teacher, verdicts in (("A", (True, False)), ("B", (pid == "p1",) * 2)):
            for k, ok in enumerate(verdicts):
                out.append({"problem_id": pid, "trace_id": f"{pid}-{teacher}-{k}",
                            "teacher": teacher, "correct": ok, "selected": ok,
                            "prompt_tokens": 5, "pruned_tokens": 10})
    return out


def test_select_teacher_options_filter_mix_and_count():
    rows = _rows()
    kept, drops = by_teacher(rows, SelectConfig(teachers=["B"]))
    assert {r["teacher"] for r in kept} == {"B"} and drops == {"teacher_not_chosen": 4}
    # problems_solved_by: p2 has no correct trace of B -> every trace of p2 is left out
    kept, drops = by_teacher(rows, SelectConfig(teachers=["A"], problems_solved_by=["A", "B"],
                                                sft_per_problem=1))
    assert {r["problem_id"] for r in kept} == {"p1"} and len(kept) == 2
    assert drops == {"problem_not_solved_by_all": 4, "teacher_not_chosen": 2}
    # sft_per_problem 2: A has only one correct trace of p1 either
    kept, drops = by_teacher(rows, SelectConfig(problems_solved_by=["A", "B"],
                                                sft_per_problem=2))
    assert kept == [] and drops == {"problem_not_solved_by_all": 8}
    # weights: one teacher per problem, drawn with the seed; weight 0 = never
    kept, drops = by_teacher(rows, SelectConfig(teacher_weights={"A": 1.0, "B": 0}))
    assert {r["teacher"] for r in kept} == {"A"} and drops == {"teacher_not_weighted": 4}
    picks = set()
    for seed in range(20):
        kept, drops = by_teacher(rows, SelectConfig(seed=seed,
                                                    teacher_weights={"A": 1, "B": 1}))
        per_problem = {(r["problem_id"], r["teacher"]) for r in kept}
        assert len(per_problem) == 2 and drops == {"teacher_not_drawn": 4}
        picks |= per_problem
        again, _ = by_teacher(rows, SelectConfig(seed=seed, teacher_weights={"A": 1, "B": 1}))
        assert again == kept  # deterministic with the seed
    assert len(picks) == 4  # over seeds each problem got each teacher


@pytest.mark.parametrize("cfg,match", [
    (SelectConfig(teachers=["C"]), r"select.teachers: no trace of teacher\(s\) \['C'\]"),
    (SelectConfig(teacher_weights={"A": -1}), "select.teacher_weights: A"),
    (SelectConfig(teacher_weights={"A": 0}), "no positive weight"),
    (SelectConfig(teachers=["A"], teacher_weights={"A": 1}), "not both"),
    (SelectConfig(problems_solved_by=["A", "Z"]), "select.problems_solved_by"),
])
def test_select_teacher_option_errors(cfg, match):
    with pytest.raises(UserError, match=match):
        check_teachers(cfg, {"A", "B"})


def test_teacher_stats_perplexity_and_spread():
    verify = [{"teacher": t, "correct": ok, "difficulty": d, "completion_tokens": n}
              for t, ok, d, n in (("A", True, "easy", 10), ("A", False, "hard", 30),
                                  ("B", True, "easy", 20), ("B", True, "hard", 20))]
    prov = [{"teacher": "A", "teacher_share": 0.5, "lp_student": -1.0},
            {"teacher": "A", "teacher_share": None, "lp_student": -3.0},
            {"teacher": "B", "teacher_share": 0.0, "lp_student": None}]
    s = teacher_stats(verify, prov)
    assert s["A"]["pass_rate"] == 0.5 and s["A"]["by_level"] == {"easy": [1, 1], "hard": [0, 1]}
    assert s["A"]["tokens"][0] == 20 and round(s["A"]["tokens"][1], 3) == 14.142
    assert s["B"]["tokens"] == [20, 0.0]  # no spread
    assert round(s["A"]["student_ppl"], 4) == round(2.718281828 ** 2, 4)  # exp(-mean(-1, -3))
    assert s["A"]["teacher_share"] == 0.5 and s["B"]["student_ppl"] is None


# --------------------------------------------------------------------------- through the stages

def test_teacher_column_through_every_stage_and_the_report(tmp_path, tiny_model, ray_cluster):
    """Import two teachers, verify -> prune -> provenance -> select with each teacher option;
    the SFT split and the pairs keep the teacher; the report puts them side by side."""
    path = two_teacher_file(tmp_path)
    rec = import_recipe(tmp_path, tiny_model, path, "select.sft_per_problem=0")
    got = {}
    for name in ("prompts", "generate", "verify", "prune", "provenance", "select"):
        got[name] = run_stage(name, rec, log=lambda *_: None)
    for name in ("generate", "verify", "prune", "provenance"):
        teachers = got[name].read_table(columns=["teacher"]).column("teacher").to_pylist()
        assert sorted(set(teachers)) == ["checked", "concise"], name
    rows = got["verify"].read_table(columns=["teacher", "correct"]).to_pylist()
    rate = {t: sum(r["correct"] for r in rows if r["teacher"] == t)
            / sum(r["teacher"] == t for r in rows) for t in STYLES}
    assert rate["checked"] == 1.0 and rate["concise"] < 1.0, rate  # checked catches its slips
    sft = got["select"].read_table("sft").to_pylist()
    assert {r["teacher"] for r in sft} == {"checked", "concise"}
    assert len(sft) == sum(r["correct"] for r in rows)
    pairs = got["select"].read_table("pairs").to_pylist()
    assert pairs and all(p["rejected_teacher"] == "concise" for p in pairs)
    per = got["select"].manifest["stats"]["teachers"]
    assert per["checked"]["mean_sft_tokens"] > per["concise"]["mean_sft_tokens"]

    only = run_stage("select", import_recipe(tmp_path, tiny_model, path,
                                              "select.teachers=[checked]"), log=lambda *_: None)
    assert {r["teacher"] for r in only.read_table("sft").to_pylist()} == {"checked"}
    assert only.manifest["drops"] == {"teacher_not_chosen": len(rows) // 2}
    assert only.manifest["stats"]["pairs"] == 0  # checked never fails: no pair

    mixed = run_stage("select", import_recipe(
        tmp_path, tiny_model, path, "select.teacher_weights={concise: 3, checked: 1}"),
        log=lambda *_: None)
    sft = mixed.read_table("sft").to_pylist()
    assert len({(r["problem_id"], r["teacher"]) for r in sft}) == len({r["problem_id"]
                                                                     for r in sft})
    assert mixed.manifest["drops"]["teacher_not_drawn"] == len(rows) // 2

    with pytest.raises(UserError, match="select.teachers: no trace of teacher"):
        run_stage("select", import_recipe(tmp_path, tiny_model, path, "select.teachers=[r1]"),
                  log=lambda *_: None)

    # The viewer filters by teacher (its ASGI app, in process).
    from starlette.testclient import TestClient

    from pipeline.apps.viewer.server import Viewer, make_app

    store = Store(str(tmp_path / "data"))
    with TestClient(make_app(Viewer(store, list(STAGES)))) as client:
        got_count = client.get(f"/api/count/verify/{got['verify'].version}",
                               params={"f": "teacher:checked"}).json()["total"]
    assert got_count == len(rows) // 2

    text = open(write_report(store, str(tmp_path / "r.html")), encoding="utf-8").read()
    section = text.split('<section id="teachers">')[1].split("</section>")[0]
    assert "<td>checked</td>" in section and "<td>concise</td>" in section
    assert "pass rate, " in section and "student perplexity" in section


@pytest.mark.slow
def test_generate_runs_each_teacher_in_turn(tmp_path, tiny_model, ray_cluster):
    """vLLM, two teachers (the tiny model under two paths): one version, n rows per problem
    and teacher, trace ids apart, part k = teacher * shards + shard."""
    second = str(tmp_path / "teacher-b")
    shutil.copytree(tiny_model, second)
    rec = load_recipe(TINY, [f"data_root={tmp_path / 'data'}", f"student={tiny_model}",
                             f"generate.teachers=[{tiny_model}, {second}]", "generate.n=2",
                             "generate.max_tokens=8", "generate.shard_size=2",
                             "prompts.synthetic_n=3"], STAGES)
    prompts = run_stage("prompts", rec, log=lambda *_: None)
    gen = run_stage("generate", rec, {"prompts": prompts.version}, log=lambda *_: None)
    rows = gen.read_table().to_pylist()
    assert len(rows) == 3 * 2 * 2
    assert sorted({r["teacher"] for r in rows}) == sorted([tiny_model, second])
    assert len({r["trace_id"] for r in rows}) == len(rows)
    stats = gen.manifest["stats"]
    assert stats["teachers"] == [tiny_model, second] and stats["shards"] == 4
    parts = sorted(os.listdir(gen.path))
    assert [p for p in parts if p.startswith("part-")] == [
        f"part-{k:05d}.parquet" for k in range(4)]


# --------------------------------------------------------------------------- compare-teachers

def test_compare_teachers_refuses_what_it_sets(tmp_path, capsys):
    code = main(["compare-teachers", "--recipe", IMPORT, f"data_root={tmp_path}",
                 "select.teachers=[a]"])
    assert code == 2 and "select.teachers: compare-teachers sets it" in capsys.readouterr().err
    code = main(["compare-teachers", "--recipe", IMPORT, "--seeds", "0,0"])
    assert code == 2 and "--seeds" in capsys.readouterr().err


def test_compare_teachers_table_and_pick():
    runs = {s: {"A": {"pass_at_1": 0.2 + s / 10, "mean_completion_tokens": 10.0, "sft_rows": 8,
                      "mean_sft_tokens": 20.0},
                "B": {"pass_at_1": 0.5, "mean_completion_tokens": 12.0, "sft_rows": 8,
                      "mean_sft_tokens": 40.0}} for s in (0, 1, 2)}
    summary = compare_teachers.summarize(runs, {"A": [20.0, 2.0], "B": [40.0, 9.0]})
    assert summary["pick"] == "B" and summary["tied"] == ["B"]
    a = summary["teachers"]["A"]["pass_at_1"]
    assert round(a[0], 6) == 0.3 and round(a[1], 6) == 0.1
    text = compare_teachers.format_table(summary)
    assert "0.300 ± 0.100" in text and text.endswith("pick: B")


@pytest.mark.slow
def test_compare_teachers_shortened_run(tmp_path, tiny_model, ray_cluster, capsys):
    """One seed, one SFT epoch per teacher, 4 held-out problems: the real stages end to end."""
    path = two_teacher_file(tmp_path, problems=8, samples=2)
    items = [f"data_root={tmp_path / 'data'}", f"student={tiny_model}", f"prompts.path={path}",
             "sft.epochs=1", "resources.sft.num_workers=1", "evaluate.synthetic_n=4",
             "evaluate.samples=1", "evaluate.pass_k=1", "evaluate.max_tokens=16"]
    plan = compare_teachers.ComparePlan(seeds=(0,), student_baseline=False)
    assert compare_teachers.main(IMPORT, items, {}, plan) == 0
    out = capsys.readouterr().out
    assert "pick: " in out and "checked" in out and "concise" in out
    result = json.load(open(tmp_path / "data" / "compare_teachers.json"))
    assert result["complete"] and result["teachers_compared"] == ["checked", "concise"]
    run0 = result["runs"]["0"]
    # the same problems, an equal number of traces per teacher
    assert run0["checked"]["sft_rows"] == run0["concise"]["sft_rows"] == result["problems"]
    assert run0["checked"]["mean_sft_tokens"] > run0["concise"]["mean_sft_tokens"]
    assert result["pick"] in ("checked", "concise")
    store = Store(str(tmp_path / "data"))
    assert len(store.versions("sft")) == 2 and len(store.versions("evaluate")) == 1
