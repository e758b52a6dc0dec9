"""Stage `prune` — difficulty-aware pruning of correct traces (DAP, docs/methods.md), two modes.

Adds `pruned_completion, pruned_tokens, prune_status, judged_difficulty`. Only correct traces are
pruned; incorrect ones pass through unchanged (status "incorrect": REDI's negatives) and so do
unverifiable ones ("unverified"). Dropped rows are counted by reason in the manifest.

mode: budget (no extra generation, ours) — per pass-rate difficulty level (easy/medium/hard, from
  verify) a token budget: correct traces within it are kept ("kept"), the shortest first when
  `keep_per_problem` caps them; longer ones are dropped ("over_budget").
mode: rewrite (paper-faithful) — one teacher call per correct trace: shown the problem and the
  trace, the teacher judges the difficulty (simple / moderate / complex) and rewrites the trace at
  a length fit for it, following that level's outline (configs/dap/: judge.txt is the frame,
  simple.txt / moderate.txt / complex.txt the per-level outlines, in our own words). Every rewrite
  is re-verified with verify's own settings; one that does not reach the reference answer is
  rejected ("rejected_<reason>") and the original kept or, with `on_reject: drop`, dropped.
  Token counts of rewrites use the teacher's tokenizer.

    distillery run prune --recipe configs/tiny.yaml prune.mode=budget
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field

from cluster.inference import Endpoint, Sampling, complete_chats, iter_samples
from pipeline.config import build_config
from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib.answers import VerifyConfig, verify_rows
from stages.lib.chat import check_chat_format, render_prompt as render_chat, split_think
from stages.lib.dap_prompts import (JUDGED, PROMPTS_DIR, fill_dap_prompt, load_dap_prompts,
                                    parse_rewrite)

LEVELS = ("easy", "medium", "hard")             # verify's pass-rate levels


@dataclass
class PruneConfig:
    """Knobs of the prune stage.

    mode: "budget" or "rewrite" (see the module docstring).
    budgets: budget mode: max completion tokens of a kept correct trace, per difficulty level.
    keep_per_problem: budget mode: keep at most this many correct traces per problem, the shortest
      first (0 = every one within budget).
    teacher: rewrite mode: the model that judges and rewrites (the recipe's teacher by default).
    backend / base_url / api_key_env: rewrite mode: "vllm" engines in Ray actors (where:
      `resources.prune`) or an OpenAI-compatible server, as in generate.
    tokenizer: rewrite mode: counts the rewritten tokens ("" = the teacher's tokenizer).
    prompts_dir: rewrite mode: folder with judge.txt (the frame: {problem}, {trace}, {simple},
      {moderate}, {complex}) and simple.txt / moderate.txt / complex.txt (one outline per level;
      "" = configs/dap of this checkout). One teacher call judges and rewrites.
    rewrite_max_tokens: generation length of the rewrite call.
    max_model_len: the engine's context length (0 = the model's); the prompt holds the trace.
    temperature / seed: sampling of the rewrite call (0 = greedy).
    chat_template / prompt_format: rewrite mode, vllm backend: how the judge prompt is rendered
      for the teacher ("" / "chat" = its own chat template; see generate and stages/lib/chat.py).
    on_reject: rewrite mode: a rewrite that fails re-verification keeps the original trace
      ("keep") or drops the row ("drop").
    reasoning_tags: rewrite mode: the stored form of a rewrite (the recipe's top-level
      `reasoning_tags`; stages/lib/chat.py trace_text).
    """

    mode: str = "budget"
    budgets: dict = field(default_factory=lambda: {"easy": 1024, "medium": 2048, "hard": 4096})
    keep_per_problem: int = 0
    teacher: str = ""
    backend: str = "vllm"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    tokenizer: str = ""
    prompts_dir: str = ""
    rewrite_max_tokens: int = 2048
    max_model_len: int = 0
    temperature: float = 0.0
    seed: int = 0
    chat_template: str = ""
    prompt_format: str = "chat"
    on_reject: str = "keep"
    reasoning_tags: str = "think"


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
    if cfg.backend not in ("vllm", "openai"):
        raise UserError(f"prune.backend: '{cfg.backend}' is not 'vllm' or 'openai'")
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


# --------------------------------------------------------------------------- rewrite mode

def judge_rewrites(rows: list[dict], outputs: dict, vcfg, count_tokens, checker=None,
                   tags: str = "think") -> list[dict]:
    """Per row: pruned_completion, pruned_tokens, prune_status, judged_difficulty.

    rows: verify rows; outputs: {trace_id: (teacher text, finish_reason)} for correct rows.
    A rewrite is accepted ("rewritten") only if the same verifier finds the reference answer in
    it; otherwise the status names the reason and the original text is carried.
    """
    out = []
    for r in rows:
        keep = {"pruned_completion": r["completion"], "pruned_tokens": r["completion_tokens"],
                "judged_difficulty": None}
        if r["correct"] is not True:
            out.append({**keep, "prune_status": "incorrect" if r["correct"] is False
                        else "unverified"})
            continue
        text, finish = outputs[r["trace_id"]]
        level, rewrite = parse_rewrite(text, tags)
        keep["judged_difficulty"] = level
        if finish != "stop":  # "length" (cut off), "prompt_too_long", "error"
            out.append({**keep, "prune_status": f"rejected_{finish}"})
            continue
        reasoning, final = split_think(rewrite, tags)
        answer_text = final if vcfg.answer_field == "final" else rewrite
        got = verify_rows([answer_text], [r["answer"]], vcfg, checker)
        status = got["verify_status"][0]
        if got["correct"][0] is True:
            out.append({"pruned_completion": rewrite, "pruned_tokens": count_tokens(rewrite),
                        "judged_difficulty": level, "prune_status": "rewritten"})
        elif status in ("ok", "no_answer"):
            out.append({**keep, "prune_status": "rejected_wrong_answer" if status == "ok"
                        else "rejected_no_answer"})
        else:  # timeout / error: unverifiable counts as not verified
            out.append({**keep, "prune_status": "rejected_unverifiable"})
    return out


_TOKENIZERS: dict = {}


def _token_counter(name: str):
    """len(tokens) under the teacher's tokenizer; loaded once per process."""
    if name not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(name)
    tok = _TOKENIZERS[name]
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def run_rewrite(cfg: PruneConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    # Re-verify with exactly the settings the verify version used.
    vcfg = build_config(VerifyConfig, inputs["verify"].manifest["config"],
                        f"{inputs['verify'].ref()} manifest config")
    prompts = load_dap_prompts(cfg.prompts_dir or PROMPTS_DIR)
    tokenizer = cfg.tokenizer or cfg.teacher
    render = None
    if cfg.backend == "vllm":  # before Ray starts (a base-model teacher: stages/lib/chat.py)
        template = check_chat_format(cfg.teacher, cfg.chat_template, cfg.prompt_format, "prune")
        render = functools.partial(render_chat, chat_template=template,
                                   prompt_format=cfg.prompt_format)
    elif cfg.chat_template or cfg.prompt_format != "chat":
        raise UserError("prune.chat_template / prune.prompt_format: the openai backend's "
                        "server renders chats itself; use backend=vllm for these")
    ctx.ensure_ray()
    src = inputs["verify"].read_ray()
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

    def ask(batch: pa.Table) -> pa.Table:
        batch = batch.filter(pc.fill_null(batch.column("correct"), False))
        msgs = [[{"role": "user", "content": fill_dap_prompt(prompts, p, c)}]
                for p, c in zip(batch.column("problem").to_pylist(),
                                batch.column("completion").to_pylist())]
        # Only the id and the prompt go to the engine: its output names its own columns
        # (completion, completion_tokens, …) after ours.
        return pa.table({"trace_id": batch.column("trace_id"),
                         "rewrite_messages": pa.array(msgs, message)})

    endpoint = (Endpoint(base_url=cfg.base_url, api_key_env=cfg.api_key_env)
                if cfg.backend == "openai" else None)
    got = []
    correct = inputs["verify"].read_table(columns=["correct"]).column("correct")
    n_correct = pc.sum(pc.fill_null(correct, False).cast(pa.int64())).as_py()
    if n_correct:  # else: no engine start
        answers = complete_chats(
            src.map_batches(ask, batch_format="pyarrow"), model=cfg.teacher, n=1,
            sampling=Sampling(temperature=cfg.temperature, max_tokens=cfg.rewrite_max_tokens,
                              seed=cfg.seed),
            resources=ctx.resources, ctx=ctx, messages_column="rewrite_messages",
            endpoint=endpoint, max_model_len=cfg.max_model_len, render=render)
        got = [t for t in iter_samples(answers.select_columns(
            ["trace_id", "completion", "completion_tokens", "finish_reason"]),
            "prune rewrite", n_correct) if t.num_rows]
    outputs = {}
    for t in got:
        for tid, text, finish in zip(t.column("trace_id").to_pylist(),
                                     t.column("completion").to_pylist(),
                                     t.column("finish_reason").to_pylist()):
            outputs[tid] = (text, finish)

    def finish(batch: pa.Table) -> pa.Table:
        cols = judge_rewrites(batch.select(["trace_id", "answer", "correct", "completion",
                                            "completion_tokens"]).to_pylist(),
                              outputs, vcfg, _token_counter(tokenizer),
                              tags=cfg.reasoning_tags)
        for name, typ in (("pruned_completion", pa.string()), ("pruned_tokens", pa.int64()),
                          ("prune_status", pa.string()), ("judged_difficulty", pa.string())):
            batch = batch.append_column(name, pa.array([c[name] for c in cols], typ))
        return batch

    judged = src.map_batches(finish, batch_format="pyarrow").materialize()
    light = pa.concat_tables(ray.get(judged.select_columns(
        ["correct", "completion_tokens", "pruned_tokens", "prune_status",
         "judged_difficulty"]).to_arrow_refs())).to_pylist()

    outcomes = collections.Counter(r["prune_status"] for r in light)
    rewritten = [r for r in light if r["prune_status"] == "rewritten"]
    asked = sum(r["correct"] is True for r in light)
    per_level = {}
    for lvl in JUDGED + (None,):
        ok = [r for r in rewritten if r["judged_difficulty"] == lvl]
        per_level[lvl or "unparsed"] = {
            "judged": sum(r["correct"] is True and r["judged_difficulty"] == lvl for r in light),
            "rewritten": len(ok),
            "mean_tokens_before": _mean(r["completion_tokens"] for r in ok),
            "mean_tokens_after": _mean(r["pruned_tokens"] for r in ok)}
    ctx.stats.update({
        "mode": "rewrite",
        "rewrites_asked": asked,
        "outcomes": dict(outcomes),
        "acceptance_rate": round(len(rewritten) / asked, 4) if asked else None,
        "per_level": per_level,
        "mean_tokens_before": _mean(r["completion_tokens"] for r in light if r["correct"] is True),
        "mean_tokens_after": _mean(r["pruned_tokens"] for r in light if r["correct"] is True),
    })
    if cfg.on_reject == "keep":
        return judged
    for status, n in outcomes.items():
        if status.startswith("rejected_"):
            ctx.drops["rewrite_" + status] += n
    return judged.filter(lambda r: not r["prune_status"].startswith("rejected_"))


STAGE = Stage(
    name="prune",
    config=PruneConfig,
    reads=("verify",),
    requires=("problem_id", "trace_id", "problem", "answer", "completion", "completion_tokens",
              "correct", "difficulty"),
    adds=("pruned_completion", "pruned_tokens", "prune_status", "judged_difficulty"),
    run=run,
)
