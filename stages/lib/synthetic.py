"""Synthetic verifiable problems: multi-step integer arithmetic with worked solutions.

Used by tests and the built-in demo (no network: the data is made here). Each problem has an
integer answer, a worked step-by-step `solution` (what the demo teacher is trained to write) and a
`difficulty` = number of operations.

    Compute 45 + 38 - 27.
    <think>
    45 + 38 = 83
    83 - 27 = 56
    </think>
    The answer is \\boxed{56}.

A subtraction is only drawn when it keeps the running value >= 0: every intermediate result is a
non-negative integer, which keeps the task learnable by a model trained for minutes on 2 cores.
"""
from __future__ import annotations

import random

from stages.lib.dap_prompts import fill_dap_prompt


def make_problems(n: int, seed: int = 0, min_terms: int = 2, max_terms: int = 4,
                  max_operand: int = 99, exclude: set | frozenset = frozenset()) -> list[dict]:
    """n distinct problems like "Compute 12 + 7 - 3." with answer "16".

    Difficulty grows with the number of terms (min_terms..max_terms) and operand size.
    `exclude`: problem texts never to return (a held-out set stays disjoint from a training set).
    """
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        k = rng.randint(min_terms, max_terms)
        terms = [rng.randint(0, max_operand) for _ in range(k)]
        value, steps, text = terms[0], [], str(terms[0])
        for t in terms[1:]:
            op = rng.choice("+-") if value >= t else "+"
            new = value + t if op == "+" else value - t
            steps.append(f"{value} {op} {t} = {new}")
            text += f" {op} {t}"
            value = new
        problem = f"Compute {text}."
        if problem in seen:
            continue
        seen.add(problem)
        out.append({
            "problem": problem,
            "answer": str(value),
            "solution": "<think>\n" + "\n".join(steps) + "\n</think>\n"
                        f"The answer is \\boxed{{{value}}}.",
            "difficulty": k - 1,
        })
    return out


# --- worked traces with detours and systematic slips (the method demo's teacher data) -----------
#
# Real long-CoT traces vary in length (some direct, some re-checking, some with a wrong turn that
# is caught) and their errors are systematic: a model slips where a step is easy to misread, not
# at random. The slip here is a classic one: the minus sign is dropped and the step is done as an
# addition — "12 - 3" computed as 12 + 3 = 15 (not 9). The slipped line is itself a TRUE
# equation, so the arithmetic the model learns stays consistent. (A forgotten carry, "18 + 5 =
# 13", is a false equation half of the time at every carry step, and a minutes-trained teacher
# learned far worse from it: docs/demo.md.) A problem's difficulty for the teacher is its number
# of subtraction steps.

TRACE_STYLES = ("concise", "checked", "detour")


def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]]]:
    """"Compute 18 + 5 - 7." -> (18, [("+", 5), ("-", 7)])."""
    tokens = problem.removeprefix("Compute ").removesuffix(".").split()
    return int(tokens[0]), [(op, int(t)) for op, t in zip(tokens[1::2], tokens[2::2])]


def apply(value: int, op: str, t: int) -> int:
    return value + t if op == "+" else value - t


def slipped(value: int, op: str, t: int) -> tuple[str, int] | None:
    """(operator, result) of the systematic wrong step, or None when the step cannot slip:
    a subtraction done as an addition (the minus sign dropped)."""
    return ("+", value + t) if op == "-" else None


def hard_steps(problem: str) -> int:
    """Subtraction steps: where the teacher can slip."""
    return sum(op == "-" for op, _ in parse_problem(problem)[1])


def worked_trace(problem: str, rng: random.Random, style: str, slip_rate: float) -> dict:
    """One worked solution of `problem` in `style`, slipping at each subtraction step with
    probability `slip_rate`.

    concise: one line per step; a slip goes unnoticed and the answer is wrong.
    checked: each step is re-done on a check line ("check: 12 - 3 = 9"); a slip is caught there
      ("check: 12 - 3 = 9, not 15") and the run goes on from the checked value, so the answer is
      right and the trace about twice as long. The check repeats the step rather than inverting
      it: an inverse check ("23 - 5 = 18") is a second computation a minutes-trained model
      learned far worse (the long styles were then right only ~45% of the time: docs/demo.md).
    detour:  the problem restated first and the result at the end; a slip is noticed at once
      ("wait, minus: 12 - 3 = 9") and corrected; like checked, right but longer than concise.
    Returns {"solution", "answer" (what the trace concludes), "correct", "slips", "style"}.
    """
    if style not in TRACE_STYLES:
        raise ValueError(f"style {style!r} is not one of {TRACE_STYLES}")
    value, steps = parse_problem(problem)
    expression = problem.removeprefix("Compute ").removesuffix(".")
    lines = [f"We need {expression}."] if style == "detour" else []
    slips = 0
    for op, t in steps:
        right, wrong = apply(value, op, t), slipped(value, op, t)
        slip = wrong is not None and rng.random() < slip_rate
        slips += slip
        if not slip:
            lines.append(f"{value} {op} {t} = {right}")
            if style == "checked":
                lines.append(f"check: {value} {op} {t} = {right}")
            value = right
            continue
        lines.append(f"{value} {wrong[0]} {t} = {wrong[1]}")     # the slip, a true equation
        if style == "concise":
            value = wrong[1]                               # carried on: the answer is wrong
        elif style == "checked":
            lines.append(f"check: {value} {op} {t} = {right}, not {wrong[1]}")
            value = right
        else:  # detour
            lines.append(f"wait, minus: {value} {op} {t} = {right}")
            value = right
    if style == "detour":
        lines.append(f"So the result is {value}.")        # the final value restated
    solution = ("<think>\n" + "\n".join(lines) + "\n</think>\n"
                f"The answer is \\boxed{{{value}}}.")
    return {"solution": solution, "answer": str(value), "style": style, "slips": slips}


def make_traces(problems: list[dict], seed: int, style_weights: dict[str, float],
                slip_rate: float) -> list[dict]:
    """One worked trace per problem: style drawn by `style_weights`, slips at `slip_rate`.

    Each row: the problem's fields + solution, style, slips, correct (answer == the problem's).
    """
    rng = random.Random(seed)
    styles, weights = list(style_weights), list(style_weights.values())
    out = []
    for p in problems:
        trace = worked_trace(p["problem"], rng, rng.choices(styles, weights)[0], slip_rate)
        out.append({**p, "solution": trace["solution"], "style": trace["style"],
                    "slips": trace["slips"], "correct": trace["answer"] == p["answer"]})
    return out


# --- the DAP rewrite task (the demo teacher's second task) --------------------------------------
#
# prune's rewrite mode shows the teacher a problem and one of its correct traces inside the judge
# frame (stages/lib/dap_prompts.py) and expects "Difficulty: <level>" and the trace rewritten at a
# length that fits. Here the level is the number of subtraction steps (where the slips are) and
# the fitting rewrite is the concise trace without slips.

def judged_level(problem: str) -> str:
    """simple: no subtraction step, moderate: one, complex: two or more."""
    return ("simple", "moderate", "complex")[min(hard_steps(problem), 2)]


def rewrite_example(problem: dict, rng: random.Random, prompts: dict, style_weights: dict,
                    slip_rate: float) -> dict:
    """One rewrite example: a CORRECT trace of `problem` in a style drawn by `style_weights`
    (slips only where the style catches them), filled into the judge frame `prompts`
    (load_dap_prompts) as `problem`; the answer `solution` is "Difficulty: <level>" + the
    concise slip-free trace."""
    style = rng.choices(list(style_weights), list(style_weights.values()))[0]
    shown = worked_trace(problem["problem"], rng, style, 0.0 if style == "concise" else slip_rate)
    concise = worked_trace(problem["problem"], rng, "concise", 0.0)
    return {**problem, "problem": fill_dap_prompt(prompts, problem["problem"], shown["solution"]),
            "solution": f"Difficulty: {judged_level(problem['problem'])}\n" + concise["solution"],
            "style": style, "task": "rewrite"}


def rewrite_examples(problems: list[dict], seed: int, prompts: dict, style_weights: dict,
                     slip_rate: float) -> list[dict]:
    """rewrite_example for each problem, from one seeded generator."""
    rng = random.Random(seed)
    return [rewrite_example(p, rng, prompts, style_weights, slip_rate) for p in problems]
