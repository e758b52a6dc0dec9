"""`distillery compare-teachers` — pick the teacher by a short distillation, not by its score.

DED (arXiv 2508.09883, docs/methods.md "Several teachers and choosing one"): a teacher's
benchmark score does not say how well a student learns from its traces; a smoke-test
distillation does. For one verify version with traces of several teachers (generate.teachers,
or an imported file with a teacher per row):

    distillery compare-teachers --recipe configs/import.yaml prompts.path=FILE student=MODEL \
        --seeds 0,1,2

  1. prompts -> generate -> verify once (or a pinned verify@<version>, its prompts from its
     lineage);
  2. per seed, per teacher, through the real stages (pipeline/apps/ablations.py's `sft_arm`):
     prune unpruned and provenance none (every correct trace stays), select pinned to that
     teacher (select.teachers) on the SAME problems (select.problems_solved_by = every teacher:
     the problems each one solved at least `per_problem` times) with `per_problem` traces each,
     so every teacher's SFT set has the same size; then sft from the base student;
  3. one evaluate per seed holding every teacher's SFT model (the base student too, at the first
     seed), on the recipe's held-out problems;
  4. the table: per teacher mean pass@1 ± sample sd over seeds, the SFT traces' mean length, the
     student's own mean length, and the pick = the highest mean pass@1.

`--demo` compares the demo's two teachers (`demo_items`) on the demo's task and settings.

Seeds vary select's shuffle (which of a problem's correct traces is taken), SFT's data order and
evaluate's sampling. Written to <data_root>/compare_teachers.json after every seed (the
report's "teachers" section reads it). How short the SFT is comes from the recipe (sft.epochs=1
on the command line shortens it); `per_problem` and the seeds come from the command.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from pipeline.apps import demo
from pipeline.apps.ablations import NO_PROVENANCE, UNPRUNED, _overall, mean_sd, sft_arm
from pipeline.apps.report import mean_sd_text
from pipeline.config import load_recipe
from pipeline.errors import UserError
from pipeline.runner import run_stage
from pipeline.store import Store
from stages import STAGES
from stages.evaluate import load_eval_problems

SEEDS = (0, 1, 2)
# The keys compare-teachers sets per arm and seed: refused on its command line.
ARM_KEYS = ("select.teachers", "select.teacher_weights", "select.problems_solved_by",
            "select.sft_per_problem", "select.seed", "sft.seed", "evaluate.seed",
            "evaluate.models")


@dataclass
class ComparePlan:
    """What one compare-teachers run does.

    seeds: the seeds (>= 3 for a spread worth reading; tests run one).
    per_problem: correct traces per problem and teacher in each SFT set (select.sft_per_problem);
      a problem counts only when every teacher has that many (select.problems_solved_by).
    student_baseline: evaluate the base student too, at the first seed (one more engine).
    """

    seeds: tuple = SEEDS
    per_problem: int = 1
    student_baseline: bool = True


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2); UserError naming --seeds otherwise."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds: '{text}' is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: '{text}' must name one or more distinct seeds")
    return seeds


def demo_items(recipe_path: str, items: list[str], log=print,
               settings: dict | None = None) -> list[str]:
    """The recipe items of `compare-teachers --demo`: the demo's settings (pipeline/apps/demo.py
    DEMO_OVERRIDES), its student, and two teachers generating side by side — the demo's teacher
    (style mix concise 0.5 / checked 0.3 / detour 0.2) and a second one trained the same way on
    mostly checked traces (CHECKED_STYLE_MIX). Both are trained on first use and cached under
    <data_root>/models/ like the demo's; the user's items come last. settings: the teachers'
    training settings (default demo.TEACHER; the tests pass a few-step one)."""
    recipe = demo.load(recipe_path, demo.DEMO_OVERRIDES + list(items))
    held_out = [p["problem"] for p in load_eval_problems(recipe.configs["evaluate"])]
    settings = settings or demo.TEACHER
    teacher, student, _ = demo.ensure_models(recipe.data_root, held_out, settings=settings,
                                             log=log)
    checked, _, _ = demo.ensure_models(recipe.data_root, held_out, settings=settings, log=log,
                                       style_mix=demo.CHECKED_STYLE_MIX, name="teacher-checked")
    # The demo's settings less those compare-teachers sets per arm (select.sft_per_problem).
    settings_items = [o for o in demo.DEMO_OVERRIDES if o.split("=", 1)[0] not in ARM_KEYS]
    return settings_items + [f"teacher={teacher}", f"student={student}",
                                  f"generate.teachers={json.dumps([teacher, checked])}",
                                  *items]


def short_name(name: str, width: int = 28) -> str:
    """A teacher's name in the table: a local model path by its folder name (the demo's two
    teachers differ only there), anything longer than `width` by its end."""
    if os.sep in name and os.path.exists(name):
        name = os.path.basename(os.path.normpath(name))
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _upstream(recipe, pins: dict):
    """(prompts, verify): the pinned verify and the prompts of its lineage, or the chain run."""
    store = Store(recipe.data_root)
    if "verify" in pins:
        verify = store.resolve(f"verify@{pins['verify']}")
        generate = store.find("generate", verify.manifest["inputs"]["generate"])
        prompts = store.find("prompts", generate.manifest["inputs"]["prompts"])
        return prompts, verify
    prompts = run_stage("prompts", recipe, pins)
    generate = run_stage("generate", recipe, {**pins, "prompts": prompts.version})
    verify = run_stage("verify", recipe, {**pins, "generate": generate.version})
    return prompts, verify


def common_problems(rows: list[dict], teachers: list[str], per_problem: int) -> int:
    """Problems where every teacher has at least `per_problem` correct traces (before select's
    length cap, which can only lower it)."""
    counts: dict = {}
    for r in rows:
        if r["correct"] is True:
            key = (r["problem_id"], r["teacher"])
            counts[key] = counts.get(key, 0) + 1
    problems = {r["problem_id"] for r in rows}
    return sum(all(counts.get((p, t), 0) >= per_problem for t in teachers) for p in problems)


def summarize(runs: dict, lengths: dict) -> dict:
    """runs {seed: {teacher: {pass_at_1, mean_completion_tokens, sft_rows, mean_sft_tokens}}}
    -> {teachers: {name: {pass_at_1 [mean, sd], ..., seeds}}, pick, tied}."""
    names = list(dict.fromkeys(t for per_seed in runs.values() for t in per_seed))
    table = {}
    for name in names:
        got = [runs[s][name] for s in runs if name in runs[s]]
        table[name] = {m: list(mean_sd([g.get(m) for g in got]))
                       for m in ("pass_at_1", "pass_at_k", "mean_completion_tokens",
                                 "sft_rows")}
        table[name]["mean_sft_tokens"] = mean_sd([g.get("mean_sft_tokens") for g in got])[0]
        table[name]["seeds"] = len(got)
        table[name]["correct_tokens"] = lengths.get(name)
    teachers = [t for t in names if t != "student"]
    best = max((table[t]["pass_at_1"][0] or 0.0) for t in teachers) if teachers else None
    tied = [t for t in teachers if (table[t]["pass_at_1"][0] or 0.0) == best]
    return {"teachers": table, "pick": tied[0] if tied else None, "tied": tied}


def format_table(summary: dict) -> str:
    head = (f"{'teacher':<28} {'pass@1':>15} {'SFT trace tokens':>17} "
            f"{'teacher length':>16} {'own tokens':>13} {'SFT rows':>8} {'seeds':>5}")
    lines = [head, "-" * len(head)]
    for name, row in summary["teachers"].items():
        sft_tokens = row["mean_sft_tokens"]
        lines.append(
            f"{short_name(name):<28} {mean_sd_text(row['pass_at_1']):>15} "
            f"{(f'{sft_tokens:.1f}' if sft_tokens is not None else '-'):>17} "
            f"{mean_sd_text(row['correct_tokens'] or (None, None), 1):>16} "
            f"{mean_sd_text(row['mean_completion_tokens'], 1):>13} "
            f"{mean_sd_text(row['sft_rows'], 0):>8} {row['seeds']:>5}")
    pick = summary["pick"]
    tie = (f" (tied with {', '.join(t for t in summary['tied'] if t != pick)}: the seeds do not "
           "separate them)" if len(summary["tied"]) > 1 else "")
    return "\n".join(lines) + f"\n\npick: {pick}{tie}"


def main(recipe_path: str, items: list[str], pins: dict, plan: ComparePlan) -> int:
    started = time.time()
    if plan.per_problem < 1:
        raise UserError(f"--per-problem: must be >= 1, got {plan.per_problem}")
    for key in ARM_KEYS:
        if any(i.startswith(key + "=") for i in items):
            raise UserError(f"{key}: compare-teachers sets it per arm and seed; leave it out "
                            "(--seeds, --per-problem)")

    def recipe_for(*overrides):
        # The arm's settings come last: the user's items cannot undo the pinning.
        return load_recipe(recipe_path, list(items) + list(overrides), STAGES)

    shared = recipe_for()
    prompts, verify = _upstream(shared, pins)
    rows = verify.read_table(columns=["problem_id", "teacher", "correct",
                                      "completion_tokens"]).to_pylist()
    teachers = sorted({r["teacher"] for r in rows})
    if len(teachers) < 2:
        raise UserError(f"compare-teachers: {verify.ref()} has traces of {teachers} only; it "
                        "needs several teachers (generate.teachers=[A, B], or an imported file "
                        "with a `teacher` per row)")
    common = common_problems(rows, teachers, plan.per_problem)
    if not common:
        raise UserError(f"compare-teachers: no problem of {verify.ref()} has "
                        f"{plan.per_problem} correct trace(s) from every teacher {teachers}; "
                        "lower --per-problem or generate more samples")
    lengths = {t: list(mean_sd([r["completion_tokens"] for r in rows
                                if r["teacher"] == t and r["correct"] is True]))
               for t in teachers}
    print(f"compare-teachers: {verify.ref()}, teachers {teachers}; {common} problems solved by "
          f"every teacher, {plan.per_problem} trace(s) each; seeds {list(plan.seeds)}", flush=True)

    runs: dict = {}
    evaluations: dict = {}
    out = os.path.join(shared.data_root, "compare_teachers.json")
    for seed in plan.seeds:
        seeded = [f"select.seed={seed}", f"sft.seed={seed}", f"evaluate.seed={seed}"]
        paths, data = {}, {}
        for teacher in teachers:
            arm = recipe_for(*UNPRUNED, *NO_PROVENANCE, *seeded,
                             f"select.sft_per_problem={plan.per_problem}",
                             f"select.teachers={json.dumps([teacher])}",
                             f"select.problems_solved_by={json.dumps(teachers)}")
            select, sft = sft_arm(arm, verify)
            stats = select.manifest["stats"]
            paths[teacher] = sft.path
            data[teacher] = {"sft_rows": stats["sft_rows"],
                             "mean_sft_tokens": stats["mean_sft_tokens"],
                             "select": select.ref(), "sft": sft.ref()}
        baseline = plan.student_baseline and seed == plan.seeds[0]
        models = ["student"] * baseline + [paths[t] for t in teachers]
        ev = run_stage("evaluate", recipe_for(*seeded, f"evaluate.models={json.dumps(models)}"),
                       {"prompts": prompts.version})
        summary_rows = ev.read_table("summary").to_pylist()
        evaluations[seed] = ev.ref()
        runs[seed] = {t: {**_overall(summary_rows, paths[t]), **data[t]} for t in teachers}
        if baseline:
            runs[seed]["student"] = _overall(summary_rows, "student")
        summary = summarize(runs, lengths)
        result = {"verify": verify.ref(), "teachers_compared": teachers, "seeds": list(runs),
                  "planned_seeds": list(plan.seeds), "complete": len(runs) == len(plan.seeds),
                  "per_problem": plan.per_problem, "problems": common,
                  "sft_rows_per_teacher": common * plan.per_problem, "runs": runs,
                  "evaluations": evaluations, **summary,
                  "wall_s": round(time.time() - started, 1)}
        # Renamed into place after every seed: a stopped run keeps the seeds it finished.
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(out + ".tmp", out)
        print(f"compare-teachers: seed {seed} done ({time.time() - started:.0f} s so far)",
              flush=True)

    print(f"\ncompare-teachers ({verify.ref()}; {common} problems x {plan.per_problem} "
          f"trace(s) per teacher; pass@1 mean ± sample sd over seeds "
          f"{', '.join(map(str, plan.seeds))}; teacher length = its correct traces' tokens, "
          "mean ± sd):")
    print(format_table(summary))
    print(f"\ncompare-teachers: {time.time() - started:.0f} s wall; {out}", flush=True)
    return 0
