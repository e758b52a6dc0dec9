"""Benchmark: the verify stage (Ray tasks, killable math-verify children) vs a plain loop.

    .venv/bin/python bench/verify.py --rows 2000

Both sides check the same generate-shaped rows against the same references:
  stock — one process, for each row `math_verify.parse(reference)`, `parse(completion)`,
          `verify(...)` with math-verify's own (SIGALRM) timeouts: what a script would do.
  ours  — `distillery run verify` on a generate version holding those rows (local Ray, the
          machine's CPUs), timed by the stage itself (manifest wall_s: repartition, Ray tasks,
          pass rates, the second pass), Ray already started; cold (first job: Ray worker
          processes and math-verify helpers start) and warm (a second version on them).
It also measures what the hard timeout costs: one Checker call vs a direct math-verify call on
the same pairs, and a kill + re-fork after a timeout.
Rows: fraction answers in mixed forms (\\frac{p}{q}, p/q, decimals, "the answer is"), n=4 samples
per problem, ~1/3 wrong — so identical (answer, reference) pairs recur as they do in real runs.
"""
from __future__ import annotations

import argparse
import fractions
import json
import os
import random
import sys
import tempfile
import time
from stages import STAGES

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_rows(n_rows: int, samples: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for p in range(n_rows // samples):
        a, b = rng.randint(1, 40), rng.choice([2, 4, 5, 8, 10, 3, 6, 7])
        value = fractions.Fraction(a, b)
        ref = str(value.numerator) if value.denominator == 1 else \
            f"\\frac{{{value.numerator}}}{{{value.denominator}}}"
        problem = f"Compute {a} divided by {b}, as a reduced fraction. (#{p})"
        for k in range(samples):
            shown = value if rng.random() > 0.33 else value + rng.choice([1, -1, fractions.Fraction(1, 2)])
            form = rng.randrange(4)
            if form == 0:
                ans = f"\\boxed{{\\frac{{{shown.numerator}}}{{{shown.denominator}}}}}"
            elif form == 1:
                ans = f"\\boxed{{{shown.numerator}/{shown.denominator}}}"
            elif form == 2 and 10 ** 6 % shown.denominator == 0:
                ans = f"\\boxed{{{float(shown):g}}}"
            else:
                ans = f"The answer is {shown.numerator}/{shown.denominator}."
            completion = (f"<think>\nWe divide {a} by {b} and reduce.\n</think>\n{ans}")
            rows.append({
                "problem_id": f"p{p:06d}", "problem": problem, "answer": ref, "source": "bench",
                "trace_id": f"p{p:06d}-{k}", "teacher": "bench", "sample_idx": k,
                "completion": completion, "reasoning": f"We divide {a} by {b} and reduce.",
                "final": ans, "completion_tokens": 20, "finish_reason": "stop",
                "prompt_tokens": 20, "prompt_messages": [{"role": "user", "content": problem}]})
    return rows


def stock_loop(rows: list[dict]) -> tuple[float, int]:
    from math_verify import parse, verify

    start = time.time()
    correct = 0
    for r in rows:
        gold = parse(f"${r['answer']}$")
        pred = parse(r["completion"])
        correct += bool(verify(gold, pred))
    return time.time() - start, correct


def write_generate(root: str, rows: list[dict]) -> None:
    """The rows as a complete generate version, through the real store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.runner import _describe
    from pipeline.store import Store

    store = Store(root)
    tmp = store.begin("generate", "bench", clear=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(tmp, "part-00000-000.parquet"))
    n, schema = _describe(store, tmp)
    store.commit("generate", "bench", {"stage": "generate", "version": "bench", "splits": [],
                                       "rows_out": n, "schema": schema, "stats": {}})


def checker_overhead(rows: list[dict], calls: int = 300) -> dict:
    from math_verify import parse, verify

    from stages.lib.answers import Checker, extract_answer

    pairs = [(extract_answer(r["final"], ["answer_is"]), r["answer"]) for r in rows[:calls]]
    start = time.time()
    for pred, ref in pairs:
        verify(parse("\\boxed{" + ref + "}", parsing_timeout=None),
               parse("\\boxed{" + pred + "}", parsing_timeout=None), timeout_seconds=None)
    direct = (time.time() - start) / len(pairs)
    c = Checker(timeout_s=1.0, memory_mib=2048)
    c.check("1", "1")  # helper start-up, not counted
    start = time.time()
    for pred, ref in pairs:
        c.check(pred, ref)
    in_child = (time.time() - start) / len(pairs)
    start = time.time()
    c.check_many(pairs)
    batched = (time.time() - start) / len(pairs)
    start = time.time()
    c.check("10^{10^{10^{10}}}", "1")  # times out after 1 s, kill + re-fork
    refork = time.time() - start - 1.0
    c.close()
    return {"direct_ms": direct * 1e3, "checker_ms": in_child * 1e3, "batched_ms": batched * 1e3,
            "kill_refork_ms": refork * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved stock/ours pairs")
    args = ap.parse_args()
    rows = make_rows(args.rows)
    distinct = len({(r["final"], r["answer"]) for r in rows})
    print(f"rows: {len(rows)} ({len(rows) // 4} problems x 4 samples), "
          f"distinct (final, reference) pairs: {distinct}, CPUs: {os.cpu_count()}")

    over = checker_overhead(rows)
    print(f"per call: direct math-verify {over['direct_ms']:.2f} ms; through the killable child "
          f"{over['checker_ms']:.2f} ms one by one, {over['batched_ms']:.2f} ms batched "
          f"(check_many); kill + re-fork after a timeout {over['kill_refork_ms']:.0f} ms")

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from pipeline.stage import ensure_ray

    with tempfile.TemporaryDirectory() as root:
        write_generate(root, rows)
        recipe_file = os.path.join(root, "recipe.yaml")
        with open(recipe_file, "w") as f:
            f.write(f"data_root: {root}\n")
        t = time.time()
        ensure_ray()
        print(f"(Ray start {time.time() - t:.1f} s, not counted)")

        def ours(batch_size: int) -> float:
            # Each batch size is a new version (same work): the stage really runs each time.
            recipe = load_recipe(recipe_file, [f"verify.batch_size={batch_size}"], STAGES)
            v = run_stage("verify", recipe, log=lambda *_: None)
            stats = v.manifest["stats"]
            print(f"ours   verify stage on Ray: {v.manifest['wall_s']:.2f} s, "
                  f"{len(rows) / v.manifest['wall_s']:.0f} traces/s, correct {stats['correct']}, "
                  f"statuses {json.dumps(stats['status_counts'])}")
            return v.manifest["wall_s"]

        # Cold: the first job also starts Ray worker processes and their math-verify helpers.
        print("cold:")
        cold = ours(256)
        # Warm, interleaved with the stock loop, so load from other work hits both alike.
        stock_runs, warm_runs = [], []
        for k in range(args.repeats):
            stock_s, stock_correct = stock_loop(rows)
            print(f"stock  single-process math-verify loop: {stock_s:.2f} s, "
                  f"{len(rows) / stock_s:.0f} traces/s, correct {stock_correct}")
            stock_runs.append(stock_s)
            warm_runs.append(ours(255 - k))
    stock_s, warm_s = sorted(stock_runs)[len(stock_runs) // 2], sorted(warm_runs)[len(warm_runs) // 2]
    print(f"median: stock {len(rows) / stock_s:.0f} traces/s, ours warm {len(rows) / warm_s:.0f} "
          f"traces/s, ours cold {len(rows) / cold:.0f} traces/s")
    print(f"ratio ours(warm)/stock: {stock_s / warm_s:.2f}x   ours(cold)/stock: {stock_s / cold:.2f}x")


if __name__ == "__main__":
    main()
