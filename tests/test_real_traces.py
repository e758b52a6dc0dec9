"""Text written by a real reasoning model, through the stages that read it.

../shared/real/traces/r1distill_gsm8k/: DeepSeek-R1-Distill-Qwen-32B on 500 GSM8K problems. Its
prompt ended in `<think>\\n`, so a completion closes a reasoning it never opened (492 of 500 have
`</think>`; the other 8 were cut near 2,000 tokens inside their reasoning). The reasoning is long
free text, the answers are markdown with numbered lists, bold headers and LaTeX displays
(`\\[ … \\]`). Through verify's extraction and grading, the sentence splitter, DAP's budget counts
(prune, budget mode) and the viewer.

Plain functions and lazily built fixtures only: other stages' tests on these traces (provenance
scoring) belong here too.
"""
from __future__ import annotations

import functools
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R1_GSM8K = os.path.join(REPO, "..", "shared", "real", "traces", "r1distill_gsm8k",
                        "benchmark_results_qwen2.5-32b-on-deepseek-r1-distill-qwen-32b_gsm8k.json")
# What the source's own judge counted correct (its `results.correct_count`; no per-item label).
SOURCE_CORRECT = 474


@functools.lru_cache(maxsize=1)
def r1_tasks() -> tuple[dict, ...]:
    """[{question, correct_answer, completion}] as the source file holds them."""
    with open(R1_GSM8K, encoding="utf-8") as f:
        data = json.load(f)
    assert data["results"]["correct_count"]["thinking_model"] == SOURCE_CORRECT
    return tuple({"question": t["question"], "correct_answer": t["correct_answer"],
                  "completion": t["model_answers"]["thinking_model"]} for t in data["tasks"])


def r1_generate_rows(count_tokens=None) -> list[dict]:
    """The 500 completions as generate writes its rows. The generation prompt opened the
    reasoning, so the split reads `<think>\\n` + completion (stages/lib/chat.py split_think): a
    completion without `</think>` is all reasoning, cut at max_tokens ("length"). Token counts:
    `count_tokens(text)`, or words when None."""
    from stages.lib.chat import split_think
    from stages.lib.ingest import normalize, problem_id
    from stages.lib.references import reference_answer

    rows = []
    for i, t in enumerate(r1_tasks()):
        completion = t["completion"]
        reasoning, final = split_think("<think>\n" + completion)
        pid = problem_id(t["question"])
        rows.append({
            "problem_id": pid, "problem": normalize(t["question"]),
            "answer": reference_answer(t["correct_answer"], f"{R1_GSM8K}: task {i}", "correct_answer"),
            "source": "r1distill_gsm8k", "trace_id": f"{pid}-r1", "teacher": "r1-distill-32b",
            "sample_idx": 0, "completion": completion, "reasoning": reasoning, "final": final,
            "completion_tokens": (count_tokens or (lambda s: len(s.split())))(completion),
            "finish_reason": "stop" if "</think>" in completion else "length",
            "prompt_tokens": 0, "prompt_messages": [{"role": "user", "content": t["question"]}]})
    return rows


def test_r1_traces_as_the_source_wrote_them():
    tasks = r1_tasks()
    assert len(tasks) == 500
    assert sum("</think>" in t["completion"] for t in tasks) == 492
    assert not any("<think>" in t["completion"] for t in tasks)


# ------------------------------------------------------------------------------ verify

def test_r1_traces_graded_close_to_the_source(tmp_path, ray_cluster):
    """The real verify stage (defaults) on the 500: 470 correct, against the source judge's 474.
    The 8 traces cut inside their reasoning have no answer; of the rest, those graded wrong
    give a different number (e.g. \\boxed{12} for 13), so the gap is the judge's leniency."""
    from test_verify import run, write_generate

    rows = r1_generate_rows()
    v = run("verify", write_generate(tmp_path, rows))
    got = v.read_table().to_pylist()
    stats = v.manifest["stats"]
    assert stats["traces"] == stats["verifiable"] == 500
    assert SOURCE_CORRECT - 10 <= stats["correct"] <= SOURCE_CORRECT + 5, stats
    assert stats["status_counts"] == {"ok": 492, "no_answer": 8}
    cut = {r["trace_id"] for r in rows if r["finish_reason"] == "length"}
    assert {r["trace_id"] for r in got if r["verify_status"] == "no_answer"} == cut
    # Every correct trace's answer is the reference's number, in whatever form it was written.
    for r in got:
        if r["correct"]:
            digits = re.sub(r"[^\d.-]", "", r["pred_answer"].replace("\\!", ""))
            assert float(digits) == float(r["answer"]), (r["pred_answer"], r["answer"])


# ------------------------------------------------------------------------------ sentences

_DISPLAY = re.compile(r"\\\[.*?\\\]", re.S)
_LIST_ITEM = re.compile(r"^[ \t]*(?:\d{1,2}\.|[-*]) +\S", re.M)


def test_r1_sentences_cover_the_text_and_keep_displays_whole():
    """split_sentences on 500 real traces: spans in order, trimmed, covering every
    non-space character; no boundary inside a LaTeX display; every markdown list item (outside
    a display) starts a sentence."""
    from stages.lib.sentences import split_sentences

    for t in r1_tasks():
        text = t["completion"]
        spans = split_sentences(text)
        assert spans, text[:80]
        pos = 0
        for a, b in spans:
            assert pos <= a < b <= len(text)
            assert text[pos:a].strip() == ""                 # only whitespace between sentences
            assert text[a:b] == text[a:b].strip()
            pos = b
        assert text[pos:].strip() == ""
        bounds = {x for span in spans for x in span}
        displays = [m.span() for m in _DISPLAY.finditer(text)]
        for s, e in displays:
            assert not [x for x in bounds if s < x < e], text[s:e]
        starts = {a for a, _ in spans}
        for m in _LIST_ITEM.finditer(text):
            item = m.start() + len(m.group()) - len(m.group().lstrip())
            if not any(s < item < e for s, e in displays):
                assert item in starts, text[item:item + 60]


# ------------------------------------------------------------------------------ DAP budgets

@pytest.fixture(scope="module")
def r1_counted(tmp_path_factory):
    """(rows with completion_tokens counted by prune's own tokenizer counter, the counter) —
    the tiny model's byte-level BPE stands in for the teacher's tokenizer (no download)."""
    from pipeline.apps.tiny_model import build_tokenizer
    from stages.prune import _token_counter

    folder = str(tmp_path_factory.mktemp("r1-tokenizer"))
    build_tokenizer().save_pretrained(folder)
    count = _token_counter(folder)
    return r1_generate_rows(count), count


def test_r1_budget_mode_counts_and_keeps_by_tokens(tmp_path, ray_cluster, r1_counted):
    """verify -> prune (budget mode) on the real traces: each difficulty's budget is the median
    token count of its correct traces, so about half are kept; kept = correct and within budget,
    counted per level exactly as the tokens say."""
    from test_verify import run, write_generate

    rows, count = r1_counted
    assert all(r["completion_tokens"] == count(r["completion"]) > len(r["completion"]) / 8
               for r in rows[:20])
    recipe = write_generate(tmp_path, rows)
    v = run("verify", recipe)
    verified = v.read_table().to_pylist()
    budgets = {}
    for level in ("easy", "medium", "hard"):
        tokens = sorted(r["completion_tokens"] for r in verified
                        if r["correct"] and r["difficulty"] == level)
        budgets[level] = tokens[len(tokens) // 2] if tokens else 1
    # One sample per problem: its pass rate is 0 or 1, so only easy and hard occur.
    assert {r["difficulty"] for r in verified} <= {"easy", "hard"}
    recipe = write_generate(tmp_path, rows, [
        "prune.mode=budget", "prune.budgets={" + ", ".join(f"{k}: {n}" for k, n in budgets.items())
        + "}"])
    p = run("prune", recipe)
    pruned = {r["trace_id"]: r for r in p.read_table().to_pylist()}
    want_kept = {r["trace_id"] for r in verified
                 if r["correct"] and r["completion_tokens"] <= budgets[r["difficulty"]]}
    assert {t for t, r in pruned.items() if r["prune_status"] == "kept"} == want_kept
    n_correct = sum(bool(r["correct"]) for r in verified)
    assert p.manifest["drops"].get("over_budget", 0) == n_correct - len(want_kept)
    assert abs(len(want_kept) - n_correct / 2) <= 10
    for t, r in pruned.items():
        assert r["pruned_tokens"] == r["completion_tokens"]
        assert r["pruned_completion"] == r["completion"]
    easy = p.manifest["stats"]["per_level"]["easy"]
    kept_easy = [r["completion_tokens"] for r in verified
                 if r["trace_id"] in want_kept and r["difficulty"] == "easy"]
    assert easy["kept"] == len(kept_easy)
    assert easy["mean_tokens_after"] == pytest.approx(sum(kept_easy) / len(kept_easy), abs=0.05)


# ------------------------------------------------------------------------------ the viewer

def test_r1_viewer_serves_the_rows(tmp_path, ray_cluster):
    """A verify version of the 500 in the viewer's HTTP API: the run is listed, the rows page
    and filters count them, search finds real text, a problem's page returns the whole trace."""
    from starlette.testclient import TestClient

    from pipeline.store import Store
    from pipeline.apps.viewer.server import Viewer, make_app
    from stages import STAGES
    from test_verify import run, write_generate

    rows = r1_generate_rows()
    v = run("verify", write_generate(tmp_path, rows))
    verified = v.read_table().to_pylist()
    viewer = Viewer(Store(str(tmp_path / "data")), list(STAGES))
    try:
        c = TestClient(make_app(viewer))
        runs = {s["stage"]: s for s in c.get("/api/runs").json()["stages"]}
        assert "verify" in runs and "generate" in runs
        base = f"/api/count/verify/{v.version}"
        assert c.get(base).json()["total"] == 500
        assert c.get(base, params={"f": "correct:true"}).json()["total"] == sum(
            bool(r["correct"]) for r in verified)
        phrase = "farmers' market"
        assert c.get(base, params={"q": phrase}).json()["total"] == sum(
            phrase.lower() in (r["problem"] + r["completion"]).lower() for r in verified)
        page = c.get(f"/api/rows/verify/{v.version}",
                     params={"cols": "trace_id,completion_tokens", "sort": "completion_tokens",
                             "desc": "1", "limit": 3}).json()
        assert [r[1] for r in page["rows"]] == sorted(
            (r["completion_tokens"] for r in rows), reverse=True)[:3]
        longest = max(rows, key=lambda r: len(r["completion"]))
        got = c.get(f"/api/problem/verify/{v.version}/{longest['problem_id']}").json()["rows"]
        assert [r["completion"] for r in got] == [longest["completion"]]   # whole, unescaped
    finally:
        viewer.close()
