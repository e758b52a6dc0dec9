"""Stage `prune` — difficulty-aware pruning of correct traces (DAP, METHODS.md), two modes.

Adds `pruned_completion, pruned_tokens, prune_status, judged_difficulty`. Only correct traces are
pruned; incorrect ones pass through unchanged (status "incorrect": REDI's negatives) and so do
unverifiable ones ("unverified"). Dropped rows are counted by reason in the manifest.

mode: budget (no extra generation, ours) — per pass-rate difficulty level (easy/medium/hard, from
  verify) a token budget: correct traces within it are kept ("kept"), the shortest first when
  `keep_per_problem` caps them; longer ones are dropped ("over_budget").
mode: rewrite (paper-faithful) — the teacher is shown the problem and a correct trace and judges its
  difficulty (simple / moderate / complex, configs/dap/judge.txt), then rewrites the trace with the
  prompt for that level (configs/dap/<level>.txt). Every rewrite is re-verified with verify's own
  settings; one that no longer reaches the reference is rejected and the original kept
  ("rejected_kept") or dropped ("rewrite_rejected"), per `on_reject`.

    distillery run prune --recipe configs/tiny.yaml prune.mode=budget
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.stage import Stage

LEVELS = ("easy", "medium", "hard")             # verify's pass-rate levels
JUDGED = ("simple", "moderate", "complex")      # the teacher's levels in rewrite mode
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "dap")


@dataclass
class PruneConfig:
    """Knobs of the prune stage.

    mode: "budget" or "rewrite" (see the module docstring).
    budgets: budget mode: max completion tokens of a kept correct trace, per difficulty level.
    keep_per_problem: budget mode: keep at most this many correct traces per problem, the shortest
      first (0 = every one within budget).
    teacher: rewrite mode: the model that judges and rewrites (the recipe's teacher by default).
    prompts_dir: rewrite mode: folder with judge.txt, simple.txt, moderate.txt, complex.txt
      ("" = configs/dap of this checkout). Placeholders: {problem}, {trace}.
    judge_max_tokens / rewrite_max_tokens: generation lengths of the two teacher calls.
    temperature: sampling temperature of both calls (0 = greedy).
    on_reject: rewrite mode: a rewrite that fails re-verification keeps the original trace
      ("keep") or drops the row ("drop").
    seed: engine seed of the rewrite calls.
    """

    mode: str = "budget"
    budgets: dict = field(default_factory=lambda: {"easy": 1024, "medium": 2048, "hard": 4096})
    keep_per_problem: int = 0
    teacher: str = ""
    prompts_dir: str = ""
    judge_max_tokens: int = 16
    rewrite_max_tokens: int = 2048
    temperature: float = 0.0
    on_reject: str = "keep"
    seed: int = 0


def _check_config(cfg: PruneConfig) -> None:
    if cfg.mode not in ("budget", "rewrite"):
        raise UserError(f"prune.mode: '{cfg.mode}' is not 'budget' or 'rewrite'")
    if cfg.mode == "budget":
        missing = [lvl for lvl in LEVELS if lvl not in cfg.budgets]
        extra = [k for k in cfg.budgets if k not in LEVELS]
        if missing or extra:
            raise UserError(f"prune.budgets: need exactly the levels {list(LEVELS)} "
                            f"(missing {missing}, unknown {extra})")
        for lvl, budget in cfg.budgets.items():
            if not isinstance(budget, int) or budget <= 0:
                raise UserError(f"prune.budgets.{lvl}: expected a positive token count, got {budget!r}")
    if cfg.on_reject not in ("keep", "drop"):
        raise UserError(f"prune.on_reject: '{cfg.on_reject}' is not 'keep' or 'drop'")


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 1) if values else None


def budget_plan(rows: list[dict], cfg: PruneConfig) -> tuple[dict, dict]:
    """Which correct traces budget mode keeps: ({trace_id: status}, {drop reason: count}).

    rows: dicts with trace_id, problem_id, correct, difficulty, completion_tokens.
    """
    status, drops = {}, {"over_budget": 0, "over_per_problem_cap": 0}
    by_problem: dict = {}
    for r in rows:
        if r["correct"] is True:
            by_problem.setdefault(r["problem_id"], []).append(r)
        else:
            status[r["trace_id"]] = "incorrect" if r["correct"] is False else "unverified"
    for traces in by_problem.values():
        # Shortest first; trace_id breaks ties so the plan does not depend on row order.
        traces.sort(key=lambda r: (r["completion_tokens"], r["trace_id"]))
        kept = 0
        for r in traces:
            if r["completion_tokens"] > cfg.budgets[r["difficulty"]]:
                drops["over_budget"] += 1
            elif cfg.keep_per_problem and kept >= cfg.keep_per_problem:
                drops["over_per_problem_cap"] += 1
            else:
                status[r["trace_id"]] = "kept"
                kept += 1
    return status, drops


def run_budget(cfg: PruneConfig, inputs, ctx):
    import pyarrow as pa

    ctx.ensure_ray()
    light = inputs["verify"].read_table(
        columns=["trace_id", "problem_id", "correct", "difficulty", "completion_tokens"])
    rows = light.to_pylist()
    status, drops = budget_plan(rows, cfg)
    for reason, n in drops.items():
        if n:
            ctx.drops[reason] += n

    def add_columns(batch: pa.Table) -> pa.Table:
        ids = batch.column("trace_id").to_pylist()
        keep = pa.array([t in status for t in ids])
        batch = batch.filter(keep)
        ids = batch.column("trace_id").to_pylist()
        batch = batch.append_column("pruned_completion", batch.column("completion"))
        batch = batch.append_column("pruned_tokens",
                                    batch.column("completion_tokens").cast(pa.int64()))
        batch = batch.append_column("prune_status", pa.array([status[t] for t in ids], pa.string()))
        return batch.append_column("judged_difficulty", pa.nulls(batch.num_rows, pa.string()))

    out = inputs["verify"].read_ray().map_batches(add_columns, batch_format="pyarrow")

    stats = {"mode": "budget", "budgets": dict(cfg.budgets), "status_counts": {}, "per_level": {}}
    for s in status.values():
        stats["status_counts"][s] = stats["status_counts"].get(s, 0) + 1
    for lvl in LEVELS:
        correct = [r for r in rows if r["correct"] is True and r["difficulty"] == lvl]
        kept = [r for r in correct if status.get(r["trace_id"]) == "kept"]
        stats["per_level"][lvl] = {
            "correct_traces": len(correct), "kept": len(kept),
            "mean_tokens_before": _mean(r["completion_tokens"] for r in correct),
            "mean_tokens_after": _mean(r["completion_tokens"] for r in kept)}
    ctx.stats.update(stats)
    return out


def run(cfg: PruneConfig, inputs, ctx):
    _check_config(cfg)
    if cfg.mode == "budget":
        return run_budget(cfg, inputs, ctx)
    return run_rewrite(cfg, inputs, ctx)


def run_rewrite(cfg: PruneConfig, inputs, ctx):
    raise UserError("prune.mode=rewrite: not available yet (needs the generate stage's engine)")


STAGE = Stage(
    name="prune",
    config=PruneConfig,
    reads=("verify",),
    requires=("problem_id", "trace_id", "problem", "answer", "completion", "completion_tokens",
              "correct", "difficulty"),
    adds=("pruned_completion", "pruned_tokens", "prune_status", "judged_difficulty"),
    run=run,
)
