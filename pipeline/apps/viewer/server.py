"""`distillery view`: a read-only HTTP server over the versioned store (docs/viewer.md).

    distillery view [--data-root DIR] [--port 8765] [--host 127.0.0.1]

What it reads: every version under the data root, only through pipeline/store.py (a version
folder counts once its manifest is written; `.tmp-<version>` folders are running stages whose
finished `part-*.parquet` shards are already whole files). Every query runs in DuckDB over the
version's Parquet parts: paging is LIMIT/OFFSET, filters are WHERE clauses with bound parameters,
histograms are GROUP BY — no version is ever loaded into Python, so the server's memory is
DuckDB's bounded buffer pool plus one page of rows.

Security: GET only; stage / version / split names must be plain names (no `/`, no `..`); each
version gets its own in-memory DuckDB whose `allowed_paths` are exactly that version's parts,
with external access off and the configuration locked before any user SQL runs, so the SQL box
cannot read other files, COPY, ATTACH, INSTALL or LOAD; user SQL must be one SELECT, runs under
a row limit and a time limit (a timer interrupts it). The page escapes all data (textContent).
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import duckdb
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from pipeline.errors import UserError
from pipeline.store import Store, Version

STATIC = os.path.join(os.path.dirname(__file__), "static")
# Names as the runner writes them: a stage name or a hex version hash; never a path.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# Filters the issue names, each applied when the version has the column (equality on a value).
FILTER_COLUMNS = ("correct", "verify_status", "difficulty", "finish_reason", "prune_status",
                  "selected", "select_reason", "model", "teacher")
# Provenance: a row matches a sentence label when any of its sentences carries it.
LABEL_COLUMN = "sentence_labels"
# Histograms (clickable: a click filters to the bar's range) and the columns a user sorts by.
HISTOGRAM_COLUMNS = ("completion_tokens", "pass_rate", "provenance_score")
HISTOGRAM_BINS = 20
# Full-text search looks in these text columns, when present.
SEARCH_COLUMNS = ("problem", "completion")
# Columns shown first in the table when the user has not chosen (others via the column chooser).
# No completion text by default: 50 rows spread over a 1M-row version touch most row groups,
# and decoding their 2 KB completions costs ~1 s (bench/viewer.py); problems are ~200 chars.
DEFAULT_COLUMNS = ("problem_id", "teacher", "model", "sample_idx", "problem", "pred_answer",
                   "correct", "verify_status", "difficulty", "pass_rate", "completion_tokens",
                   "pruned_tokens", "prune_status", "provenance_score", "selected",
                   "finish_reason", "chosen_trace_id", "rejected_trace_id")


@dataclass
class ViewerLimits:
    """Limits of the server's queries.

    page_rows: the most rows one table page may ask for.
    cell_chars: table cells longer than this are cut (the problem page shows the full text).
    sql_rows: the SQL box returns at most this many rows (it says when it cut).
    sql_seconds: a SQL-box query is interrupted after this many seconds.
    query_seconds: any other query (filters, search, histograms) is interrupted after this long.
    memory_limit: DuckDB's buffer pool per version; what bounds the server's memory.
    threads: DuckDB threads per query (0 = DuckDB's default, one per core).
    cached_versions: open DuckDB databases kept (one per version and split).
    """

    page_rows: int = 200
    cell_chars: int = 300
    sql_rows: int = 1000
    sql_seconds: float = 10.0
    query_seconds: float = 30.0
    memory_limit: str = "1GB"
    threads: int = 0
    cached_versions: int = 8


class ViewError(Exception):
    """A request the viewer answers with a message and an HTTP status (never a 500 page)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def plain(name: str, what: str) -> str:
    if not PLAIN_NAME.match(name) or ".." in name:
        raise ViewError(400, f"{what} '{name}' is not a plain name (no '/', '..' or absolute paths)")
    return name


@dataclass
class Source:
    """The Parquet parts one view reads: a complete version's split, or a running version's shards."""

    stage: str
    version: str
    split: str | None
    status: str                    # "complete" | "running"
    files: list[str]
    manifest: dict = field(default_factory=dict)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # dates, decimals, bytes: shown as text


def json_response(content, status: int = 200) -> Response:
    body = json.dumps(_jsonable(content), ensure_ascii=False, allow_nan=False)
    return Response(body, status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Viewer:
    """The store, the open DuckDB databases (one per version/split), and the queries."""

    def __init__(self, store: Store, stage_order: list[str], limits: ViewerLimits | None = None):
        protocols = store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
        if "file" not in protocols:
            # DuckDB would need httpfs (an extension download) and credentials for object stores.
            raise UserError(f"distillery view reads local data roots only, not {store.url} "
                            "(copy or mount the versions you want to look at)")
        self.store = store
        self.stage_order = list(stage_order)
        self.limits = limits or ViewerLimits()
        self._dbs: OrderedDict[tuple, tuple[duckdb.DuckDBPyConnection, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._totals: OrderedDict[tuple, int | None] = OrderedDict()   # search -> rows matching
        self._facets: OrderedDict[tuple, dict] = OrderedDict()         # file list -> filter menus

    # ---- the store -------------------------------------------------------------------------
    def stages(self) -> list[str]:
        try:
            entries = self.store.fs.ls(self.store.root, detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e.rstrip("/")) for e in entries]
        names = [n for n in names if PLAIN_NAME.match(n) and not n.startswith(".")
                 and self.store.fs.isdir(self.store.stage_dir(n))]
        known = [s for s in self.stage_order if s in names]
        return known + sorted(n for n in names if n not in known)

    def running(self, stage: str) -> list[dict]:
        """`.tmp-<version>` folders: a stage writing now (or one that crashed before its manifest)."""
        try:
            entries = self.store.fs.ls(self.store.stage_dir(stage), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if not name.startswith(".tmp-"):
                continue
            version = name[len(".tmp-"):]
            shards = sorted(self.store.fs.glob(posixpath.join(entry, "part-*.parquet")))
            out.append({"version": version, "shards": len(shards),
                        "of": self._expected_shards(stage, shards)})
        return out

    def _expected_shards(self, stage: str, shards: list[str]) -> int | None:
        """generate's shards: prompts@LATEST problems / problems in the first (full) shard.

        generate cuts the prompts, sorted by problem_id, into shards of shard_size problems
        (stages/generate.py), so every shard but the last holds shard_size distinct problems.
        With two or more shards written, the first is full: n = ceil(problems / shard_size).
        """
        prompts = self.store.latest("prompts")
        if stage != "generate" or len(shards) < 2 or prompts is None or not prompts.rows:
            return None
        con = duckdb.connect(":memory:")
        try:
            per_shard = con.execute("SELECT count(DISTINCT problem_id) FROM read_parquet(?)",
                                    [shards[0]]).fetchone()[0]
        except duckdb.Error:
            return None
        finally:
            con.close()
        return math.ceil(prompts.rows / per_shard) if per_shard else None

    def runs(self) -> dict:
        stages = []
        for stage in self.stages():
            latest = self.store.latest(stage)
            versions = []
            for v in self.store.versions(stage):
                m = v.manifest
                versions.append({
                    "version": v.version, "latest": latest is not None and latest.version == v.version,
                    "output": m.get("output", "dataset"), "splits": v.splits,
                    "rows_in": m.get("rows_in"), "rows_out": m.get("rows_out"),
                    "drops": m.get("drops") or {}, "wall_s": m.get("wall_s"),
                    "finished_at": m.get("finished_at"), "inputs": m.get("inputs") or {}})
            incomplete = self._incomplete(stage, {v["version"] for v in versions})
            stages.append({"stage": stage, "latest": latest.version if latest else None,
                           "versions": versions, "running": self.running(stage),
                           "incomplete": incomplete})
        return {"data_root": self.store.url, "stages": stages}

    def _incomplete(self, stage: str, complete: set[str]) -> list[str]:
        """Version folders without a manifest: half-written (a crash between rename and manifest)."""
        try:
            entries = self.store.fs.ls(self.store.stage_dir(stage), detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(n for n in names if not n.startswith(".") and n != "LATEST"
                      and not n.endswith(".tmp") and n not in complete
                      and self.store.fs.isdir(self.store.version_dir(stage, n)))

    def lineage(self, version: Version, seen: set | None = None) -> dict:
        seen = set() if seen is None else seen
        node = {"stage": version.stage, "version": version.version, "rows_out": version.rows,
                "inputs": []}
        if version.ref() in seen:
            return node
        seen.add(version.ref())
        for stage, v in (version.manifest.get("inputs") or {}).items():
            parent = self.store.find(stage, v)
            node["inputs"].append(self.lineage(parent, seen) if parent is not None else
                                  {"stage": stage, "version": v, "missing": True, "inputs": []})
        return node

    def source(self, stage: str, version: str, split: str | None) -> Source:
        plain(stage, "stage"), plain(version, "version")
        if split:
            plain(split, "split")
        v = self.store.find(stage, version)
        if v is not None:
            if v.manifest.get("output") == "model":
                raise ViewError(404, f"{v.ref()} is a model checkpoint, not a dataset")
            if v.splits and not split:
                raise ViewError(400, f"{v.ref()} has splits {v.splits}: name one")
            if split and split not in v.splits:
                raise ViewError(404, f"{v.ref()} has no split '{split}' (splits: {v.splits or 'none'})")
            files = v.parquet_files(split)
            if not files:
                raise ViewError(410, f"{v.ref()}: its manifest is there but its Parquet parts "
                                "are gone")
            return Source(stage, version, split, "complete", files, v.manifest)
        fs = self.store.fs
        tmp = self.store.tmp_dir(stage, version)
        if fs.exists(tmp):
            if split:
                raise ViewError(409, f"{stage}@{version} is still running: its splits are "
                                "written at the end")
            files = sorted(fs.glob(posixpath.join(tmp, "part-*.parquet")))
            if not files:
                raise ViewError(409, f"{stage}@{version} is running: no shard finished yet")
            return Source(stage, version, None, "running", files)
        if fs.exists(self.store.version_dir(stage, version)):
            raise ViewError(409, f"{stage}@{version} is half-written (no manifest): "
                            "it is not a complete version and is not read")
        raise ViewError(404, f"{stage}@{version}: no such version under {self.store.url}")

    # ---- DuckDB ----------------------------------------------------------------------------
    def _db(self, src: Source) -> tuple[duckdb.DuckDBPyConnection, dict]:
        """One in-memory DuckDB per file list; the view `data` over exactly these files."""
        key = (src.stage, src.version, src.split, tuple(src.files))
        with self._lock:
            if key in self._dbs:
                self._dbs.move_to_end(key)
                return self._dbs[key]
            con = duckdb.connect(":memory:")
            try:
                if self.limits.threads:
                    con.execute(f"SET threads={int(self.limits.threads)}")
                con.execute(f"SET memory_limit={_literal(self.limits.memory_limit)}")
                files = "[" + ", ".join(_literal(f) for f in src.files) + "]"
                # The only files this database may ever open: the version's parts. Then file
                # access goes off for everything else (COPY, ATTACH, INSTALL, read_csv('/etc/..'))
                # and the configuration is locked so no statement can turn it back on.
                con.execute(f"SET allowed_paths={files}")
                con.execute("SET enable_external_access=false")
                con.execute("SET autoinstall_known_extensions=false")
                con.execute("SET autoload_known_extensions=false")
                con.execute(f"CREATE VIEW data AS SELECT * FROM read_parquet({files}, "
                            "union_by_name=true)")
                # The same rows with their address (file, row number): the table's paging key.
                con.execute(f"CREATE VIEW keyed AS SELECT * FROM read_parquet({files}, "
                            "union_by_name=true, filename=true, file_row_number=true)")
                con.execute("SET lock_configuration=true")
                columns = {name: typ for name, typ, *_ in con.execute("DESCRIBE data").fetchall()}
            except duckdb.IOException as e:
                con.close()
                raise ViewError(410, f"{src.stage}@{src.version}: its files changed or vanished "
                                f"while opening ({e})") from None
            self._dbs[key] = (con, columns)
            while len(self._dbs) > self.limits.cached_versions:
                _, (old, _) = self._dbs.popitem(last=False)
                old.close()
            return con, columns

    def query(self, src: Source, sql: str, params: list | None = None, seconds: float | None = None,
              max_rows: int | None = None, user_sql: bool = False) -> tuple[list[str], list[tuple]]:
        """Run one query on its own cursor; a timer interrupts it after `seconds`.

        user_sql: the SQL box's text: its errors (a typo, a refused file) are the user's, 400.
        """
        con, _ = self._db(src)
        cur = con.cursor()
        seconds = self.limits.query_seconds if seconds is None else seconds
        timer = threading.Timer(seconds, cur.interrupt)
        timer.start()
        try:
            cur.execute(sql, params or [])
            rows = cur.fetchmany(max_rows) if max_rows is not None else cur.fetchall()
            names = [d[0] for d in cur.description]
            return names, rows
        except duckdb.InterruptException:
            raise ViewError(408, f"query stopped after its time limit of {seconds:g} s") from None
        except duckdb.IOException as e:
            if user_sql:
                raise ViewError(400, f"IOException: {str(e).splitlines()[0]}") from None
            raise ViewError(410, f"{src.stage}@{src.version}: its files changed or vanished "
                            f"({str(e).splitlines()[0]}); reload the runs page") from None
        except duckdb.Error as e:
            raise ViewError(400 if user_sql else 500, f"{type(e).__name__}: "
                            f"{str(e).splitlines()[0]}") from None
        finally:
            timer.cancel()
            cur.close()

    def close(self) -> None:
        with self._lock:
            for con, _ in self._dbs.values():
                con.close()
            self._dbs.clear()

    def columns(self, src: Source) -> dict:
        return self._db(src)[1]

    # ---- the queries behind the pages ------------------------------------------------------
    def where(self, src: Source, params) -> tuple[str, list]:
        """Filters from the query string: f=col:value (equality), label=..., r=col:lo:hi, q=text."""
        cols = self.columns(src)
        clauses, args = [], []
        for item in params.getlist("f"):
            name, _, value = item.partition(":")
            if name not in FILTER_COLUMNS or name not in cols:
                raise ViewError(400, f"filter on '{name}': not a filter column of this version "
                                f"(filters: {[c for c in FILTER_COLUMNS if c in cols]})")
            if value == "null":
                clauses.append(f"{_quote(name)} IS NULL")
            elif cols[name] == "BOOLEAN":
                if value not in ("true", "false"):
                    raise ViewError(400, f"filter {name}: true, false or null, not '{value}'")
                clauses.append(f"{_quote(name)} = ?")
                args.append(value == "true")
            else:
                clauses.append(f"CAST({_quote(name)} AS VARCHAR) = ?")
                args.append(value)
        for label in params.getlist("label"):
            if LABEL_COLUMN not in cols:
                raise ViewError(400, f"this version has no {LABEL_COLUMN} column")
            clauses.append(f"list_contains({LABEL_COLUMN}, ?)")
            args.append(label)
        for item in params.getlist("r"):
            name, lo, hi = (item.split(":") + ["", ""])[:3]
            if name not in HISTOGRAM_COLUMNS or name not in cols:
                raise ViewError(400, f"range on '{name}': not a histogram column of this version")
            try:
                lo_v, hi_v = float(lo), float(hi)
            except ValueError:
                raise ViewError(400, f"range {item}: expected col:low:high numbers") from None
            # The last bar includes its upper edge (the maximum), the others do not.
            clauses.append(f"{_quote(name)} >= ? AND ({_quote(name)} < ? OR {_quote(name)} = ?)")
            args += [lo_v, hi_v, hi_v if params.get("closed") == name else math.nan]
        q = params.get("q", "")
        if q:
            where = [c for c in SEARCH_COLUMNS if c in cols]
            if not where:
                raise ViewError(400, f"this version has none of the text columns {SEARCH_COLUMNS}")
            # A plain substring, case-insensitive: RE2 on the escaped text decodes and matches
            # in one pass (measured 1.5x faster than ILIKE on 2 KB completions).
            clauses.append("(" + " OR ".join(f"regexp_matches({_quote(c)}, '(?i)' || "
                                             "regexp_escape(?))" for c in where) + ")")
            args += [q] * len(where)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def page(self, src: Source, params) -> dict:
        cols = self.columns(src)
        chosen = [c for c in params.get("cols", "").split(",") if c] or \
            [c for c in DEFAULT_COLUMNS if c in cols] or list(cols)[:8]
        for c in chosen:
            if c not in cols:
                raise ViewError(400, f"no column '{c}' in this version (columns: {list(cols)})")
        sort = params.get("sort", "")
        if sort and sort not in cols:
            raise ViewError(400, f"sort by '{sort}': no such column")
        offset, limit = _int(params, "offset", 0), _int(params, "limit", 50)
        if limit < 1 or limit > self.limits.page_rows or offset < 0:
            raise ViewError(400, f"limit must be 1..{self.limits.page_rows}, offset >= 0")
        where, args = self.where(src, params)
        cut = self.limits.cell_chars
        select = []
        for c in chosen:
            # Text is cut in SQL (the page shows the first `cell_chars`); lists/structs as text.
            expr = _quote(c) if cols[c] == "VARCHAR" else f"CAST({_quote(c)} AS VARCHAR)"
            numeric = cols[c] in ("BIGINT", "INTEGER", "DOUBLE", "FLOAT", "BOOLEAN", "SMALLINT",
                                  "TINYINT", "HUGEINT", "UBIGINT", "UINTEGER", "DECIMAL")
            select.append(_quote(c) if numeric else f"left({expr}, {cut}) AS {_quote(c)}")
        if "problem_id" in cols and "problem_id" not in chosen:
            select.append('"problem_id"')
        # Two steps (late materialisation): find the page's rows by reading only the filter and
        # sort columns, then fetch the displayed columns of just those rows by (file, row
        # number); DuckDB then skips every other file and row group. A sort over 1M rows with
        # 2 KB completions otherwise decodes all 2 GB of text to keep 50 rows.
        order = ""
        if sort:
            order = (f" ORDER BY {_quote(sort)} {'DESC' if params.get('desc') == '1' else 'ASC'} "
                     "NULLS LAST, filename, file_row_number")
        # A sorted search scans every text anyway: take the total in the same scan (a window
        # over the matching keys) and keep it for the count request that follows. Unsorted, the
        # page stops at its first `limit` matches (0.15 s at 1M rows) and the count scans once
        # (1.3 s): 1.4 s in all, where the window made the page itself 2.4 s (bench/viewer.py).
        searching = bool(params.get("q")) and bool(sort)
        total = ", count(*) OVER ()" if searching else ""
        _, keys = self.query(src, f"SELECT filename, file_row_number{total} FROM keyed{where}"
                             f"{order} LIMIT {limit} OFFSET {offset}", args)
        if searching:
            self._remember_total(src, where, args, keys[0][2] if keys else None)
        names, rows = [c.strip('"') for c in chosen], []
        if "problem_id" in cols and "problem_id" not in chosen:
            names.append("problem_id")
        if keys:
            by_file: dict[str, list[int]] = {}
            for k in keys:
                by_file.setdefault(k[0], []).append(int(k[1]))
            fetch = " UNION ALL ".join(
                f"SELECT filename, file_row_number, {', '.join(select)} FROM keyed "
                f"WHERE filename = {_literal(f)} AND file_row_number IN ({', '.join(map(str, nums))})"
                for f, nums in by_file.items())
            _, found = self.query(src, fetch)
            at = {(r[0], r[1]): r[2:] for r in found}
            rows = [list(at[(k[0], k[1])]) for k in keys if (k[0], k[1]) in at]
        return {"columns": names, "rows": rows, "offset": offset, "limit": limit,
                "cell_chars": cut}

    def _remember_total(self, src: Source, where: str, args: list, total: int | None) -> None:
        with self._lock:
            self._totals[(src.stage, src.version, src.split, tuple(src.files), where,
                          tuple(map(str, args)))] = total
            while len(self._totals) > 64:
                self._totals.popitem(last=False)

    def count(self, src: Source, params) -> dict:
        where, args = self.where(src, params)
        key = (src.stage, src.version, src.split, tuple(src.files), where, tuple(map(str, args)))
        with self._lock:
            known = self._totals.get(key, -1)
        if known is not None and known >= 0:
            return {"total": known}
        _, rows = self.query(src, f"SELECT count(*) FROM data{where}", args)
        return {"total": rows[0][0]}

    def histogram(self, src: Source, column: str, params) -> dict:
        cols = self.columns(src)
        if column not in HISTOGRAM_COLUMNS or column not in cols:
            raise ViewError(400, f"no histogram of '{column}' here")
        where, args = self.where(src, params)
        col = _quote(column)
        lo_hi = self.query(src, f"SELECT min({col}), max({col}), count({col}) FROM data{where}", args)[1][0]
        lo, hi, n = lo_hi
        if n == 0 or lo is None:
            return {"column": column, "bins": []}
        lo, hi = float(lo), float(hi)
        width = (hi - lo) / HISTOGRAM_BINS if hi > lo else 1.0
        nulls = " AND " if where else " WHERE "
        _, rows = self.query(
            src, f"SELECT least(CAST(floor(({col} - ?) / ?) AS BIGINT), {HISTOGRAM_BINS - 1}) AS b, "
                 f"count(*) FROM data{where}{nulls}{col} IS NOT NULL GROUP BY b ORDER BY b",
            [lo, width] + args)
        counts = dict(rows)
        bins = [{"lo": lo + i * width, "hi": lo + (i + 1) * width, "count": counts.get(i, 0),
                 "last": i == HISTOGRAM_BINS - 1} for i in range(HISTOGRAM_BINS if hi > lo else 1)]
        return {"column": column, "bins": bins}

    def facets(self, src: Source) -> dict:
        """Values (with counts) of the filter columns this version has: the filter menus.

        Computed once per file list (a complete version never changes; a running one gets a
        new list with each shard) and kept with the version's database.
        """
        key = (src.stage, src.version, src.split, tuple(src.files))
        with self._lock:
            if key in self._facets:
                return self._facets[key]
        cols = self.columns(src)
        present = [c for c in FILTER_COLUMNS if c in cols]
        out = {c: [] for c in present}
        if present:
            # One scan for every menu (GROUPING SETS), not one per column: 8 scans of a
            # 1M-row version took 2.3 s on a loaded machine. grouping(c) = 0 marks c's rows.
            names = ", ".join(_quote(c) for c in present)
            _, rows = self.query(src, f"SELECT {names}, "
                                 + ", ".join(f"grouping({_quote(c)})" for c in present)
                                 + ", count(*) FROM data GROUP BY GROUPING SETS ("
                                 + ", ".join(f"({_quote(c)})" for c in present) + ")")
            k = len(present)
            for r in rows:
                i = r[k:2 * k].index(0)
                value = r[i]
                out[present[i]].append([_menu_value(value), r[-1]])
            for c in present:
                out[c] = sorted(out[c], key=lambda vn: -vn[1])[:50]
        if LABEL_COLUMN in cols:
            _, rows = self.query(src, f"SELECT l, count(*) FROM (SELECT unnest({LABEL_COLUMN}) AS l "
                                 "FROM data) GROUP BY l ORDER BY count(*) DESC")
            out["label"] = [[v, n] for v, n in rows]
        with self._lock:
            self._facets[key] = out
            while len(self._facets) > self.limits.cached_versions:
                self._facets.popitem(last=False)
        return out

    def problem(self, src: Source, problem_id: str) -> dict:
        cols = self.columns(src)
        if "problem_id" not in cols:
            raise ViewError(400, "this version has no problem_id column")
        order = [c for c in ("model", "sample_idx", "trace_id") if c in cols]
        _, rows = self.query(src, "SELECT * FROM data WHERE problem_id = ?"
                             + (f" ORDER BY {', '.join(map(_quote, order))}" if order else "")
                             + f" LIMIT {self.limits.page_rows}", [problem_id])
        names = list(cols)
        return {"rows": [dict(zip(names, r)) for r in rows]}

    def pairs_for(self, problem_id: str) -> dict | None:
        """select@LATEST's REDI pair(s) for this problem, if select has run."""
        select = self.store.latest("select")
        if select is None or "pairs" not in select.splits:
            return None
        src = self.source("select", select.version, "pairs")
        if "problem_id" not in self.columns(src):
            return None
        _, rows = self.query(src, "SELECT * FROM data WHERE problem_id = ? LIMIT 10", [problem_id])
        names = list(self.columns(src))
        return {"version": select.version, "rows": [dict(zip(names, r)) for r in rows]}

    def sql(self, src: Source, text: str) -> dict:
        statements = _statements(text)
        if len(statements) != 1:
            raise ViewError(400, f"one SELECT statement, not {len(statements)}")
        if statements[0].type != duckdb.StatementType.SELECT:
            raise ViewError(400, f"only SELECT is allowed here, not {statements[0].type.name}")
        body = statements[0].query.strip().rstrip(";").strip()
        limit = self.limits.sql_rows
        names, rows = self.query(src, f"SELECT * FROM ({body}) AS q LIMIT {limit + 1}",
                                 seconds=self.limits.sql_seconds, user_sql=True)
        return {"columns": names, "rows": [list(r) for r in rows[:limit]],
                "truncated": len(rows) > limit, "row_limit": limit}


def _menu_value(value) -> str:
    """A filter value as the `f=col:value` filter compares it: CAST(col AS VARCHAR)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _statements(text: str):
    try:
        return duckdb.extract_statements(text)
    except duckdb.Error as e:
        raise ViewError(400, f"{type(e).__name__}: {str(e).splitlines()[0]}") from None


def _int(params, name: str, default: int) -> int:
    try:
        return int(params.get(name, default))
    except ValueError:
        raise ViewError(400, f"{name} must be an integer") from None


def make_app(viewer: Viewer) -> FastAPI:
    app = FastAPI(title="distillery view", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def read_only(request: Request, call_next):
        # GET (and HEAD) only: nothing here writes, deletes or runs anything.
        if request.method not in ("GET", "HEAD"):
            return json_response({"error": "read-only viewer: GET only"}, 405)
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
        return response

    @app.exception_handler(ViewError)
    async def view_error(request: Request, e: ViewError):
        return json_response({"error": e.message}, e.status)

    def src_of(stage, version, request):
        return viewer.source(stage, version, request.query_params.get("split") or None)

    # Sync endpoints: FastAPI runs them in its thread pool, each with its own DuckDB cursor.
    @app.get("/api/runs")
    def runs():
        return json_response(viewer.runs())

    @app.get("/api/version/{stage}/{version}")
    def version_info(stage: str, version: str, request: Request):
        plain(stage, "stage"), plain(version, "version")
        v = viewer.store.find(stage, version)
        if v is None:
            src = viewer.source(stage, version, None)   # running, half-written or missing
            return json_response({"stage": stage, "version": version, "status": src.status,
                                  "splits": [], "shards": len(src.files),
                                  "columns": viewer.columns(src), "manifest": None,
                                  "lineage": None, "histograms": []})
        split = request.query_params.get("split") or (v.splits[0] if v.splits else None)
        info = {"stage": stage, "version": version, "status": "complete", "splits": v.splits,
                "split": split, "manifest": v.manifest, "lineage": viewer.lineage(v),
                "columns": {}, "histograms": []}
        if v.manifest.get("output") != "model":
            cols = viewer.columns(viewer.source(stage, version, split))
            info["columns"] = cols
            info["histograms"] = [c for c in HISTOGRAM_COLUMNS if c in cols]
        return json_response(info)

    @app.get("/api/rows/{stage}/{version}")
    def rows(stage: str, version: str, request: Request):
        return json_response(viewer.page(src_of(stage, version, request), request.query_params))

    @app.get("/api/count/{stage}/{version}")
    def count(stage: str, version: str, request: Request):
        return json_response(viewer.count(src_of(stage, version, request), request.query_params))

    @app.get("/api/facets/{stage}/{version}")
    def facets(stage: str, version: str, request: Request):
        return json_response(viewer.facets(src_of(stage, version, request)))

    @app.get("/api/hist/{stage}/{version}/{column}")
    def hist(stage: str, version: str, column: str, request: Request):
        src = src_of(stage, version, request)
        return json_response(viewer.histogram(src, column, request.query_params))

    @app.get("/api/problem/{stage}/{version}/{problem_id}")
    def problem(stage: str, version: str, problem_id: str, request: Request):
        src = src_of(stage, version, request)
        out = viewer.problem(src, problem_id)
        out["pairs"] = viewer.pairs_for(problem_id) if stage != "select" else None
        return json_response(out)

    @app.get("/api/sql/{stage}/{version}")
    def sql(stage: str, version: str, request: Request):
        text = request.query_params.get("q", "")
        return json_response(viewer.sql(src_of(stage, version, request), text))

    @app.get("/")
    def index():
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(store: Store, stage_order: list[str], host: str = "127.0.0.1", port: int = 8765,
          limits: ViewerLimits | None = None) -> None:
    import uvicorn

    viewer = Viewer(store, stage_order, limits)
    app = make_app(viewer)
    print(f"distillery view: http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}/ "
          f"(data root {store.url}; Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        viewer.close()
