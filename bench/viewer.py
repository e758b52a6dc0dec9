"""Benchmark: `distillery view` on a large provenance-shaped version, measured over HTTP.

    .venv/bin/python bench/viewer.py                  # 1,000,000 rows (~1.5 GB of Parquet, ~1 min to write)
    .venv/bin/python bench/viewer.py --rows 20000     # a quick check

Writes one complete version (`provenance@bench<rows>`, the contract's columns, n=8 samples per
problem, completions of 500-4,000 characters drawn from an English-like word list, problems of
~200) with pyarrow into a temp data root, starts `distillery view` on it in a subprocess, and
times with an HTTP client (targets from issue #12):
  start -> first page     the process starting until the runs page and the version's first table
                          page have both answered                                   < 2 s
  filter / sort           one table page (50 rows) + its row count, median of 10     < 500 ms
  full-text search        a word found in 0.1% of completions: page + count (every
                          completion and problem scanned), median of 3                < 2 s
  problem page            all 8 samples of a problem with their full text, median of 10 < 200 ms
  server memory           RSS after start vs after every query above: it must not grow
                          with the version (DuckDB's pool is capped at 1 GB)
Stock tools in the same run, same queries: DuckDB directly in this process (no HTTP, no JSON)
and pandas.read_parquet of the columns the query needs, then a pandas filter. The viewer's ratio
to each is printed (> 1 = the viewer is slower).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SAMPLES = 8                 # samples per problem (the generate stage's n)
ROWS_PER_FILE = 50_000      # one part file per 50k rows, as generate's shards would write them
NEEDLE = "zanzibarite"      # put in 0.1% of completions: the full-text search's target
WORDS = ("the of and to in is we that for it as with be on by this are so then let from at "
         "sum product term value equation integer number solve check answer compute multiply "
         "divide subtract add therefore because since which gives square root factor prime "
         "remainder modulo fraction denominator numerator simplify expand substitute wait "
         "hmm actually verify again step first second third next finally boxed result").split()


def corpus(chars: int, rng: np.random.Generator) -> str:
    words = rng.choice(np.array(WORDS), size=chars // 5)
    text = " ".join(words.tolist())
    return (text + " ") * (chars // max(1, len(text)) + 1)


def write_version(root: str, rows: int, seed: int = 0) -> tuple[str, str, dict]:
    """One complete provenance-shaped version via the Store; returns (stage, version, facts)."""
    from pipeline.store import Store

    rng = np.random.default_rng(seed)
    text = corpus(8_000_000, rng)       # slices of one 8 MB text: fast, and compresses like prose
    store = Store(root)
    stage, version = "provenance", f"bench{rows}"
    tmp = store.begin(stage, version, clear=True)
    facts = {"needle_rows": 0, "false_rows": 0, "problem_ids": []}
    labels = np.array(["teacher", "student", "common"])
    for file_no, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        idx = np.arange(start, start + n)
        problem = idx // SAMPLES
        lengths = rng.integers(500, 4001, n)
        offsets = rng.integers(0, len(text) - 4001, n)
        completions = [text[o:o + k] for o, k in zip(offsets.tolist(), lengths.tolist())]
        needle = rng.random(n) < 0.001
        for i in np.flatnonzero(needle).tolist():
            completions[i] = completions[i][:200] + f" {NEEDLE} " + completions[i][200:]
        problems = {p: f"Problem {p}: " + text[(p * 7919) % 7_000_000:][:190] for p in set(problem.tolist())}
        correct = rng.random(n) < 0.6
        pass_rate = np.round(rng.integers(0, SAMPLES + 1, n) / SAMPLES, 3)
        tokens = (lengths // 4).astype(np.int64)
        sentences = [max(1, k // 120) for k in lengths.tolist()]
        spans = [[[j * 120, min(k, j * 120 + 119)] for j in range(s)] for s, k in zip(sentences, lengths.tolist())]
        labs = [labels[rng.integers(0, 3, s)].tolist() for s in sentences]
        p_t = [np.round(rng.random(s), 3).tolist() for s in sentences]
        p_s = [np.round(rng.random(s), 3).tolist() for s in sentences]
        score = np.round(rng.normal(0.0, 1.0, n), 4)
        table = pa.table({
            "problem_id": [f"{p:012x}" for p in problem.tolist()],
            "trace_id": [f"{i:016x}" for i in idx.tolist()],
            "problem": [problems[p] for p in problem.tolist()],
            "answer": [str(p % 997) for p in problem.tolist()],
            "source": ["bench"] * n,
            "teacher": ["bench-teacher"] * n,
            "sample_idx": (idx % SAMPLES).astype(np.int64),
            "completion": completions,
            "final": [f"So the answer is \\boxed{{{p % 997}}}." for p in problem.tolist()],
            "completion_tokens": tokens,
            "finish_reason": np.where(rng.random(n) < 0.03, "length", "stop"),
            "pred_answer": [str(p % 997) if c else str(p % 991) for p, c in zip(problem.tolist(), correct.tolist())],
            "correct": correct,
            "verify_status": ["ok"] * n,
            "pass_rate": pass_rate,
            "difficulty": np.where(pass_rate >= 0.8, "easy", np.where(pass_rate >= 0.3, "medium", "hard")),
            "pruned_tokens": (tokens * 0.8).astype(np.int64),
            "prune_status": np.where(correct, "kept", "incorrect"),
            "sentence_spans": pa.array(spans, pa.list_(pa.list_(pa.int64()))),
            "sentence_labels": labs,
            "sentence_p_teacher": p_t,
            "sentence_p_student": p_s,
            "teacher_sentences": np.array([l.count("teacher") for l in labs], np.int64),
            "teacher_share": np.round([l.count("teacher") / len(l) for l in labs], 4),
            "lp_teacher": np.round(rng.normal(-0.5, 0.1, n), 4),
            "lp_student": np.round(rng.normal(-1.0, 0.2, n), 4),
            "provenance_score": score,
            "provenance_truncated": np.zeros(n, bool),
            "selected": correct & (score > 0),
            "select_reason": np.where(correct, np.where(score > 0, "top_teacher_sentences", "not_top_k"), "incorrect"),
        })
        # pruned_completion: the text select trains on (prune fills it; here the completion).
        table = table.append_column("pruned_completion", table.column("completion"))
        pq.write_table(table, os.path.join(tmp, f"part-{file_no:05d}.parquet"),
                       row_group_size=10_000, compression="zstd")
        facts["needle_rows"] += int(needle.sum())
        facts["false_rows"] += int((~correct).sum())
        facts["problem_ids"] += [f"{p:012x}" for p in sorted(set(problem.tolist()))[:: max(1, n // SAMPLES // 4)]]
    store.commit(stage, version, {"stage": stage, "version": version, "inputs": {},
                                  "output": "dataset", "splits": [], "rows_in": rows,
                                  "rows_out": rows, "drops": {}, "stats": {},
                                  "finished_at": "2026-11-23T00:00:00+00:00", "wall_s": 0.0})
    return stage, version, facts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    import httpx
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--root", default="", help="data root to write into (default: a temp dir, removed)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    root = args.root or tempfile.mkdtemp(prefix="viewer-bench-")
    try:
        t, (stage, version, facts) = timed(lambda: write_version(root, args.rows))
        from pipeline.store import Store
        files = Store(root).get(stage, version).parquet_files()
        size = sum(os.path.getsize(f) for f in files)
        print(f"wrote {stage}@{version}: {args.rows:,} rows, {len(files)} files, "
              f"{size / 2**30:.2f} GiB in {t:.1f} s")
        return run_bench(root, stage, version, facts, files, args, httpx, psutil)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


def run_bench(root, stage, version, facts, files, args, httpx, psutil) -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "view", "--data-root", root,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        c = httpx.Client(base_url=base, timeout=120)
        while True:
            try:
                runs = c.get("/api/runs")
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.perf_counter() - started > 60:
                    raise SystemExit("the viewer did not start")
                time.sleep(0.02)
        assert runs.status_code == 200, runs.text
        c.get("/")
        t_runs = time.perf_counter() - started
        v = f"{stage}/{version}"
        first = c.get(f"/api/rows/{v}", params={"limit": 50})
        assert first.status_code == 200 and len(first.json()["rows"]) == 50, first.text[:300]
        t_first = time.perf_counter() - started
        rss0 = psutil.Process(proc.pid).memory_info().rss

        def median_of(k, call):
            times = []
            for i in range(k):
                t, r = timed(lambda: call(i))
                assert r.status_code == 200, r.text[:300]
                times.append(t)
            return statistics.median(times), r

        def page_and_count(params):
            def call(i):
                p = dict(params, offset=str(50 * i), limit="50")
                r = c.get(f"/api/rows/{v}", params=p)
                assert r.status_code == 200, r.text[:300]
                return c.get(f"/api/count/{v}", params={k: x for k, x in params.items()
                                                        if k not in ("sort", "desc")})
            return call

        t_filter, r = median_of(args.repeats, page_and_count({"f": "correct:false"}))
        assert r.json()["total"] == facts["false_rows"], (r.json(), facts["false_rows"])
        t_sort, _ = median_of(args.repeats, page_and_count(
            {"sort": "completion_tokens", "desc": "1", "f": "difficulty:hard"}))
        t_score, _ = median_of(args.repeats, page_and_count({"sort": "provenance_score"}))
        t_text, _ = median_of(args.repeats, page_and_count(
            {"sort": "completion_tokens", "cols": "problem_id,completion,completion_tokens"}))
        t_facets, _ = timed(lambda: c.get(f"/api/facets/{v}"))      # first open: computed
        t_hist, _ = median_of(args.repeats, lambda i: c.get(f"/api/hist/{v}/completion_tokens",
                                                           params={"f": "correct:false"}))
        t_search, r = median_of(3, page_and_count({"q": NEEDLE.upper()}))
        assert r.json()["total"] == facts["needle_rows"], (r.json(), facts["needle_rows"])
        pids = facts["problem_ids"]
        t_problem, r = median_of(args.repeats, lambda i: c.get(f"/api/problem/{v}/{pids[(i * 7) % len(pids)]}"))
        assert len(r.json()["rows"]) == SAMPLES
        t_sql, _ = median_of(3, lambda i: c.get(f"/api/sql/{v}", params={
            "q": "SELECT difficulty, avg(completion_tokens) FROM data GROUP BY difficulty"}))
        rss1 = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(10)

    # Stock tools, same queries, in this process.
    import duckdb
    import pandas as pd

    con = duckdb.connect()
    flist = "[" + ", ".join("'" + f + "'" for f in files) + "]"
    con.execute(f"CREATE VIEW data AS SELECT * FROM read_parquet({flist})")
    cols = "problem_id, sample_idx, left(problem, 300), left(completion, 300), pred_answer, correct"

    def duck(i):
        con.execute(f"SELECT {cols} FROM data WHERE correct = false LIMIT 50 OFFSET {50 * i}").fetchall()
        return con.execute("SELECT count(*) FROM data WHERE correct = false").fetchone()[0]
    d_filter = statistics.median(timed(lambda: duck(i))[0] for i in range(args.repeats))
    d_search = statistics.median(timed(lambda: con.execute(
        "SELECT count(*) FROM data WHERE problem ILIKE ? OR completion ILIKE ?",
        [f"%{NEEDLE}%"] * 2).fetchone())[0] for _ in range(3))
    d_problem = statistics.median(timed(lambda: con.execute(
        "SELECT * FROM data WHERE problem_id = ?", [pids[i % len(pids)]]).fetchall())[0]
        for i in range(args.repeats))
    p_filter, _ = timed(lambda: (lambda df: (df[~df.correct].head(50), int((~df.correct).sum())))(
        pd.read_parquet(files, columns=["problem_id", "sample_idx", "problem", "pred_answer", "correct"])))
    p_search, _ = timed(lambda: (lambda df: int((df.problem.str.contains(NEEDLE, case=False)
                                                | df.completion.str.contains(NEEDLE, case=False)).sum()))(
        pd.read_parquet(files, columns=["problem", "completion"])))

    rows = [
        ("start -> runs page", t_runs, 2.0, None, None),
        ("start -> first table page", t_first, 2.0, None, None),
        ("filter (page + count), median", t_filter, 0.5, d_filter, p_filter),
        ("sort tokens + filter, median", t_sort, 0.5, None, None),
        ("sort provenance_score, median", t_score, 0.5, None, None),
        ("sort, completion column shown", t_text, 0.5, None, None),
        ("filter menus, first open", t_facets, 2.0, None, None),
        ("histogram (filtered), median", t_hist, 0.5, None, None),
        ("full-text search, median of 3", t_search, 2.0, d_search, p_search),
        ("problem page, median", t_problem, 0.2, d_problem, None),
        ("SQL box group-by, median of 3", t_sql, 2.0, None, None),
    ]
    print(f"\ndistillery view on {args.rows:,} rows ({len(files)} files)")
    print(f"{'figure':<32} {'viewer':>9} {'target':>8} {'ok':>4} {'duckdb':>9} {'ratio':>6} "
          f"{'pandas':>9} {'ratio':>6}")
    for name, t, target, duck_t, pandas_t in rows:
        line = f"{name:<32} {t * 1000:>7.0f}ms {target * 1000:>6.0f}ms {'yes' if t < target else 'NO':>4}"
        if duck_t is not None:
            line += f" {duck_t * 1000:>7.0f}ms {t / duck_t:>6.2f}"
        if pandas_t is not None:
            line += f" {pandas_t * 1000:>7.0f}ms {t / pandas_t:>6.2f}"
        print(line)
    print(f"server RSS: {rss0 / 2**20:.0f} MiB after start -> {rss1 / 2**20:.0f} MiB after the "
          f"queries (Parquet on disk: {sum(os.path.getsize(f) for f in files) / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
