"""Stage `distributions` — the teacher's top-k next-token distribution at every completion
position of select's SFT rows, captured once for logit-level distillation (stage kd;
docs/methods.md, "Logit-level distillation"; docs/kd.md).

    distillery run distributions --recipe configs/tiny.yaml distributions.k=32

The positions are exactly the tokens sft trains on: each SFT row becomes the student's text as
sft builds it (stages/lib/chat.py target_texts with the STUDENT's template; stages/lib/packed.py
encode + fit_length with the same max_length / overlong), and the teacher reads those same
student tokens. So teacher and student must tokenize that text alike: both tokenizers encode
every row in the driver, and any row where they differ is a UserError naming both models before
any work (cross-tokenizer distillation is not supported). Rows sft would drop (prompt over
max_length, or overlong=drop) are dropped here too, counted by the same reasons.

Per row, besides select's columns (problem_id, trace_id, messages, difficulty, source):
  completion_ids  list<int32>           the student-form completion tokens the positions predict
  topk_ids        list<list<int32>>     [position][k] teacher's top-k ids, most probable first
  topk_logps      list<list<float16>>   their raw log-probs (temperature 1, full softmax)
  token_logp      list<float16>         the teacher's log-prob of completion_ids[position]
  tail_mass       list<float16>         1 - sum of the k probabilities (summed in fp32)
  padded_dropped  int32                 top-k entries the teacher spent on ids >= the student's
                                        vocabulary (dropped; see stages/lib/topk.py)
  padded_mass_max float32               the most probability a position put on those ids
Storage: int32 id + fp16 log-prob = 6 B an entry (k=32: 192 B) + 8 B a token (token_logp and
tail_mass in fp16, the completion id in int32) = 200 B/token raw; the manifest also has
Parquet's compressed size. Every stored probability is fp16: kd reads only the top-k (it derives
the tail from them in fp32), so token_logp and tail_mass are for inspection and stats.

Compute: the teacher on the scoring pool (cluster/scoring.py, `resources.distributions`), rows
packed padding-free (stages/lib/packed.py packed_row), the LM head `chunk` positions at a time
with torch.topk per chunk (stages/lib/topk.py): never [K, vocab] logits of a whole row.

Reuse (docs/kd.md, "Reusing provenance's teacher forward"): when select's input is a provenance
version that kept the teacher's top-k (provenance.topk = k, the same teacher, the same vocabulary
support and compute dtype), each SFT row whose tokens are exactly the ones provenance's teacher
scored (same ids, same prompt length: true when teacher and student share tokenizer and chat
template) takes its capture from provenance's side dataset instead of a second teacher forward;
every other row is scored on the pool. Either way the stored row is the same (the same function
on the same tokens, topk.capture_arrays). The manifest's stats count rows_reused_from_provenance
and rows_scored (and say why nothing was reused, when nothing was: provenance_reuse).

Resume: rows sorted by (problem_id, trace_id), cut into shards of shard_size; each captured shard
is written atomically as the version's part-NNNNN.parquet (pipeline/shards.py); a rerun after a
crash or kill -9 captures only the missing shards, and every row is there once.
"""
from __future__ import annotations

import functools
import posixpath
import time
from dataclasses import dataclass

from cluster.scoring import score_batches
from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.shards import Shards, tagged
from pipeline.stage import Stage
from pipeline.store import Store
from stages.lib.chat import check_chat_format, load_tokenizer, target_format, target_texts
from stages.lib.models import check_model
from stages.lib.packed import ATTENTION, encode, fit_length, onednn_linears, register_attention
from stages.lib.topk import (bytes_per_token, capture_arrays, capture_fields, packed_topk,
                             vocab_size)

OVERLONG = ("truncate", "drop")
# What the stage writes per row (the kd stage reads exactly these).
CAPTURE_COLUMNS = ("completion_ids", "topk_ids", "topk_logps", "token_logp", "tail_mass")
PROMPT_IDS = "_prompt_ids"  # in flight only: the student-form prompt tokens of each row
PROVENANCE_TOPK = ".teacher_topk"  # provenance's side dataset (stages/provenance.py TOPK_DIR)


@dataclass
class DistributionsConfig:
    """Knobs of the distributions stage (replicas and GPUs: `resources.distributions`).

    teacher / student: the models (filled from the recipe's top-level teacher / student). The
      text is the student's (its chat template, its target form); the teacher must tokenize it
      to the same ids, and its top-k is taken over the student's vocabulary (config.vocab_size;
      a teacher's padded rows beyond it are dropped and the rest renormalised).
    k: entries kept per position (6 B each: k=32 is 192 B/token); at most the vocabulary size.
    max_length / overlong: as sft's (same defaults): prompt + completion tokens of a row, and
      what a longer one does: "truncate" (positions cut at max_length; counted in
      stats.truncated) or "drop" (drops.over_max_length). A prompt that alone fills max_length
      is dropped (drops.prompt_over_max_length). Use the values sft and kd use.
    tokens_per_row: capacity of one packed teacher forward (>= the longest row: a longer row
      gets a forward of its own).
    chunk: positions per LM-head call (1,024 x 152k vocab x 4 B = 0.62 GB of fp32 logits).
    shard_size: rows per shard, the unit of resume and of one actor call.
    chat_template / prompt_format / reasoning_tags: as sft's: how a conversation becomes the
      student's training text (stages/lib/chat.py; "" / "chat" = the student's own template).
    trust_remote_code: let transformers run code shipped with the teacher (off by default).
    """

    teacher: str = ""
    student: str = ""
    k: int = 32
    max_length: int = 4096
    overlong: str = "truncate"
    tokens_per_row: int = 16384
    chunk: int = 1024
    shard_size: int = 256
    chat_template: str = ""
    prompt_format: str = "chat"
    reasoning_tags: str = "think"
    trust_remote_code: bool = False


def check_config(cfg: DistributionsConfig) -> tuple[str, int, int]:
    """Refuse bad settings before Ray starts. Returns (the chat template text, "" = the
    student's own; the student's vocabulary size; the teacher's)."""

    if cfg.overlong not in OVERLONG:
        raise UserError(f"distributions.overlong: '{cfg.overlong}' (use 'truncate' or 'drop')")
    if cfg.max_length < 2:
        raise UserError(f"distributions.max_length: must be >= 2, got {cfg.max_length}")
    for key in ("shard_size", "chunk", "tokens_per_row", "k"):
        if getattr(cfg, key) < 1:
            raise UserError(f"distributions.{key}: must be >= 1, got {getattr(cfg, key)}")
    check_model(cfg.teacher, "distributions.teacher")
    template = check_chat_format(cfg.student, cfg.chat_template, cfg.prompt_format,
                                 "distributions", "student")
    student_vocab = vocab_size(cfg.student, "distributions.student")
    teacher_vocab = vocab_size(cfg.teacher, "distributions.teacher", cfg.trust_remote_code)
    support = min(student_vocab, teacher_vocab)
    if cfg.k > support:
        raise UserError(f"distributions.k: {cfg.k} is larger than the vocabulary ({support} ids: "
                        f"student {student_vocab}, teacher {teacher_vocab}); use k <= {support}")
    return template, student_vocab, teacher_vocab


def student_form(cfg: DistributionsConfig, template: str, messages: list, trace_ids: list,
                 where: str):
    """Per SFT row, sft's (ids, n_prompt, outcome) of the student's text (encode + fit_length),
    after checking that the teacher's tokenizer gives the same ids for that text. Driver-side,
    before any work: a mismatch is a UserError naming both models."""

    student = load_tokenizer(cfg.student, "distributions.student")
    teacher = load_tokenizer(cfg.teacher, "distributions.teacher")
    fmt = target_format(student, cfg.student, template, cfg.prompt_format, cfg.reasoning_tags,
                        "distributions.student")
    out = []
    for i, (conversation, tid) in enumerate(zip(messages, trace_ids)):
        if not conversation or conversation[-1]["role"] != "assistant":
            raise UserError(f"distributions: {where} row {i}: the last message must be the "
                            "assistant's answer")
        prompt, trace = conversation[:-1], conversation[-1]["content"]
        ids_s = encode(student, prompt, trace, fmt)
        prompt_text, target, _ = target_texts(student, prompt, trace, fmt)
        ids_t = (teacher(prompt_text, add_special_tokens=False)["input_ids"],
                 teacher(target, add_special_tokens=False)["input_ids"])
        if ids_s != ids_t:
            s, t = ids_s[0] + ids_s[1], ids_t[0] + ids_t[1]
            at = next((j for j, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
            raise UserError(
                f"distributions: cross-tokenizer distillation is not supported: teacher "
                f"{cfg.teacher} and student {cfg.student} tokenize {where} row {i} (trace_id "
                f"{tid}) differently (first difference at token {at} of the student's text: "
                f"{len(s)} student vs {len(t)} teacher tokens); use a teacher that shares the "
                "student's tokenizer")
        out.append(fit_length(*ids_s, cfg.max_length, cfg.overlong))
    return out


# --- capture: one batch of rows in a pool actor ------------------------------------------------

def capture_batch(models: dict, batch, cfg: DistributionsConfig, vocab: int):
    """Pool actor's call: the batch (pyarrow, with the in-flight prompt ids) -> the batch with
    the capture columns (topk.capture_fields), the prompt ids dropped."""
    model, _ = models["teacher"]
    prompts = batch.column(PROMPT_IDS).to_pylist()
    completions = batch.column("completion_ids").to_pylist()
    seqs = [(p + c, len(p)) for p, c in zip(prompts, completions)]
    got = packed_topk(model, seqs, cfg.k, vocab, cfg.tokens_per_row, cfg.chunk)
    batch = batch.drop([PROMPT_IDS])
    for name, value in capture_arrays(got, cfg.k).items():
        batch = batch.append_column(name, value)
    return batch


# --- reuse: provenance's teacher forward ------------------------------------------------------

def provenance_topk(store, source, cfg: DistributionsConfig, support: int, dtype: str):
    """(the provenance version select read, when its teacher top-k can stand in for this
    capture, else None; why not, "" when it can)."""
    ref = (source.manifest.get("inputs") or {}).get("provenance")
    if not ref:
        return None, f"{source.ref()} was not made from a provenance version"
    prov = store.find("provenance", ref)
    if prov is None:
        return None, f"provenance@{ref}, select's input, is not under {store.url}"
    config, stats = prov.manifest.get("config") or {}, prov.manifest.get("stats") or {}
    have = stats.get("topk") or 0
    checks = [
        (config.get("method") == "score",
         f"{prov.ref()} has provenance.method {config.get('method')!r}: no teacher forward"),
        (have == cfg.k, f"{prov.ref()} kept provenance.topk={have}, distributions.k is {cfg.k}"),
        (config.get("teacher") == cfg.teacher,
         f"{prov.ref()}'s teacher is {config.get('teacher')}, not {cfg.teacher}"),
        (stats.get("topk_vocab") == support,
         f"{prov.ref()}'s top-k is over {stats.get('topk_vocab')} ids, this capture's over "
         f"{support}"),
        (stats.get("topk_dtype") == dtype,
         f"{prov.ref()}'s teacher ran in {stats.get('topk_dtype')}, this pool runs {dtype}")]
    for ok, why in checks:
        if not ok:
            return None, why
    return prov, ""


def reuse_plan(prov, trace_ids: list, prompt_ids: list, completion_ids: list) -> dict:
    """{trace_id: provenance side part} of the rows whose student-form tokens (prompt +
    completion, prompt length) are exactly the tokens provenance's teacher scored. Reads only
    the token columns, one part at a time."""
    import pyarrow.parquet as pq

    want = {t: i for i, t in enumerate(trace_ids)}
    plan = {}
    for path in sorted(prov.fs.glob(posixpath.join(prov.path, PROVENANCE_TOPK,
                                                   "part-*.parquet"))):
        with prov.fs.open(path, "rb") as f:
            part = pq.read_table(f, columns=["trace_id", "teacher_ids", "teacher_prompt_len"])
        for t, ids, n in zip(*(part.column(c).to_pylist() for c in part.column_names)):
            i = want.get(t)
            if i is not None and n == len(prompt_ids[i]) and \
                    ids == prompt_ids[i] + completion_ids[i]:
                plan[t] = path
    return plan


def reused_rows(fs, rows, plan: dict):
    """`rows` (a shard's reused rows, with the in-flight prompt ids) with the capture columns
    read from provenance's side parts, in capture_fields' types: what capture_batch would have
    made of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = rows.column("trace_id").to_pylist()
    names = [name for name, _ in capture_fields()]
    parts = []
    for path in sorted({plan[t] for t in ids}):
        with fs.open(path, "rb") as f:
            parts.append(pq.read_table(f, columns=["trace_id", *names],
                                       filters=[("trace_id", "in",
                                                 [t for t in ids if plan[t] == path])]))
    found = pa.concat_tables(parts)
    at = {t: i for i, t in enumerate(found.column("trace_id").to_pylist())}
    found = found.take(pa.array([at[t] for t in ids], pa.int64()))
    rows = rows.drop([PROMPT_IDS])
    for name, typ in capture_fields():
        # Parquet gives its lists back with "element" item names: the pool's are Arrow's "item"
        rows = rows.append_column(pa.field(name, typ), found.column(name).cast(typ))
    return rows


# --- the stage --------------------------------------------------------------------------------

def run(cfg: DistributionsConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.compute as pc

    template, student_vocab, teacher_vocab = check_config(cfg)
    source = inputs["select"]
    table = source.read_table("sft").sort_by([("problem_id", "ascending"),
                                              ("trace_id", "ascending")])
    if not table.num_rows:
        raise UserError(f"distributions: {source.ref()} has no SFT rows (split 'sft' is empty)")
    where = f"{source.ref()} split 'sft'"
    fitted = student_form(cfg, template, table.column("messages").to_pylist(),
                          table.column("trace_id").to_pylist(), where)
    keep, prompt_ids, completion_ids, truncated = [], [], [], 0
    for ids, n_prompt, outcome in fitted:
        keep.append(ids is not None)
        if ids is None:
            ctx.drops[outcome] += 1
            continue
        truncated += outcome == "truncated"
        prompt_ids.append(ids[:n_prompt])
        completion_ids.append(ids[n_prompt:])
    if not any(keep):
        raise UserError(f"distributions: every one of the {table.num_rows} SFT rows was dropped "
                        f"({dict(ctx.drops)}); raise distributions.max_length or use "
                        "distributions.overlong=truncate")
    support = min(student_vocab, teacher_vocab)
    top = max(max(p + c) for p, c in zip(prompt_ids, completion_ids))
    if top >= support:
        raise UserError(f"distributions: {where} has token id {top}, outside the models' "
                        f"vocabulary ({support} ids: student {student_vocab}, teacher "
                        f"{teacher_vocab})")
    table = table.filter(pa.array(keep))
    table = table.append_column(PROMPT_IDS, pa.array(prompt_ids, pa.list_(pa.int32())))
    table = table.append_column("completion_ids", pa.array(completion_ids, pa.list_(pa.int32())))
    shards = [table.slice(start, cfg.shard_size)
              for start in range(0, table.num_rows, cfg.shard_size)]
    store = Store(ctx.data_root)
    # Which rows provenance's teacher forward already captured: decided for every row on every
    # run (a few token columns read), so the counts cover the whole version after a resume.
    dtype = "bfloat16" if ctx.resources.gpus_per_replica else "float32"
    prov, why_not = provenance_topk(store, source, cfg, support, dtype)
    plan = reuse_plan(prov, table.column("trace_id").to_pylist(), prompt_ids,
                      completion_ids) if prov is not None else {}
    shards = [table.slice(start, cfg.shard_size)
              for start in range(0, table.num_rows, cfg.shard_size)]
    out = Shards(store.fs, ctx.out_dir)
    todo = out.todo(len(shards))
    print(f"distributions: {table.num_rows} SFT rows in {len(shards)} shards of "
          f"{cfg.shard_size}; {len(shards) - len(todo)} already captured, {len(todo)} to "
          f"capture; k={cfg.k}: {bytes_per_token(cfg.k)} B/token raw", flush=True)
    print(f"distributions: {len(plan)} rows reused from "
          f"{prov.ref() if prov is not None else 'provenance'}'s teacher forward, "
          f"{table.num_rows - len(plan)} scored by the teacher here"
          + (f" (no reuse: {why_not})" if why_not else ""), flush=True)

    started, new_positions, scored_now, reused_now = time.time(), 0, 0, 0
    if todo:
        progress = Progress("distributions", total=table.num_rows, unit="rows", errors=False,
                            tokens_label="positions/s",
                            done=table.num_rows - sum(shards[k].num_rows for k in todo))

        def finish(k, parts):
            nonlocal new_positions
            done = pa.concat_tables(parts)
            out.write(k, done.sort_by([("problem_id", "ascending"), ("trace_id", "ascending")]))
            positions = sum(len(c) for c in done.column("completion_ids").to_pylist())
            new_positions += positions
            progress.update(done.num_rows, tokens=positions)

        mine, rest = {}, {}
        for k in todo:
            hit = pa.array([t in plan for t in shards[k].column("trace_id").to_pylist()])
            mine[k], rest[k] = shards[k].filter(hit), shards[k].filter(pc.invert(hit))
        reused_now = sum(t.num_rows for t in mine.values())
        for k in todo:  # shards provenance captured whole: no teacher, no Ray
            if not rest[k].num_rows:
                finish(k, [reused_rows(store.fs, mine[k], plan)])
        pending = {k: t for k, t in rest.items() if t.num_rows}
        scored_now = sum(t.num_rows for t in pending.values())
        if pending:

            import ray.data

            ctx.ensure_ray()
            captured = score_batches(
                ray.data.from_arrow(tagged(pending)),
                models={"teacher": cfg.teacher},
                score_fn=functools.partial(capture_batch, cfg=cfg, vocab=support),
                resources=ctx.resources, ctx=ctx, batch_size=cfg.shard_size,
                prepare=register_attention, cpu_model_hook=onednn_linears,
                attn_implementation=ATTENTION, trust_remote_code=cfg.trust_remote_code)
            for k, done in out.gather(captured, {k: t.num_rows for k, t in pending.items()},
                                      "distributions"):
                parts = [done]
                if mine[k].num_rows:
                    parts.append(reused_rows(store.fs, mine[k], plan))
                finish(k, parts)
        progress.close()
    capture_s = time.time() - started
    stats = _stats(store, [out.path(k) for k in range(len(shards))], cfg)
    stats.update(truncated=truncated, student_vocab=student_vocab, teacher_vocab=teacher_vocab,
                 shards=len(shards), shards_captured_this_run=len(todo),
                 positions_this_run=new_positions,
                 # this run's positions over its wall time (actor start, model load included)
                 positions_per_s=round(new_positions / capture_s, 1) if todo else None,
                 rows_reused_from_provenance=len(plan), rows_scored=table.num_rows - len(plan),
                 rows_reused_this_run=reused_now, rows_scored_this_run=scored_now,
                 provenance_reuse=prov.ref() if prov is not None else f"none: {why_not}")
    print(f"distributions: {stats['rows']} rows, {stats['positions']} positions, k={cfg.k}: "
          f"{stats['bytes_per_token_raw']} B/token raw, {stats['bytes_per_token_parquet']} "
          f"B/token in Parquet; {stats['padded_dropped']} padded-id entries dropped; "
          f"{len(plan)} rows reused from provenance, {table.num_rows - len(plan)} scored",
          flush=True)
    ctx.stats.update(stats)
    return None


def _stats(store, paths: list, cfg: DistributionsConfig) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = positions = dropped = 0
    on_disk, mass_max, tail_sum = 0, 0.0, 0.0
    for path in paths:
        with store.fs.open(path, "rb") as f:
            meta = pq.read_metadata(f)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in CAPTURE_COLUMNS:
                    on_disk += column.total_compressed_size
        t = pq.read_table(path, filesystem=store.arrow_fs(),
                          columns=["tail_mass", "padded_dropped", "padded_mass_max"])
        rows += t.num_rows
        # Arrow has no sum kernel for halffloat: widen first
        tails = pc.cast(pc.list_flatten(t.column("tail_mass")), pa.float64())
        positions += len(tails)
        tail_sum += pc.sum(tails).as_py() or 0.0
        dropped += pc.sum(t.column("padded_dropped")).as_py() or 0
        mass_max = max(mass_max, pc.max(t.column("padded_mass_max")).as_py() or 0.0)
    return {"rows": rows, "positions": positions, "k": cfg.k,
            "bytes_per_token_raw": bytes_per_token(cfg.k),
            "bytes_per_token_parquet": round(on_disk / positions, 1) if positions else None,
            "tail_mass_mean": round(tail_sum / positions, 6) if positions else None,
            "padded_dropped": dropped, "padded_mass_max": mass_max}


STAGE = Stage(
    name="distributions",
    config=DistributionsConfig,
    reads=("select",),
    requires=("problem_id", "trace_id", "messages"),
    adds=CAPTURE_COLUMNS,
    run=run,
    resumable=True,
)
