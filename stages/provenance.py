"""Stage `provenance` — which sentences of each trace come from the teacher, and which traces select
should train on (docs/methods.md, "Provenance tracing"; arXiv 2512.20908).

    distillery run provenance --recipe configs/tiny.yaml provenance.rule=paper

Every prune row's `pruned_completion` is scored as the assistant turn after its prompt
(`prompt_messages`, rendered with each model's own chat template) under the teacher and the
original student: one packed forward per model (stages/lib/packed.py's score_completions) on a Ray
Data actor pool (cluster/scoring.py; `resources.provenance` decides replicas and GPUs). The text is
split into sentences (stages/lib/sentences.py); per sentence p = exp(mean token log-prob) over the
tokens overlapping its character span, each model with its own tokenizer; label teacher / student
/ common with margin beta. Per trace: teacher_sentences, teacher_share, lp_teacher, lp_student and
provenance_score = lp_teacher - lp_student (docs/provenance.md says how tokens are weighted).

Selection (`selected`, `select_reason`; nothing is dropped, the manifest counts the reasons):
  rule paper — per problem, the keep_per_problem correct traces with the most teacher sentences
    (ties: higher provenance_score, then trace_id);
  rule score — correct traces with provenance_score >= min_score, or (min_score unset) the top
    top_fraction of all correct traces by score;
  rule all   — every correct trace;
  rule random — per problem, keep_per_problem correct traces drawn at random (`seed`): the
    baseline the paper compares with, the same number of traces as rule paper.
Incorrect and unverified traces are scored too (REDI pairs keep them) but never selected.
method: none — a pass-through: no model is loaded, the score columns are null, selected = correct.

The teacher's top-k (`topk` > 0, for stage distributions; docs/kd.md "Reusing provenance's
teacher forward"): the teacher's scoring forward also takes its top-k next-token distribution at
every completion position (stages/lib/topk.py TopkScorer: the same forward, the same chunked LM
head; the log-probs above are unchanged). Kept per trace SELECTED at the end (only those can be
SFT rows), in the hidden side dataset <version>/.teacher_topk/part-XXXXX.parquet (readers of the
version never see it): trace_id, problem_id, teacher_ids (the prompt + completion tokens the
teacher scored, its form), teacher_prompt_len, and distributions' columns (topk_ids, topk_logps,
token_logp, tail_mass, padded_dropped, padded_mass_max: topk.capture_fields), over the ids below
min(student, teacher) vocabulary size, as distributions takes them. The manifest's stats say k,
that vocabulary size and the dtype the teacher ran in (topk, topk_vocab, topk_dtype).

Resume: rows sorted by (problem_id, trace_id), cut into shards of shard_size; each scored shard is
written atomically into the version's temp folder (.scored/part-XXXXX.parquet, a hidden folder no
reader lists; its top-k first, in .scored_topk/); a rerun scores only the missing shards.
Selection needs every row, so it runs once all shards are scored and writes the final
part-XXXXX.parquet files (and the selected traces' top-k).
"""
from __future__ import annotations

import functools
import math
import posixpath
import random
import time
from dataclasses import dataclass

from cluster.scoring import score_batches
from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.shards import Shards, tagged
from pipeline.stage import Stage
from pipeline.store import Store
from stages.lib.chat import check_chat_format, target_format
from stages.lib.packed import ATTENTION, onednn_linears, register_attention, score_traces
from stages.lib.sentences import (completion_mean, geometric_p, label_two, scored_end,
                                  sentence_means, split_sentences)
from stages.lib.topk import TopkScorer, capture_arrays, capture_fields, vocab_size

METHODS = ("score", "none")
RULES = ("paper", "score", "all", "random")
LABELS = ("teacher", "student", "common", "unscored")
TOPK_DIR = ".teacher_topk"          # the selected traces' teacher top-k, beside the parts
SCORED_TOPK_DIR = ".scored_topk"    # in flight: every correct trace's, per scored shard


@dataclass
class ProvenanceConfig:
    """Knobs of the provenance stage (replicas and GPUs: `resources.provenance`).

    method: "score" (teacher and student score every trace) or "none" (pass-through, no models;
      score columns null, selected = correct).
    teacher / student: the models (filled from the recipe's top-level teacher / student; the
      student is the ORIGINAL student, before sft).
    rule: selection rule, "paper" | "score" | "all" | "random" (module docstring).
    beta: label margin on p_T - p_S (the paper's best: 0.1; 0.05 and 0.15 were worse).
    keep_per_problem: rules paper and random: correct traces kept per problem (the paper keeps 1).
    seed: rule random: the draw (same seed + same rows = same selection).
    top_fraction: rule score without min_score: the share of correct traces kept, best first.
    min_score: rule score: keep correct traces with provenance_score >= this (null = use
      top_fraction).
    max_length: prompt + completion tokens one model scores; longer traces are scored on their
      first max_length tokens and counted (`truncated`).
    tokens_per_row: capacity of one packed forward (>= max_length): 16,384 tokens x vocab never
      meet, the LM head runs `chunk` positions at a time.
    chunk: positions per LM-head chunk (1,024 x 152k vocab x 4 B = 0.6 GB of fp32 logits).
    shard_size: traces per shard, the unit of resume and of one actor call.
    chat_template / prompt_format: how the prompt is rendered for both models (stages/lib/chat.py:
      "" = each model's own template; "raw" = the problem text alone), as generate asked.
      Each model scores the trace as it would write it after its own prompt (score_traces).
    reasoning_tags: how traces mark their reasoning (the recipe's top-level `reasoning_tags`).
    trust_remote_code: let transformers run code shipped with the models (off by default).
    topk: also keep the teacher's top-k next-token distribution (k entries) at every scored
      completion position of the selected traces, from the forward that scores them, so stage
      distributions with distributions.k = topk reuses it instead of running the teacher again
      (module docstring; docs/kd.md). 0 = off: no extra work or storage. On disk, per token of
      a selected trace: 6 B an entry + 8 B (k=32: 200 B), plus 4 B a token id scored.
    """

    method: str = "score"
    teacher: str = ""
    student: str = ""
    rule: str = "paper"
    beta: float = 0.1
    keep_per_problem: int = 1
    top_fraction: float = 0.5
    min_score: float | None = None
    seed: int = 0
    max_length: int = 4096
    tokens_per_row: int = 16384
    chunk: int = 1024
    shard_size: int = 256
    chat_template: str = ""
    prompt_format: str = "chat"
    reasoning_tags: str = "think"
    trust_remote_code: bool = False
    topk: int = 0


def check_config(cfg: ProvenanceConfig) -> str:
    """Refuse bad settings before Ray starts; returns the chat template text ("" = the models')."""
    if cfg.method not in METHODS:
        raise UserError(f"provenance.method: '{cfg.method}' is not one of {list(METHODS)}")
    if cfg.rule not in RULES:
        raise UserError(f"provenance.rule: '{cfg.rule}' is not one of {list(RULES)}")
    if cfg.beta < 0:
        raise UserError(f"provenance.beta: must be >= 0, got {cfg.beta}")
    if cfg.keep_per_problem < 1:
        raise UserError(f"provenance.keep_per_problem: must be >= 1, got {cfg.keep_per_problem}")
    if not 0 < cfg.top_fraction <= 1:
        raise UserError(f"provenance.top_fraction: must be in (0, 1], got {cfg.top_fraction}")
    if cfg.max_length < 2 or cfg.shard_size < 1 or cfg.chunk < 1:
        raise UserError("provenance.max_length (>= 2), shard_size and chunk (>= 1) must be positive")
    if cfg.topk < 0:
        raise UserError(f"provenance.topk: must be >= 0 (0 = off), got {cfg.topk}")
    if cfg.method == "none":
        return ""

    template = ""
    for role, path in (("teacher", cfg.teacher), ("student", cfg.student)):
        template = check_chat_format(path, cfg.chat_template, cfg.prompt_format, "provenance",
                                     role)
    return template


def topk_support(cfg: ProvenanceConfig) -> int:
    """The ids the teacher's top-k is taken over: min(student, teacher) vocabulary size, as
    stage distributions takes them (a teacher's padded rows beyond it are left out). Refuses a
    topk larger than that."""
    student = vocab_size(cfg.student, "provenance.student", cfg.trust_remote_code)
    teacher = vocab_size(cfg.teacher, "provenance.teacher", cfg.trust_remote_code)
    support = min(student, teacher)
    if cfg.topk > support:
        raise UserError(f"provenance.topk: {cfg.topk} is larger than the vocabulary ({support} "
                        f"ids: student {student}, teacher {teacher}); use topk <= {support}")
    return support


# --- scoring: one batch of rows in a pool actor --------------------------------------------------

def score_columns():
    import pyarrow as pa

    return [("sentence_spans", pa.list_(pa.list_(pa.int64()))),
            ("sentence_labels", pa.list_(pa.string())),
            ("sentence_p_teacher", pa.list_(pa.float64())),
            ("sentence_p_student", pa.list_(pa.float64())),
            ("teacher_sentences", pa.int64()), ("teacher_share", pa.float64()),
            ("lp_teacher", pa.float64()), ("lp_student", pa.float64()),
            ("provenance_score", pa.float64()), ("provenance_truncated", pa.bool_()),
            ("scored_tokens_teacher", pa.int64()), ("scored_tokens_student", pa.int64())]


def trace_columns(text: str, teacher: dict, student: dict, beta: float) -> dict:
    """The per-row provenance columns from the two models' scored tokens of one completion."""
    spans = split_sentences(text)
    p_t = [geometric_p(m) for m in sentence_means(spans, teacher["offsets"], teacher["logps"])]
    p_s = [geometric_p(m) for m in sentence_means(spans, student["offsets"], student["logps"])]
    labels = [label_two(a, b, beta) for a, b in zip(p_t, p_s)]
    common = min(scored_end(teacher, len(text)), scored_end(student, len(text)))
    lp_t = completion_mean(teacher, common)
    lp_s = completion_mean(student, common)
    n_teacher = labels.count("teacher")
    return {
        "sentence_spans": [list(s) for s in spans], "sentence_labels": labels,
        "sentence_p_teacher": p_t, "sentence_p_student": p_s,
        "teacher_sentences": n_teacher,
        "teacher_share": n_teacher / len(spans) if spans else None,
        "lp_teacher": lp_t, "lp_student": lp_s,
        "provenance_score": lp_t - lp_s if lp_t is not None and lp_s is not None else None,
        "provenance_truncated": teacher["truncated"] or student["truncated"],
        "scored_tokens_teacher": len(teacher["logps"]),
        "scored_tokens_student": len(student["logps"]),
    }


def topk_columns():
    """The in-flight top-k columns score_batch adds when cfg.topk > 0 (the driver moves them to
    the side dataset): the teacher's scored tokens and topk.capture_fields."""
    import pyarrow as pa

    return [("teacher_ids", pa.list_(pa.int32())), ("teacher_prompt_len", pa.int32()),
            *capture_fields()]


def score_batch(models: dict, batch, cfg: ProvenanceConfig, template: str = "",
                support: int = 0):
    """Pool actor's call: the batch (pyarrow) + the score columns (see score_columns).
    template: the chat template text check_config returned ("" = each model's own).
    cfg.topk > 0: also topk_columns, from the teacher's scoring forward over ids < `support`
    (topk_support), filled for correct traces (only those can be selected) and empty for the
    rest."""
    import pyarrow as pa

    texts = [t or "" for t in batch.column("pruned_completion").to_pylist()]
    messages = batch.column("prompt_messages").to_pylist()
    scored, topk = {}, None
    for name in ("teacher", "student"):
        model, tokenizer = models[name]
        fmt = target_format(tokenizer, name, template, cfg.prompt_format, cfg.reasoning_tags,
                            f"provenance.{name}")
        if name == "teacher" and cfg.topk:
            topk = TopkScorer(model, cfg.topk, support, cfg.tokens_per_row, cfg.chunk)
        scored[name] = score_traces(model, tokenizer, messages, texts, fmt, cfg.max_length,
                                    cfg.tokens_per_row, cfg.chunk,
                                    score_ids=topk if name == "teacher" else None)
    rows = [trace_columns(text, t, s, cfg.beta)
            for text, t, s in zip(texts, scored["teacher"], scored["student"])]
    for name, typ in score_columns():
        batch = batch.append_column(pa.field(name, typ), pa.array([r[name] for r in rows], typ))
    if topk is not None:
        keep = [c is True and g is not None
                for c, g in zip(batch.column("correct").to_pylist(), topk.got)]
        values = {"teacher_ids": pa.array([ids if k else [] for k, (ids, _) in
                                           zip(keep, topk.seqs)], pa.list_(pa.int32())),
                  "teacher_prompt_len": pa.array([n if k else 0 for k, (_, n) in
                                                  zip(keep, topk.seqs)], pa.int32()),
                  **capture_arrays([g if k else None for k, g in zip(keep, topk.got)],
                                   cfg.topk)}
        for name, typ in topk_columns():
            batch = batch.append_column(pa.field(name, typ), values[name])
    return batch


def null_columns(table):
    """method none: the same columns, null (lists empty)."""
    import pyarrow as pa

    n = table.num_rows
    for name, typ in score_columns():
        value = pa.array([[]] * n, typ) if pa.types.is_list(typ) else pa.nulls(n, typ)
        table = table.append_column(pa.field(name, typ), value)
    return table


# --- selection: on the whole version -----------------------------------------------------------

def select_plan(rows: list[dict], cfg: ProvenanceConfig) -> dict:
    """{trace_id: (selected, reason)} for dicts with trace_id, problem_id, correct,
    teacher_sentences, provenance_score."""
    out, candidates = {}, []
    for r in rows:
        if r["correct"] is not True:
            out[r["trace_id"]] = (False, "incorrect" if r["correct"] is False else "unverified")
        elif cfg.method == "none":
            out[r["trace_id"]] = (True, "no_provenance")
        elif cfg.rule == "all":
            out[r["trace_id"]] = (True, "all")
        else:
            candidates.append(r)
    if cfg.rule == "paper":
        by_problem: dict = {}
        for r in candidates:
            by_problem.setdefault(r["problem_id"], []).append(r)
        for traces in by_problem.values():
            # Most teacher sentences first; then the higher score; trace_id settles the rest.
            traces.sort(key=lambda r: (-(r["teacher_sentences"] or 0),
                                       -_score_or_floor(r["provenance_score"]), r["trace_id"]))
            for k, r in enumerate(traces):
                out[r["trace_id"]] = ((True, "top_teacher_sentences")
                                      if k < cfg.keep_per_problem else (False, "not_top_k"))
    elif cfg.rule == "random":

        by_problem = {}
        for r in candidates:
            by_problem.setdefault(r["problem_id"], []).append(r)
        for problem_id, traces in by_problem.items():
            # Sorted first, seeded per problem: the draw depends on neither row order nor
            # on which other problems are in the version.
            traces.sort(key=lambda r: r["trace_id"])
            random.Random(f"{cfg.seed}:{problem_id}").shuffle(traces)
            for k, r in enumerate(traces):
                out[r["trace_id"]] = ((True, "random") if k < cfg.keep_per_problem
                                      else (False, "not_drawn"))
    elif cfg.rule == "score" and cfg.min_score is not None:
        for r in candidates:
            ok = r["provenance_score"] is not None and r["provenance_score"] >= cfg.min_score
            out[r["trace_id"]] = (True, "above_min_score") if ok else (False, "below_min_score")
    elif cfg.rule == "score":
        ranked = sorted(candidates, key=lambda r: (-_score_or_floor(r["provenance_score"]),
                                                    r["trace_id"]))
        keep = math.ceil(cfg.top_fraction * len(ranked))  # 0.5 of 7 traces keeps 4
        for k, r in enumerate(ranked):
            out[r["trace_id"]] = ((True, "top_fraction") if k < keep
                                  else (False, "not_top_fraction"))
    return out


def _score_or_floor(score: float | None) -> float:
    return -math.inf if score is None else score


# --- the stage ---------------------------------------------------------------------------------

def run(cfg: ProvenanceConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    template = check_config(cfg)
    topk = cfg.topk if cfg.method == "score" else 0
    support = topk_support(cfg) if topk else 0
    table = inputs["prune"].read_table().sort_by([("problem_id", "ascending"),
                                                  ("trace_id", "ascending")])
    shards = [table.slice(start, cfg.shard_size)
              for start in range(0, table.num_rows, cfg.shard_size)]
    store = Store(ctx.data_root)
    fs = store.fs
    scored_dir = posixpath.join(ctx.out_dir, ".scored")
    out = Shards(fs, ctx.out_dir)  # the final parts, written once every shard is scored

    started = time.time()
    todo, new_tokens = [], 0
    if cfg.method == "score":
        scored = Shards(fs, scored_dir)
        scored_topk = Shards(fs, posixpath.join(ctx.out_dir, SCORED_TOPK_DIR)) if topk else None
        todo = scored.todo(len(shards))
        print(f"provenance: {table.num_rows} traces in {len(shards)} shards of {cfg.shard_size}; "
              f"{len(shards) - len(todo)} already scored, {len(todo)} to score", flush=True)
    if todo:

        import ray.data

        ctx.ensure_ray()
        scores = score_batches(ray.data.from_arrow(tagged({k: shards[k] for k in todo})),
                            models={"teacher": cfg.teacher, "student": cfg.student},
                            score_fn=functools.partial(score_batch, cfg=cfg, template=template,
                                                       support=support),
                            resources=ctx.resources, ctx=ctx, batch_size=cfg.shard_size,
                            prepare=register_attention, cpu_model_hook=onednn_linears,
                            attn_implementation=ATTENTION,
                            trust_remote_code=cfg.trust_remote_code)
        progress = Progress("provenance", total=table.num_rows, unit="traces", errors=False,
                            tokens_label="scored tok/s",
                            done=table.num_rows - sum(shards[k].num_rows for k in todo))
        for k, done in scored.gather(scores, {k: shards[k].num_rows for k in todo},
                                     "provenance"):
            done = done.sort_by([("problem_id", "ascending"), ("trace_id", "ascending")])
            if scored_topk is not None:  # first: a shard counts as scored once .scored has it
                scored_topk.write(k, _topk_rows(done))
                done = done.drop([name for name, _ in topk_columns()])
            scored.write(k, done)
            shard_tokens = (sum(done.column("scored_tokens_teacher").to_pylist())
                            + sum(done.column("scored_tokens_student").to_pylist()))
            new_tokens += shard_tokens
            progress.update(done.num_rows, tokens=shard_tokens)
        progress.close()
    score_s = time.time() - started

    if cfg.method == "score":
        parts = [pq.read_table(scored.path(k), filesystem=store.arrow_fs())
                 for k in range(len(shards))]
    else:
        parts = [null_columns(s) for s in shards]
    light = pa.concat_tables([p.select(["trace_id", "problem_id", "correct", "teacher_sentences",
                                        "provenance_score"]) for p in parts]) if parts else None
    plan = select_plan(light.to_pylist() if light is not None else [], cfg)
    for k, part in enumerate(parts):
        ids = part.column("trace_id").to_pylist()
        part = part.append_column("selected", pa.array([plan[t][0] for t in ids], pa.bool_()))
        part = part.append_column("select_reason", pa.array([plan[t][1] for t in ids],
                                                            pa.string()))
        out.write(k, part)
    if topk:
        _keep_selected_topk(fs, store, ctx.out_dir, len(parts), plan)
    # .scored first: a run stopped between the two scores every shard again
    for scratch in (scored_dir, posixpath.join(ctx.out_dir, SCORED_TOPK_DIR)):
        if fs.exists(scratch):
            fs.rm(scratch, recursive=True)
    if not parts:  # no rows: readers still need the schema
        empty = null_columns(table.slice(0, 0))
        empty = empty.append_column("selected", pa.array([], pa.bool_()))
        empty = empty.append_column("select_reason", pa.array([], pa.string()))
        out.write(0, empty)
    ctx.stats.update(_stats(parts, plan, cfg, todo, new_tokens, score_s))
    if topk:
        ctx.stats.update(topk=topk, topk_vocab=support,
                         topk_dtype="bfloat16" if ctx.resources.gpus_per_replica else "float32",
                         **_topk_stats(fs, store, ctx.out_dir, len(parts)))
    return None


def _topk_rows(done):
    """The scored shard's rows that carry a top-k (correct traces with a completion token),
    with the columns the side dataset keeps."""
    import pyarrow.compute as pc

    side = done.select(["trace_id", "problem_id", *[name for name, _ in topk_columns()]])
    return side.filter(pc.greater(pc.list_value_length(side.column("teacher_ids")), 0))


def _keep_selected_topk(fs, store, out_dir: str, count: int, plan: dict) -> None:
    """.scored_topk/part-k -> .teacher_topk/part-k with the selected traces only (one part in
    memory at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scored = Shards(fs, posixpath.join(out_dir, SCORED_TOPK_DIR))
    final = Shards(fs, posixpath.join(out_dir, TOPK_DIR))
    for k in range(count):
        part = pq.read_table(scored.path(k), filesystem=store.arrow_fs())
        keep = [plan[t][0] for t in part.column("trace_id").to_pylist()]
        final.write(k, part.filter(pa.array(keep, pa.bool_())))


def _topk_stats(fs, store, out_dir: str, count: int) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = positions = 0
    final = Shards(fs, posixpath.join(out_dir, TOPK_DIR))
    for k in range(count):
        t = pq.read_table(final.path(k), filesystem=store.arrow_fs(),
                          columns=["teacher_ids", "teacher_prompt_len"])
        rows += t.num_rows
        positions += (pc.sum(pc.list_value_length(t.column("teacher_ids"))).as_py() or 0) - \
            (pc.sum(t.column("teacher_prompt_len")).as_py() or 0)
    return {"topk_traces": rows, "topk_positions": positions}


def _stats(parts, plan: dict, cfg: ProvenanceConfig, todo: list, new_tokens: int,
           score_s: float) -> dict:
    import pyarrow as pa

    reasons: dict = {}
    for selected, reason in plan.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    stats = {"method": cfg.method, "rule": cfg.rule, "beta": cfg.beta,
             "traces": len(plan), "selected": sum(s for s, _ in plan.values()),
             "not_selected": sum(not s for s, _ in plan.values()),
             "select_reasons": dict(sorted(reasons.items())),
             "shards": len(parts), "shards_scored_this_run": len(todo)}
    if cfg.method == "none" or not parts:
        return stats
    t = pa.concat_tables([p.select(["trace_id", "sentence_labels", "provenance_score",
                                    "provenance_truncated",
                                    "scored_tokens_teacher", "scored_tokens_student",
                                    "teacher_share", "correct"]) for p in parts]).to_pylist()
    labels = {label: 0 for label in LABELS}
    for r in t:
        for label in r["sentence_labels"]:
            labels[label] += 1
    sentences = sum(labels.values())
    scores = sorted(r["provenance_score"] for r in t if r["provenance_score"] is not None)
    tokens = sum(r["scored_tokens_teacher"] + r["scored_tokens_student"] for r in t)

    def share(rows):
        vals = [r["teacher_share"] for r in rows if r["teacher_share"] is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    stats.update({
        "truncated": sum(r["provenance_truncated"] for r in t),
        "sentences": sentences,
        "sentence_labels": labels,
        "sentence_label_shares": {k: round(n / sentences, 4) if sentences else None
                                  for k, n in labels.items()},
        "teacher_share_mean": share(t),
        "teacher_share_mean_correct": share([r for r in t if r["correct"] is True]),
        "teacher_share_mean_incorrect": share([r for r in t if r["correct"] is False]),
        # What selection changed: teacher-sentence share of the correct traces it kept vs those
        # it left (the demo's table reports both).
        "teacher_share_mean_selected": share([r for r in t if plan[r["trace_id"]][0]]),
        "teacher_share_mean_unselected": share(
            [r for r in t if r["correct"] is True and not plan[r["trace_id"]][0]]),
        "provenance_score_mean": round(sum(scores) / len(scores), 5) if scores else None,
        "provenance_score_p10": round(scores[len(scores) // 10], 5) if scores else None,
        "provenance_score_p50": round(scores[len(scores) // 2], 5) if scores else None,
        "provenance_score_p90": round(scores[min(len(scores) - 1, 9 * len(scores) // 10)], 5)
        if scores else None,
        "scored_tokens": tokens,
        "scored_tokens_this_run": new_tokens,
        # Both models' tokens scored by this run over its wall time (actor start and model
        # loading included); None on a rerun that scored nothing.
        "scored_tok_per_s": round(new_tokens / score_s, 1) if todo and score_s > 0 else None,
    })
    return stats


STAGE = Stage(
    name="provenance",
    config=ProvenanceConfig,
    reads=("prune",),
    requires=("problem_id", "trace_id", "correct", "pruned_completion", "prompt_messages"),
    adds=("sentence_spans", "sentence_labels", "sentence_p_teacher", "sentence_p_student",
          "teacher_sentences", "teacher_share", "lp_teacher", "lp_student", "provenance_score",
          "provenance_truncated", "selected", "select_reason"),
    run=run,
    resumable=True,
)
