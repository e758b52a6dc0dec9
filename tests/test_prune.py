"""prune: budget mode (per-level token budgets, shortest first) and rewrite mode (DAP) with counts.

Upstream versions are hand-written generate tables run through the real verify stage
(helpers in test_verify.py).
"""
from __future__ import annotations

import pytest

from stages.prune import PruneConfig, budget_plan
from test_verify import run, trace, write_generate


def _rows():
    rows = []
    # Easy (5/5 correct): token counts 10, 50, 200, 30, 20.
    for i, n in enumerate([10, 50, 200, 30, 20]):
        rows.append(trace("Compute 1 + 1.", "2", f"<think>\nadd\n</think>\n\\boxed{{2}}", i, n))
    # Hard (1/4 correct): the correct one has 500 tokens; three incorrect pass through.
    for i, (ans, n) in enumerate([("5", 500), ("6", 40), ("7", 60), ("8", 900)]):
        rows.append(trace("Compute 2 + 3.", "5", f"<think>\nadd\n</think>\n\\boxed{{{ans}}}", i, n))
    # No reference: unverified, passes through.
    for i in range(2):
        rows.append(trace("Name a colour.", None, "blue", i, 3, source="chat"))
    return rows


def test_budget_mode_keeps_shortest_correct_within_budget(tmp_path, ray_cluster):
    recipe = write_generate(tmp_path, _rows(), [
        "prune.mode=budget", "prune.budgets={easy: 40, medium: 100, hard: 1000}"])
    run("verify", recipe)
    p = run("prune", recipe)
    out = p.read_table().to_pylist()
    kept = sorted(r["pruned_tokens"] for r in out if r["prune_status"] == "kept")
    assert kept == [10, 20, 30, 500]
    assert p.manifest["drops"] == {"over_budget": 2}               # the 50- and 200-token traces
    assert p.manifest["rows_in"] == 11 and p.manifest["rows_out"] == 9
    statuses = [r["prune_status"] for r in out]
    assert statuses.count("incorrect") == 3 and statuses.count("unverified") == 2
    for r in out:                                    # budget mode does not change the text
        assert r["pruned_completion"] == r["completion"] and r["judged_difficulty"] is None
    levels = p.manifest["stats"]["per_level"]
    assert levels["easy"] == {"correct_traces": 5, "kept": 3, "mean_tokens_before": 62.0,
                              "mean_tokens_after": 20.0}
    assert levels["hard"]["mean_tokens_after"] == 500.0
    assert levels["medium"]["correct_traces"] == 0


def test_budget_mode_per_problem_cap(tmp_path, ray_cluster):
    recipe = write_generate(tmp_path, _rows(), [
        "prune.budgets={easy: 40, medium: 100, hard: 1000}", "prune.keep_per_problem=2"])
    run("verify", recipe)
    p = run("prune", recipe)
    kept = sorted(r["pruned_tokens"] for r in p.read_table().to_pylist()
                  if r["prune_status"] == "kept")
    assert kept == [10, 20, 500]
    assert p.manifest["drops"] == {"over_budget": 2, "over_per_problem_cap": 1}


def test_budget_plan_is_order_independent():
    rows = [{"trace_id": f"t{i}", "problem_id": "p", "correct": True, "difficulty": "easy",
             "completion_tokens": n} for i, n in enumerate([30, 10, 10, 20])]
    cfg = PruneConfig(budgets={"easy": 25, "medium": 1, "hard": 1}, keep_per_problem=2)
    a, drops = budget_plan(rows, cfg)
    b, _ = budget_plan(list(reversed(rows)), cfg)
    assert a == b == {"t1": "kept", "t2": "kept"}    # the two 10-token traces, ties by trace_id
    assert drops == {"over_budget": 1, "over_per_problem_cap": 1}


def test_budget_mode_rejects_missing_level(tmp_path, ray_cluster):
    from pipeline.errors import UserError

    recipe = write_generate(tmp_path, _rows()[:2], ["prune.budgets={easy: 40}"])
    run("verify", recipe)
    with pytest.raises(UserError, match="missing"):
        run("prune", recipe)
