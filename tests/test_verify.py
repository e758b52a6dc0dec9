"""verify: answer extraction, math-verify under a hard timeout, pass rates and difficulty.

Upstream `generate` versions are written through the real store and runner by a test-only stage
(`write_generate`) from hand-written traces whose answers we know.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import pytest

from pipeline.config import load_recipe
from pipeline.runner import run_stage
from pipeline.stage import Stage
from stages import provenance, prune, select, verify
from stages.verify import Checker, VerifyConfig, extract_answer, verify_rows


# --------------------------------------------------------------------- a generate-shaped upstream

@dataclass
class HandWrittenConfig:
    """path: JSON list of generate-shaped rows to write as the version."""

    path: str = ""


def _write_rows(cfg, inputs, ctx):
    import pyarrow as pa

    with open(cfg.path) as f:
        rows = json.load(f)
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([
        ("problem_id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
        ("source", pa.string()), ("trace_id", pa.string()), ("teacher", pa.string()),
        ("sample_idx", pa.int64()), ("completion", pa.string()), ("reasoning", pa.string()),
        ("final", pa.string()), ("completion_tokens", pa.int64()), ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()), ("prompt_messages", message)])
    return pa.Table.from_pylist(rows, schema=schema)


HAND_WRITTEN = Stage(name="generate", config=HandWrittenConfig, reads=(), requires=(),
                     adds=("trace_id", "completion", "final"), run=_write_rows)
TEST_STAGES = {"generate": HAND_WRITTEN, "verify": verify.STAGE, "prune": prune.STAGE,
               "provenance": provenance.STAGE, "select": select.STAGE}


def trace(problem: str, answer, completion: str, idx: int, tokens: int | None = None,
          source: str = "test") -> dict:
    """One generate-shaped row; token counts default to a word count (tests only)."""
    pid = hashlib.sha256(problem.encode()).hexdigest()[:16]
    reasoning, final = ("", completion)
    if "</think>" in completion:
        reasoning, final = completion.split("</think>", 1)
        reasoning = reasoning.replace("<think>", "").strip()
    return {"problem_id": pid, "problem": problem, "answer": answer, "source": source,
            "trace_id": hashlib.sha256(f"{pid}:{idx}".encode()).hexdigest()[:16],
            "teacher": "hand", "sample_idx": idx, "completion": completion,
            "reasoning": reasoning, "final": final.strip(),
            "completion_tokens": tokens if tokens is not None else len(completion.split()),
            "finish_reason": "stop", "prompt_tokens": 12,
            "prompt_messages": [{"role": "user", "content": problem}]}


def write_generate(tmp_path, rows: list[dict], overrides=()):
    """Write `rows` as a generate version under tmp_path/data; return the recipe for later stages."""
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(rows))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"data_root: {tmp_path / 'data'}\nteacher: ''\n"
                           f"generate:\n  path: {rows_file}\n")
    recipe = load_recipe(str(recipe_file), list(overrides), stages=TEST_STAGES)
    run_stage("generate", recipe, stages=TEST_STAGES, log=lambda *_: None)
    return recipe


def run(name, recipe):
    return run_stage(name, recipe, stages=TEST_STAGES, log=lambda *_: None)


# --------------------------------------------------------------------- extraction

def test_extract_boxed_first_then_fallbacks():
    assert extract_answer("so x = 3, \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_answer("first \\boxed{3} then \\boxed{4}") == "4"           # the last one
    assert extract_answer("\\boxed{3}, then cut off \\boxed{4") == "3"          # unclosed skipped
    assert extract_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces still balance
    assert extract_answer("The answer is 42.") == "42"                          # default fallback
    assert extract_answer("The answer is $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert extract_answer("we get 7 apples", ["answer_is"]) is None             # no box, no "is"
    assert extract_answer("we get 7 apples") == "7"                 # math-verify's, by default
    assert extract_answer("we get 7 apples, then 1,200", ["last_number"]) == "1200"
    assert extract_answer("I give up") is None
    assert extract_answer("") is None


# --------------------------------------------------------------------- bounded checking

@pytest.fixture(scope="module")
def checker():
    c = Checker(timeout_s=1.0, memory_mib=2048)
    yield c
    c.close()


def test_checker_equivalent_forms_right_and_wrong(checker):
    assert checker.check("\\frac{1}{2}", "0.5") == (True, "ok")
    assert checker.check("0.5", "\\frac{1}{2}") == (True, "ok")
    assert checker.check("1+x", "x+1") == (True, "ok")
    assert checker.check("16", "16") == (True, "ok")
    assert checker.check("17", "16") == (False, "ok")


def test_checker_adversarial_input_times_out_and_recovers(checker):
    # verify() would compute 10^(10^10000000000) exactly: hours of C code holding the GIL,
    # which math-verify's own SIGALRM timeout cannot interrupt.
    start = time.time()
    assert checker.check("10^{10^{10^{10}}}", "1") == (None, "timeout")
    nested = "1"
    for _ in range(300):
        nested = "\\frac{" + nested + "}{2}"
    assert checker.check(nested, "1") == (None, "timeout")
    elapsed = time.time() - start
    assert elapsed < 2 * 1.0 + 2.0, elapsed     # two timeouts of 1 s + kill/re-fork slack
    # The killed children were replaced: the next call is answered normally, quickly.
    start = time.time()
    assert checker.check("\\frac{1}{2}", "0.5") == (True, "ok")
    assert time.time() - start < 1.0


def test_verify_rows_statuses(checker):
    cfg = VerifyConfig()
    cols = verify_rows(["\\boxed{4}", "\\boxed{5}", "no answer", "\\boxed{4}", "", "\\boxed{2^{2^{2^{40}}}}"],
                       ["4", "4", "4", None, "4", "3"], cfg, checker)
    assert cols["verify_status"] == ["ok", "ok", "no_answer", "no_reference", "no_answer", "timeout"]
    assert cols["correct"] == [True, False, False, None, False, None]
    assert cols["pred_answer"] == ["4", "5", None, "4", None, "2^{2^{2^{40}}}"]


# --------------------------------------------------------------------- the stage

def _hand_written_rows() -> list[dict]:
    rows = []
    # A: 5/5 correct (pass rate 1.0 -> easy), mixed forms of one half.
    for i, c in enumerate(["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "The answer is 1/2.",
                           "\\boxed{\\dfrac{1}{2}}", "\\boxed{.5}"]):
        rows.append(trace("Half of one?", "0.5", f"<think>\nhalve it\n</think>\n{c}", i))
    # B: 2/4 correct (0.5 -> medium); one has no answer at all.
    for i, c in enumerate(["\\boxed{7}", "\\boxed{8}", "I give up", "\\boxed{7}"]):
        rows.append(trace("Compute 3 + 4.", "7", f"<think>\nadd\n</think>\n{c}", i))
    # C: 0/3 correct (0.0 -> hard): stays, it is REDI data. One empty completion.
    for i, c in enumerate(["\\boxed{1}", "", "\\boxed{2}"]):
        rows.append(trace("Compute 9 - 9.", "0", c, i))
    # D: no reference (a non-math source): correct null, pass rate null.
    for i in range(2):
        rows.append(trace("Write a haiku.", None, "<think>\nhm\n</think>\nold pond \\boxed{x}", i,
                          source="poetry"))
    return rows


def test_verify_stage_pass_rates_difficulty_and_stats(tmp_path, ray_cluster):
    rows = _hand_written_rows()
    recipe = write_generate(tmp_path, rows)
    v = run("verify", recipe)
    got = {r["trace_id"]: r for r in v.read_table().to_pylist()}
    assert len(got) == len(rows)                 # nothing dropped: incorrect traces are kept
    assert v.manifest["drops"] == {}
    by_problem = {}
    for r in got.values():
        by_problem.setdefault(r["problem"], []).append(r)

    half = by_problem["Half of one?"]
    assert all(r["correct"] and r["verify_status"] == "ok" for r in half)
    assert {r["pass_rate"] for r in half} == {1.0} and {r["difficulty"] for r in half} == {"easy"}

    add = sorted(by_problem["Compute 3 + 4."], key=lambda r: r["sample_idx"])
    assert [r["correct"] for r in add] == [True, False, False, True]
    assert [r["verify_status"] for r in add] == ["ok", "ok", "no_answer", "ok"]
    assert {r["pass_rate"] for r in add} == {0.5} and {r["difficulty"] for r in add} == {"medium"}

    zero = by_problem["Compute 9 - 9."]
    assert {r["pass_rate"] for r in zero} == {0.0} and {r["difficulty"] for r in zero} == {"hard"}

    poem = by_problem["Write a haiku."]
    assert {r["verify_status"] for r in poem} == {"no_reference"}
    assert {r["correct"] for r in poem} == {None} and {r["pass_rate"] for r in poem} == {None}
    assert poem[0]["pred_answer"] == "x"

    stats = v.manifest["stats"]
    assert stats["traces"] == 14 and stats["verifiable"] == 12 and stats["correct"] == 7
    assert stats["accuracy"] == round(7 / 12, 4)
    assert stats["status_counts"] == {"ok": 10, "no_answer": 2, "no_reference": 2}
    assert stats["difficulty_counts"] == {"easy": 1, "medium": 1, "hard": 1}
    assert stats["pass_rate_histogram"]["0.0-0.1"] == 1
    assert stats["pass_rate_histogram"]["0.5-0.6"] == 1
    assert stats["pass_rate_histogram"]["0.9-1.0"] == 1


def test_verify_thresholds_and_skipped_sources(tmp_path, ray_cluster):
    rows = _hand_written_rows() + [
        trace("Print 7 in Python.", "7", "\\boxed{7}", 0, source="code")]
    recipe = write_generate(tmp_path, rows, ["verify.medium_min_pass_rate=0.6",
                                             "verify.easy_min_pass_rate=1.0",
                                             "verify.skip_sources=[code]"])
    v = run("verify", recipe)
    got = {r["problem"]: r for r in v.read_table().to_pylist()}
    assert got["Compute 3 + 4."]["difficulty"] == "hard"      # 0.5 < 0.6
    assert got["Half of one?"]["difficulty"] == "easy"        # 1.0 >= 1.0
    code = got["Print 7 in Python."]                          # not checked, passes through
    assert (code["verify_status"], code["correct"], code["pass_rate"]) == ("no_reference", None, None)


def test_verify_bad_config_is_a_user_error(tmp_path, ray_cluster):
    from pipeline.errors import UserError

    recipe = write_generate(tmp_path, _hand_written_rows()[:2], ["verify.fallbacks=[lastnum]"])
    with pytest.raises(UserError, match="lastnum"):
        run("verify", recipe)
    assert not os.path.exists(tmp_path / "data" / "verify" / "LATEST")


def test_verify_empty_generate_version_is_a_user_error(tmp_path, ray_cluster):
    from pipeline.errors import UserError

    recipe = write_generate(tmp_path, [])
    with pytest.raises(UserError, match="no traces to verify"):
        run("verify", recipe)
    assert not os.path.exists(tmp_path / "data" / "verify" / "LATEST")
