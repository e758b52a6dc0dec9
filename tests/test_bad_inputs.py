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
    from stages.lib.dap_prompts import load_dap_prompts

    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(_windows(f"data_root: {tmp_path / 'data'}\nprompts:\n  synthetic_n: 5\n"))
    assert load_recipe(str(recipe), [], STAGES).configs["prompts"].synthetic_n == 5

    dap = tmp_path / "dap"
    dap.mkdir()
    for name in ("judge", "simple", "moderate", "complex"):
        src = open(os.path.join(REPO, "configs/dap", f"{name}.txt"), encoding="utf-8").read()
        (dap / f"{name}.txt").write_bytes(_windows(src))
        want = src.strip()
    got = load_dap_prompts(str(dap))
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


# --------------------------------------------------------------------- the ingest corpus

# (file in tests/bad_inputs/, what the one-line message must name). Every message names the file;
# row/line and field where there is one.
INGEST_CASES = [
    ("broken.jsonl", ["broken.jsonl", "line 3", "not valid JSON"]),
    ("not_object.jsonl", ["not_object.jsonl", "line 2", "expected a JSON object"]),
    ("problem_number.jsonl", ["problem_number.jsonl", "line 2", "field 'problem'", "expected text"]),
    ("answer_list.jsonl", ["answer_list.jsonl", "line 2", "field 'answer'", "list"]),
    ("answer_nan.jsonl", ["answer_nan.jsonl", "line 2", "field 'answer'"]),
    ("missing_field.jsonl", ["missing_field.jsonl", "line 2", "no field 'problem'", "question"]),
    ("latin1.jsonl", ["latin1.jsonl", "line 2", "not UTF-8", "column 17"]),
    ("empty.jsonl", ["empty.jsonl", "no rows"]),
    ("blank_lines.jsonl", ["blank_lines.jsonl", "no rows"]),
    ("only_empty_problems.jsonl", ["only_empty_problems.jsonl", "no problems left",
                                   "empty_problem", "field 'problem'"]),
    ("truncated.json", ["truncated.json", "line 2", "not valid JSON"]),
    ("not_list.json", ["not_list.json", "expected a JSON list"]),
    ("bad_item.json", ["bad_item.json", "item 1", "expected a JSON object"]),
    ("wrong_count.csv", ["wrong_count.csv", "line 3", "3 fields", "header has 2"]),
    ("dup_header.csv", ["dup_header.csv", "line 1", "problem"]),
    ("header_only.csv", ["header_only.csv", "no rows"]),
    ("missing_column.csv", ["missing_column.csv", "line 2", "no field 'problem'"]),
    ("notes.txt", ["notes.txt", "unknown format"]),
    ("does-not-exist.jsonl", ["does-not-exist.jsonl", "no such file"]),
]


@pytest.mark.parametrize("name,needles", INGEST_CASES, ids=[c[0] for c in INGEST_CASES])
def test_ingest_corpus(name, needles, tmp_path, capsys):
    code, err, _ = ingest(tmp_path, os.path.join(CORPUS, name), capsys)
    assert_user_error(code, err, str(tmp_path / "data"), "prompts", *needles)


def _generated_cases(tmp_path) -> dict[str, tuple[str, list[str]]]:
    """Mis-encoded, odd-typed and broken binary inputs, made here (binary or big)."""
    import pyarrow as pa

    cases = {}
    path = tmp_path / "utf16_no_bom.jsonl"
    path.write_bytes(_jsonl(PROBLEMS).encode("utf-16-le"))
    cases["utf-16 without BOM"] = (str(path), ["utf16_no_bom.jsonl", "line 1", "NUL bytes"])
    path = tmp_path / "utf16.csv"  # UTF-16 with a BOM but a latin-1 byte inside: undecodable
    path.write_bytes(codecs.BOM_UTF16_LE + "problem,answer\n".encode("utf-16-le") + b"\x00\xd8")
    cases["broken utf-16"] = (str(path), ["utf16.csv", "line", "not UTF-16"])
    path = tmp_path / "deep.jsonl"
    path.write_text('{"problem": "x", "answer": ' + "[" * 100_000 + "\n")
    cases["deep nesting"] = (str(path), ["deep.jsonl", "line 1"])
    path = tmp_path / "huge_int.jsonl"
    path.write_text('{"problem": "x", "answer": ' + "9" * 100_000 + "}\n")
    cases["100k-digit integer"] = (str(path), ["huge_int.jsonl", "line 1"])
    path = tmp_path / "truncated.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", "2"]}), path)
    path.write_bytes(path.read_bytes()[:-20])
    cases["truncated parquet"] = (str(path), ["truncated.parquet", "not a readable Parquet"])
    path = tmp_path / "int_problem.parquet"
    pq.write_table(pa.table({"problem": [1, 2], "answer": ["1", "2"]}), path)
    cases["int problem column"] = (str(path), ["int_problem.parquet", "row 0",
                                                "field 'problem'", "expected text"])
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), path)
    cases["empty parquet"] = (str(path), ["empty.parquet", "no rows"])
    path = tmp_path / "struct_answer.parquet"
    pq.write_table(pa.table({"problem": ["a"], "answer": [{"value": 1}]}), path)
    cases["struct answer"] = (str(path), ["struct_answer.parquet", "row 0", "field 'answer'"])
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    (folder / "x.txt").write_text("hello")
    cases["folder that is not a dataset"] = (str(folder), ["not_a_dataset",
                                                           "not a datasets.save_to_disk"])
    return cases


def test_generated_ingest_corpus(tmp_path, capsys):
    for label, (path, needles) in _generated_cases(tmp_path).items():
        code, err, _ = ingest(tmp_path / label.replace(" ", "_"), path, capsys)
        assert_user_error(code, err, str(tmp_path / label.replace(" ", "_") / "data"),
                          "prompts", *needles)


def test_huge_inputs_ingest_as_correct_rows(tmp_path, capsys):
    """200k rows of JSONL and one 20 MB problem: correct rows, quickly."""
    import time

    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": 2 * i}) + "\n"
                            for i in range(200_000)))
    start = time.time()
    code, err, rows = ingest(tmp_path / "many", str(path), capsys)
    assert code == 0, err
    assert len(rows) == 200_000 and rows[0]["answer"] == str(2 * int(rows[0]["problem"].split()[2]))
    assert time.time() - start < 60
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"problem": "x " * 10_000_000 + "?", "answer": 1}) + "\n")
    code, err, rows = ingest(tmp_path / "long", str(path), capsys)
    assert code == 0, err
    assert len(rows) == 1 and len(rows[0]["problem"]) == 20_000_001


def test_odd_but_valid_values_ingest(tmp_path, capsys):
    """Numbers as answers, GSM8K answers, a missing answer, unicode, duplicates: correct rows."""
    path = tmp_path / "odd.jsonl"
    records = [{"problem": "1+1?", "answer": 2}, {"problem": "half?", "answer": 0.5},
               {"problem": "gsm?", "answer": "3 apples\n#### 42"},
               {"problem": "none?", "answer": None}, {"problem": "1+1?", "answer": 2},
               {"problem": "π ≈ ?\u2028", "answer": "3.14"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    code, err, rows = ingest(tmp_path, str(path), capsys)
    assert code == 0, err
    assert [r["answer"] for r in rows] == ["2", "0.5", "42", None, "3.14"]


# --------------------------------------------------------------------- trace files (import)

# (file in tests/bad_inputs/, the stage that refuses it, what the message must name). The traces
# of a file go through prompts (its problems) and then generate's import (its traces).
IMPORT_CASES = [
    ("import_lists_differ.jsonl", "generate",
     ["import_lists_differ.jsonl", "line 2", "field 'correctness_math_verify'", "1 values for 2"]),
    ("import_trace_not_text.jsonl", "generate",
     ["import_trace_not_text.jsonl", "line 2", "field 'generations.1'", "expected text"]),
    ("import_unknown_layout.jsonl", "prompts",
     ["import_unknown_layout.jsonl", "line 1", "unknown layout", "question"]),
    ("import_mixed_layouts.jsonl", "prompts",
     ["import_mixed_layouts.jsonl", "line 2", "field 'conversations'", "mixes layouts",
      "line 1 was openr1"]),
]


@pytest.mark.parametrize("name,stage,needles", IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_import_corpus(name, stage, needles, tmp_path, capsys, tiny_model):
    """Exit 2, one line naming file, row and field; neither stage leaves a complete version (a
    failed import keeps only its temp folder, which a rerun of a fixed file starts over)."""
    data_root = str(tmp_path / "data")
    code, out, err = run_cli(["run", "all", "--recipe", os.path.join(REPO, "configs/import.yaml"),
                              f"data_root={data_root}", f"prompts.path={os.path.join(CORPUS, name)}",
                              f"student={tiny_model}", "stages=[prompts, generate]"], capsys)
    assert_user_error(code, err, data_root, "generate", *needles)
    if stage == "prompts":
        assert completes(data_root, "prompts") == []


def test_unclosed_reasoning_tag_is_counted_not_fatal(tmp_path, capsys, tiny_model):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2",
                                "completion": "<think>\n1 + 1 is"}) + "\n")
    data_root = str(tmp_path / "data")
    code, out, err = run_cli(["run", "all", "--recipe", os.path.join(REPO, "configs/import.yaml"),
                              f"data_root={data_root}", f"prompts.path={path}",
                              f"student={tiny_model}", "stages=[prompts, generate]"], capsys)
    assert code == 0, err
    (version,) = completes(data_root, "generate")
    manifest = json.load(open(os.path.join(data_root, "generate", version, MANIFEST)))
    assert manifest["stats"]["reasoning_status"] == {"unclosed": 1}
    assert manifest["stats"]["finish_reasons"] == {"length": 1}


# --------------------------------------------------------------------- recipes and overrides

RECIPE_CASES = [
    (["--recipe", "{corpus}/recipe_not_yaml.yaml"], ["recipe_not_yaml.yaml", "not valid YAML", "line 3"]),
    (["--recipe", "{corpus}/recipe_list.yaml"], ["recipe_list.yaml", "mapping"]),
    (["--recipe", "{corpus}/recipe_unknown_section.yaml"], ["recipe_unknown_section.yaml",
                                                             "genrate", "generate"]),
    (["--recipe", "{corpus}/recipe_unknown_field.yaml"], ["recipe_unknown_field.yaml",
                                                           "temprature", "temperature"]),
    (["--recipe", "{corpus}/recipe_latin1.yaml"], ["recipe_latin1.yaml", "line 3", "not UTF-8"]),
    (["--recipe", "{corpus}/missing.yaml"], ["missing.yaml", "not found"]),
    (["--recipe", "{corpus}"], ["bad_inputs", "folder"]),
    (["--recipe", "configs/tiny.yaml", "generate.temprature=0.5"], ["temprature", "temperature"]),
    (["--recipe", "configs/tiny.yaml", "prompts.synthetic_n=many"], ["synthetic_n", "many"]),
    (["--recipe", "configs/tiny.yaml", "nonsense"], ["nonsense"]),
    (["--recipe", "configs/tiny.yaml", "prompts.dedup=maybe"], ["dedup", "maybe"]),
]


@pytest.mark.parametrize("args,needles", RECIPE_CASES, ids=[" ".join(c[0])[-40:] for c in RECIPE_CASES])
def test_recipe_and_override_mistakes(args, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["run", "prompts"] + [a.format(corpus=CORPUS) for a in args] + \
        [f"data_root={tmp_path / 'data'}"]
    code, out, err = run_cli(argv, capsys)
    assert_user_error(code, err, str(tmp_path / "data"), "prompts", *needles)


# --------------------------------------------------------------------- models users bring

@pytest.fixture(scope="module")
def prompts_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models") / "data")
    assert main(["run", "prompts", "--recipe", os.path.join(REPO, "configs/tiny.yaml"),
                 f"data_root={root}", "prompts.synthetic_n=4"]) == 0
    return root


def _broken_models(tiny_model, folder) -> dict[str, tuple[str, list[str]]]:
    import shutil

    cases = {}
    bert = folder / "bert"
    bert.mkdir()
    shutil.copy(os.path.join(CORPUS, "bert_config.json"), bert / "config.json")
    cases["not a causal LM"] = (str(bert), ["generate.teacher", "bert", "not a causal"])
    truncated = folder / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["truncated weights"] = (str(truncated), ["model.safetensors", "truncated"])
    no_config = folder / "no_config"
    no_config.mkdir()
    cases["no config.json"] = (str(no_config), ["no_config", "no config.json"])
    bad_config = folder / "bad_config"
    shutil.copytree(tiny_model, bad_config)
    (bad_config / "config.json").write_text('{"model_type": ')
    cases["config.json not JSON"] = (str(bad_config), ["bad_config", "config.json"])
    bad_tok = folder / "bad_tokenizer"
    shutil.copytree(tiny_model, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{not json")
    cases["tokenizer does not load"] = (str(bad_tok), ["bad_tokenizer", "tokenizer"])
    from test_chat_format import strip_template  # tests/ is on sys.path under pytest

    base = strip_template(tiny_model, str(folder / "base"))
    cases["no chat template"] = (base, ["generate.teacher", "no chat template",
                                        "generate.chat_template", "generate.prompt_format=raw"])
    return cases


def test_models_that_cannot_be_teachers_fail_before_ray(tiny_model, prompts_root, tmp_path, capsys):
    import ray

    for label, (model, needles) in _broken_models(tiny_model, tmp_path).items():
        ray_before = ray.is_initialized()  # another module's session Ray may be up already
        code, out, err = run_cli(["run", "generate", "--recipe",
                                  os.path.join(REPO, "configs/tiny.yaml"),
                                  f"data_root={prompts_root}", f"teacher={model}"], capsys)
        assert_user_error(code, err, prompts_root, "generate", *needles)
        # Answered before Ray: none started, and no shard was planned ("N problems in ...").
        assert ray.is_initialized() == ray_before and "problems in" not in out, label


# --------------------------------------------------------------------- verifier bombs, end to end

def test_verifier_bombs_through_the_cli(tmp_path, capsys, ray_cluster):
    """A generate version whose completions are bombs: verify answers every row (timeout /
    error / ok), within timeout_s each, and the ordinary rows beside them are right."""
    import time

    import pyarrow as pa

    from pipeline.store import Store
    from stages.lib.ingest import problem_id

    bombs = ["\\boxed{(" * 20000, "\\boxed{10^{10^{10^{10}}}}", "\\boxed{" + "9" * 100_000 + "}",
             "The answer is" + " " * 100_000 + "x", "\\boxed{" + "{" * 30_000]
    rows = []
    for i, text in enumerate(bombs + ["\\boxed{4}"] * len(bombs)):
        rows.append({"problem_id": problem_id(f"p{i}"), "problem": f"p{i}", "answer": "4",
                     "source": "bombs", "trace_id": f"t{i}", "teacher": "x", "sample_idx": 0,
                     "completion": text, "reasoning": "", "final": text,
                     "completion_tokens": 1, "finish_reason": "length"})
    root = str(tmp_path / "data")
    store = Store(root)
    folder = store.begin("generate", "bombs0000000", clear=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "part-00000.parquet"))
    store.commit("generate", "bombs0000000", {"stage": "generate", "rows_out": len(rows),
                                              "schema": {k: "string" for k in rows[0]}})
    start = time.time()
    code, out, err = run_cli(["run", "verify", "--recipe", os.path.join(REPO, "configs/tiny.yaml"),
                              f"data_root={root}", "verify.timeout_s=1"], capsys)
    assert code == 0, err
    assert time.time() - start < 60 + len(bombs) * 2
    (version,) = completes(root, "verify")
    got = {r["trace_id"]: r for r in pq.read_table(os.path.join(root, "verify", version)).to_pylist()}
    assert len(got) == len(rows)
    for i in range(len(bombs)):
        assert got[f"t{i}"]["verify_status"] in ("ok", "timeout", "error", "no_answer")
        assert got[f"t{i + len(bombs)}"]["correct"] is True


def test_user_error_in_a_ray_train_worker_is_exit_2(ray_cluster, tmp_path, capsys):
    """sft/redi train in Ray Train workers: TrainingFailedError carries the worker's exception."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.errors import UserError

    def loop(config):
        raise UserError("sft.student /m: row 3 cannot be encoded (from a Ray Train worker)")

    def job():
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(storage_path=str(tmp_path / "train"))).fit()

    code, err = _guarded(job, capsys)
    assert code == 2, err
    assert err.splitlines()[-1] == \
        "error: sft.student /m: row 3 cannot be encoded (from a Ray Train worker)"
