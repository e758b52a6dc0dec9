"""`compare-teachers --demo`: the demo's second teacher (another style mix, its own cache
folder) and the recipe items that put both teachers into one generate.

The full comparison (two 1500-step teachers, 3 seeds) is measured in docs/demo.md, not run here;
a shortened compare-teachers run on imported traces is tests/test_teachers.py.
"""
from __future__ import annotations

import json
import os

from pipeline.apps.compare_teachers import ARM_KEYS, demo_items, short_name
from pipeline.apps.demo import CHECKED_STYLE_MIX, STYLE_MIX, TASK, ensure_models, load
from stages.lib.synthetic import make_problems

TINY = dict(steps=4, student_steps=2, batch=8, lr=1e-3, seed=0, train_n=200, train_seed=1,
            shape=dict(layers=1, hidden=128, heads=2, kv_heads=1, intermediate=256, vocab=512))


def test_second_style_mix_is_its_own_cached_teacher(tmp_path):
    held_out = [p["problem"] for p in make_problems(20, seed=7, **TASK)]
    root, logs = str(tmp_path / "data"), []
    first, student, info = ensure_models(root, held_out, settings=TINY, log=logs.append)
    checked, student2, info2 = ensure_models(root, held_out, settings=TINY, log=logs.append,
                                             style_mix=CHECKED_STYLE_MIX, name="teacher-checked")
    assert CHECKED_STYLE_MIX != STYLE_MIX
    assert os.path.basename(checked).startswith("teacher-checked-")
    assert os.path.basename(first).startswith("teacher-") and first != checked
    assert info["style_mix"] == STYLE_MIX and info2["style_mix"] == CHECKED_STYLE_MIX
    # Phase 1 does not see the style mix: both runs' students are the same snapshot.
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(student).state_dict()
    b = AutoModelForCausalLM.from_pretrained(student2).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Cached: a second call trains nothing.
    again = ensure_models(root, held_out, settings=TINY, log=logs.append,
                          style_mix=CHECKED_STYLE_MIX, name="teacher-checked")
    assert again[0] == checked and "found" in logs[-1]


def test_demo_items_put_both_teachers_into_one_generate(tmp_path):
    root = str(tmp_path / "data")
    items = demo_items("configs/tiny.yaml", [f"data_root={root}", "sft.epochs=1"],
                       log=lambda *_: None, settings=TINY)
    recipe = load("configs/tiny.yaml", items)
    teachers = recipe.configs["generate"].teachers
    assert len(teachers) == 2 and os.path.basename(teachers[1]).startswith("teacher-checked-")
    assert all(os.path.exists(os.path.join(t, "config.json")) for t in teachers)
    assert recipe.configs["sft"].epochs == 1  # the user's items come last
    assert recipe.configs["generate"].n == 4  # the demo's settings
    assert json.loads(json.dumps(teachers)) == teachers
    # Nothing compare-teachers sets per arm (it refuses those keys on its command line).
    assert not [i for i in items if i.split("=", 1)[0] in ARM_KEYS]
    assert [short_name(t) for t in teachers] == [os.path.basename(t) for t in teachers]


def test_short_name():
    assert short_name("Qwen/QwQ-32B") == "Qwen/QwQ-32B"  # not a local folder: as it is
    long = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert short_name(long) == "…" + long[-27:] and len(short_name(long)) == 28
