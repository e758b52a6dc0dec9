"""distributions: the teacher's top-k at every SFT completion position equals a direct
transformers forward; the padded-vocabulary path; the refused tokenizer pair and k; resume.

Models are built here (no downloads): the session's tiny model is the student; the teacher is
another tiny model with the same tokenizer (seed 1); the padded teacher is that teacher with 64
extra embedding rows (resize_token_embeddings) made large enough to enter the top-k; a tiny
model with a 400-token vocabulary is the refused teacher. The select version is written by
hand (its sft split's columns), so no upstream stage runs.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from pipeline.config import load_recipe
from pipeline.errors import UserError
from pipeline.runner import run_stage
from stages import STAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 64  # extra embedding rows of the padded teacher
TRACES = [
    "<think>\nWe add the two numbers. Two and two make four.\n</think>\n\nThe answer is "
    "\\boxed{4}.",
    "<think>\nshort\n</think>\n\n\\boxed{1}",
    "The answer is \\boxed{7}.",                                   # no reasoning at all
    "<think>\n" + "Add the digits and carry the one. " * 12 + "\n</think>\n\n\\boxed{9}",
    "<think>\nThree times three.\n</think>\n\n\\boxed{9}",
]
MAX_LENGTH = 96  # the long trace is truncated


# --- models and the select version ------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """Another random tiny model: the tokenizer is trained deterministically, so it is the
    student's; the weights differ (seed 1)."""
    from pipeline.apps.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("teacher")), seed=1)


@pytest.fixture(scope="module")
def padded(teacher, tmp_path_factory) -> str:
    """The teacher with PAD more embedding rows (tied: the LM head grows too), rows the
    tokenizer never yields. Row V+j = 4 x row j, so at positions where id j scores well the
    padded id scores better and takes a top-k entry that must be dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.apps.tiny_model import save_model

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + PAD, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[vocab:] = 4 * emb[:PAD]
    assert model.config.vocab_size == vocab + PAD
    out = str(tmp_path_factory.mktemp("padded"))
    save_model(model, AutoTokenizer.from_pretrained(teacher), out)
    return out


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory) -> str:
    from pipeline.apps.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("other-vocab")), vocab_size=400, seed=1)


def write_select(data_root: str, traces=TRACES) -> str:
    """A complete select version whose sft split holds one row per trace; returns its version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import Store
    from stages.lib.chat import messages_type

    rows = [{"problem_id": f"p{i % 3}", "trace_id": f"t{i:02d}",
             "messages": [{"role": "user", "content": f"Compute {i} + {i}."},
                          {"role": "assistant", "content": text}],
             "difficulty": "easy", "source": "test"} for i, text in enumerate(traces)]
    sft = pa.Table.from_pylist(rows, schema=pa.schema([
        ("problem_id", pa.string()), ("trace_id", pa.string()), ("messages", messages_type()),
        ("difficulty", pa.string()), ("source", pa.string())]))
    pairs = pa.table({"problem_id": pa.array([], pa.string())})
    store, version = Store(data_root), "test0select0"
    out = store.begin("select", version, clear=True)
    for split, table in (("sft", sft), ("pairs", pairs)):
        os.makedirs(os.path.join(out, split))
        pq.write_table(table, os.path.join(out, split, "part-00000.parquet"))
    store.commit("select", version, {
        "stage": "select", "version": version, "splits": ["sft", "pairs"],
        "rows_in": len(rows), "rows_out": {"sft": len(rows), "pairs": 0}, "drops": {},
        "inputs": {}, "config": {}, "schema": {"sft": sft.schema.names,
                                               "pairs": pairs.schema.names},
        "finished_at": "2026-12-01T00:00:00+00:00"})
    return version


def recipe(tmp_path, teacher: str, student: str, *overrides):
    data = tmp_path / "data"
    if not os.path.exists(data / "select"):
        write_select(str(data))
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data_root: {data}\nteacher: {teacher}\nstudent: {student}\n"
                    f"distributions: {{max_length: {MAX_LENGTH}, shard_size: 2, "
                    "tokens_per_row: 128, chunk: 16, k: 8}\n")
    return load_recipe(str(path), list(overrides), STAGES)


def _vocab(path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


def _load(path):
    """As the stage's CPU pool loads a model: varlen attention, oneDNN linears."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import ATTENTION, onednn_linears, register_attention

    register_attention()
    return onednn_linears(AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=ATTENTION).eval())


def _direct(path, seqs, vocab, k):
    """Reference: a plain transformers forward (eager attention, full logits, log_softmax over
    the first `vocab` ids) per sequence; [(logps [n, vocab], top-k ids [n, k])] at the positions
    that predict its tokens after the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ids, n_prompt in seqs:
            logits = model(torch.tensor([ids])).logits[0, n_prompt - 1:len(ids) - 1, :vocab]
            lp = logits.float().log_softmax(-1)
            out.append((lp, lp.topk(k, dim=-1).indices))
    return out


def _seqs(teacher, student, max_length=MAX_LENGTH):
    """sft's (ids, n_prompt) of TRACES' rows, through the stage's own driver-side function."""
    from stages.distributions import DistributionsConfig, student_form

    cfg = DistributionsConfig(teacher=teacher, student=student, max_length=max_length)
    messages = [[{"role": "user", "content": f"Compute {i} + {i}."},
                 {"role": "assistant", "content": t}] for i, t in enumerate(TRACES)]
    fitted = student_form(cfg, "", messages, [f"t{i:02d}" for i in range(len(TRACES))], "test")
    return [(ids, n) for ids, n, _ in fitted], [o for _, _, o in fitted]


def _check_against_direct(got_ids, got_logps, token_logp, tail, lp, ref_ids, targets, tol,
                          id_tol=1e-4, fp16=False):
    """Top-k ids equal the reference's except where its values tie within id_tol (the fp32
    capture's accuracy: then the order may differ, the values may not); log-probs within tol;
    the token's log-prob and the tail within 1e-4 of the fp32 capture, plus half an fp16 ulp
    (|x| * 2^-11) where they were read back from the stored (fp16) columns."""
    import torch

    got_ids = torch.as_tensor(got_ids).long()
    got_logps = torch.as_tensor(got_logps).float()
    k = got_ids.shape[1]
    ref_vals = lp.gather(1, ref_ids)
    assert (got_logps - lp.gather(1, got_ids)).abs().max() <= tol   # values at the stored ids
    assert (got_logps - ref_vals).abs().max() <= tol                # the k largest, in order
    clear = torch.ones(len(lp), dtype=torch.bool)
    if k < lp.shape[1]:
        top = lp.topk(k + 1, dim=-1).values
        clear = (top[:, :-1] - top[:, 1:]).min(dim=-1).values > 2 * id_tol
    assert clear.float().mean() > 0.5
    assert torch.equal(got_ids[clear], ref_ids[clear])
    want_token = lp.gather(1, torch.as_tensor(targets)[:, None])[:, 0]
    want_tail = 1 - ref_vals.exp().sum(-1)
    for got, want in ((token_logp, want_token), (tail, want_tail)):
        got = torch.as_tensor(got).float()
        # half an fp16 ulp: |x| * 2^-11, or 2^-25 (half the subnormal step) near 0
        bound = 1e-4 + (want.abs() * 2 ** -11 + 2 ** -25 if fp16 else 0)
        assert ((got - want).abs() <= bound).all()


# --- the capture itself (no Ray) --------------------------------------------------------------

def test_topk_equals_a_direct_transformers_forward(teacher, tiny_model):
    """Packed rows (several rows per forward, varlen attention), the LM head 7 positions at a
    time: the fp32 top-k, the token's log-prob and the tail equal a plain forward's, <= 1e-4."""
    import torch

    from stages.lib.topk import packed_topk

    seqs, outcomes = _seqs(teacher, tiny_model)
    assert outcomes.count("truncated") == 1 and len(seqs[3][0]) == MAX_LENGTH
    vocab, k = _vocab(teacher), 16
    with torch.inference_mode():
        got = packed_topk(_load(teacher), seqs, k, vocab, tokens_per_row=128, chunk=7)
    for (ids, n), g, (lp, ref_ids) in zip(seqs, got, _direct(teacher, seqs, vocab, k)):
        assert g["ids"].shape == (len(ids) - n, k) and g["ids"].dtype.name == "int32"
        _check_against_direct(g["ids"], g["logps"], g["token_logp"], g["tail"], lp, ref_ids,
                              ids[n:], tol=1e-4)
        assert not g["dropped"].any() and not g["padded_mass"].any()
    # k = the whole vocabulary: nothing left for the tail
    with torch.inference_mode():
        full = packed_topk(_load(teacher), seqs[:1], vocab, vocab, tokens_per_row=128, chunk=7)
    assert full[0]["tail"].max() <= 1e-5


def test_padded_teacher_is_renormalised_over_the_student_vocabulary(teacher, padded,
                                                                    tiny_model):
    """The padded teacher's logits on ids < V are the teacher's: dropping ids >= V and
    renormalising gives exactly the teacher's capture; the dropped entries are counted."""
    import numpy as np
    import torch

    from stages.lib.topk import packed_topk

    seqs, _ = _seqs(teacher, tiny_model)
    vocab = _vocab(teacher)
    assert _vocab(padded) == vocab + PAD
    with torch.inference_mode():
        plain = packed_topk(_load(teacher), seqs, 8, vocab, tokens_per_row=128, chunk=16)
        wide = packed_topk(_load(padded), seqs, 8, vocab, tokens_per_row=128, chunk=16)
        # what the padded teacher's own full-vocabulary top-8 looks like: padded ids in it
        unrestricted = packed_topk(_load(padded), seqs, 8, vocab + PAD, 128, 16)
    for p, w, u in zip(plain, wide, unrestricted):
        assert (w["ids"] < vocab).all()
        np.testing.assert_allclose(w["logps"], p["logps"], atol=1e-5)
        np.testing.assert_allclose(w["token_logp"], p["token_logp"], atol=1e-5)
        assert np.array_equal(w["dropped"], (u["ids"] >= vocab).sum(-1))
        sums = np.exp(w["logps"].astype(np.float64)).sum(-1) + w["tail"]
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    assert sum(int(w["dropped"].sum()) for w in wide) > 0
    assert max(float(w["padded_mass"].max()) for w in wide) > 0


# --- bad input (driver, before Ray) -------------------------------------------------------------

def test_refused_tokenizer_pair_names_both_models(tmp_path, other_vocab, tiny_model):
    r = recipe(tmp_path, other_vocab, tiny_model)
    with pytest.raises(UserError, match="cross-tokenizer distillation is not supported") as e:
        run_stage("distributions", r, log=lambda *_: None)
    assert other_vocab in str(e.value) and tiny_model in str(e.value)
    assert not glob.glob(str(tmp_path / "data" / "distributions" / ".tmp-*" / "part-*"))


def test_k_larger_than_the_vocabulary_is_refused(tmp_path, teacher, tiny_model):
    with pytest.raises(UserError, match=r"distributions.k: 5000 is larger than the vocabulary"):
        run_stage("distributions", recipe(tmp_path, teacher, tiny_model, "distributions.k=5000"),
                  log=lambda *_: None)
    with pytest.raises(UserError, match="distributions.overlong"):
        run_stage("distributions", recipe(tmp_path, teacher, tiny_model,
                                          "distributions.overlong=cut"), log=lambda *_: None)
    with pytest.raises(UserError, match="distributions.teacher is empty"):
        run_stage("distributions", recipe(tmp_path, "''", tiny_model), log=lambda *_: None)


# --- the stage through the runner ---------------------------------------------------------------

@pytest.fixture(scope="module")
def captured(tmp_path_factory, ray_cluster, teacher, padded, tiny_model):
    """distributions over the hand-written select version, with the teacher and with the
    padded teacher (shards of 2 rows: 3 shards)."""
    tmp = tmp_path_factory.mktemp("dist-stage")
    r = recipe(tmp, teacher, tiny_model)
    v = run_stage("distributions", r, log=lambda *_: None)
    wide = run_stage("distributions", recipe(tmp, padded, tiny_model), log=lambda *_: None)
    return dict(tmp=tmp, recipe=r, version=v, padded=wide, rows=v.read_table().to_pylist())


def test_stage_rows_match_a_direct_forward_in_fp16(captured, teacher, tiny_model):
    """Every SFT row once, select's columns kept, positions = sft's completion tokens; the
    stored top-k equals a plain forward within fp16 storage: |x| * 2^-11 + 1e-4."""
    import numpy as np

    rows, v = captured["rows"], captured["version"]
    assert [r["trace_id"] for r in rows] == [f"t{i:02d}" for i in (0, 3, 1, 4, 2)]  # by problem
    for col in ("problem_id", "trace_id", "messages", "difficulty", "source", "completion_ids",
                "topk_ids", "topk_logps", "token_logp", "tail_mass"):
        assert col in v.manifest["schema"], col
    assert v.manifest["schema"]["topk_ids"] == "list<element: list<element: int32>>"
    assert v.manifest["schema"]["topk_logps"] == "list<element: list<element: halffloat>>"
    assert v.manifest["schema"]["token_logp"] == "list<element: halffloat>"
    assert v.manifest["schema"]["tail_mass"] == "list<element: halffloat>"
    assert v.manifest["schema"]["completion_ids"] == "list<element: int32>"
    seqs, _ = _seqs(teacher, tiny_model)
    by_id = {f"t{i:02d}": s for i, s in enumerate(seqs)}
    refs = dict(zip(by_id, _direct(teacher, seqs, _vocab(teacher), 8)))
    for r in rows:
        ids, n = by_id[r["trace_id"]]
        assert r["completion_ids"] == ids[n:]                    # the tokens sft trains on
        assert len(r["topk_ids"]) == len(r["topk_logps"]) == len(r["token_logp"]) == \
            len(r["tail_mass"]) == len(ids) - n
        assert all(len(x) == 8 for x in r["topk_ids"])
        lp, ref_ids = refs[r["trace_id"]]
        logps = np.asarray(r["topk_logps"], np.float32)
        # fp16: half an ulp is |x| * 2^-11 at most, plus the fp32 capture's own 1e-4
        tol = float(np.abs(logps).max()) * 2 ** -11 + 1e-4
        _check_against_direct(r["topk_ids"], logps, r["token_logp"], r["tail_mass"], lp,
                              ref_ids, ids[n:], tol, fp16=True)
        assert r["padded_dropped"] == 0


def test_stage_manifest_stats(captured):
    v = captured["version"]
    stats, rows = v.manifest["stats"], captured["rows"]
    positions = sum(len(r["completion_ids"]) for r in rows)
    assert stats["rows"] == 5 and stats["positions"] == positions and stats["k"] == 8
    assert stats["bytes_per_token_raw"] == 6 * 8 + 8   # k=32: 192 + 8 = 200
    assert 0 < stats["bytes_per_token_parquet"] < 200
    assert stats["truncated"] == 1 and stats["padded_dropped"] == 0
    assert stats["shards"] == 3 and stats["shards_captured_this_run"] == 3
    assert v.manifest["drops"] == {}
    assert v.manifest["inputs"] == {"select": "test0select0"}


def test_stage_padded_teacher_drops_and_counts(captured):
    """Through the stage: the padded teacher's rows equal the teacher's (the same fp32 values
    rounded to fp16 alike), its dropped entries are in the manifest."""
    import numpy as np

    wide = captured["padded"].read_table().to_pylist()
    for a, b in zip(wide, captured["rows"]):
        assert a["trace_id"] == b["trace_id"] and a["topk_ids"] == b["topk_ids"]
        np.testing.assert_allclose(np.asarray(a["topk_logps"], np.float32),
                                   np.asarray(b["topk_logps"], np.float32), atol=2e-3)
    stats = captured["padded"].manifest["stats"]
    assert stats["padded_dropped"] == sum(r["padded_dropped"] for r in wide) > 0
    assert 0 < stats["padded_mass_max"] < 1
    vocab = stats["student_vocab"]
    assert stats["teacher_vocab"] == vocab + PAD and vocab == _vocab(captured["recipe"].student)


def test_stage_resumes_only_the_missing_shards(captured):
    """A run that stopped after its first shard (the version's temp folder holds part 0 only):
    the rerun captures shards 1 and 2, and every row is there once, as before."""
    from pipeline.store import Store

    v, r = captured["version"], captured["recipe"]
    store = Store(r.data_root)
    tmp = store.tmp_dir("distributions", v.version)
    os.makedirs(tmp)
    shutil.copy(os.path.join(v.path, "part-00000.parquet"), tmp)
    shutil.rmtree(v.path)
    again = run_stage("distributions", r, log=lambda *_: None)
    assert again.version == v.version
    assert again.manifest["stats"]["shards_captured_this_run"] == 2
    assert again.read_table().to_pylist() == captured["rows"]


def test_drop_rows_as_sft_does(tmp_path, ray_cluster, teacher, tiny_model):
    """overlong=drop: the truncated row is left out and counted as sft counts it."""
    v = run_stage("distributions", recipe(tmp_path, teacher, tiny_model,
                                          "distributions.overlong=drop",
                                          "distributions.shard_size=8"), log=lambda *_: None)
    assert v.manifest["drops"] == {"over_max_length": 1}
    assert sorted(r["trace_id"] for r in v.read_table(columns=["trace_id"]).to_pylist()) == \
        ["t00", "t01", "t02", "t04"]


@pytest.mark.slow
def test_kill_9_then_rerun_captures_every_row_once(tmp_path, teacher, tiny_model):
    """A real `distillery run distributions` is SIGKILLed after its first shard; the same
    command rerun captures only the missing shards, and every row is there exactly once."""
    from test_sft import _kill_tree

    from pipeline.store import Store

    data = tmp_path / "data"
    traces = [f"<think>\nAdd one to {i}. " * (4 + i % 5) + f"\n</think>\n\n\\boxed{{{i}}}"
              for i in range(24)]
    write_select(str(data), traces)
    cli_recipe = tmp_path / "cli.yaml"
    cli_recipe.write_text(f"data_root: {data}\nteacher: {teacher}\nstudent: {tiny_model}\n"
                          "distributions: {shard_size: 1, max_length: 256, k: 8}\n")
    cmd = [os.path.join(os.path.dirname(sys.executable), "distillery"), "run", "distributions",
           "--recipe", str(cli_recipe)]
    ray_tmp = tempfile.mkdtemp(prefix="ray-dist-", dir="/tmp")
    env = dict(os.environ, DISTILLERY_RAY_TMP=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    # Bad input first: exit 2 naming the key, no traceback, no version.
    bad = subprocess.run(cmd + ["distributions.k=100000"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "distributions.k" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and Store(str(data)).latest("distributions") is None

    log_path = tmp_path / "killed.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    parts = str(data / "distributions" / ".tmp-*" / "part-*.parquet")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not glob.glob(parts):
            time.sleep(0.01)
        assert proc.poll() is None, log_path.read_text()[-3000:]
    finally:
        _kill_tree(proc, ray_tmp)
    done_before = len(glob.glob(parts))
    assert 0 < done_before < 24, done_before
    assert not Store(str(data)).latest("distributions")            # nothing looks complete

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{done_before} already captured" in rerun.stdout
    assert "B/token raw" in rerun.stdout
    v = Store(str(data)).latest("distributions")
    assert v.manifest["stats"]["shards_captured_this_run"] == 24 - done_before
    got = v.read_table(columns=["trace_id", "topk_ids", "completion_ids"]).to_pylist()
    assert sorted(r["trace_id"] for r in got) == [f"t{i:02d}" for i in range(24)]
    assert all(len(r["topk_ids"]) == len(r["completion_ids"]) > 0 for r in got)


# --- reusing provenance's teacher forward --------------------------------------------------------

REUSE_ROWS = [  # (problem, answer, trace): prune keeps them, verify marks all but the last correct
    ("Compute 2 + 2.", "4", TRACES[0]), ("Compute 2 + 2.", "4", TRACES[4].replace("9", "4")),
    ("Compute 1 + 0.", "1", TRACES[1]), ("Compute 3 + 4.", "7", TRACES[2]),
    ("Compute 4 + 5.", "9", TRACES[3]), ("Compute 2 + 2.", "4", "<think>\nHmm.\n</think>\n\n"
                                         "\\boxed{5}")]


def _reuse_recipe(tmp, teacher, student, *overrides):
    """generate (hand-written REUSE_ROWS) -> verify -> prune -> provenance -> select ->
    distributions in one data root. provenance scores 80 tokens at most and distributions
    takes 96: the long trace (TRACES[3]) is the one row whose tokens differ."""
    from test_verify import TEST_STAGES, trace

    stages = {**TEST_STAGES, "distributions": STAGES["distributions"]}
    rows = [trace(p, a, t, i) for i, (p, a, t) in enumerate(REUSE_ROWS)]
    (tmp / "rows.json").write_text(json.dumps(rows))
    (tmp / "recipe.yaml").write_text(
        f"data_root: {tmp / 'data'}\nteacher: {teacher}\nstudent: {student}\n"
        f"generate: {{path: {tmp / 'rows.json'}}}\n"
        "prune: {budgets: {easy: 100000, medium: 100000, hard: 100000}}\n"
        "provenance: {rule: all, max_length: 80, shard_size: 3, chunk: 16, topk: 8}\n"
        "select: {sft_per_problem: 0}\n"
        f"distributions: {{max_length: {MAX_LENGTH}, shard_size: 2, tokens_per_row: 128, "
        "chunk: 16, k: 8}\n")
    return load_recipe(str(tmp / "recipe.yaml"), list(overrides), stages)


def _through_select(recipe, *names) -> dict:
    return {name: run_stage(name, recipe, stages=recipe.stage_defs, log=lambda *_: None)
            for name in names}


@pytest.fixture(scope="module")
def reused(tmp_path_factory, ray_cluster, teacher, tiny_model):
    """The same SFT rows captured twice: after a provenance that kept the teacher's top-8 (reuse)
    and after provenance.method=none (no teacher forward to reuse: every row scored)."""
    tmp = tmp_path_factory.mktemp("dist-reuse")
    r = _reuse_recipe(tmp, teacher, tiny_model)
    prov = _through_select(r, "generate", "verify", "prune", "provenance", "select")["provenance"]
    with_reuse = run_stage("distributions", r, stages=r.stage_defs, log=lambda *_: None)
    none = _reuse_recipe(tmp, teacher, tiny_model, "provenance.method=none")
    _through_select(none, "provenance", "select")
    fresh = run_stage("distributions", none, stages=none.stage_defs, log=lambda *_: None)
    return dict(tmp=tmp, recipe=r, prov=prov, reuse=with_reuse, fresh=fresh)


def test_reuse_equals_a_fresh_capture(reused):
    """Rows taken from provenance's side dataset equal the rows the teacher scores here, within
    fp16 storage (the two forwards pack the rows differently: fp32 rounding, then one fp16
    ulp at most); the long row provenance truncated shorter is scored, and counted."""
    import numpy as np

    a, b = reused["reuse"], reused["fresh"]
    assert a.version != b.version                      # provenance's settings reach the hash
    sa, sb = a.manifest["stats"], b.manifest["stats"]
    assert sa["rows"] == sb["rows"] == 5
    assert sa["rows_reused_from_provenance"] == 4 and sa["rows_scored"] == 1
    assert sa["rows_reused_this_run"] == 4 and sa["rows_scored_this_run"] == 1
    assert sa["provenance_reuse"] == reused["prov"].ref()
    assert sb["rows_reused_from_provenance"] == 0 and sb["rows_scored"] == 5
    assert "method 'none'" in sb["provenance_reuse"]
    assert a.manifest["schema"] == b.manifest["schema"]
    rows_a, rows_b = a.read_table().to_pylist(), b.read_table().to_pylist()
    assert [r["trace_id"] for r in rows_a] == [r["trace_id"] for r in rows_b]
    compared = 0
    for x, y in zip(rows_a, rows_b):
        assert x["completion_ids"] == y["completion_ids"] and x["messages"] == y["messages"]
        la, lb = (np.asarray(r["topk_logps"], np.float32) for r in (x, y))
        ulp = np.abs(lb) * 2 ** -10 + 1e-5             # one fp16 ulp, the fp32 difference
        assert (np.abs(la - lb) <= ulp).all()
        ia, ib = np.asarray(x["topk_ids"]), np.asarray(y["topk_ids"])
        # an entry whose value is clear of its neighbours' (no near tie) has the same id
        gap = np.abs(np.diff(lb, axis=1)) > 2 * ulp[:, 1:]
        clear = np.pad(gap, ((0, 0), (1, 0)), constant_values=True) & \
            np.pad(gap, ((0, 0), (0, 1)), constant_values=True)
        assert (ia[clear] == ib[clear]).all()
        compared += int(clear.sum())
        for col in ("token_logp", "tail_mass"):
            va, vb = (np.asarray(r[col], np.float32) for r in (x, y))
            assert (np.abs(va - vb) <= np.abs(vb) * 2 ** -10 + 1e-5).all(), col
        assert x["padded_dropped"] == y["padded_dropped"] == 0
    # random-init tiny models are near-uniform: many entries sit within an ulp of a neighbour
    assert compared > 0.25 * sum(len(r["topk_ids"]) * 8 for r in rows_b)


def test_provenance_keeps_the_selected_traces_topk(reused):
    """provenance's side dataset: the selected (correct) traces only, hidden from the version's
    readers (pandas opens the version folder as before), with its k, support and dtype."""
    import pandas as pd
    import pyarrow.parquet as pq

    prov = reused["prov"]
    stats = prov.manifest["stats"]
    assert stats["topk"] == 8 and stats["topk_dtype"] == "float32"
    assert stats["topk_vocab"] == _vocab(reused["recipe"].student)
    side = pq.read_table(os.path.join(prov.path, ".teacher_topk")).to_pylist()
    rows = prov.read_table().to_pylist()
    assert sorted(r["trace_id"] for r in side) == \
        sorted(r["trace_id"] for r in rows if r["selected"])
    assert stats["topk_traces"] == len(side) == 5
    assert stats["topk_positions"] == sum(len(r["topk_ids"]) for r in side)
    for r in side:
        assert len(r["topk_ids"]) == len(r["teacher_ids"]) - r["teacher_prompt_len"] > 0
    assert len(pd.read_parquet(prov.path)) == len(rows) == 6
    assert not glob.glob(os.path.join(prov.path, ".scored*"))


def test_another_chat_template_falls_back_to_scoring(reused, teacher, tiny_model):
    """A teacher with the student's tokenizer but its own chat template (a system turn): the
    tokens provenance's teacher scored are not the student-form ones, so no row is reused;
    every row is scored and counted, and the capture equals the plain teacher's."""
    import numpy as np

    templated = reused["tmp"] / "templated-teacher"
    shutil.copytree(teacher, templated)
    jinja = templated / "chat_template.jinja"
    jinja.write_text("{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}" + jinja.read_text())
    r = _reuse_recipe(reused["tmp"], str(templated), tiny_model)
    _through_select(r, "provenance", "select")
    v = run_stage("distributions", r, stages=r.stage_defs, log=lambda *_: None)
    stats = v.manifest["stats"]
    assert stats["rows_reused_from_provenance"] == 0 and stats["rows_scored"] == 5
    assert stats["provenance_reuse"].startswith("provenance@")     # usable, no row matched
    for x, y in zip(v.read_table().to_pylist(), reused["fresh"].read_table().to_pylist()):
        assert x["trace_id"] == y["trace_id"]
        np.testing.assert_array_equal(np.asarray(x["topk_logps"], np.float32),
                                      np.asarray(y["topk_logps"], np.float32))


def test_reuse_resumes_and_counts_the_whole_version(reused):
    """A reusing run that stopped after its first shard: the rerun captures shards 1 and 2 (the
    rows it reuses read again from provenance), the rows are those of the uninterrupted run, and
    the counts cover the whole version, with this run's beside them."""
    from pipeline.store import Store

    v, r = reused["reuse"], reused["recipe"]
    rows = v.read_table().to_pylist()
    tmp = Store(r.data_root).tmp_dir("distributions", v.version)
    os.makedirs(tmp)
    shutil.copy(os.path.join(v.path, "part-00000.parquet"), tmp)
    shutil.rmtree(v.path)
    again = run_stage("distributions", r, pins=v.manifest["inputs"], stages=r.stage_defs,
                      log=lambda *_: None)      # pinned: a later test made another select
    assert again.version == v.version and again.read_table().to_pylist() == rows
    stats = again.manifest["stats"]
    assert stats["rows_reused_from_provenance"] == 4 and stats["rows_scored"] == 1
    assert stats["shards_captured_this_run"] == 2
    assert stats["rows_reused_this_run"] + stats["rows_scored_this_run"] == 3


VLLM_SCRIPT = """
import json, os, sys
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
seqs, k = json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
llm = LLM(model=sys.argv[1], max_model_len=1024, seed=0, enforce_eager=True, dtype="float32",
          max_logprobs=k)
params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in seqs], params, use_tqdm=False)
res = [[{str(t): [lp.logprob, lp.rank] for t, lp in o.prompt_logprobs[i].items()}
        for i in range(n, len(ids))] for o, (ids, n) in zip(outs, seqs)]
print("TOPK " + json.dumps(res), flush=True)
llm.llm_engine.engine_core.shutdown()
os._exit(0)
"""


@pytest.mark.slow
def test_topk_matches_vllm_prompt_logprobs(teacher, tiny_model, tmp_path):
    """The same token ids through vLLM's prompt_logprobs=k (dtype float32, temperature 1,
    max_logprobs=k: the engine's default cap is 20): the same top-k, log-probs within 1e-4
    (ids compared where vLLM's adjacent values are more than 2e-4 apart)."""
    import json

    import torch

    from stages.lib.topk import packed_topk

    k = 24  # above vLLM's default max_logprobs of 20
    seqs, _ = _seqs(teacher, tiny_model)
    with torch.inference_mode():
        got = packed_topk(_load(teacher), seqs, k, _vocab(teacher), tokens_per_row=256)
    path = tmp_path / "seqs.json"
    path.write_text(json.dumps(seqs))
    env = dict(os.environ, TMPDIR=str(tmp_path), VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, teacher, str(path), str(k)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [x for x in done.stdout.splitlines() if x.startswith("TOPK ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    worst, compared = 0.0, 0
    for g, positions in zip(got, json.loads(lines[0][len("TOPK "):])):
        assert len(positions) == len(g["ids"])
        for ids, logps, entries in zip(g["ids"], g["logps"], positions):
            # vLLM: the k ranked entries, plus the prompt's own token when it ranks below k
            ranked = sorted((rank, int(t), lp) for t, (lp, rank) in entries.items() if rank <= k)
            assert len(ranked) == k
            vals = [lp for _, _, lp in ranked]
            worst = max(worst, max(abs(a - b) for a, b in zip(logps.tolist(), vals)))
            if min(a - b for a, b in zip(vals, vals[1:])) > 2e-4:
                assert ids.tolist() == [t for _, t, _ in ranked]
                compared += 1
    print(f"max |ours - vLLM prompt_logprobs| over the top-{k} = {worst:.2e}; "
          f"{compared} positions with clear order compared by id")
    assert worst <= 1e-4 and compared > 0
