"""Stage `evaluate` — pass@1 and pass@k of several models on held-out problems, one table.

    distillery run evaluate --recipe configs/tiny.yaml evaluate.samples=8

Every model in `models` (the recipe's teacher and base student, the sft and redi checkpoints
this run reads, or any checkpoint path / hub id) samples `samples` completions per held-out
problem on vLLM (generate's `complete_chats`: the same engines, chat rendering and sampling
knobs), and every completion is checked by verify's own extractor + math-verify (`verify_rows`),
so evaluation and training data agree on what "correct" means.

Reported per model, overall and per difficulty level (docs/methods.md "Evaluation"):
  pass@1   = mean over problems of c/n (c correct of n samples): pass@1 averaged over n samples;
  pass@k   = mean over problems of 1 - C(n-c, k) / C(n, k), the unbiased estimator of
             Chen et al. 2021 (HumanEval) — the chance that at least one of k samples is correct;
  mean completion tokens beside them (pruning should cut tokens without cutting accuracy).

Held-out set: `eval_path: synthetic` makes problems with their own seed; any file in the formats
`prompts` reads works too. Either way, problems whose normalized text is among the training
prompts (the `prompts` version read) are dropped and counted ("contaminated").

Inputs: `prompts` (for decontamination) and the `sft` and `redi` versions (LATEST, or pinned with
sft@<version> / redi@<version>), so a new checkpoint makes a new evaluate version; run it after
redi. The teacher and base student come from the recipe.

Output: one version with two splits — `samples` (one row per model x problem x sample, with the
completion and the verdict) and `summary` (one row per model x difficulty, "all" included).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from cluster.inference import Sampling, complete_chats, iter_samples
from pipeline.config import absolute_if_local
from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib.answers import DEFAULT_FALLBACKS, VerifyConfig, answer_parts, verify_rows
from stages.lib.chat import (PROBLEM_TEMPLATE, check_chat_format, load_tokenizer, opened_reasoning,
                             prompt_messages, render_prompt, split_think)
from stages.lib.ingest import normalize, problem_id, read_records
from stages.lib.references import ANSWER_FROM, reference_answer
from stages.lib.synthetic import make_problems

# Names that mean "the model this recipe/run already has"; anything else is a path or hub id.
NAMED = ("teacher", "student", "sft", "kd", "redi", "opd")


@dataclass
class EvaluateConfig:
    """Knobs of the evaluate stage (engines: `resources.evaluate`; each engine actor serves
    every model in turn, swapping engines).

    teacher / student: filled from the recipe's top-level teacher / student.
    models: what to evaluate, in table order: "teacher", "student" (the base student), "sft",
      "kd", "redi", "opd" (the versions this run reads; pin them with sft@<version>), or a
      checkpoint folder / hub id. Duplicates are an error.
    eval_path: "synthetic" (held-out problems made by stages/lib/synthetic.py with `synthetic_seed`)
      or a .jsonl/.json/.csv/.parquet file or save_to_disk folder (as `prompts` reads them).
    problem_field / answer_field / difficulty_field: columns of that file ("" difficulty_field
      = no per-level rows). Synthetic problems carry their number of operations as difficulty.
    answer_from: how the reference is read from answer_field, as prompts.answer_from: "auto"
      (GSM8K's "#### N" without thousands separators, a solution's last \\boxed{}, else the
      value; a float such as AMC23's 27.0 is "27"), "last_boxed" or "field". docs/evaluate.md
      has the fields of every benchmark file in ../shared/real/eval_sets/.
    group_fields: columns of the eval file that pass@1 (and pass@k) are also broken down by, in
      the manifest's stats (`by_group`) and the printed table (MATH-500: level and subject).
      Columns the file lacks are skipped; "Level 3" (MATH's own spelling) is level 3.
    split: the split of a save_to_disk DatasetDict.
    limit: evaluate the first N problems (0 = all).
    synthetic_n / synthetic_seed / synthetic_min_terms / synthetic_max_terms /
      synthetic_max_operand: the held-out generator (a seed no training set uses).
    decontaminate: drop problems whose normalized text is among the training prompts read.
    samples: completions per problem (n); pass@1 is averaged over them.
    pass_k: k of the pass@k column (1 <= k <= samples).
    temperature / top_p / top_k / max_tokens / seed: sampling (docs/methods.md: T 0.6, top-p 0.95).
    system_prompt / problem_template: how a problem becomes the chat sent to the model; keep
      them equal to generate's, so the models are asked as the teacher was.
    chat_template / prompt_format: how that chat becomes the prompt text, for every model in
      `models` ("" / "chat" = each model's own template; "raw" = the problem template alone, for
      base models; see generate and stages/lib/chat.py).
    verify_answer_field / verify_fallbacks / verify_timeout_s: as verify's answer_field,
      fallbacks and timeout_s ("final" = the text after the reasoning).
    reasoning_tags: how the models mark their reasoning (the recipe's top-level `reasoning_tags`).
    """

    teacher: str = ""
    student: str = ""
    models: list = field(default_factory=lambda: ["teacher", "student", "sft", "redi"])
    eval_path: str = "synthetic"
    problem_field: str = "problem"
    answer_field: str = "answer"
    answer_from: str = "auto"
    difficulty_field: str = "difficulty"
    group_fields: list = field(default_factory=lambda: ["level", "subject"])
    split: str = "test"
    limit: int = 0
    synthetic_n: int = 200
    synthetic_seed: int = 1_000_003
    synthetic_min_terms: int = 2
    synthetic_max_terms: int = 4
    synthetic_max_operand: int = 99
    decontaminate: bool = True
    samples: int = 4
    pass_k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_tokens: int = 4096
    seed: int = 0
    system_prompt: str = ""
    problem_template: str = PROBLEM_TEMPLATE
    chat_template: str = ""
    prompt_format: str = "chat"
    reasoning_tags: str = "think"
    verify_answer_field: str = "final"
    verify_fallbacks: list = field(default_factory=lambda: list(DEFAULT_FALLBACKS))
    verify_timeout_s: float = 5.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as a product (no huge binomials): C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def summarize(rows: list[dict], k: int) -> list[dict]:
    """Per-sample verdicts -> one summary row per (model, difficulty), "all" first.

    rows: dicts with model, problem_id, difficulty, correct (bool|None), completion_tokens,
    finish_reason. An unverifiable sample (correct None) counts as not correct: evaluation must
    not get easier when the verifier gives up.
    """
    by_model: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {}).setdefault(r["problem_id"], []).append(r)
    out = []
    for model, problems in by_model.items():
        levels = sorted({s[0]["difficulty"] for s in problems.values()
                         if s[0]["difficulty"] is not None})
        for level in ["all"] + levels:
            chosen = [s for s in problems.values() if level == "all" or s[0]["difficulty"] == level]
            p1, pk, tokens, truncated, samples = [], [], [], 0, 0
            for s in chosen:
                n, c = len(s), sum(bool(x["correct"]) for x in s)
                p1.append(c / n)
                pk.append(pass_at_k(n, c, min(k, n)))
                tokens += [x["completion_tokens"] for x in s]
                truncated += sum(x["finish_reason"] == "length" for x in s)
                samples += n
            out.append({
                "model": model, "difficulty": level, "problems": len(chosen), "samples": samples,
                "pass_at_1": round(sum(p1) / len(p1), 4), "k": k,
                "pass_at_k": round(sum(pk) / len(pk), 4),
                "mean_completion_tokens": round(sum(tokens) / len(tokens), 1),
                "truncated_share": round(truncated / samples, 4),
            })
    return out


def format_table(summary: list[dict], paths: dict[str, str] | None = None) -> str:
    """The overall rows as a fixed-width table (what the CLI and the demo print)."""
    overall = [r for r in summary if r["difficulty"] == "all"]
    if not overall:
        return "(no models evaluated)"
    k = overall[0]["k"]
    head = f"{'model':<10} {'pass@1':>7} {f'pass@{k}':>7} {'mean tokens':>12} {'problems':>9}"
    lines = [head, "-" * len(head)]
    for r in overall:
        lines.append(f"{r['model']:<10} {r['pass_at_1']:>7.3f} {r['pass_at_k']:>7.3f} "
                     f"{r['mean_completion_tokens']:>12.1f} {r['problems']:>9}")
    levels = [r for r in summary if r["difficulty"] != "all"]
    if levels:
        names = sorted({r["difficulty"] for r in levels}, key=str)
        lines += ["", "pass@1 by difficulty: " + "  ".join(f"{n:>6}" for n in names)]
        for model in dict.fromkeys(r["model"] for r in overall):
            cells = {r["difficulty"]: r["pass_at_1"] for r in levels if r["model"] == model}
            lines.append(f"{model:<21} " + "  ".join(
                f"{cells[n]:>6.3f}" if n in cells else f"{'-':>6}" for n in names))
    if paths:
        lines += [""] + [f"{name}: {path}" for name, path in paths.items()]
    return "\n".join(lines)


_LEVEL = re.compile(r"level\s*(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def group_value(value) -> str | None:
    """A group_fields cell as the group's name: 3, 3.0, "3" and "Level 3" are all "3"."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    level = _LEVEL.fullmatch(text)
    return (level.group(1) if level else text) or None


def summarize_groups(rows: list[dict], groups: dict[str, dict], k: int) -> dict[str, list[dict]]:
    """pass@1 / pass@k per model and per value of each group field: {field: [summary rows with
    `value` for `difficulty`]}, values in natural order. groups: {problem_id: {field: value}};
    a problem without a value for a field is left out of that field's rows."""
    fields = dict.fromkeys(f for g in groups.values() for f, v in g.items() if v is not None)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["model"] for r in rows))}
    out = {}
    for name in fields:
        mine = [{**r, "difficulty": groups.get(r["problem_id"], {}).get(name)} for r in rows]
        mine = [r for r in mine if r["difficulty"] is not None]
        table = [{"value" if key == "difficulty" else key: v for key, v in r.items()}
                 for r in summarize(mine, k) if r["difficulty"] != "all"]
        out[name] = sorted(table, key=lambda r: (_natural(r["value"]), order[r["model"]]))
    return out


def _natural(value: str):
    return (0, float(value), "") if _NUMBER.fullmatch(value) else (1, 0.0, value)


def format_groups(by_group: dict[str, list[dict]]) -> str:
    """pass@1 per model x group value, one block per group field (what the stage prints)."""
    lines = []
    for name, table in by_group.items():
        values = list(dict.fromkeys(r["value"] for r in table))
        cells = {(r["model"], r["value"]): r for r in table}
        widths = [max(6, len(v)) for v in values]
        lines += ["", f"{f'pass@1 by {name}:':<21} " + "  ".join(
            f"{v:>{w}}" for v, w in zip(values, widths))]
        for model in dict.fromkeys(r["model"] for r in table):
            lines.append(f"{model:<21} " + "  ".join(
                f"{cells[model, v]['pass_at_1']:>{w}.3f}" if (model, v) in cells else f"{'-':>{w}}"
                for v, w in zip(values, widths)))
        lines.append(f"{'problems':<21} " + "  ".join(
            f"{max(r['problems'] for r in table if r['value'] == v):>{w}}"
            for v, w in zip(values, widths)))
    return "\n".join(lines).lstrip("\n")


def load_eval_problems(cfg: EvaluateConfig) -> list[dict]:
    """[{problem, answer, difficulty, groups}] from the synthetic generator or a file; groups:
    {field: value} of cfg.group_fields the row has."""

    if cfg.eval_path == "synthetic":

        made = make_problems(cfg.synthetic_n, seed=cfg.synthetic_seed,
                             min_terms=cfg.synthetic_min_terms, max_terms=cfg.synthetic_max_terms,
                             max_operand=cfg.synthetic_max_operand)
        rows = [{"problem": normalize(p["problem"]), "answer": p["answer"],
                 "difficulty": str(p["difficulty"]), "groups": {}} for p in made]
    else:
        if cfg.answer_from not in ANSWER_FROM:
            raise UserError(f"evaluate.answer_from: '{cfg.answer_from}' is not one of "
                            f"{ANSWER_FROM}")
        rows = []
        for where, rec in read_records(cfg.eval_path, cfg.split):
            for name in (cfg.problem_field, cfg.answer_field):
                if name not in rec:
                    raise UserError(f"{where}: no field '{name}' (fields: {sorted(rec)}); "
                                    "set evaluate.problem_field / evaluate.answer_field")
            if not isinstance(rec[cfg.problem_field], str):
                raise UserError(f"{where}: field '{cfg.problem_field}': expected text")
            level = rec.get(cfg.difficulty_field) if cfg.difficulty_field else None
            rows.append({"problem": normalize(rec[cfg.problem_field]),
                         "answer": reference_answer(rec[cfg.answer_field], where, cfg.answer_field,
                                                cfg.answer_from),
                         "difficulty": None if level is None else str(level),
                         "groups": {name: group_value(rec.get(name)) for name in cfg.group_fields
                                    if group_value(rec.get(name)) is not None}})
    return rows[:cfg.limit] if cfg.limit else rows


def resolve_models(cfg: EvaluateConfig, inputs) -> dict[str, str]:
    """{table name: checkpoint path or hub id}, in cfg.models order."""
    if not cfg.models:
        raise UserError("evaluate.models is empty: name at least one model "
                        f"({', '.join(NAMED)}, or a checkpoint path)")
    if len(set(cfg.models)) != len(cfg.models):
        raise UserError(f"evaluate.models lists a model twice: {cfg.models}")
    found = {"teacher": cfg.teacher, "student": cfg.student,
             **{name: inputs[name].path for name in ("sft", "kd", "redi", "opd")
                if name in inputs}}

    out = {}
    for name in cfg.models:
        path = absolute_if_local(found.get(name, name))
        if not path:
            raise UserError(f"evaluate.models: '{name}' is not set in the recipe "
                            f"(set `{name}:` at the top of the recipe or {name}=...)")
        out[name] = path
    return out


def run(cfg: EvaluateConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.data

    if cfg.samples < 1 or not 1 <= cfg.pass_k <= cfg.samples:
        raise UserError(f"evaluate: need samples >= 1 and 1 <= pass_k <= samples, got "
                        f"samples={cfg.samples} pass_k={cfg.pass_k}")
    if "{problem}" not in cfg.problem_template:
        raise UserError("evaluate.problem_template must contain {problem}")
    models = resolve_models(cfg, inputs)
    template = ""
    for name, path in models.items():  # before Ray starts: stages/lib/chat.py
        template = check_chat_format(path, cfg.chat_template, cfg.prompt_format, "evaluate",
                                     role=f"models[{name}]")
    render = functools.partial(render_prompt, chat_template=template,
                               prompt_format=cfg.prompt_format)
    # Each model's generation prompt may open the reasoning (R1-Distill's later template): its
    # turn is that tag + what it wrote, as generate stores a teacher's.
    opened = {name: opened_reasoning(render(load_tokenizer(path, f"evaluate.models[{name}]"),
                                            prompt_messages("", cfg)), cfg.reasoning_tags)
              for name, path in models.items()}

    problems = load_eval_problems(cfg)
    ctx.rows_in = len(problems)
    training = {normalize(p) for p in inputs["prompts"].read_table(columns=["problem"])
                .column("problem").to_pylist()} if cfg.decontaminate else set()
    kept, seen = [], set()
    for p in problems:
        if p["problem"] in training:
            ctx.drops["contaminated"] += 1
        elif p["problem"] in seen:
            ctx.drops["duplicate"] += 1
        elif p["answer"] is None:
            ctx.drops["no_reference"] += 1
        else:
            seen.add(p["problem"])
            kept.append(p)
    if not kept:
        raise UserError(f"evaluate: no held-out problems left from {cfg.eval_path} "
                        f"(drops: {dict(ctx.drops)})")

    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({
        "problem_id": [problem_id(p["problem"]) for p in kept],
        "problem": [p["problem"] for p in kept],
        "answer": [p["answer"] for p in kept],
        "difficulty": pa.array([p["difficulty"] for p in kept], pa.string()),
        "prompt_messages": pa.array([prompt_messages(p["problem"], cfg) for p in kept], msg_type),
    })
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        max_tokens=cfg.max_tokens, seed=cfg.seed)
    verify_cfg = VerifyConfig(answer_field=cfg.verify_answer_field,
                              fallbacks=list(cfg.verify_fallbacks),
                              timeout_s=cfg.verify_timeout_s)
    ctx.ensure_ray()

    # Every model in one dataset: one engine actor serves them in turn (cluster/inference.py,
    # model_column), swapping engines (~2 s) instead of a fresh actor per model (~12 s: vLLM's
    # import and first start). Blocks hold one model each (batch_size=None: an engine takes a
    # whole block), `replicas` blocks per model so that no replica idles.
    per_block = -(-table.num_rows // max(1, ctx.resources.replicas))
    blocks = []
    for name, path in models.items():
        for i in range(0, table.num_rows, per_block):
            block = table.slice(i, per_block)
            blocks.append(block.append_column("model", pa.array([name] * block.num_rows))
                          .append_column("model_path", pa.array([path] * block.num_rows)))
    first = next(iter(models.values()))
    out = complete_chats(ray.data.from_arrow(blocks), model=first, sampling=sampling,
                         n=cfg.samples, resources=ctx.resources, ctx=ctx, batch_size=None,
                         render=render, model_column="model_path")
    done = pa.concat_tables(list(iter_samples(out, "evaluate",
                                              len(models) * table.num_rows * cfg.samples)))
    parts, rows = [], []
    for name, path in models.items():
        t = done.filter(pc.equal(done["model"], name))
        t = t.sort_by([("problem_id", "ascending"), ("sample_idx", "ascending")])
        completions = [c if c is None else opened[name] + c
                       for c in t.column("completion").to_pylist()]
        t = t.set_column(t.schema.get_field_index("completion"), "completion",
                         pa.array(completions, pa.string()))
        texts = ([split_think(c or "", cfg.reasoning_tags)[1] for c in completions]
                 if cfg.verify_answer_field == "final" else completions)
        # A completion cut at max_tokens gets no math-verify fallback (verify's answer_parts).
        verdict = verify_rows(texts, t.column("answer").to_pylist(), verify_cfg,
                              parts=answer_parts(None, t.column("finish_reason").to_pylist()))
        t = t.drop(["prompt_messages", "error", "model", "model_path"])
        t = t.add_column(0, "model", pa.array([name] * t.num_rows, pa.string()))
        t = t.add_column(1, "model_path", pa.array([path] * t.num_rows, pa.string()))
        t = t.append_column("pred_answer", pa.array(verdict["pred_answer"], pa.string()))
        t = t.append_column("correct", pa.array(verdict["correct"], pa.bool_()))
        t = t.append_column("verify_status", pa.array(verdict["verify_status"], pa.string()))
        parts.append(t)
        rows += t.select(["model", "problem_id", "difficulty", "correct", "completion_tokens",
                          "finish_reason"]).to_pylist()
        print(f"evaluate: {name} done ({t.num_rows} samples)", flush=True)

    summary = summarize(rows, cfg.pass_k)
    by_group = summarize_groups(rows, {problem_id(p["problem"]): p["groups"] for p in kept},
                                cfg.pass_k)
    paths = dict(models)
    for r in summary:
        r["model_path"] = paths[r["model"]]
    ctx.stats.update({"models": paths, "problems": len(kept), "samples_per_problem": cfg.samples,
                      "table": summary, "by_group": by_group})
    groups_table = format_groups(by_group)
    print("\n" + format_table(summary) + ("\n\n" + groups_table if groups_table else "") + "\n",
          flush=True)
    return {"samples": pa.concat_tables(parts), "summary": pa.Table.from_pylist(summary)}


STAGE = Stage(
    name="evaluate",
    config=EvaluateConfig,
    reads=("prompts", "sft", "kd", "redi", "opd"),
    # the training prompts only to decontaminate; sft / redi only when evaluated by name
    uses=lambda cfg: ({"prompts"} if cfg.decontaminate else set())
    | (set(cfg.models) & {"sft", "kd", "redi", "opd"}),
    requires=("problem",),
    adds=("model", "problem_id", "correct", "completion_tokens", "pass_at_1", "pass_at_k",
          "mean_completion_tokens"),
    run=run,
)
