"""Stage `select` — the SFT set and the REDI preference pairs, two splits of one version.

    <version>/sft/    problem_id, trace_id, teacher, messages, difficulty, source
    <version>/pairs/  problem_id, prompt, chosen, rejected, chosen_trace_id, rejected_trace_id,
                      chosen_teacher, rejected_teacher

`messages` = the exact prompt messages the teacher saw + one assistant turn
"<think>\\n{reasoning}\\n</think>\\n{final}" built from the pruned text; `prompt / chosen / rejected`
are TRL's conversational preference format, so TRL's DPO trainer (and our REDI trainer) read the
split unchanged.

Reads `provenance` (every prune row + the `selected` column; with `provenance.method: none`
selected = correct, and select behaves as it did on prune). Per problem, its traces are put in a
seeded shuffle (sorted by trace_id first, so the order does not depend on how rows arrived): SFT
takes the first `sft_per_problem` SELECTED correct traces; a pair is the first correct with the
first incorrect trace (docs/methods.md, REDI), both within the length caps, where the chosen
trace is the first selected correct one when the problem has one within the cap (else the first
correct: provenance chooses what SFT imitates; REDI's contrast needs a correct trace either
way).
Problems that give no pair are counted by reason.

Several teachers (docs/teachers.md), before the per-problem walk: `teachers` keeps only the
traces of the named teachers; `teacher_weights` mixes them per PROBLEM: each problem takes all
its traces from one teacher, drawn by weight with `random.Random(f"{seed}:{problem_id}:teacher")`
among the weighted teachers that have traces of it (so a problem's SFT rows and its pair come
from one teacher, and over problems the mix follows the weights). `problems_solved_by` keeps only
the problems each listed teacher solved often enough to give its full SFT share: the same
problems and an equal number of rows per teacher (distillery compare-teachers). Every trace left
out is counted by reason in the manifest's drops.

    distillery run select --recipe configs/tiny.yaml select.seed=1
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib.chat import reasoning_tags, split_think, trace_text


@dataclass
class SelectConfig:
    """Knobs of the select stage.

    seed: the per-problem shuffle seed (same seed + same input = same rows).
    sft_per_problem: at most this many correct traces per problem in the SFT split (0 = all).
    sft_max_tokens: SFT rows longer than this (prompt_tokens + pruned_tokens) are left out
      (0 = no cap; the trainer's max length truncates anyway).
    pair_max_prompt_tokens: problems whose prompt is longer give no pair (REDI recipe: 800).
    pair_max_response_tokens: traces longer than this are not used in pairs (REDI recipe: 19k).
    reasoning_tags: how traces mark their reasoning (the recipe's top-level `reasoning_tags`).
    teachers: take traces only from these teachers (the `teacher` column; [] = every teacher).
      A name no trace has is an error that lists the teachers there are.
    teacher_weights: {teacher: weight >= 0}: per problem, one teacher drawn by weight (seeded,
      see above); teachers not named here are left out. {} = no mixing. Not with `teachers`.
    problems_solved_by: [teachers]: keep only the problems where each of them has at least
      max(1, sft_per_problem) selected correct traces within sft_max_tokens ([] = every problem).
      With `teachers: [A]` and sft_per_problem k, every teacher's SFT split then holds k rows of
      the same problems.
    """

    seed: int = 0
    sft_per_problem: int = 4
    sft_max_tokens: int = 0
    pair_max_prompt_tokens: int = 800
    pair_max_response_tokens: int = 19000
    reasoning_tags: str = "think"
    teachers: list = field(default_factory=list)
    teacher_weights: dict = field(default_factory=dict)
    problems_solved_by: list = field(default_factory=list)


def assistant_text(completion: str, tags: str) -> str:
    """The trace in its stored form ("<think>\n{reasoning}\n</think>\n\n{final}", stages/lib/chat.py
    trace_text), however the completion marked its reasoning (only the closing tag, both, an
    unclosed opening tag, none). sft and redi build each student's own target from it."""
    return trace_text(*split_think(completion or "", tags), tags)


def shuffled(traces: list[dict], seed: int, problem_id: str) -> list[dict]:
    """The problem's traces in a seeded order independent of the input row order."""
    order = sorted(traces, key=lambda r: r["trace_id"])
    random.Random(f"{seed}:{problem_id}").shuffle(order)
    return order


def _fits(r: dict, cfg: SelectConfig) -> bool:
    """A correct, selected trace within the SFT length cap: what SFT may take."""
    return (r["correct"] is True and bool(r["selected"])
            and (not cfg.sft_max_tokens
                 or r["prompt_tokens"] + r["pruned_tokens"] <= cfg.sft_max_tokens))


def check_teachers(cfg: SelectConfig, present: set) -> None:
    """UserError for a teacher option that names no teacher of the data, or bad weights."""
    if cfg.teachers and cfg.teacher_weights:
        raise UserError("select.teacher_weights: set either select.teachers (take) or "
                        "select.teacher_weights (mix), not both")
    for key, names in (("teachers", list(cfg.teachers)),
                       ("teacher_weights", list(cfg.teacher_weights)),
                       ("problems_solved_by", list(cfg.problems_solved_by))):
        missing = [str(n) for n in names if str(n) not in present]
        if missing:
            raise UserError(f"select.{key}: no trace of teacher(s) {missing}; the traces' "
                            f"teachers are {sorted(present)}")
    weights = cfg.teacher_weights
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
            raise UserError(f"select.teacher_weights: {name}: {w!r} is not a number >= 0")
    if weights and not sum(weights.values()) > 0:
        raise UserError(f"select.teacher_weights: {dict(weights)} has no positive weight")


def by_teacher(rows: list[dict], cfg: SelectConfig) -> tuple[list[dict], dict]:
    """The rows the teacher options keep, and the traces left out by reason."""
    drops = {}

    def drop(reason: str, n: int) -> None:
        if n:
            drops[reason] = drops.get(reason, 0) + n

    # Which problems every listed teacher solved is read off all the rows, before the
    # teachers option leaves only the chosen teacher's.
    need = max(1, cfg.sft_per_problem)
    unsolved = set()
    if cfg.problems_solved_by:
        fit: dict = {}
        for r in rows:
            if _fits(r, cfg):
                fit[(r["problem_id"], r["teacher"])] = fit.get((r["problem_id"], r["teacher"]),
                                                               0) + 1
        unsolved = {r["problem_id"] for r in rows
                    if any(fit.get((r["problem_id"], str(t)), 0) < need
                           for t in cfg.problems_solved_by)}
        kept = [r for r in rows if r["problem_id"] not in unsolved]
        drop("problem_not_solved_by_all", len(rows) - len(kept))
        rows = kept
    if cfg.teachers:
        chosen = {str(t) for t in cfg.teachers}
        kept = [r for r in rows if r["teacher"] in chosen]
        drop("teacher_not_chosen", len(rows) - len(kept))
        rows = kept
    by_problem: dict = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    if cfg.teacher_weights:
        weights = {str(t): float(w) for t, w in cfg.teacher_weights.items() if w > 0}
        for pid in sorted(by_problem):
            mine = [r for r in by_problem[pid] if r["teacher"] in weights]
            drop("teacher_not_weighted", len(by_problem[pid]) - len(mine))
            by_problem[pid] = mine
            there = sorted({r["teacher"] for r in mine})
            if not there:
                continue
            pick = random.Random(f"{cfg.seed}:{pid}:teacher").choices(
                there, [weights[t] for t in there])[0]
            mine = [r for r in by_problem[pid] if r["teacher"] == pick]
            drop("teacher_not_drawn", len(by_problem[pid]) - len(mine))
            by_problem[pid] = mine
    return [r for pid in sorted(by_problem) for r in by_problem[pid]], drops


def plan(rows: list[dict], cfg: SelectConfig) -> tuple[list[dict], list[tuple[dict, dict]], dict]:
    """(sft rows, [(chosen, rejected)], problems without a pair by reason).

    rows: dicts with problem_id, trace_id, correct, selected, prompt_tokens, pruned_tokens.
    """
    by_problem: dict = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    sft, pairs = [], []
    no_pair = {"no_correct": 0, "no_incorrect": 0, "prompt_too_long": 0, "response_too_long": 0}
    for pid in sorted(by_problem):
        order = shuffled(by_problem[pid], cfg.seed, pid)
        correct = [r for r in order if r["correct"] is True]
        fits = [r for r in correct if _fits(r, cfg)]
        sft.extend(fits[:cfg.sft_per_problem] if cfg.sft_per_problem else fits)

        incorrect = [r for r in order if r["correct"] is False]
        if not correct:
            no_pair["no_correct"] += 1
            continue
        if not incorrect:
            no_pair["no_incorrect"] += 1
            continue
        if order[0]["prompt_tokens"] > cfg.pair_max_prompt_tokens:
            no_pair["prompt_too_long"] += 1
            continue
        cap = cfg.pair_max_response_tokens
        chosen = [r for r in correct if r["pruned_tokens"] <= cap]
        # Selected traces first (stable: the seeded order stays within each group).
        chosen.sort(key=lambda r: not r["selected"])
        rejected = [r for r in incorrect if r["pruned_tokens"] <= cap]
        if not chosen or not rejected:
            no_pair["response_too_long"] += 1
            continue
        pairs.append((chosen[0], rejected[0]))
    return sft, pairs, no_pair


def run(cfg: SelectConfig, inputs, ctx):
    import pyarrow as pa

    if cfg.sft_per_problem < 0:
        raise UserError(f"select.sft_per_problem: must be >= 0, got {cfg.sft_per_problem}")
    reasoning_tags(cfg.reasoning_tags, "select")
    # Driver-side: a problem's traces must meet in one place, and the selection is a few list
    # walks. Rows carry the texts, so this holds the provenance version in memory (fine up to a few
    # GB; beyond that, a Ray groupby per problem).
    rows = inputs["provenance"].read_table(columns=[
        "problem_id", "trace_id", "teacher", "correct", "selected", "prompt_tokens",
        "pruned_tokens", "pruned_completion", "prompt_messages", "difficulty",
        "source"]).to_pylist()
    present = {r["teacher"] for r in rows}
    check_teachers(cfg, present)
    rows, drops = by_teacher(rows, cfg)
    ctx.drops.update(drops)
    if not rows:
        raise UserError(f"select: no trace left after the teacher options (left out: {drops})")
    sft, pairs, no_pair = plan(rows, cfg)

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    sft_table = pa.Table.from_pylist([{
        "problem_id": r["problem_id"],
        "trace_id": r["trace_id"],
        "teacher": r["teacher"],
        "messages": list(r["prompt_messages"]) + [
            {"role": "assistant",
             "content": assistant_text(r["pruned_completion"], cfg.reasoning_tags)}],
        "difficulty": r["difficulty"],
        "source": r["source"],
    } for r in sft], schema=pa.schema([("problem_id", pa.string()), ("trace_id", pa.string()),
                                       ("teacher", pa.string()), ("messages", message),
                                       ("difficulty", pa.string()), ("source", pa.string())]))
    pairs_table = pa.Table.from_pylist([{
        "problem_id": c["problem_id"],
        "prompt": list(c["prompt_messages"]),
        "chosen": [{"role": "assistant",
                    "content": assistant_text(c["pruned_completion"], cfg.reasoning_tags)}],
        "rejected": [{"role": "assistant",
                      "content": assistant_text(r["pruned_completion"], cfg.reasoning_tags)}],
        "chosen_trace_id": c["trace_id"],
        "rejected_trace_id": r["trace_id"],
        "chosen_teacher": c["teacher"],
        "rejected_teacher": r["teacher"],
    } for c, r in pairs], schema=pa.schema([
        ("problem_id", pa.string()), ("prompt", message), ("chosen", message),
        ("rejected", message), ("chosen_trace_id", pa.string()),
        ("rejected_trace_id", pa.string()), ("chosen_teacher", pa.string()),
        ("rejected_teacher", pa.string())]))

    problems = len({r["problem_id"] for r in rows})
    ctx.stats.update({
        "problems": problems,
        "sft_rows": sft_table.num_rows,
        "sft_problems": len({r["problem_id"] for r in sft}),
        "selected_correct": sum(1 for r in rows if r["correct"] is True and r["selected"]),
        "pairs_chosen_selected": sum(1 for c, _ in pairs if c["selected"]),
        "pairs": pairs_table.num_rows,
        "problems_without_pair": no_pair,
        "mean_sft_tokens": round(sum(r["pruned_tokens"] for r in sft) / len(sft), 1) if sft else None,
        # per teacher: SFT rows, their mean tokens, and pairs by the chosen trace's teacher
        "teachers": {t: {"sft_rows": len(mine),
                         "mean_sft_tokens": (round(sum(r["pruned_tokens"] for r in mine)
                                                   / len(mine), 1) if mine else None),
                         "pairs": sum(1 for c, _ in pairs if c["teacher"] == t)}
                     for t in sorted(present)
                     for mine in [[r for r in sft if r["teacher"] == t]]},
    })
    return {"sft": sft_table, "pairs": pairs_table}


STAGE = Stage(
    name="select",
    config=SelectConfig,
    reads=("provenance",),
    requires=("problem_id", "trace_id", "teacher", "correct", "selected", "prompt_tokens",
              "pruned_tokens", "pruned_completion", "prompt_messages", "difficulty", "source"),
    adds=("problem_id", "trace_id", "teacher", "messages", "prompt", "chosen", "rejected",
          "chosen_trace_id", "rejected_trace_id"),
    run=run,
)
