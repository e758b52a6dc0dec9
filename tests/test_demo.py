"""The demo's model cache (a very short two-phase teacher run, its student snapshot, a cache
hit), its training draws, and the effects lines it prints.

The full demo (`distillery demo`, minutes) is measured in docs/demo.md, not run in CI; a
shortened `--ablations` run is tests/test_ablations.py.
"""
from __future__ import annotations

import os
import random

from pipeline.apps.demo import (DAP_DEMO_PROMPTS, STYLE_MIX, TASK, effects, ensure_models,
                           rewrite_draw, trace_draw)
from stages.lib.synthetic import make_problems

TINY = dict(steps=4, student_steps=2, batch=8, lr=1e-3, seed=0, train_n=200, train_seed=1,
            shape=dict(layers=1, hidden=128, heads=2, kv_heads=1, intermediate=256, vocab=512))


def test_teacher_student_trained_once_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = [p["problem"] for p in make_problems(20, seed=7, **TASK)]
    root = str(tmp_path / "data")
    logs = []
    teacher, student, info = ensure_models(root, held_out, settings=TINY, log=logs.append)
    assert os.path.dirname(teacher) == os.path.join(root, "models")
    assert info["held_out_excluded"] == 20 and info["loss"][-1][0] == 4
    # Same tokenizer (a student must read the teacher's traces token for token), head_dim 64.
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    assert t_tok.get_vocab() == s_tok.get_vocab() and t_tok.chat_template == s_tok.chat_template
    t_model = AutoModelForCausalLM.from_pretrained(teacher)
    s_model = AutoModelForCausalLM.from_pretrained(student)
    cfg = t_model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    # The snapshot (step 2) differs from the final weights (step 4).
    assert any((a - b).abs().max() > 0 for a, b in
               zip(t_model.parameters(), s_model.parameters()))

    again = ensure_models(root, held_out, settings=TINY, log=logs.append)
    assert again[:2] == (teacher, student)
    assert "found" in logs[-1]
    # A different held-out set must not reuse a teacher that may have trained on it.
    other = ensure_models(root, held_out[:10], settings=TINY, log=logs.append)
    assert other[0] != teacher


def test_phase_draws_balance_levels_and_mix_styles_and_rewrites():
    from stages.lib.dap_prompts import load_dap_prompts

    problems = make_problems(3000, seed=1, **TASK)
    rng = random.Random(0)
    student_phase = trace_draw(problems, {"concise": 1.0}, 0.5)
    rows = [student_phase(rng) for _ in range(3000)]
    # The student's phase never shows a check line, a detour or the rewrite frame.
    assert not any("check" in r["solution"] or "wait" in r["solution"]
                   or "We need" in r["solution"] or "Rewrite" in r["problem"] for r in rows)
    ops = [r["problem"].count("+") + r["problem"].count("-") for r in rows]
    levels = sorted({p["difficulty"] for p in problems})
    assert len(levels) >= 2
    for k in levels:                            # levels drawn uniformly, not by their counts
        assert abs(ops.count(k) / len(ops) - 1 / len(levels)) < 0.04
    teacher_phase = trace_draw(problems, STYLE_MIX, 0.5)
    traces = [teacher_phase(rng)["solution"] for _ in range(4000)]
    checked = sum("check:" in t for t in traces) / len(traces)
    assert abs(checked - STYLE_MIX["checked"]) < 0.04
    rewrites = rewrite_draw(problems, load_dap_prompts(DAP_DEMO_PROMPTS), STYLE_MIX, 0.5)
    rows = [rewrites(rng) for _ in range(200)]
    assert all(r["problem"].startswith("Rewrite concisely.") for r in rows)
    assert all(r["solution"].startswith("Difficulty: ") for r in rows)


def test_effects_lines_from_the_manifests():
    prune = {"mode": "budget", "per_level": {
        "easy": {"correct_traces": 10, "kept": 10, "mean_tokens_before": 40.0,
                 "mean_tokens_after": 30.0},
        "medium": {"correct_traces": 30, "kept": 10, "mean_tokens_before": 60.0,
                   "mean_tokens_after": 36.0},
        "hard": {"correct_traces": 0, "kept": 0, "mean_tokens_before": None,
                 "mean_tokens_after": None}}}
    provenance = {"rule": "paper", "teacher_share_mean_selected": 0.42,
                  "teacher_share_mean_unselected": 0.1, "sentence_label_shares": {"teacher": 0.2}}
    select = {"sft_rows": 20, "mean_sft_tokens": 33.0, "sft_problems": 20, "pairs": 7}
    lines = effects(prune, provenance, select)
    # (10*40 + 30*60) / 40 = 55.0 before; (10*30 + 10*36) / 20 = 33.0 after: -40%
    assert lines[0] == "DAP (budget): correct traces 40 -> kept 20; mean tokens 55.0 -> 33.0 (-40%)"
    assert "0.420 in the selected correct traces vs 0.100 in the unselected" in lines[1]
    assert lines[2].startswith("select: 20 SFT rows (mean 33.0 tokens) from 20 problems, 7 REDI")
    rewrite = {"mode": "rewrite", "rewrites_asked": 8, "acceptance_rate": 0.75,
               "mean_tokens_before": 60.0, "mean_tokens_after": 45.0}
    assert effects(rewrite, {}, select)[0] == ("DAP (rewrite): 8 correct traces judged + "
                                               "rewritten, accepted 75%; mean tokens 60.0 -> "
                                               "45.0 (-25%)")
