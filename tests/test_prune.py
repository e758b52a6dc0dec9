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


# --------------------------------------------------------------------- rewrite mode (DAP)

def test_judge_rewrites_accepts_only_reverified_rewrites(tiny_model):
    """Hand-written teacher outputs through the real verifier and the teacher's tokenizer."""
    from stages.prune import _token_counter, judge_rewrites
    from stages.lib.answers import Checker, VerifyConfig

    base = {"answer": "0.5", "completion": "<think>\nlong long\n</think>\n\\boxed{1/2}",
            "completion_tokens": 400}
    rows = [{**base, "trace_id": "ok", "correct": True},
            {**base, "trace_id": "wrong", "correct": True},
            {**base, "trace_id": "none", "correct": True},
            {**base, "trace_id": "cut", "correct": True},
            {**base, "trace_id": "neg", "correct": False},
            {**base, "trace_id": "unk", "correct": None}]
    outputs = {
        "ok": ("Difficulty: simple\n<think>\nhalf of 1\n</think>\nSo \\boxed{\\frac{1}{2}}.", "stop"),
        "wrong": ("Difficulty: complex\n<think>\nhm\n</think>\n\\boxed{2}", "stop"),
        "none": ("I would rather not.", "stop"),
        "cut": ("Difficulty: moderate\n<think>\nhalf of", "length"),
    }
    count = _token_counter(tiny_model)
    checker = Checker(timeout_s=2.0, memory_mib=2048)
    try:
        got = judge_rewrites(rows, outputs, VerifyConfig(), count, checker)
    finally:
        checker.close()
    status = [g["prune_status"] for g in got]
    assert status == ["rewritten", "rejected_wrong_answer", "rejected_no_answer",
                      "rejected_length", "incorrect", "unverified"]
    assert [g["judged_difficulty"] for g in got] == ["simple", "complex", None, "moderate",
                                                      None, None]
    rewrite = "<think>\nhalf of 1\n</think>\n\nSo \\boxed{\\frac{1}{2}}."  # stored form
    assert got[0]["pruned_completion"] == rewrite
    assert got[0]["pruned_tokens"] == count(rewrite) < 400
    for g in got[1:]:                       # rejected and pass-through rows carry the original
        assert g["pruned_completion"] == base["completion"] and g["pruned_tokens"] == 400


def test_rewrite_mode_on_the_tiny_teacher(tmp_path, ray_cluster, tiny_model):
    """The real engine path: vLLM (CPU) rewrites every correct trace; a random-init teacher
    cannot keep the answer, so each rewrite must be rejected and counted, the original kept."""
    rows = _rows()[:6]          # 5 correct easy traces + 1 correct hard one
    recipe = write_generate(tmp_path, rows, [
        f"teacher={tiny_model}", "prune.mode=rewrite", "prune.rewrite_max_tokens=16",
        "prune.on_reject=drop"])
    run("verify", recipe)
    p = run("prune", recipe)
    stats = p.manifest["stats"]
    assert stats["rewrites_asked"] == 6
    rejected = {k: v for k, v in stats["outcomes"].items() if k.startswith("rejected_")}
    assert sum(rejected.values()) + stats["outcomes"].get("rewritten", 0) == 6
    # on_reject=drop: each rejected rewrite dropped its row, counted by reason.
    assert p.manifest["drops"] == {"rewrite_" + k: v for k, v in rejected.items()}
    out = p.read_table().to_pylist()
    assert len(out) == 6 - sum(rejected.values())
    assert all(r["prune_status"] == "rewritten" for r in out)
