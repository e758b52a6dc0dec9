"""Reading trace files someone else wrote: OpenR1-Math, ShareGPT, OpenAI messages, flat rows.

Shared by `prompts` (the problems and answers of a trace file: `prompts.import_format`) and
`generate` (`backend: import`: the traces themselves). Both stream the file: rows are read in
batches (JSON lines one line at a time, Parquet and Arrow one record batch at a time), so memory
is bounded by a batch, not by the file. docs/import.md describes each layout and its fields.

Files: `.jsonl`, `.json` (a list, or {"data": [...]}; read whole: use JSON lines or Parquet for
big files), `.parquet`, a folder of Parquet shards (a hub dataset on disk: `data/train-*.parquet`),
a `datasets.save_to_disk` folder (its Arrow files, read directly).

Layouts (`import_format`: auto | openr1 | sharegpt | messages | flat), each a set of logical
fields with the names they have in the published sets (`LAYOUTS`); `import_fields` renames any of
them, a dotted path reaching into structs and lists (`correctness.llama_verification`,
`messages.0.info.reference_answer`). `auto` reads the layout off the first row (the field that
marks it: `generations`, `conversations`, `messages`, `completion`), and every other row must
have the same one.

Errors (UserError, exit 2) name the file, the row (or line) and the field; nothing here writes.
"""
from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.textfile import read_text
from stages.lib.chat import REASONING_TAGS, trace_text

FORMATS = ("auto", "openr1", "sharegpt", "messages", "flat")

# Per layout: logical field -> the names it is looked up under, first found wins. The first
# field of each layout is its marker (what `auto` detects it by) and is required; the rest are
# optional unless `import_fields` names them (then every row must have them).
LAYOUTS = {
    "openr1": {
        "generations": ["generations"],
        "problem": ["problem"],
        "answer": ["answer"],
        # OpenR1-Math-220k names / OpenR1-Math-Raw's `correctness` struct.
        "correct_math_verify": ["correctness_math_verify", "correctness.math_verify_answer"],
        "correct_llama": ["correctness_llama", "correctness.llama_verification"],
        "reasoning_complete": ["is_reasoning_complete"],
        "finish_reasons": ["finish_reasons"],
        "messages": ["messages"],
        "source": ["source"],
        "teacher": ["teacher", "model"],
    },
    "sharegpt": {
        "conversations": ["conversations"],
        "system": ["system"],
        "answer": ["answer", "reference_answer", "ground_truth"],
        "source": ["source"],
        "teacher": ["teacher", "model"],
    },
    "messages": {
        "messages": ["messages"],
        "answer": ["answer", "reference_answer", "ground_truth",
                   "messages.0.info.reference_answer"],          # AM-*-Distilled
        "source": ["source"],
        "teacher": ["teacher", "model"],
    },
    "flat": {
        "completion": ["completion"],
        "problem": ["problem"],
        "answer": ["answer"],
        "reasoning_content": ["reasoning_content"],
        "finish_reason": ["finish_reason"],
        "system": ["system"],
        "source": ["source"],
        "teacher": ["teacher", "model"],
    },
}
# Detection order: an OpenR1 row has `messages` too, so `generations` is looked at first.
DETECT_ORDER = ("openr1", "sharegpt", "messages", "flat")
# The source's own verdicts, kept as generate columns (verify reports its agreement with each).
VERDICTS = {"correct_math_verify": "source_correct_math_verify",
            "correct_llama": "source_correct_llama"}

_USER = {"user", "human"}
_ASSISTANT = {"assistant", "gpt", "model", "bot", "chatgpt"}


# --------------------------------------------------------------------------- problem identity

def normalize(text: str) -> str:
    """A problem's text with whitespace collapsed and ends stripped: what its id hashes."""
    return re.sub(r"\s+", " ", text).strip()


def problem_id(text: str) -> str:
    return hashlib.sha256(normalize(text).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the settings

@dataclass(frozen=True)
class Spec:
    """What to read and how: the `import_*` settings of prompts (or of generate)."""

    path: str
    format: str = "auto"                     # auto | openr1 | sharegpt | messages | flat
    fields: dict = field(default_factory=dict)   # logical field -> dotted path in the file
    keep: dict = field(default_factory=dict)     # path -> value | [values]: keep rows equal to one
    drop: dict = field(default_factory=dict)     # path -> value | [values]: drop rows equal to one
    split: str = "train"
    where: str = "prompts"                   # the config section, for messages

    def check(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"{self.where}.import_format: '{self.format}' is not one of "
                            f"{list(FORMATS)}")
        known = sorted({name for names in LAYOUTS.values() for name in names})
        for key, value in self.fields.items():
            if key not in known:
                raise UserError(f"{self.where}.import_fields: unknown field '{key}' "
                                f"(fields: {', '.join(known)})")
            if not isinstance(value, str) or not value:
                raise UserError(f"{self.where}.import_fields.{key}: expected a field name or "
                                f"dotted path, got {value!r}")
        for name, rules in (("import_keep", self.keep), ("import_drop", self.drop)):
            for key, value in rules.items():
                if isinstance(value, (dict,)) or (isinstance(value, list) and
                                                  any(isinstance(v, (dict, list)) for v in value)):
                    raise UserError(f"{self.where}.{name}.{key}: expected a value or a list of "
                                    f"values, got {value!r}")


def names_for(layout: str, logical: str, spec: Spec) -> list[str]:
    if logical in spec.fields:
        return [spec.fields[logical]]
    return LAYOUTS[layout].get(logical, [])


def lookup(record, path: str):
    """The value at a dotted path (dict keys, list indices); a key holding a dot is tried whole
    first. None when absent."""
    if isinstance(record, dict) and path in record:
        return record[path]
    node = record
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit():
            node = node[int(part)] if int(part) < len(node) else None
        else:
            return None
        if node is None:
            return None
    return node


def _get(record, layout: str, logical: str, spec: Spec, where: str, required: bool = False):
    """(value, the name it was found under); a field named in import_fields must be there."""
    names = names_for(layout, logical, spec)
    for name in names:
        value = lookup(record, name)
        if value is not None:
            return value, name
    if required or logical in spec.fields:
        fields = sorted(record) if isinstance(record, dict) else []
        hint = f"import_fields.{logical}" if logical in spec.fields else f"{spec.where}.import_fields"
        raise UserError(f"{where}: no field '{names[0] if names else logical}' ({layout} layout; "
                        f"fields: {fields}); set {hint}")
    return None, names[0] if names else logical


def detect(record, spec: Spec) -> str | None:
    for layout in DETECT_ORDER:
        marker = next(iter(LAYOUTS[layout]))
        if any(lookup(record, n) is not None for n in names_for(layout, marker, spec)):
            return layout
    return None


class LayoutCheck:
    """The layout of every row: the named one, or the first row's under `auto`; a row of
    another layout (a file mixing layouts) or of none is a UserError naming it."""

    def __init__(self, spec: Spec, path: str):
        self.spec, self.path, self.layout = spec, path, None
        self.first = None
        if spec.format != "auto":
            self.layout = spec.format

    def __call__(self, record, where: str) -> str:
        found = detect(record, self.spec)
        if self.spec.format != "auto":
            marker = next(iter(LAYOUTS[self.layout]))
            if not any(lookup(record, n) is not None
                       for n in names_for(self.layout, marker, self.spec)):
                raise UserError(f"{where}: no field '{names_for(self.layout, marker, self.spec)[0]}'"
                                f" for import_format {self.layout} (fields: "
                                f"{sorted(record) if isinstance(record, dict) else []}"
                                f"{'; it looks like ' + found if found else ''})")
            return self.layout
        if found is None:
            raise UserError(
                f"{where}: unknown layout: none of the fields that mark a trace layout "
                f"(generations: openr1, conversations: sharegpt, messages: messages, completion: "
                f"flat) is in the row (fields: {sorted(record) if isinstance(record, dict) else []});"
                " set import_format and import_fields")
        if self.layout is None:
            self.layout, self.first = found, where
        elif found != self.layout:
            raise UserError(f"{where}: field '{next(iter(LAYOUTS[found]))}': the file mixes "
                            f"layouts: this row is {found}, {self.first} was {self.layout}")
        return self.layout


def passes(record, spec: Spec) -> str | None:
    """None when the row is kept by import_keep / import_drop, else the drop reason."""
    for path, allowed in spec.keep.items():
        values = allowed if isinstance(allowed, list) else [allowed]
        if lookup(record, path) not in values:
            return f"{path} not in {values}"
    for path, banned in spec.drop.items():
        values = banned if isinstance(banned, list) else [banned]
        value = lookup(record, path)
        if value in values:
            return f"{path}={value}"
    return None


def filter_columns(spec: Spec) -> set[str]:
    return {path.split(".")[0] for path in (*spec.keep, *spec.drop)}


# --------------------------------------------------------------------------- files

@dataclass(frozen=True)
class Source:
    path: str
    files: tuple[str, ...]
    kind: str             # jsonl | json | parquet | arrow


def open_source(path: str, split: str = "train", where: str = "prompts.path") -> Source:
    """The files a path stands for. A folder: a save_to_disk dataset (its split), else every
    Parquet file under it (the split's files when their names say which: train-*.parquet)."""
    if not path:
        raise UserError(f"{where}: no trace file given")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
                splits = json.load(f).get("splits", [])
            if split not in splits:
                raise UserError(f"{path}: no split '{split}' (splits: {splits}); set "
                                f"{where.split('.')[0]}.split")
            path = os.path.join(path, split)
        if os.path.exists(os.path.join(path, "state.json")):
            with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
                state = json.load(f)
            files = tuple(os.path.join(path, d["filename"]) for d in state.get("_data_files", []))
            return Source(path, files, "arrow")
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        files = [f for f in files if not any(p.startswith(".") for p in
                                             os.path.relpath(f, path).split(os.sep))]
        if not files:
            raise UserError(f"{path}: a folder with neither a datasets.save_to_disk dataset "
                            "(state.json / dataset_dict.json) nor Parquet files")
        named = [f for f in files if re.match(rf"{re.escape(split)}[-_.]", os.path.basename(f))]
        return Source(path, tuple(named or files), "parquet")
    ext = os.path.splitext(path)[1].lower()
    kinds = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
    if ext not in kinds:
        raise UserError(f"{path}: unknown format '{ext}' for a trace file (use .jsonl, .json, "
                        ".parquet, a folder of Parquet shards or a datasets.save_to_disk folder)")
    return Source(path, (path,), kinds[ext])


def file_hashes(source: Source) -> dict:
    """{"sha256": …, "files": [{path, bytes, sha256}]}: each file hashed in 4 MiB chunks (never
    held whole). One file: its own sha256 (what `sha256sum` prints); several: the sha256 of
    their "relative path  sha256" lines."""
    files = []
    for path in source.files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(4 << 20), b""):
                h.update(chunk)
        files.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                      "sha256": h.hexdigest()})
    if len(files) == 1:
        total = files[0]["sha256"]
    else:
        base = os.path.abspath(source.path)
        lines = "".join(f"{os.path.relpath(f['path'], base)}  {f['sha256']}\n" for f in files)
        total = hashlib.sha256(lines.encode()).hexdigest()
    return {"path": os.path.abspath(source.path), "sha256": total, "files": files}


def json_lines(path: str):
    """(line number, record) per non-blank line, one line in memory at a time. A UTF-8 BOM and
    CRLF are fine; UTF-16 with a BOM is decoded as such."""
    with open(path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            lines = io.TextIOWrapper(raw, encoding="utf-16", newline=None)
            decoded = True
        else:
            lines, decoded = raw, False
        lineno = 0
        for line in lines:
            lineno += 1
            if not decoded:
                if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[3:]
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: line {lineno}: not UTF-8 text (byte "
                                    f"0x{line[e.start]:02x} at column {e.start + 1}); save it "
                                    "as UTF-8") from None
            if not line.strip():
                continue
            if "\x00" in line:
                raise UserError(f"{path}: line {lineno}: NUL bytes in the text (UTF-16 without "
                                "a byte-order mark?); save it as UTF-8")
            rec = _loads(line, path, lineno)
            if not isinstance(rec, dict):
                raise UserError(f"{path}: line {lineno}: expected a JSON object, "
                                f"got {type(rec).__name__}")
            yield f"{path}: line {lineno}", rec


def _loads(text: str, path: str, lineno: int | None = None):
    """json.loads, a user error naming the file and the line when the text is not JSON."""
    where = f"{path}: line {lineno}" if lineno else path
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {lineno or e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{where}: {e}") from None


def _json_items(path: str):
    """(where, record) of a .json file: a list of objects, or {"data": [...]}."""
    text = read_text(path)
    data = _loads(text, path) if text.strip() else []
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    del text
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: item {i}: expected a JSON object, got {type(rec).__name__}")
        yield f"{path}: item {i}", rec


def _arrow_batches(path: str, kind: str, columns, batch_rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            cols = [c for c in names if c in columns] if columns is not None else None
            yield from pf.iter_batches(batch_size=batch_rows, columns=cols)
            return
        with pa.memory_map(path) as mm:
            reader = pa.ipc.open_stream(mm)
            names = reader.schema.names
            for batch in reader:
                if columns is not None:
                    batch = batch.select([c for c in names if c in columns])
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows)
    except UserError:
        raise
    except (OSError, pa.ArrowException) as e:
        what = "Parquet" if kind == "parquet" else "Arrow (datasets.save_to_disk)"
        raise UserError(f"{path}: not a readable {what} file ({e})") from None


def iter_rows(source: Source, columns: set | None = None, batch_rows: int = 256):
    """Batches of [(where, record)], in file order, at most `batch_rows` records each.
    `columns`: the top-level columns to read from Parquet / Arrow (None: all)."""
    for path in source.files:
        if source.kind in ("jsonl", "json"):
            items = json_lines(path) if source.kind == "jsonl" else _json_items(path)
            batch = []
            for item in items:
                batch.append(item)
                if len(batch) == batch_rows:
                    yield batch
                    batch = []
            if batch:
                yield batch
            continue
        row = 0
        for rb in _arrow_batches(path, source.kind, columns, batch_rows):
            records = rb.to_pylist()
            yield [(f"{path}: row {row + i}", r) for i, r in enumerate(records)]
            row += len(records)


def columns_for(spec: Spec, logicals=None) -> set | None:
    """Top-level columns to read: every name the layouts (or `logicals` of them) may use, the
    overrides and the filters. None under `auto` with no restriction."""
    if logicals is None:
        return None
    cols = set()
    for layout, fields in LAYOUTS.items():
        if spec.format not in ("auto", layout):
            continue
        for logical in fields:
            if logical in logicals or logical == next(iter(fields)):
                cols.update(n.split(".")[0] for n in names_for(layout, logical, spec))
    cols.update(v.split(".")[0] for v in spec.fields.values())
    return cols | filter_columns(spec)


# --------------------------------------------------------------------------- rows -> problems, traces

def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}': expected text, got {type(value).__name__}")
    return value


def _turns(value, where: str, name: str, role_key: str, text_key: str) -> list[dict]:
    """A chat as [{"role", "content", ...}] with user/assistant/system roles."""
    if not isinstance(value, list):
        raise UserError(f"{where}: field '{name}': expected a list of turns, "
                        f"got {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or role_key not in turn:
            raise UserError(f"{where}: field '{name}.{i}': expected {{{role_key}, {text_key}}}, "
                            f"got {turn!r:.80}")
        role = str(turn[role_key]).lower()
        role = "user" if role in _USER else "assistant" if role in _ASSISTANT else role
        content = turn.get(text_key)
        if content is None and role == "assistant":
            content = ""
        turns.append({**turn, "role": role, "content": _text(content, where,
                                                             f"{name}.{i}.{text_key}")})
    return turns


def _chat(record, layout: str, spec: Spec, where: str):
    """(prompt messages, problem text, the final assistant turn) of a sharegpt / messages row."""
    if layout == "sharegpt":
        value, name = _get(record, layout, "conversations", spec, where, required=True)
        turns = _turns(value, where, name, "from", "value")
        system, _ = _get(record, layout, "system", spec, where)
    else:
        value, name = _get(record, layout, "messages", spec, where, required=True)
        turns = _turns(value, where, name, "role", "content")
        system = None
    users = [t for t in turns if t["role"] == "user"]
    if not users:
        raise UserError(f"{where}: field '{name}': no user turn (the problem)")
    if turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: field '{name}': the last turn is '{turns[-1]['role']}', not "
                        "the assistant's (the trace)")
    prompt = [{"role": t["role"], "content": t["content"]} for t in turns[:-1]]
    if system and not any(t["role"] == "system" for t in prompt):
        prompt = [{"role": "system", "content": _text(system, where, "system")}] + prompt
    return prompt, users[0]["content"], turns[-1]


def problem_of(record, layout: str, spec: Spec, where: str) -> tuple[str, object, object]:
    """(problem text, the answer's raw value or None, the row's source or None)."""
    if layout in ("openr1", "flat"):
        value, name = _get(record, layout, "problem", spec, where, required=True)
        problem = _text(value, where, name)
    else:
        problem = _chat(record, layout, spec, where)[1]
    answer, _ = _get(record, layout, "answer", spec, where)
    source, _ = _get(record, layout, "source", spec, where)
    return problem, answer, source if isinstance(source, str) and source else None


def _bools(record, layout, logical, spec, where, n: int) -> list:
    value, name = _get(record, layout, logical, spec, where)
    if value is None:
        return [None] * n
    if not isinstance(value, list):
        raise UserError(f"{where}: field '{name}': expected a list parallel to 'generations', "
                        f"got {type(value).__name__}")
    if len(value) != n:
        raise UserError(f"{where}: field '{name}': {len(value)} values for {n} generations "
                        "(the lists must be parallel)")
    for i, v in enumerate(value):
        if v is not None and not isinstance(v, (bool, str)):
            raise UserError(f"{where}: field '{name}.{i}': expected true/false, got {v!r:.40}")
    return value


def traces_of(record, layout: str, spec: Spec, where: str, tags: str) -> list[dict]:
    """Every trace of a row: {problem, answer, source, teacher, prompt (messages or None),
    completion, finish_reason (or None: unknown), correct_math_verify, correct_llama,
    reasoning_complete}. A trace that is not text, parallel lists of other lengths: UserError."""
    problem, answer, source = problem_of(record, layout, spec, where)
    teacher, _ = _get(record, layout, "teacher", spec, where)
    teacher = teacher if isinstance(teacher, str) and teacher else None
    base = {"problem": problem, "answer": answer, "source": source, "teacher": teacher}
    none = {"correct_math_verify": None, "correct_llama": None, "reasoning_complete": None}
    if layout == "openr1":
        value, name = _get(record, layout, "generations", spec, where, required=True)
        if not isinstance(value, list):
            raise UserError(f"{where}: field '{name}': expected a list of traces, "
                            f"got {type(value).__name__}")
        gens = [_text(g, where, f"{name}.{i}") for i, g in enumerate(value)]
        n = len(gens)
        cols = {k: _bools(record, layout, k, spec, where, n)
                for k in ("correct_math_verify", "correct_llama", "reasoning_complete")}
        reasons = _bools(record, layout, "finish_reasons", spec, where, n)
        msgs, _ = _get(record, layout, "messages", spec, where)
        prompt = None
        if isinstance(msgs, list):
            turns = [m for m in msgs if isinstance(m, dict) and m.get("role") != "assistant"]
            if turns and all(isinstance(m.get("content"), str) for m in turns):
                prompt = [{"role": str(m["role"]), "content": m["content"]} for m in turns]
        return [{**base, "prompt": prompt, "completion": g,
                 "finish_reason": reasons[i] if isinstance(reasons[i], str) else None,
                 **{k: _verdict(cols[k][i]) for k in cols}} for i, g in enumerate(gens)]
    if layout == "flat":
        value, name = _get(record, layout, "completion", spec, where, required=True)
        completion = _text(value, where, name)
        reasoning, rname = _get(record, layout, "reasoning_content", spec, where)
        if reasoning is not None and REASONING_TAGS[tags].open not in completion:
            completion = trace_text(_text(reasoning, where, rname).strip(), completion.strip(), tags)
        system, sname = _get(record, layout, "system", spec, where)
        prompt = ([{"role": "system", "content": _text(system, where, sname)},
                   {"role": "user", "content": problem}] if system else None)
        reason, _ = _get(record, layout, "finish_reason", spec, where)
        return [{**base, "prompt": prompt, "completion": completion,
                 "finish_reason": reason if isinstance(reason, str) else None, **none}]
    prompt, _, last = _chat(record, layout, spec, where)
    completion = last["content"]
    reasoning = last.get("reasoning_content")
    if reasoning is not None and REASONING_TAGS[tags].open not in completion:
        completion = trace_text(_text(reasoning, where, "reasoning_content").strip(),
                                completion.strip(), tags)
    return [{**base, "prompt": prompt, "completion": completion, "finish_reason": None, **none}]


def _verdict(value):
    """A source's verdict as a bool: true/false, or "true"/"yes"/"false"/"no"; None unknown."""
    if isinstance(value, str):
        return {"true": True, "yes": True, "false": False, "no": False}.get(value.strip().lower())
    return value


# --------------------------------------------------------------------------- token counts

class TokenCounter:
    """Token counts with the teacher's tokenizer when `teacher` names a loadable one, else the
    student's. A teacher that is only a label (an imported file's "deepseek-r1") is not an
    error: the student's tokenizer counts, and `name` says which did."""

    def __init__(self, teacher: str, student: str, where: str = "generate"):
        from transformers import AutoTokenizer

        self.tokenizer, self.name, self.note = None, "", ""
        tried = []
        for role, model in (("teacher", teacher), ("student", student)):
            if not model:
                continue
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(model)
                self.name = model
                break
            except Exception as e:  # a label, a missing folder, no network: try the next one
                tried.append(f"{role} '{model}' ({type(e).__name__})")
        if self.tokenizer is None:
            raise UserError(f"{where}: no tokenizer to count tokens with: "
                            f"{'; '.join(tried) or 'no teacher and no student set'} did not load; "
                            "set student=<a model folder or hub id>")
        if tried:
            self.note = f"{tried[0]} is not a loadable tokenizer; counted with {self.name}"

    CHUNK = 64  # texts per encode call: a few MB of token arrays, whatever the shard size

    def count(self, texts: list[str]) -> list[int]:
        """Tokens per text. A fast tokenizer counts in Rust (its Encoding's length): the token
        ids never become Python lists, which cost ~4 GiB and most of the time on 2,048 traces
        of 15k tokens. `encode_batch_fast` (tokenizers >= 0.20) skips the character offsets
        that `encode_batch` tracks for every token and that a count never reads: the same
        lengths, 2.4-4x the tokens/s on 256 traces of 24,000 characters, 2.1x the import's
        traces/s (docs/performance.md)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch",
                                                                        None)
        out = []
        for i in range(0, len(texts), self.CHUNK):
            chunk = texts[i:i + self.CHUNK]
            if encode is not None:
                out.extend(len(e) for e in encode(chunk, add_special_tokens=False))
            else:
                out.extend(len(x) for x in
                           self.tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return out

    def prompt_text(self, messages: list[dict]) -> str:
        """The rendered prompt (the tokenizer's chat template with its generation prompt), or the
        messages' contents joined when it has none."""
        if self.tokenizer.chat_template:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception:  # a template that rejects this chat (e.g. no system role)
                pass
        return "\n\n".join(m["content"] for m in messages)


# --------------------------------------------------------------------------- problem files

def read_records(path: str, split: str = "train") -> list[tuple[str, dict]]:
    """[(where, record)] with `where` like "file.jsonl:line 3" for error messages."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # not a save_to_disk folder
            raise UserError(f"{path}: not a datasets.save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{path}: no split '{split}' (splits: {list(ds)}); "
                                "set prompts.split")
            ds = ds[split]
        return [(f"{path}: row {i}", r) for i, r in enumerate(ds.to_list())]
    ext = os.path.splitext(path)[1].lower()
    # Text files: a UTF-8 (or UTF-16) byte-order mark and CRLF line ends are accepted
    # (pipeline/textfile.py).
    if ext == ".jsonl":  # line by line
        return list(json_lines(path))
    if ext == ".json":
        return list(_json_items(path))
    if ext in (".csv", ".tsv"):
        text = read_text(path)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if ext == ".csv" else "\t")
        try:
            header = next(reader, None)
            if header is None:
                return []
            if len(set(header)) != len(header):
                twice = sorted({h for h in header if header.count(h) > 1})
                raise UserError(f"{path}: line 1: the header names {twice} more than once")
            out = []
            for row in reader:
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    raise UserError(f"{path}: line {reader.line_num}: {len(row)} fields, the "
                                    f"header has {len(header)} ({header})")
                out.append((f"{path}: line {reader.line_num}", dict(zip(header, row))))
        except csv.Error as e:
            raise UserError(f"{path}: line {reader.line_num}: not valid {ext[1:].upper()} ({e})") from None
        return out
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        return [(f"{path}: row {i}", r) for i, r in enumerate(table.to_pylist())]
    raise UserError(f"{path}: unknown format '{ext}' (use .jsonl, .json, .csv, .tsv, .parquet, "
                    "a datasets.save_to_disk folder, or 'synthetic')")
