"""Stage `select` — the SFT set and the REDI preference pairs, two splits of one version.

    <version>/sft/    problem_id, trace_id, messages, difficulty, source
    <version>/pairs/  problem_id, prompt, chosen, rejected, chosen_trace_id, rejected_trace_id

`messages` = the exact prompt messages the teacher saw + one assistant turn
"<think>\\n{reasoning}\\n</think>\\n{final}" built from the pruned text; `prompt / chosen / rejected`
are TRL's conversational preference format, so TRL's DPO trainer (and our REDI trainer) read the
split unchanged.

Reads `provenance` (every prune row + the `selected` column; with `provenance.method: none`
selected = correct, and select behaves as it did on prune). Per problem, its traces are put in a
seeded shuffle (sorted by trace_id first, so the order does not depend on how rows arrived): SFT
takes the first `sft_per_problem` SELECTED correct traces; a pair is the first correct with the
first incorrect trace (METHODS.md, REDI), both within the length caps, where the chosen trace is
the first selected correct one when the problem has one within the cap (else the first correct:
provenance chooses what SFT imitates; REDI's contrast needs a correct trace either way).
Problems that give no pair are counted by reason.

    distillery run select --recipe configs/tiny.yaml select.seed=1
"""
from __future__ import annotations

import random
from dataclasses import dataclass

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
    """

    seed: int = 0
    sft_per_problem: int = 4
    sft_max_tokens: int = 0
    pair_max_prompt_tokens: int = 800
    pair_max_response_tokens: int = 19000
    reasoning_tags: str = "think"


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
        fits = [r for r in correct if r["selected"]
                if not cfg.sft_max_tokens
                or r["prompt_tokens"] + r["pruned_tokens"] <= cfg.sft_max_tokens]
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
        "problem_id", "trace_id", "correct", "selected", "prompt_tokens", "pruned_tokens", "pruned_completion",
        "prompt_messages", "difficulty", "source"]).to_pylist()
    sft, pairs, no_pair = plan(rows, cfg)

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    sft_table = pa.Table.from_pylist([{
        "problem_id": r["problem_id"],
        "trace_id": r["trace_id"],
        "messages": list(r["prompt_messages"]) + [
            {"role": "assistant",
             "content": assistant_text(r["pruned_completion"], cfg.reasoning_tags)}],
        "difficulty": r["difficulty"],
        "source": r["source"],
    } for r in sft], schema=pa.schema([("problem_id", pa.string()), ("trace_id", pa.string()),
                                       ("messages", message), ("difficulty", pa.string()),
                                       ("source", pa.string())]))
    pairs_table = pa.Table.from_pylist([{
        "problem_id": c["problem_id"],
        "prompt": list(c["prompt_messages"]),
        "chosen": [{"role": "assistant",
                    "content": assistant_text(c["pruned_completion"], cfg.reasoning_tags)}],
        "rejected": [{"role": "assistant",
                      "content": assistant_text(r["pruned_completion"], cfg.reasoning_tags)}],
        "chosen_trace_id": c["trace_id"],
        "rejected_trace_id": r["trace_id"],
    } for c, r in pairs], schema=pa.schema([
        ("problem_id", pa.string()), ("prompt", message), ("chosen", message),
        ("rejected", message), ("chosen_trace_id", pa.string()),
        ("rejected_trace_id", pa.string())]))

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
    })
    return {"sft": sft_table, "pairs": pairs_table}


STAGE = Stage(
    name="select",
    config=SelectConfig,
    reads=("provenance",),
    requires=("problem_id", "trace_id", "correct", "selected", "prompt_tokens", "pruned_tokens",
              "pruned_completion", "prompt_messages", "difficulty", "source"),
    adds=("problem_id", "trace_id", "messages", "prompt", "chosen", "rejected",
          "chosen_trace_id", "rejected_trace_id"),
    run=run,
)
