"""Stage `prompts` — ingest problems into `problem_id, problem, answer, source`.

Reads JSONL, JSON, CSV, TSV, Parquet or a `datasets.save_to_disk` folder, or makes synthetic
problems. Text formats may carry a UTF-8 (or UTF-16) byte-order mark and CRLF line ends.
Column mapping (`problem_field`, `answer_field`) lets OpenR1-Math / NuminaMath / GSM8K files load
unedited. Exact dedup on normalized text; optional n-gram decontamination against an eval file.

    distillery run prompts --recipe configs/tiny.yaml prompts.path=data/my.jsonl
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.stage import Stage
from stages.lib import ingest
from stages.lib.ingest import normalize, problem_id, read_records
from stages.lib.references import ANSWER_FROM, reference_answer
from stages.lib.synthetic import make_problems


@dataclass
class PromptsConfig:
    """Knobs of the ingest stage.

    path: a .jsonl/.json/.csv/.tsv/.parquet file, a `datasets.save_to_disk` folder, or
      "synthetic". Text files: UTF-8 (a byte-order mark and CRLF line ends are fine) or UTF-16
      with a byte-order mark.
    problem_field / answer_field: the input columns holding the problem text and the reference
      answer ("" = the input has no answers; verify then marks rows `no_reference`).
    answer_from: how the reference is read from answer_field's value —
      "auto": a GSM8K answer "...#### 2,125" is what follows "####" without thousands separators
        ("2125"); a value holding a \\boxed{} (a MATH / Minerva solution) is its last box's
        content; anything else is the value as it is;
      "last_boxed": the last \\boxed{} (or \\fbox{}) of the value (MATH's convention); a value
        without one has no answer (counted in the stats as `answer_not_found`);
      "field": the value as it is.
      A number is its text; a float with an integer value is the integer ("27.0" -> "27",
      AMC23's answers), so answers compare as the integers they are in every form.
    split: which split to take from a save_to_disk DatasetDict.
    source: value of the `source` column ("" = the file name, or "synthetic").
    limit: keep the first N problems after dedup (0 = all).
    dedup: drop exact duplicates of the normalized text (whitespace collapsed, ends stripped).
    decontaminate: an eval file (same formats, same problem_field); problems sharing any
      word n-gram of length `decontaminate_ngram` with it are dropped ("contaminated").
    synthetic_*: the built-in generator (stages/lib/synthetic.py): count, seed, terms per problem,
      largest operand.
    import_format: "" = `path` is a table of problems (problem_field / answer_field); else it is
      a trace file (docs/import.md) whose problems and answers are read, streamed: "auto" (the
      layout read off the first row) or "openr1" | "sharegpt" | "messages" | "flat". A
      generate with `backend: import` and no import_path of its own then imports the traces of
      the same file, read with these same settings (configs/import.yaml).
    import_fields: a trace file's field renames, logical field -> name or dotted path
      ({answer: ground_truth}, {correct_llama: correctness.llama_verification}).
    import_keep / import_drop: rows of a trace file kept only when a field (a name or dotted
      path) equals one of the values ({problem_is_valid: ["yes", "Yes"]}, quoted: a bare yes is
      YAML for true) / dropped when it does ({source: cn_k12}); counted by reason. The source
      column is the row's `source` when it has one, else the file name.
    """

    path: str = "synthetic"
    problem_field: str = "problem"
    answer_field: str = "answer"
    answer_from: str = "auto"
    split: str = "train"
    source: str = ""
    limit: int = 0
    dedup: bool = True
    decontaminate: str = ""
    decontaminate_ngram: int = 8
    synthetic_n: int = 64
    synthetic_seed: int = 0
    synthetic_min_terms: int = 2
    synthetic_max_terms: int = 4
    synthetic_max_operand: int = 99
    import_format: str = ""
    import_fields: dict = field(default_factory=dict)
    import_keep: dict = field(default_factory=dict)
    import_drop: dict = field(default_factory=dict)




def _ngrams(text: str, n: int) -> set:
    words = normalize(text).lower().split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def load_problems(cfg: PromptsConfig) -> tuple[list[dict], dict, dict]:
    """Rows in `problem_id, problem, answer, source` form, drop counts by reason, and stats
    (`answer_not_found`: kept rows whose answer field has a value but no answer in it)."""
    drops: dict[str, int] = {}
    if cfg.answer_from not in ANSWER_FROM:
        raise UserError(f"prompts.answer_from: '{cfg.answer_from}' is not one of {ANSWER_FROM}")
    if cfg.path == "synthetic":
        made = make_problems(cfg.synthetic_n, seed=cfg.synthetic_seed,
                             min_terms=cfg.synthetic_min_terms, max_terms=cfg.synthetic_max_terms,
                             max_operand=cfg.synthetic_max_operand)
        records = [(f"synthetic: row {i}", r) for i, r in enumerate(made)]
        source = cfg.source or "synthetic"
        problem_field, answer_field = "problem", "answer"
    elif cfg.import_format:
        records, filtered = _trace_file_problems(cfg)
        drops.update(filtered)
        source = cfg.source or os.path.basename(cfg.path.rstrip("/"))
        problem_field, answer_field = "problem", "answer"
    else:
        records = read_records(cfg.path, cfg.split)
        source = cfg.source or os.path.basename(cfg.path.rstrip("/"))
        problem_field, answer_field = cfg.problem_field, cfg.answer_field
    if not records:
        kept_none = f" left (dropped: {drops})" if drops else ""
        raise UserError(f"{cfg.path}: no rows{kept_none}")

    contaminated: set = set()
    if cfg.decontaminate:
        for where, rec in read_records(cfg.decontaminate):
            text = rec.get(problem_field)
            if isinstance(text, str):
                contaminated |= _ngrams(text, cfg.decontaminate_ngram)

    rows, seen, not_found = [], set(), 0
    for where, rec in records:
        if problem_field not in rec:
            raise UserError(f"{where}: no field '{problem_field}' (fields: {sorted(rec)}); "
                            "set prompts.problem_field")
        text = rec[problem_field]
        if not isinstance(text, str):
            raise UserError(f"{where}: field '{problem_field}': expected text, "
                            f"got {type(text).__name__}")
        if answer_field and answer_field not in rec:
            raise UserError(f"{where}: no field '{answer_field}' (fields: {sorted(rec)}); "
                            "set prompts.answer_field, or prompts.answer_field='' for none")
        answer = (reference_answer(rec[answer_field], where, answer_field, cfg.answer_from)
                  if answer_field else None)
        norm = normalize(text)
        if not norm:
            drops["empty_problem"] = drops.get("empty_problem", 0) + 1
            continue
        if cfg.dedup and norm in seen:
            drops["duplicate"] = drops.get("duplicate", 0) + 1
            continue
        if contaminated and _ngrams(norm, cfg.decontaminate_ngram) & contaminated:
            drops["contaminated"] = drops.get("contaminated", 0) + 1
            continue
        seen.add(norm)
        if answer is None and answer_field and rec[answer_field] not in (None, ""):
            not_found += 1  # e.g. answer_from=last_boxed on a solution without a box
        rows.append({"problem_id": problem_id(norm), "problem": norm, "answer": answer,
                     "source": (cfg.source or rec.get("source") or source) if cfg.import_format
                     else source})
    if not rows:  # every row dropped: a version of zero problems would only fail downstream
        raise UserError(f"{cfg.path}: no problems left of {len(records)} rows "
                        f"(dropped: {drops}); field '{problem_field}'")
    if cfg.limit:
        if len(rows) > cfg.limit:
            drops["over_limit"] = len(rows) - cfg.limit
        rows = rows[:cfg.limit]
    return rows, drops, {"answer_not_found": not_found}


def _trace_file_problems(cfg: PromptsConfig) -> tuple[list[tuple[str, dict]], dict]:
    """[(where, {problem, answer, source})] of a trace file's rows that pass import_keep /
    import_drop, and the rows filtered out by reason. Streamed: only the columns the problems
    and the filters need are read (Parquet, Arrow), one batch at a time."""
    spec = ingest.Spec(path=cfg.path, format=cfg.import_format, fields=dict(cfg.import_fields),
                       keep=dict(cfg.import_keep), drop=dict(cfg.import_drop), split=cfg.split)
    spec.check()
    source = ingest.open_source(cfg.path, cfg.split)
    check = ingest.LayoutCheck(spec, cfg.path)
    records, drops = [], collections.Counter()
    columns = ingest.columns_for(spec, {"problem", "answer", "source", "system"})
    for batch in ingest.iter_rows(source, columns=columns):
        for where, record in batch:
            layout = check(record, where)
            reason = ingest.passes(record, spec)
            if reason:
                drops[reason] += 1
                continue
            problem, answer, row_source = ingest.problem_of(record, layout, spec, where)
            records.append((where, {"problem": problem, "answer": answer, "source": row_source}))
    return records, dict(drops)


def run(cfg: PromptsConfig, inputs, ctx):
    import pyarrow as pa

    rows, drops, stats = load_problems(cfg)
    ctx.drops.update(drops)
    ctx.rows_in = len(rows) + sum(drops.values())
    schema = pa.schema([("problem_id", pa.string()), ("problem", pa.string()),
                        ("answer", pa.string()), ("source", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    ctx.stats["problems"] = len(rows)
    ctx.stats["with_answer"] = sum(r["answer"] is not None for r in rows)
    ctx.stats.update(stats)
    return table


STAGE = Stage(
    name="prompts",
    config=PromptsConfig,
    reads=(),
    requires=(),
    adds=("problem_id", "problem", "answer", "source"),
    run=run,
)
