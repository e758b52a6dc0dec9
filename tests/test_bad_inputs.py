"""What users bring: every case ends in correct rows, or in exit 2 with a one-line message that
names the file, the row/line and the field — no traceback, and no complete version left behind.

The real CLI runs each case (`pipeline.cli.main` in this process, which is what the console
script calls; a few cases also through `.venv/bin/distillery` to see the real stderr). Most cases
fail before Ray or vLLM start, so the module stays fast. Small fixed files live in
tests/bad_inputs/; big ones are generated here.
"""
from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.store import MANIFEST

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "bad_inputs")
PROBLEMS = [("What is 1 + 1?", "2"), ("What is 2 + 3?", "5"), ("Compute 7 - 4.", "3")]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def completes(data_root: str, stage: str) -> list[str]:
    """Complete versions of `stage` (folders with a manifest)."""
    folder = os.path.join(data_root, stage)
    if not os.path.isdir(folder):
        return []
    return [v for v in os.listdir(folder)
            if os.path.exists(os.path.join(folder, v, MANIFEST))
            or os.path.exists(os.path.join(folder, v, "manifest.json"))]


def assert_user_error(code: int, err: str, data_root: str, stage: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert completes(data_root, stage) == [], f"a complete {stage} version was left behind"


def ingest(tmp_path, path: str, capsys, *extra: str) -> tuple[int, str, list[dict] | None]:
    data_root = str(tmp_path / "data")
    code, out, err = run_cli(["run", "prompts", "--recipe", os.path.join(REPO, "configs/tiny.yaml"),
                              f"data_root={data_root}", f"prompts.path={path}", *extra], capsys)
    rows = None
    if code == 0:
        (version,) = completes(data_root, "prompts")
        rows = pq.read_table(os.path.join(data_root, "prompts", version)).to_pylist()
    return code, err, rows


# --------------------------------------------------------------------- item 4: BOM and CRLF

def _jsonl(problems) -> str:
    return "".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in problems)


def _windows(text: str, bom: bytes = codecs.BOM_UTF8, encoding: str = "utf-8") -> bytes:
    body = text.replace("\n", "\r\n").encode(encoding)
    if encoding == "utf-16-le":
        return codecs.BOM_UTF16_LE + body
    return bom + body


TEXT_FORMATS = {
    "jsonl": _jsonl(PROBLEMS),
    "json": json.dumps([{"problem": p, "answer": a} for p, a in PROBLEMS], indent=1) + "\n",
    "csv": "problem,answer\n" + "".join(f'"{p}",{a}\n' for p, a in PROBLEMS),
    "tsv": "problem\tanswer\n" + "".join(f"{p}\t{a}\n" for p, a in PROBLEMS),
}


@pytest.mark.parametrize("fmt", list(TEXT_FORMATS))
@pytest.mark.parametrize("encoding", ["utf-8-bom", "utf-16-bom"])
def test_byte_order_mark_and_crlf_are_read(fmt, encoding, tmp_path, capsys):
    """A Windows export (UTF-8 BOM or UTF-16 'Unicode text', CRLF) reads like a clean file.
    Before: 'line 1: not valid JSON' (JSON/JSONL), "no field 'problem'" (CSV: the header began
    with U+FEFF)."""
    path = tmp_path / f"problems.{fmt}"
    path.write_bytes(_windows(TEXT_FORMATS[fmt], encoding="utf-16-le" if "16" in encoding
                              else "utf-8"))
    code, err, rows = ingest(tmp_path, str(path), capsys)
    assert code == 0, err
    assert [(r["problem"], r["answer"]) for r in rows] == PROBLEMS


def test_recipe_dap_prompts_and_eval_set_with_bom_and_crlf(tmp_path, capsys):
    from pipeline.config import load_recipe
    from stages import STAGES
    from stages.evaluate import EvaluateConfig, load_eval_problems
    from stages.prune import load_prompts

    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(_windows(f"data_root: {tmp_path / 'data'}\nprompts:\n  synthetic_n: 5\n"))
    assert load_recipe(str(recipe), [], STAGES).configs["prompts"].synthetic_n == 5

    dap = tmp_path / "dap"
    dap.mkdir()
    for name in ("judge", "simple", "moderate", "complex"):
        src = open(os.path.join(REPO, "configs/dap", f"{name}.txt"), encoding="utf-8").read()
        (dap / f"{name}.txt").write_bytes(_windows(src))
        want = src.strip()
    got = load_prompts(str(dap))
    assert got["complex"] == want and "\r" not in got["judge"] and "\ufeff" not in got["judge"]

    evals = tmp_path / "eval.jsonl"
    evals.write_bytes(_windows(_jsonl(PROBLEMS)))
    rows = load_eval_problems(EvaluateConfig(eval_path=str(evals)))
    assert [(r["problem"], r["answer"]) for r in rows] == PROBLEMS


def test_windows_jsonl_through_the_console_script(tmp_path):
    """The installed `distillery` script end to end: a BOM + CRLF file ingests (exit 0)."""
    path = tmp_path / "win.jsonl"
    path.write_bytes(_windows(_jsonl(PROBLEMS)))
    exe = os.path.join(os.path.dirname(sys.executable), "distillery")
    done = subprocess.run([exe, "run", "prompts", "--recipe", "configs/tiny.yaml",
                           f"data_root={tmp_path / 'data'}", f"prompts.path={path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert completes(str(tmp_path / "data"), "prompts")


# --------------------------------------------------------------------- item 5: errors inside Ray

def _guarded(job, capsys) -> tuple[int, str]:
    from pipeline.cli import run_guarded

    code = run_guarded(lambda args: job(), None)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["data task", "actor constructor", "data actor pool"])
def test_user_errors_raised_inside_ray_reach_the_cli_as_exit_2(where, ray_cluster, capsys):
    """Before: Ray's RayTaskError / ActorDiedError traceback and exit 1."""
    import ray
    import ray.data

    from pipeline.errors import UserError

    # Defined here, not at module level: Ray's workers cannot import a test module, and
    # cloudpickle sends local functions and classes by value.
    class FailingActor:
        def __init__(self):
            raise UserError("teacher /models/base: the model has no chat template (from an actor)")

        def ping(self):
            return 1

    class FailingUDF:  # a Ray Data actor-pool UDF whose constructor fails, like a vLLM engine
        def __init__(self):
            raise UserError("teacher /models/bad: its tokenizer does not load (from a pool actor)")

        def __call__(self, batch):
            return batch

    def failing_batch(batch):
        raise UserError("rows.jsonl: line 3: field 'problem': expected text (from a Ray Data task)")

    def job():
        if where == "data task":
            ray.data.range(8).map_batches(failing_batch).materialize()
        elif where == "actor constructor":
            actor = ray.remote(FailingActor).remote()
            ray.get(actor.ping.remote())
        else:
            ray.data.range(8).map_batches(
                FailingUDF, compute=ray.data.ActorPoolStrategy(size=1)).materialize()

    code, err = _guarded(job, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    want = {"data task": "rows.jsonl: line 3: field 'problem': expected text (from a Ray Data task)",
            "actor constructor": "teacher /models/base: the model has no chat template (from an actor)",
            "data actor pool": "teacher /models/bad: its tokenizer does not load (from a pool actor)"}
    assert lines[0] == f"error: {want[where]}"
    assert "Traceback" not in err.split(lines[0])[-1]


def test_other_errors_inside_ray_stay_exit_1_with_their_traceback(ray_cluster, capsys):
    import ray.data

    def boom(batch):
        raise ZeroDivisionError("a bug, not the user's input")

    from pipeline.cli import run_guarded

    with pytest.raises(Exception, match="a bug"):
        run_guarded(lambda args: ray.data.range(4).map_batches(boom).materialize(), None)
