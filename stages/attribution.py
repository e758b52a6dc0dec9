"""Stage `attribution` — where the sentences of a distilled student's own answers come from
(the paper's analysis, docs/methods.md "Provenance tracing"; arXiv 2512.20908).

    distillery run attribution --recipe configs/tiny.yaml attribution.distilled=sft

Reads evaluate's `samples` split: the completions the distilled student D (`distilled`: "sft",
"kd", "redi", "opd", another model name of evaluate's list, or a checkpoint path evaluate
sampled) wrote for held-out problems. Each completion is scored, in the prompt evaluate asked
it with, under the teacher T, the original student S and D itself (cluster/scoring.py's actor
pool, one packed forward per model), split into sentences, and every sentence labelled with
four classes (stages/lib/sentences.py's label_four): shared if |p_S - p_D|, |p_T - p_D| and
|p_T - p_S| are all <= alpha; teacher if p_T - p_S > beta; student if p_S - p_T > beta;
otherwise boosted.

Reported (manifest stats, `distillery report`): the share of teacher-originated sentences in D's
correct answers vs its incorrect ones (the paper: higher in the correct ones), pooled over
sentences and as a mean per answer, and the share of every class.

Output: one row per analysed sample: its evaluate columns + sentence_spans (into `completion`),
sentence_labels, sentence_p_teacher / _student / _distilled, teacher_sentences, teacher_share,
lp_teacher / lp_student / lp_distilled, provenance_truncated. Not resumable (a few thousand
answers: minutes); not in configs/tiny.yaml's default run.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

from cluster.scoring import score_batches
from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib.chat import check_chat_format, prompt_messages, target_format
from stages.lib.packed import ATTENTION, onednn_linears, register_attention, score_traces
from stages.lib.sentences import (completion_mean, geometric_p, label_four, scored_end,
                                  sentence_means, split_sentences)

CLASSES = ("shared", "teacher", "student", "boosted", "unscored")
ROLES = ("teacher", "student", "distilled")


@dataclass
class AttributionConfig:
    """Knobs of the attribution stage (replicas and GPUs: `resources.attribution`).

    distilled: whose answers to analyse: a model name of evaluate's `models` ("sft", "kd",
      "redi", "opd", …) or a checkpoint path evaluate sampled; D is that model.
    teacher / student: T and the original S (the recipe's top-level teacher / student).
    alpha: "shared" margin: all three pairwise |p differences| <= alpha (set by hand in the
      paper; shared sentences differed by ~0.1 on average).
    beta: teacher / student margin on p_T - p_S (the paper's best: 0.1).
    max_length / tokens_per_row / chunk: as in provenance.
    trust_remote_code: let transformers run code shipped with the models (off by default).
    """

    distilled: str = "sft"
    teacher: str = ""
    student: str = ""
    alpha: float = 0.1
    beta: float = 0.1
    max_length: int = 4096
    tokens_per_row: int = 16384
    chunk: int = 1024
    trust_remote_code: bool = False


def score_batch(models: dict, batch, cfg: AttributionConfig, prompt_cfg: dict, template: str):
    """Pool actor's call: the samples + the attribution columns."""
    import pyarrow as pa

    texts = [t or "" for t in batch.column("completion").to_pylist()]
    ask = types.SimpleNamespace(**prompt_cfg)
    messages = [prompt_messages(p, ask) for p in batch.column("problem").to_pylist()]
    scored = {}
    for role in ROLES:
        model, tokenizer = models[role]
        fmt = target_format(tokenizer, role, template, prompt_cfg["prompt_format"],
                            prompt_cfg["reasoning_tags"], f"attribution.{role}")
        scored[role] = score_traces(model, tokenizer, messages, texts, fmt, cfg.max_length,
                                    cfg.tokens_per_row, cfg.chunk)
    rows = []
    for k, text in enumerate(texts):
        spans = split_sentences(text)
        p = {role: [geometric_p(m) for m in sentence_means(spans, scored[role][k]["offsets"],
                                                          scored[role][k]["logps"])]
             for role in ROLES}
        labels = [label_four(t, s, d, cfg.alpha, cfg.beta)
                  for t, s, d in zip(p["teacher"], p["student"], p["distilled"])]
        common = min(scored_end(scored[role][k], len(text)) for role in ROLES)
        n_teacher = labels.count("teacher")
        rows.append({
            "sentence_spans": [list(s) for s in spans], "sentence_labels": labels,
            **{f"sentence_p_{role}": p[role] for role in ROLES},
            "teacher_sentences": n_teacher,
            "teacher_share": n_teacher / len(spans) if spans else None,
            **{f"lp_{role}": completion_mean(scored[role][k], common) for role in ROLES},
            "provenance_truncated": any(scored[role][k]["truncated"] for role in ROLES)})
    types_ = [("sentence_spans", pa.list_(pa.list_(pa.int64()))),
              ("sentence_labels", pa.list_(pa.string()))]
    types_ += [(f"sentence_p_{role}", pa.list_(pa.float64())) for role in ROLES]
    types_ += [("teacher_sentences", pa.int64()), ("teacher_share", pa.float64())]
    types_ += [(f"lp_{role}", pa.float64()) for role in ROLES]
    types_ += [("provenance_truncated", pa.bool_())]
    for name, typ in types_:
        batch = batch.append_column(pa.field(name, typ), pa.array([r[name] for r in rows], typ))
    return batch


def shares(rows: list[dict]) -> dict:
    """Teacher-originated sentences among all sentences (pooled) and per answer (mean)."""
    labels = [label for r in rows for label in r["sentence_labels"]]
    per_answer = [r["teacher_share"] for r in rows if r["teacher_share"] is not None]
    return {"answers": len(rows), "sentences": len(labels),
            "teacher_share_pooled": round(labels.count("teacher") / len(labels), 4)
            if labels else None,
            "teacher_share_mean": round(sum(per_answer) / len(per_answer), 4)
            if per_answer else None,
            "classes": {c: labels.count(c) for c in CLASSES}}


def run(cfg: AttributionConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.data

    if cfg.alpha < 0 or cfg.beta < 0:
        raise UserError("attribution.alpha and attribution.beta must be >= 0")
    evaluate = inputs["evaluate"]
    samples = evaluate.read_table("samples")
    by_name = pc.equal(samples.column("model"), cfg.distilled)
    by_path = pc.equal(samples.column("model_path"), cfg.distilled)
    chosen = samples.filter(pc.or_(by_name, by_path))
    if chosen.num_rows == 0:
        names = sorted(set(samples.column("model").to_pylist()))
        raise UserError(f"attribution.distilled: '{cfg.distilled}' is not a model of "
                        f"{evaluate.ref()} (it sampled: {', '.join(names)})")
    distilled_path = chosen.column("model_path")[0].as_py()
    ev = evaluate.manifest["config"]
    prompt_cfg = {k: ev[k] for k in ("system_prompt", "problem_template", "chat_template",
                                     "prompt_format", "reasoning_tags")}
    template = ""
    for role, path in (("teacher", cfg.teacher), ("student", cfg.student),
                       ("distilled", distilled_path)):
        template = check_chat_format(path, prompt_cfg["chat_template"],
                                     prompt_cfg["prompt_format"], "attribution", role)

    ctx.ensure_ray()
    out = score_batches(ray.data.from_arrow(chosen),
                        models={"teacher": cfg.teacher, "student": cfg.student,
                                "distilled": distilled_path},
                        score_fn=functools.partial(score_batch, cfg=cfg, prompt_cfg=prompt_cfg,
                                                   template=template),
                        resources=ctx.resources, ctx=ctx, batch_size=256,
                        prepare=register_attention, cpu_model_hook=onednn_linears,
                        attn_implementation=ATTENTION, trust_remote_code=cfg.trust_remote_code)
    table = pa.concat_tables(list(out.iter_batches(batch_size=None, batch_format="pyarrow")))
    table = table.sort_by([("problem_id", "ascending"), ("sample_idx", "ascending")])
    light = table.select(["correct", "sentence_labels", "teacher_share",
                          "provenance_truncated"]).to_pylist()
    ctx.stats.update({
        "distilled": cfg.distilled, "distilled_path": distilled_path,
        "alpha": cfg.alpha, "beta": cfg.beta,
        "all": shares(light),
        "correct": shares([r for r in light if r["correct"] is True]),
        "incorrect": shares([r for r in light if r["correct"] is False]),
        "truncated": sum(r["provenance_truncated"] for r in light),
    })
    return table


STAGE = Stage(
    name="attribution",
    config=AttributionConfig,
    reads=("evaluate",),
    requires=("model", "model_path", "problem", "completion", "correct"),
    adds=("sentence_spans", "sentence_labels", "sentence_p_teacher", "sentence_p_student",
          "sentence_p_distilled", "teacher_sentences", "teacher_share", "lp_teacher",
          "lp_student", "lp_distilled", "provenance_truncated"),
    run=run,
)
