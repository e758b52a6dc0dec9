"""The demo's model cache: a (very short) teacher run, its student snapshot, then a cache hit.

The full demo (`distillery demo`, minutes) is measured in docs/demo.md, not run in CI.
"""
from __future__ import annotations

import os

from pipeline.demo import TASK, ensure_models
from stages.synthetic import make_problems

TINY = dict(steps=4, batch=8, lr=1e-3, seed=0, train_n=200, train_seed=1, balance_levels=True,
            shape=dict(layers=1, hidden=128, heads=2, kv_heads=1, intermediate=256, vocab=512))


def test_teacher_student_trained_once_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = [p["problem"] for p in make_problems(20, seed=7, **TASK)]
    root = str(tmp_path / "data")
    logs = []
    teacher, student, info = ensure_models(root, held_out, settings=TINY, student_steps=2,
                                           log=logs.append)
    assert os.path.dirname(teacher) == os.path.join(root, "models")
    assert info["held_out_excluded"] == 20 and len(info["loss"]) == 1
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

    again = ensure_models(root, held_out, settings=TINY, student_steps=2, log=logs.append)
    assert again[:2] == (teacher, student)
    assert "found" in logs[-1]
    # A different held-out set must not reuse a teacher that may have trained on it.
    other = ensure_models(root, held_out[:10], settings=TINY, student_steps=2, log=logs.append)
    assert other[0] != teacher
