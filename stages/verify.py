"""Stage `verify` — check every trace's final answer against the reference with math-verify.

Adds per row `pred_answer, correct, verify_status` and per problem `pass_rate, difficulty`.
Incorrect traces are kept (REDI learns from them); nothing is dropped here. The extraction and
the checking child process live in stages/lib/answers.py (prune and evaluate check the same way).

    distillery run verify --recipe configs/tiny.yaml verify.timeout_s=2
"""
from __future__ import annotations

import collections
import time

from pipeline.errors import UserError
from pipeline.resources import placement
from pipeline.progress import Progress
from pipeline.stage import Stage
from stages.lib.answers import (FALLBACKS, VerifyConfig, answer_parts, difficulty_of,
                                verify_rows)


# --------------------------------------------------------------------------- the stage

def _check_config(cfg: VerifyConfig) -> None:
    if cfg.answer_field not in ("final", "completion"):
        raise UserError(f"verify.answer_field: '{cfg.answer_field}' is not 'final' or 'completion'")
    for name in cfg.fallbacks:
        if name not in FALLBACKS:
            raise UserError(f"verify.fallbacks: unknown extractor '{name}' (valid: {FALLBACKS})")
    if not 0 <= cfg.medium_min_pass_rate <= cfg.easy_min_pass_rate <= 1:
        raise UserError("verify: need 0 <= medium_min_pass_rate <= easy_min_pass_rate <= 1, got "
                        f"{cfg.medium_min_pass_rate} and {cfg.easy_min_pass_rate}")
    if cfg.timeout_s <= 0:
        raise UserError(f"verify.timeout_s: must be > 0, got {cfg.timeout_s}")


CORRECT_FROM = {"verify": (), "source_math_verify": ("source_correct_math_verify",),
                "source_llama": ("source_correct_llama",),
                "source_both": ("source_correct_math_verify", "source_correct_llama")}


def source_correct(verdicts: list[tuple]) -> list:
    """Per row, correct from the source's verdicts: true when every one is true, null when none
    was given, else false (a verdict of false, or one judge silent: not "both say so")."""
    return [None if all(v is None for v in row) else all(v is True for v in row)
            for row in verdicts]


def agreement(ours: list, theirs: list) -> dict:
    """How often math-verify's verdict and a source's agree, over rows where both exist."""
    both = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    agree = sum(a == b for a, b in both)
    return {"compared": len(both), "agree": agree,
            "rate": round(agree / len(both), 4) if both else None}


def run(cfg: VerifyConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray


    _check_config(cfg)
    if cfg.correct_from not in CORRECT_FROM:
        raise UserError(f"verify.correct_from: '{cfg.correct_from}' is not one of "
                        f"{list(CORRECT_FROM)}")
    have = set(inputs["generate"].manifest.get("schema") or {})
    verdict_cols = sorted(c for c in have if c.startswith("source_correct_"))
    for col in CORRECT_FROM[cfg.correct_from]:
        if col not in have:
            raise UserError(f"verify.correct_from: {cfg.correct_from} needs the column '{col}', "
                            f"which {inputs['generate'].ref()} does not have (the source's "
                            "verdicts come with an imported file: docs/import.md)")
    if ctx.rows_in == 0:
        raise UserError(f"verify: {inputs['generate'].ref()} has no traces to verify "
                        f"({inputs['generate'].path})")
    ctx.ensure_ray()
    started = time.time()

    def check_batch(batch: pa.Table) -> pa.Table:
        # The math_verify extractor reads the answer part only: generate's `final` (split with
        # the recipe's reasoning tags), never numbers inside the reasoning.
        finals = batch.column("final").to_pylist() if cfg.answer_field == "completion" else None
        finish = (batch.column("finish_reason").to_pylist()
                  if "finish_reason" in batch.column_names else None)
        cols = verify_rows(batch.column(cfg.answer_field).to_pylist(),
                           batch.column("answer").to_pylist(), cfg,
                           sources=batch.column("source").to_pylist(),
                           parts=answer_parts(finals, finish))
        if cfg.correct_from != "verify":  # the source's verdict decides; ours stays beside it
            cols["checked_correct"] = cols["correct"]
            cols["correct"] = source_correct(list(zip(*(
                batch.column(c).to_pylist() for c in CORRECT_FROM[cfg.correct_from]))))
        for name, typ in (("pred_answer", pa.string()), ("correct", pa.bool_()),
                          ("verify_status", pa.string()), ("checked_correct", pa.bool_())):
            if name in cols:
                batch = batch.append_column(name, pa.array(cols[name], typ))
        return batch

    ds = inputs["generate"].read_ray()
    # Small inputs arrive as one block = one task = one core: split so every CPU gets work
    # (e.g. 256 traces / 64 = 4 blocks on 2 CPUs).
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(1, min((ctx.rows_in or 0) // 64, 4 * cpus))
    # Ray Data retries tasks (max_retries=-1, pipeline/resources.py: placement): a node lost
    # mid-stage costs its blocks a rerun elsewhere, never a lost or doubled row.
    checked = ds.repartition(blocks).map_batches(
        check_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
        num_cpus=ctx.resources.num_cpus, **placement(ctx.resources))
    progress, refs = Progress("verify", total=ctx.rows_in, unit="traces", errors=False), []
    for bundle in checked.iter_internal_ref_bundles():  # = materialize(), counting as it goes
        refs.extend(bundle.block_refs)
        progress.update(bundle.num_rows())
    progress.close()
    ds = ray.data.from_arrow_refs(refs)

    # Per problem pass rates from three small columns, then joined back onto every row.
    light = pa.concat_tables(ray.get(
        ds.select_columns(["problem_id", "correct", "verify_status", *verdict_cols,
                           *(["checked_correct"] if cfg.correct_from != "verify" else [])]
                          ).to_arrow_refs()))
    verifiable = light.filter(pc.is_valid(light["correct"]))
    groups = verifiable.group_by("problem_id").aggregate([("correct", "sum"), ("correct", "count")])
    rates = {pid: n_ok / n for pid, n_ok, n in zip(groups["problem_id"].to_pylist(),
                                                   groups["correct_sum"].to_pylist(),
                                                   groups["correct_count"].to_pylist())}
    levels = {pid: difficulty_of(r, cfg) for pid, r in rates.items()}

    def add_rates(batch: pa.Table) -> pa.Table:
        pids = batch.column("problem_id").to_pylist()
        batch = batch.append_column("pass_rate", pa.array([rates.get(p) for p in pids], pa.float64()))
        return batch.append_column("difficulty", pa.array([levels.get(p) for p in pids], pa.string()))

    # Lazy: the runner's Parquet write runs this pass (one Ray job fewer).
    out = ds.map_batches(add_rates, batch_format="pyarrow")
    wall = time.time() - started  # checking + pass rates; the manifest's wall_s adds the write

    n_true = sum(bool(c) for c in verifiable["correct"].to_pylist())
    hist = [0] * 10  # problems per pass-rate decile; 1.0 goes in the last bin
    for r in rates.values():
        hist[min(int(r * 10), 9)] += 1
    ctx.stats.update({
        "traces": light.num_rows,
        "verifiable": verifiable.num_rows,
        "correct": n_true,
        "accuracy": round(n_true / verifiable.num_rows, 4) if verifiable.num_rows else None,
        "status_counts": dict(collections.Counter(light["verify_status"].to_pylist())),
        "problems": len(set(light["problem_id"].to_pylist())),
        "problems_with_pass_rate": len(rates),
        "pass_rate_histogram": {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": h for i, h in enumerate(hist)},
        "difficulty_counts": {lvl: sum(v == lvl for v in levels.values())
                              for lvl in ("easy", "medium", "hard")},
        "check_wall_s": round(wall, 3),
        "check_traces_per_s": round(light.num_rows / wall, 1) if wall else None,
        "correct_from": cfg.correct_from,
        # An imported file's own verdicts against math-verify's (ours, whatever correct_from).
        "source_agreement": {c: agreement(
            light["checked_correct" if cfg.correct_from != "verify" else "correct"].to_pylist(),
            light[c].to_pylist()) for c in verdict_cols},
    })
    return out


STAGE = Stage(
    name="verify",
    config=VerifyConfig,
    reads=("generate",),
    requires=("problem_id", "trace_id", "answer", "source", "completion", "final"),
    adds=("pred_answer", "correct", "verify_status", "pass_rate", "difficulty"),
    run=run,
)
