"""The synthetic task's worked traces: length spread, systematic slips, level balance."""
from __future__ import annotations

import random
import statistics

from stages.lib.synthetic import (TRACE_STYLES, hard_steps, make_problems, make_traces, parse_problem,
                              slipped, worked_trace)
from stages.lib.answers import extract_answer

TASK = dict(min_terms=3, max_terms=6, max_operand=9)


def test_slips_drop_the_minus_sign():
    assert slipped(12, "-", 3) == ("+", 15)   # 12 - 3 done as 12 + 3: a true equation, wrong step
    assert slipped(12, "+", 3) is None        # an addition has no minus to drop
    assert parse_problem("Compute 18 + 5 - 7.") == (18, [("+", 5), ("-", 7)])
    assert hard_steps("Compute 18 - 5 - 7.") == 2 and hard_steps("Compute 18 + 5.") == 0
    t = worked_trace("Compute 12 - 3.", random.Random(0), "concise", slip_rate=1.0)
    assert "12 + 3 = 15" in t["solution"] and t["answer"] == "15"


def test_every_style_without_slips_is_correct_and_the_answer_is_extractable():
    for p in make_problems(200, seed=3, **TASK):
        for style in TRACE_STYLES:
            t = worked_trace(p["problem"], random.Random(0), style, slip_rate=0.0)
            assert t["answer"] == p["answer"] and t["slips"] == 0
            assert extract_answer(t["solution"]) == p["answer"]


def test_concise_slips_give_wrong_answers_and_the_long_styles_recover():
    problems = [p for p in make_problems(400, seed=5, **TASK) if hard_steps(p["problem"]) > 0]
    for style, expect_correct in (("concise", False), ("checked", True), ("detour", True)):
        traces = [worked_trace(p["problem"], random.Random(i), style, slip_rate=1.0)
                  for i, p in enumerate(problems)]
        assert all(t["slips"] > 0 for t in traces)
        # A concise slip is carried to the end, except when later steps undo it by chance.
        right = sum(t["answer"] == p["answer"] for t, p in zip(traces, problems))
        assert (right == len(problems)) if expect_correct else right < 0.1 * len(problems)


def test_lengths_spread_like_long_cot_and_errors_grow_with_hard_steps():
    problems = make_problems(3000, seed=11, **TASK)
    rows = make_traces(problems, seed=0, style_weights={"concise": 0.4, "checked": 0.3,
                                                        "detour": 0.3}, slip_rate=0.2)
    length = {s: statistics.mean(len(r["solution"]) for r in rows if r["style"] == s)
              for s in TRACE_STYLES}
    # checked doubles the lines; detour adds a restatement: the concise trace is the shortest.
    assert length["checked"] > 1.6 * length["concise"] and length["detour"] > length["concise"]
    shares = {s: sum(r["style"] == s for r in rows) / len(rows) for s in TRACE_STYLES}
    assert abs(shares["concise"] - 0.4) < 0.04
    # Errors are systematic: none without a carry/borrow step, more the more there are.
    by_hard: dict[int, list[bool]] = {}
    for r in rows:
        if r["style"] == "concise":
            by_hard.setdefault(hard_steps(r["problem"]), []).append(r["correct"])
    assert all(by_hard[0])
    rates = [1 - sum(v) / len(v) for k, v in sorted(by_hard.items()) if len(v) >= 30]
    assert rates == sorted(rates) and rates[-1] > 0.3


def test_rewrite_examples_show_a_correct_trace_and_ask_for_the_concise_one():
    import os

    from stages.lib.dap_prompts import load_dap_prompts, parse_rewrite
    from stages.lib.synthetic import judged_level, rewrite_examples

    assert [judged_level(p) for p in ("Compute 3 + 4.", "Compute 8 - 5.",
                                      "Compute 18 - 5 - 7.")] == ["simple", "moderate", "complex"]
    prompts = load_dap_prompts(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "dap"))
    problems = make_problems(200, seed=13, **TASK)
    rows = rewrite_examples(problems, seed=0, prompts=prompts,
                            style_weights={"checked": 0.5, "detour": 0.5}, slip_rate=0.5)
    for p, r in zip(problems, rows):
        assert p["problem"] in r["problem"] and "{trace}" not in r["problem"]
        shown = r["problem"].split("Correct solution:\n", 1)[1]
        assert extract_answer(shown) == p["answer"]          # the trace shown is a correct one
        level, rewrite = parse_rewrite(r["solution"])
        assert level == judged_level(p["problem"]) and extract_answer(rewrite) == p["answer"]
        assert "check" not in rewrite and "We need" not in rewrite   # the concise trace
        assert len(rewrite) < len(shown)
