"""Import throughput and peak memory: `generate.backend: import` against a plain
`datasets.load_dataset("json", ...)` + `to_parquet` of the same file, measured in one run.

    .venv/bin/python bench/import.py --traces 20000 --chars 24000

Writes an OpenR1-Math-layout JSON-lines file of `--traces` traces (two generations per row, each
`--chars` characters of reasoning, ~6k tokens at 24,000) and then, each in its own subprocess:

  baseline  datasets.load_dataset("json", data_files=FILE, split="train") and
            Dataset.to_parquet(...): Arrow conversion of every column, no parsing of the traces;
  import    the prompts stage (problems, streamed) and generate with backend import
            (configs/import.yaml): layout checks, the reasoning split, trace ids, token counts
            with the tiny model's tokenizer, resumable shards.

`--profile` runs the import child under cProfile and prints the functions with the most own time
(where the import's time goes; it slows the child, so its wall is not the figure to quote).

Peak RSS of each is the child's own (os.wait4's rusage: the child and the children it waited
for). Prints traces/s of each, the ratio and both peaks. The issue's scale is 1,000,000 traces
of ~6k tokens; this machine runs a smaller file by default (state the scale with the figures).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_file(path: str, traces: int, chars: int, seed: int = 0) -> int:
    """An OpenR1-layout JSONL of `traces` traces, 2 per row; returns its size in bytes."""
    rng = random.Random(seed)
    words = ["so", "the", "sum", "is", "then", "we", "check", "again", "wait", "add", "carry",
             "=", "+", "1", "2", "3", "4", "5", "7", "9", "\\frac{1}{2}", "x", "hence"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, traces, 2):
            a, b = rng.randint(1, 10 ** 6), rng.randint(1, 10 ** 6)
            gens, verdicts = [], []
            for k in range(min(2, traces - i)):
                n = 0
                body = []
                while n < chars:
                    w = rng.choice(words)
                    body.append(w)
                    n += len(w) + 1
                answer = a + b + k
                gens.append("<think>\n" + " ".join(body) + "\n</think>\n\n\\boxed{%d}" % answer)
                verdicts.append(k == 0)
            f.write(json.dumps({"problem": f"Problem {i}: what is {a} + {b}?",
                                "answer": str(a + b), "source": "bench",
                                "generations": gens, "correctness_math_verify": verdicts}) + "\n")
    return os.path.getsize(path)


BASELINE = textwrap.dedent("""
    import sys, time
    import datasets
    datasets.disable_progress_bars()
    start = time.time()
    ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train",
                               cache_dir=sys.argv[2])
    ds.to_parquet(sys.argv[3])
    print("WALL", time.time() - start, "ROWS", ds.num_rows, flush=True)
""")

IMPORT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[4])
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from stages import STAGES
    rec = load_recipe(sys.argv[4] + "/configs/import.yaml",
                      [f"prompts.path={sys.argv[1]}", f"data_root={sys.argv[2]}",
                       f"student={sys.argv[3]}"], STAGES)
    start = time.time()
    run_stage("prompts", rec, log=lambda *_: None)
    gen = run_stage("generate", rec, log=lambda *_: None)
    print("WALL", time.time() - start, "ROWS", gen.rows, "GEN_WALL", gen.manifest["wall_s"],
          flush=True)
""")


def run_child(cmd: list[str]) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix both runs).
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd[:3])}\n{err[-3000:]}")
    line = next(line for line in out.splitlines() if line.startswith("WALL"))
    parts = line.split()
    got = {parts[i]: float(parts[i + 1]) for i in range(0, len(parts), 2)}
    got["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=20000)
    ap.add_argument("--chars", type=int, default=24000, help="characters of reasoning per trace")
    ap.add_argument("--dir", default="", help="scratch folder (default: a temp folder)")
    ap.add_argument("--profile", action="store_true",
                    help="run the import child under cProfile; print its top functions")
    args = ap.parse_args()

    work = args.dir or tempfile.mkdtemp(prefix="bench-import-")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "traces.jsonl")
    start = time.time()
    size = write_file(path, args.traces, args.chars)
    print(f"file: {args.traces} traces, {size / 2**20:.0f} MiB ({time.time() - start:.0f} s to "
          f"write)", flush=True)
    sys.path.insert(0, REPO)
    from pipeline.apps.tiny_model import build_tiny_model

    model = build_tiny_model(os.path.join(work, "tiny"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline())["generations"][0]
    print(f"tokens per trace (tiny tokenizer): {len(tok(first)['input_ids'])}", flush=True)

    py = sys.executable
    base = run_child([py, "-c", BASELINE, path, os.path.join(work, "hf-cache"),
                      os.path.join(work, "baseline.parquet")])
    child = [py, "-c", IMPORT]
    if args.profile:  # cProfile takes a script, not -c
        script, prof = os.path.join(work, "import_child.py"), os.path.join(work, "import.prof")
        with open(script, "w") as f:
            f.write(IMPORT)
        child = [py, "-m", "cProfile", "-o", prof, script]
    shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)  # a rerun imports again
    ours = run_child(child + [path, os.path.join(work, "data"), model, REPO])
    assert int(ours["ROWS"]) == args.traces, ours
    b_rate, o_rate = args.traces / base["WALL"], args.traces / ours["WALL"]
    print(f"baseline load_dataset+to_parquet: {base['WALL']:.1f} s, {b_rate:.0f} traces/s, "
          f"peak RSS {base['peak_rss_mib']:.0f} MiB")
    print(f"import (prompts + generate):      {ours['WALL']:.1f} s, {o_rate:.0f} traces/s, "
          f"peak RSS {ours['peak_rss_mib']:.0f} MiB (generate stage alone {ours['GEN_WALL']:.1f} s)")
    print(f"ratio import/baseline throughput: {o_rate / b_rate:.3f}")
    if args.profile:
        import pstats

        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
