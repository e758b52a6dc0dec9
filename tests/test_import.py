"""Traces someone else generated, through `generate.backend: import` (stages/lib/ingest.py).

Each layout (OpenR1-Math, ShareGPT, OpenAI messages, flat) from small files written here, in each
file form (.jsonl, .json, .parquet, a folder of Parquet shards, a datasets.save_to_disk folder);
resume; the REDI recipe's data rules on a file in OpenR1-Math-Raw's layout; the real R1-Distill
completions through verify → prune → provenance → select → sft; `run all` on configs/import.yaml.
Real components throughout: pyarrow, datasets, the tiny model's tokenizer, Ray, math-verify.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import load_recipe
from pipeline.runner import run_stage
from pipeline.store import Store
from stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT = os.path.join(REPO, "configs", "import.yaml")
REDI = os.path.join(REPO, "configs", "redi-openr1.yaml")


def recipe(path, data_root, student, *overrides):
    return load_recipe(path, [f"data_root={data_root}", f"student={student}", *overrides], STAGES)


def run(names, rec):
    return {n: run_stage(n, rec, log=lambda *_: None) for n in names}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def boxed(reasoning, answer, tags="think"):
    if tags == "thought":
        return (f"<|begin_of_thought|>\n\n{reasoning}\n\n<|end_of_thought|>\n\n"
                f"<|begin_of_solution|>\n\n\\boxed{{{answer}}}\n\n<|end_of_solution|>")
    return f"<think>\n{reasoning}\n</think>\n\n\\boxed{{{answer}}}"


PROBLEMS = [(f"What is {a} + {b}?", str(a + b)) for a, b in ((1, 2), (3, 4), (10, 5))]


def openr1_rows():
    return [{"problem": p, "answer": a, "source": "olympiads",
             "generations": [boxed("add", a), boxed("oops", int(a) + 1), "<think>\nno end"],
             "correctness_math_verify": [True, False, False],
             "correctness_llama": [True, None, False],
             "is_reasoning_complete": [True, True, False],
             "finish_reasons": ["stop", "stop", "length"],
             "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]}
            for p, a in PROBLEMS]


def sharegpt_rows():
    return [{"system": "You are a careful solver.", "answer": a,
             "conversations": [{"from": "user", "value": p},
                               {"from": "assistant", "value": boxed("add", a, "thought")}]}
            for p, a in PROBLEMS]


def messages_rows():
    rows = []
    for i, (p, a) in enumerate(PROBLEMS):
        last = ({"role": "assistant", "content": f"\\boxed{{{a}}}", "reasoning_content": "add"}
                if i % 2 else {"role": "assistant", "content": boxed("add", a)})
        rows.append({"messages": [{"role": "user", "content": p}, last],
                     "answer": a, "source": "math"})
    return rows


def flat_rows():
    return [{"problem": p, "answer": a, "completion": boxed("add", a), "teacher": "qwq"}
            for p, a in PROBLEMS]


def write_as(kind, folder, rows):
    """The rows as a .jsonl / .json / .parquet file, a hub folder of Parquet shards, or a
    datasets.save_to_disk folder; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        return write_jsonl(folder / "traces.jsonl", rows)
    if kind == "json":
        (folder / "traces.json").write_text(json.dumps(rows), encoding="utf-8")
        return str(folder / "traces.json")
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), folder / "traces.parquet")
        return str(folder / "traces.parquet")
    if kind == "hub":  # data/train-0000k-of-00002.parquet, and a test split that is left out
        (folder / "hub" / "data").mkdir(parents=True)
        for k, part in enumerate((rows[:2], rows[2:])):
            pq.write_table(pa.Table.from_pylist(part),
                           folder / "hub" / "data" / f"train-{k:05d}-of-00002.parquet")
        pq.write_table(pa.Table.from_pylist(rows[:1]),
                       folder / "hub" / "data" / "test-00000-of-00001.parquet")
        return str(folder / "hub")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "disk"))
    return str(folder / "disk")


LAYOUT_CASES = [  # (layout, rows, file kind, reasoning tags, traces per problem)
    ("openr1", openr1_rows, "jsonl", "think", 3),
    ("openr1", openr1_rows, "hub", "think", 3),
    ("sharegpt", sharegpt_rows, "json", "thought", 1),
    ("messages", messages_rows, "parquet", "think", 1),
    ("flat", flat_rows, "disk", "think", 1),
]


@pytest.mark.parametrize("layout,make,kind,tags,per", LAYOUT_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in LAYOUT_CASES])
def test_each_layout_imports_as_a_generate_version(layout, make, kind, tags, per, tmp_path,
                                                   tiny_model):
    path = write_as(kind, tmp_path / "in", make())
    rec = recipe(IMPORT, tmp_path / "data", tiny_model, f"prompts.path={path}",
                 f"reasoning_tags={tags}")
    got = run(["prompts", "generate"], rec)
    prompts, gen = got["prompts"].read_table().to_pylist(), got["generate"]
    assert sorted((p["problem"], p["answer"]) for p in prompts) == sorted(PROBLEMS)
    rows = gen.read_table().to_pylist()
    assert len(rows) == len(PROBLEMS) * per
    ids = {p["problem_id"]: p for p in prompts}
    for r in rows:
        assert r["problem_id"] in ids and r["answer"] == ids[r["problem_id"]]["answer"]
        assert r["completion_tokens"] > 0 and r["prompt_tokens"] > 0
        # the source's own user turn; a flat row has none: generate's problem_template
        user = r["prompt_messages"][-1]["content"]
        assert user == r["problem"] if layout != "flat" else user.startswith(r["problem"] + "\n")
    stats = gen.manifest["stats"]
    assert stats["import_format"] == layout and stats["tokenizer"] == tiny_model
    assert set(STAGES["generate"].adds) <= set(gen.manifest["schema"])
    # Lineage: the file(s) and their sha256, computed as sha256sum would.
    files = stats["source_files"]["files"]
    for f in files:
        assert f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest()
    if kind == "hub":
        assert [os.path.basename(f["path"]) for f in files] == [
            "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    else:
        assert len(files) >= 1
    correct = [r for r in rows if r["final"] == f"\\boxed{{{ids[r['problem_id']]['answer']}}}"]
    if layout == "openr1":
        # verdicts kept, parallel to generations; the unclosed <think> is counted, not fatal
        assert [r["source_correct_math_verify"] for r in rows if r["sample_idx"] == 0] == [True] * 3
        assert sum(r["source_correct_llama"] is None for r in rows) == 3
        assert stats["reasoning_status"] == {"closed": 6, "unclosed": 3}
        assert stats["finish_reasons"] == {"length": 3, "stop": 6}
        assert len(correct) == 3
    else:
        assert len(correct) == 3 and all(r["reasoning"] == "add" for r in rows)
    if layout == "sharegpt":
        assert rows[0]["prompt_messages"][0] == {"role": "system",
                                                 "content": "You are a careful solver."}
    if layout == "flat":
        assert {r["teacher"] for r in rows} == {"qwq"}
    else:
        assert {r["teacher"] for r in rows} == {f"import:{os.path.basename(path)}"}


def test_field_overrides_and_filters(tmp_path, tiny_model):
    """import_fields renames (a dotted path into a struct), import_keep / import_drop filter
    rows (counted by reason in both versions' manifests)."""
    rows = [{"question": p, "gt": {"value": a}, "output": boxed("add", a), "split": s,
             "origin": o} for (p, a), s, o in zip(PROBLEMS, ["ok", "ok", "bad"],
                                                   ["x", "cn_k12", "x"])]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    fields = "{problem: question, answer: gt.value, completion: output}"
    rec = recipe(IMPORT, tmp_path / "data", tiny_model, f"prompts.path={path}",
                 "prompts.import_format=flat", f"prompts.import_fields={fields}",
                 "prompts.import_keep={split: ok}", "prompts.import_drop={origin: [cn_k12]}")
    got = run(["prompts", "generate"], rec)
    assert [(r["problem"], r["answer"]) for r in got["prompts"].read_table().to_pylist()] == \
        [PROBLEMS[0]]
    assert got["prompts"].manifest["drops"] == {"split not in ['ok']": 1, "origin=cn_k12": 1}
    assert got["generate"].manifest["drops"] == {"split not in ['ok']": 1, "origin=cn_k12": 1}
    assert got["generate"].rows == 1


def test_teacher_label_that_is_no_model_counts_with_the_student(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "t.jsonl", flat_rows()[:1])
    rec = recipe(IMPORT, tmp_path / "data", tiny_model, f"prompts.path={path}",
                 "teacher=R1 via the API")
    gen = run(["prompts", "generate"], rec)["generate"]
    assert gen.manifest["stats"]["tokenizer"] == tiny_model
    # the row's own teacher wins over the label
    assert gen.read_table(columns=["teacher"]).column(0).to_pylist() == ["qwq"]


def test_import_resumes_from_the_shards_of_an_interrupted_run(tmp_path, tiny_model):
    """A run killed after its first shard leaves it in the version's temp folder; the rerun
    imports only the rest and writes what an uninterrupted run writes."""
    path = write_jsonl(tmp_path / "t.jsonl", openr1_rows())
    args = (f"prompts.path={path}", "generate.shard_size=1")
    whole = run(["prompts", "generate"], recipe(IMPORT, tmp_path / "a", tiny_model, *args))
    rec = recipe(IMPORT, tmp_path / "b", tiny_model, *args)
    run(["prompts"], rec)
    version = whole["generate"].version
    tmp = Store(str(tmp_path / "b")).tmp_dir("generate", version)
    os.makedirs(tmp)
    shutil.copy(os.path.join(whole["generate"].path, "part-00000.parquet"), tmp)
    resumed = run(["generate"], rec)["generate"]
    assert resumed.version == version
    assert resumed.manifest["stats"]["shards_generated_this_run"] == 2
    assert resumed.read_table().to_pylist() == whole["generate"].read_table().to_pylist()
    assert resumed.manifest["drops"] == whole["generate"].manifest["drops"]


# --------------------------------------------------------------------------- REDI's data rules

def _raw_row(problem, answer, verdicts, *, source="olympiads", valid="Yes", texts=None):
    """An OpenR1-Math-Raw row: verdicts = [(math_verify, llama)] per generation."""
    gens = texts or [boxed("work", answer if mv else f"{answer}9") for mv, _ in verdicts]
    return {"problem": problem, "answer": answer, "problem_is_valid": valid, "source": source,
            "generations": gens,
            "correctness": {"llama_verification": [lj for _, lj in verdicts],
                            "math_verify_answer": [mv for mv, _ in verdicts],
                            "math_verify_reparsed_answer": [mv for mv, _ in verdicts]},
            "messages": [{"role": "user", "content": problem}]}


@pytest.mark.slow
def test_redi_openr1_recipe_counts(tmp_path, tiny_model, ray_cluster):
    """configs/redi-openr1.yaml on a file in OpenR1-Math-Raw's layout, every rule exercised:
    cn_k12 dropped, problem_is_valid != yes dropped, correct only when the Llama judge and
    math-verify both say so, one pair per problem (first correct with first incorrect after
    the seed-42 shuffle), no pair for a prompt over 800 tokens or responses over 19,000."""
    from stages.select import shuffled
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long_problem = "What is 2 + 2? " + "Think about it. " * 300          # > 800 tokens
    long_trace = boxed("step " * 20000, "9")                   # wrong, and > 19,000 tokens
    assert len(tok(long_problem)["input_ids"]) > 800
    assert len(tok(long_trace)["input_ids"]) > 19000
    rows = [
        # A: 4 traces: (T,T) (T,F) (F,T) (T,T) -> 2 correct, 2 incorrect -> a pair
        _raw_row("What is 1 + 1?", "2", [(True, True), (True, False), (False, True),
                                          (True, True)]),
        # B: both judges agree it is right, every time -> no incorrect, no pair
        _raw_row("What is 2 + 1?", "3", [(True, True), (True, True)]),
        # C: the Llama judge never ran: no trace counts as correct -> no correct, no pair
        _raw_row("What is 3 + 1?", "4", [(True, None), (False, None)]),
        # D: a prompt over 800 tokens -> prompt_too_long
        _raw_row(long_problem, "4", [(True, True), (False, False)]),
        # E: the only incorrect trace is over 19,000 tokens -> response_too_long
        _raw_row("What is 4 + 4?", "8", [(True, True), (False, False)],
                 texts=[boxed("4+4", "8"), long_trace]),
        # F, G: dropped by the data rules
        _raw_row("What is 5 + 1?", "6", [(True, True), (False, False)], source="cn_k12"),
        _raw_row("What is 6 + 1?", "7", [(True, True), (False, False)], valid="no"),
        # H: "yes" in lower case is valid too; a pair
        _raw_row("What is 7 + 1?", "8", [(False, False), (True, True)], valid="yes"),
    ]
    path = tmp_path / "raw" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    # A teacher label that is not a hub id: no network round trip to find it has no tokenizer.
    rec = recipe(REDI, tmp_path / "data", tiny_model, f"prompts.path={tmp_path / 'raw'}",
                 "teacher=DeepSeek-R1 (OpenR1-Math-Raw)", "stages=[prompts, generate, verify, prune, provenance, select]")
    got = run(rec.stages, rec)

    prompts = got["prompts"].manifest
    assert prompts["rows_out"] == 6
    assert prompts["drops"] == {"source=cn_k12": 1, "problem_is_valid not in ['yes', 'Yes']": 1}
    assert got["generate"].rows == 14 and got["generate"].manifest["drops"] == prompts["drops"]
    verify = got["verify"]
    stats = verify.manifest["stats"]
    assert stats["correct_from"] == "source_both"
    assert stats["correct"] == 2 + 2 + 0 + 1 + 1 + 1      # A, B, C, D, E, H
    agree = stats["source_agreement"]
    assert agree["source_correct_math_verify"]["compared"] == 14
    assert agree["source_correct_math_verify"]["rate"] == 1.0   # the traces answer as labelled
    assert agree["source_correct_llama"]["compared"] == 12      # C's two have no verdict
    sel = got["select"]
    s = sel.manifest["stats"]
    assert s["sft_rows"] == 7                         # every correct trace: the positives
    assert s["pairs"] == 2                            # A and H
    assert s["problems_without_pair"] == {"no_correct": 1, "no_incorrect": 1,
                                          "prompt_too_long": 1, "response_too_long": 1}
    # The pair is the first correct and the first incorrect trace after the seed-42 shuffle.
    traces = got["provenance"].read_table(columns=["problem_id", "trace_id", "correct"]).to_pylist()
    for pair in sel.read_table("pairs").to_pylist():
        order = shuffled([t for t in traces if t["problem_id"] == pair["problem_id"]], 42,
                         pair["problem_id"])
        assert pair["chosen_trace_id"] == next(t["trace_id"] for t in order if t["correct"])
        assert pair["rejected_trace_id"] == next(t["trace_id"] for t in order
                                                 if t["correct"] is False)


# --------------------------------------------------------------------------- real traces

@pytest.mark.slow
def test_real_r1_distill_traces_through_sft(tmp_path, tiny_model, ray_cluster):
    """40 of the real R1-Distill-Qwen-32B GSM8K completions, converted here into the OpenR1
    layout (problem, answer, generations), imported and run through verify -> prune ->
    provenance -> select -> sft with the tiny student."""
    from test_real_traces import r1_tasks

    tasks = r1_tasks()[:40]
    rows = [{"problem": t["question"], "answer": t["correct_answer"],
             "generations": [t["completion"]], "source": "gsm8k"} for t in tasks]
    path = write_jsonl(tmp_path / "r1.jsonl", rows)
    rec = recipe(IMPORT, tmp_path / "data", tiny_model, f"prompts.path={path}",
                 "teacher=DeepSeek-R1-Distill-Qwen-32B (gsm8k file)", "sft.epochs=1",
                 "sft.max_length=256", "sft.tokens_per_step=1024",
                 "resources.sft.num_workers=1",
                 "stages=[prompts, generate, verify, prune, provenance, select, sft]")
    got = run(rec.stages, rec)
    gen = got["generate"].read_table().to_pylist()
    assert len(gen) == 40 and {r["teacher"] for r in gen} == {
        "DeepSeek-R1-Distill-Qwen-32B (gsm8k file)"}
    # The completions close a reasoning they never opened (the prompt did): split at </think>.
    closed = [r for r in gen if "</think>" in r["completion"]]
    assert all(r["reasoning"] and r["final"] for r in closed)
    stats = got["verify"].manifest["stats"]
    assert stats["traces"] == 40 and stats["correct"] >= 34, stats
    assert got["select"].manifest["stats"]["sft_rows"] == stats["correct"]
    assert got["sft"].manifest["stats"]["steps"] >= 1
    assert os.path.exists(os.path.join(got["sft"].path, "config.json"))


# --------------------------------------------------------------------------- one command

@pytest.mark.slow
def test_run_all_from_a_trace_file_to_an_evaluated_student(tmp_path, tiny_model, ray_cluster,
                                                           capsys):
    """`distillery run all --recipe configs/import.yaml prompts.path=FILE`: 16 problems, 4
    traces each (two right, two wrong on purpose), to sft, redi and evaluate."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(16):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        answers = [a + b, a + b + 1, a + b, a + b - 1]
        rows.append({"problem": f"What is {a} + {b}?", "answer": str(a + b),
                     "generations": [boxed(f"{a} + {b} = {x}", x) for x in answers]})
    path = write_jsonl(tmp_path / "traces.jsonl", rows)
    root = tmp_path / "data"
    code = main(["run", "all", "--recipe", IMPORT, f"prompts.path={path}",
                 f"student={tiny_model}", f"data_root={root}", "sft.epochs=1",
                 "resources.sft.num_workers=1", "resources.redi.num_workers=1"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    store = Store(str(root))
    verify = store.latest("verify").manifest["stats"]
    assert verify["traces"] == 64 and verify["correct"] == 32
    select = store.latest("select").manifest["stats"]
    assert select["sft_rows"] == 32 and select["pairs"] == 16
    evaluate = store.latest("evaluate").manifest["stats"]
    assert set(evaluate["models"]) == {"student", "sft", "redi"}
    assert {r["model"] for r in evaluate["table"]} == {"student", "sft", "redi"}
    assert evaluate["models"]["redi"] == store.latest("redi").path
